"""Text-to-image generation with an exported adapter: LLM + adapter stand in for CLIP.

SD1.5 and SDXL bases run through diffusers' own pipelines, handed ``prompt_embeds`` (and
``pooled_prompt_embeds`` for SDXL), so users keep diffusers' schedulers and speed-ups; the
demo's pixel-space base runs through `PixelDiffusionPipeline` with the same scheduler API.
The negative prompt goes through the same LLM + adapter, and prompts are batched.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from linguadiff.export import ADAPTER_FILE, METADATA_FILE, find_export, read_export_metadata
from linguadiff.models.lora import LORA_DIR, LORA_WEIGHTS, apply_export_lora
from linguadiff.models.prompt_encoder import PromptEncoder
from linguadiff.models.text_encoder import torch_dtype

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """`auto`: the GPU when there is one, in bfloat16; else the CPU in float32."""
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype if dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return device, dtype


def make_scheduler(name: str, config: dict[str, Any]):
    """A diffusers sampler built from the base's noise-schedule config."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "dpm++":  # the paper's sampler: DPM-Solver++ with Karras sigmas
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", use_karras_sigmas=True)
    samplers = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "ddpm": DDPMScheduler}
    if name not in samplers:
        raise ValueError(f"unknown scheduler {name!r}; choose one of dpm++, {', '.join(samplers)}")
    return samplers[name].from_config(config)


def find_adapter(path: str | Path) -> Path:
    """`path` may be the adapter file, an export folder or a run_dir. A control run's export
    (text_encoder=clip) has no adapter, and says so (`find_export` finds either kind)."""
    path = Path(path).expanduser()
    for candidate in (path, path / ADAPTER_FILE, path / "export" / ADAPTER_FILE):
        if candidate.is_file() and candidate.name != METADATA_FILE:
            return candidate
    for candidate in (path, path / METADATA_FILE, path / "export" / METADATA_FILE):
        if candidate.is_file() and candidate.name == METADATA_FILE:
            raise FileNotFoundError(f"{path} is a control run's export (text_encoder=clip: the base's own CLIP, "
                                    f"no adapter): it has no {ADAPTER_FILE}")
    raise FileNotFoundError(
        f"no {ADAPTER_FILE} at {path} (nor in {path / 'export'}): has that run finished? "
        "Export happens at the end of training."
    )


@dataclass
class Generator:
    """A text encoder (``encode(prompts) -> {"context", "pooled"}``) + the base's diffusion pipeline."""

    encoder: Any  # a PromptEncoder (LLM + adapter), or the base's own CLIP (CLIPTeacher: the base, a control run)
    pipeline: Any
    kind: str
    metadata: dict[str, Any]
    defaults: dict[str, Any]

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        base_path: str | None = None,
        llm_path: str | None = None,
        trust_remote_code: bool = False,
    ) -> "Generator":
        """The run's export (`run_dir`, its export folder or the adapter file) with its base.
        `trust_remote_code`: the user allows the LLM's remote code if its metadata asks for it.
        A control run's export (text_encoder=clip) draws with the base's own CLIP, in the
        form it trained with (the pipelines' own).

        The LLM and base the export's metadata names are loaded only from this machine (a
        local folder or the Hugging Face cache): an export is a file from elsewhere, and does
        not get to start downloads. `llm_path` / `base_path`, the user's own choice, may."""
        export = find_export(run_dir)
        meta = read_export_metadata(export)
        control = meta.get("text_encoder") == "clip"
        if llm_path is None and not control:
            require_on_this_machine(meta["llm"]["path"], "LLM", "llm", meta["llm"].get("revision"), "config.json")
        if base_path is None:
            base = meta["base_model"]
            require_on_this_machine(base["path"], "base model", "base", base.get("revision"), "model_index.json")
        if control:
            from linguadiff.models.clip_teacher import CLIPTeacher, teacher_kind

            base = meta["base_model"]
            encoder = CLIPTeacher(base_path or base["path"], teacher_kind(base["kind"]), dtype=dtype, windows=1,
                                  revision=None if base_path else base.get("revision")).eval()
        else:
            encoder, meta = PromptEncoder.from_export(export / ADAPTER_FILE, llm_path=llm_path, dtype=dtype,
                                                      trust_remote_code=trust_remote_code)
        base = meta["base_model"]
        kind, path = base["kind"], base_path or base["path"]
        # A stage-2/3 export carries its trained UNet beside the adapter (unet/: the whole UNet),
        # or a LoRA for the base's (lora/, train.unet=lora), put on with diffusers' own loader.
        unet_dir, lora_dir = export / "unet", export / LORA_DIR
        pipeline = load_pipeline(kind, path, unet_dir if unet_dir.is_dir() else None, torch_dtype(dtype), base.get("revision"))
        if not unet_dir.is_dir() and (lora_dir / LORA_WEIGHTS).is_file():
            apply_export_lora(pipeline, lora_dir)
        pipeline.set_progress_bar_config(disable=True)
        encoder.to(device)
        pipeline.to(device)
        return cls(encoder=encoder, pipeline=pipeline, kind=kind, metadata=meta, defaults=dict(meta.get("generate", {})))

    @classmethod
    def from_base(cls, base_path: str, kind: str, device: str = "cpu", dtype: str = "float32",
                  revision: str | None = None, **defaults) -> "Generator":
        """The base model with its own CLIP text encoder: the reference the adapter must match."""
        from linguadiff.models.clip_teacher import CLIPTeacher, teacher_kind

        # The pipeline's own conditioning (one window of 77 tokens for SDXL), as diffusers draws with the base.
        encoder = CLIPTeacher(base_path, kind=teacher_kind(kind), dtype=dtype, windows=1, revision=revision).to(device)
        pipeline = load_pipeline(kind, base_path, None, torch_dtype(dtype), revision)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.to(device)
        return cls(encoder=encoder.eval(), pipeline=pipeline, kind=kind, metadata={}, defaults=defaults)

    def __call__(
        self,
        prompts: list[str],
        negative_prompt: str | None = None,
        num_images: int = 1,
        seed: int | Sequence[int] = 0,
        steps: int | None = None,
        guidance: float | None = None,
        scheduler: str | None = None,
        batch_size: int = 16,
        height: int | None = None,
        width: int | None = None,
    ) -> list[tuple[int, int, Image.Image]]:
        """Draw `num_images` per prompt; image j of every prompt uses seed `seed + j`, so
        the same seed compares prompts (and languages) on the same starting noise. A list
        of seeds gives each prompt its own (image j of prompt i: `seed[i] + j`), so a set of
        different prompts is not drawn from one noise. Returns (prompt index, image index,
        image) triples. `height` / `width` (pixels; None: the base's default square) must be
        multiples of `size_multiple`."""
        self.check_size(height, width)
        seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        steps = steps or self.defaults.get("steps", 50)
        guidance = guidance if guidance is not None else self.defaults.get("guidance", 7.5)
        negative_prompt = negative_prompt if negative_prompt is not None else self.defaults.get("negative_prompt", "")
        self.pipeline.scheduler = make_scheduler(scheduler or self.defaults.get("scheduler", "dpm++"), self.pipeline.scheduler.config)
        jobs = [(i, j) for i in range(len(prompts)) for j in range(num_images)]
        negative = self._encode([negative_prompt])
        results = []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            cond = self._encode([prompts[i] for i, _ in chunk])
            generators = [torch.Generator().manual_seed(seeds[i] + j) for i, j in chunk]
            images = self._draw(cond, negative, len(chunk), steps, guidance, generators, height, width)
            results += [(i, j, im) for (i, j), im in zip(chunk, images)]
        return results

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor | None]:
        return self.encoder.encode(prompts)

    def check_size(self, height: int | None, width: int | None) -> None:
        """Raises ValueError naming `height` or `width` unless each is None or a positive
        multiple of `size_multiple`."""
        for name, value in (("height", height), ("width", width)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0
                                          and value % self.size_multiple == 0):
                raise ValueError(f"{name} must be a positive multiple of {self.size_multiple} for this base, got {value!r}")

    @property
    def size_multiple(self) -> int:
        """What image sides must be a multiple of: the VAE's factor x 2 per UNet downsampling."""
        vae = getattr(self.pipeline, "vae", None)
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        return factor * 2 ** (len(self.pipeline.unet.config.down_block_types) - 1)

    def _draw(self, cond, negative, n, steps, guidance, generators, height=None, width=None) -> list[Image.Image]:
        dtype = self.pipeline.unet.dtype
        context = cond["context"].to(dtype)
        negative_context = negative["context"].to(dtype).expand(n, -1, -1)
        if self.kind == "demo":
            return self.pipeline(context, negative_context, num_inference_steps=steps, guidance_scale=guidance,
                                 generator=generators, height=height, width=width)
        kwargs = dict(
            height=height,
            width=width,
            prompt_embeds=context,
            negative_prompt_embeds=negative_context,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
        )
        if self.kind == "sdxl":
            kwargs["pooled_prompt_embeds"] = cond["pooled"].to(dtype)
            kwargs["negative_pooled_prompt_embeds"] = negative["pooled"].to(dtype).expand(n, -1)
        # The pipelines hand their latents (in the UNet's dtype) to the VAE as they are: decode here.
        latents = self.pipeline(**kwargs, output_type="latent").images
        return latents_to_images(self.pipeline, latents)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's decode of denoised latents -> images in [-1, 1] (float32), whatever the dtypes.

    diffusers' SD1.5/SDXL pipelines decode the latents in the dtype the UNet made them in,
    so a bf16 VAE (the presets' `model.dtype`) beside an fp32 UNet (trained weights) fails
    with "Input type (float) and bias type (c10::BFloat16) should be the same". Here the
    latents take the VAE's dtype, and an fp16 VAE whose config asks for it
    (`force_upcast`, SDXL's VAE overflows in fp16) decodes in fp32 and is put back after,
    as the SDXL pipeline does. Scaling follows the pipelines (latents_mean/std when the
    VAE has them, else 1 / scaling_factor).
    """
    config = vae.config
    upcast = vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
    dtype = torch.float32 if upcast else vae.dtype
    device = next(vae.parameters()).device
    latents = latents.to(device, torch.float32)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        latents = latents * torch.tensor(std, device=device).view(shape) / config.scaling_factor
        latents = latents + torch.tensor(mean, device=device).view(shape)
    else:
        latents = latents / config.scaling_factor
    original = vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        images = vae.decode(latents.to(dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(original)
    return images.float()


def latents_to_images(pipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Decode (`decode_latents`) and post-process as the pipeline would (watermark included)."""
    images = decode_latents(pipeline.vae, latents)
    if getattr(pipeline, "watermark", None) is not None:
        images = pipeline.watermark.apply_watermark(images)
    return pipeline.image_processor.postprocess(images.cpu(), output_type="pil")


def require_on_this_machine(name: str, what: str, option: str, revision: str | None, marker: str) -> None:
    """FileNotFoundError unless `name` is a local folder or a Hugging Face model already in the
    cache (its `marker` file); the message says how to allow the download."""
    if Path(name).expanduser().exists():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, marker, revision=revision)
    except ValueError:  # not a Hub name either (a folder of another machine, say)
        cached = None
    if not isinstance(cached, str):
        raise FileNotFoundError(
            f"the export names the {what} {name!r}, which is neither a folder nor in the Hugging Face cache of "
            f"this machine; downloads are not started on an export's say-so: give {option}=NAME_OR_FOLDER on the "
            f"command line ({option}={name} to download that one)")


def load_pipeline(kind: str, path: str, unet_dir: Path | None, dtype: torch.dtype, revision: str | None):
    """The base's diffusion pipeline without its CLIP (the LLM + adapter replace it)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=dtype) if unet_dir else None
    if kind == "demo":
        unet = unet or UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, revision=revision)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        return pipeline_from_components(kind, unet, None, scheduler)
    if kind == "sd15":
        from diffusers import StableDiffusionPipeline

        extra = {"unet": unet} if unet is not None else {}
        return StableDiffusionPipeline.from_pretrained(
            path, text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, torch_dtype=dtype, revision=revision, **extra,
        )
    if kind == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        extra = {"unet": unet} if unet is not None else {}
        return StableDiffusionXLPipeline.from_pretrained(
            path, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            torch_dtype=dtype, revision=revision, **extra,
        )
    raise ValueError(f"unknown base model kind {kind!r} (demo, sd15 or sdxl)")


def pipeline_from_components(kind: str, unet, vae, scheduler):
    """The same pipelines from models already in memory (the sample callback's, mid-training)."""
    if kind == "demo":
        from linguadiff.models.pixel_pipeline import PixelDiffusionPipeline

        return PixelDiffusionPipeline(unet=unet, scheduler=scheduler)
    if kind == "sd15":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=scheduler)
    raise ValueError(f"unknown base model kind {kind!r} (demo, sd15 or sdxl)")
