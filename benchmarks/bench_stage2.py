"""Stage-2 throughput: how close a full end-to-end step comes to the UNet's train step alone.

Stage 2 runs, every step: a batch from the image-text loader, a frozen VAE encode of the
images (none for the demo's pixel-space base), a frozen LLM forward over the captions, a
train step of the adapter and of the UNet (diffusion loss), gradient clipping, fused AdamW
and the EMA update. The UNet train step is the part that stays whatever else is made
cheaper, so it is the reference (DESIGN.md's anchor: SDXL UNet, 1024 px, batch 8, 15.0
img/s on an H200). Everything here is measured, never asserted.

    python benchmarks/bench_stage2.py --preset demo --loader             # CPU, the committed demo
    python benchmarks/bench_stage2.py --preset sdxl-7b --json OUT.json   # GPU, random SDXL + 7B (sd15-7b: SD1.5)
    python benchmarks/bench_stage2.py --preset sdxl-7b --tiny            # the GPU code path, tiny, on CPU
    python benchmarks/bench_stage2.py --preset sdxl-7b --lora            # train.unet=lora: UNet LoRA + adapter train
    python benchmarks/bench_stage2.py --preset sdxl-7b --encode-ahead --float8 --only a,e,e+,f,f8   # speed levers

Speed levers (issue 11): ``--encode-ahead`` adds row e+ (f+ with --cached-latents), the full
step with ``speed.encode_ahead`` (the next batch's LLM forward on a side stream during the
step, DiffusionStage.llm_ahead); ``--float8`` then converts the UNet's and adapter's linear
layers as ``speed.float8=[unet,adapter]`` does and adds rows f8 (e8 without latents), and with
``--compile`` a8' and f8' (the float8 UNet compiled). Rows a', e', f' are skipped when
``--only`` names none of them, so a float8-only compile costs one compilation.

The measured code is the project's: ``DiffusionStage`` built around the parts (which sets
what trains, gradient checkpointing, the loss options and the EMA), its ``to_model_space``,
``conditioning`` (the PromptEncoder with ``length_groups``), ``diffusion_loss``,
``configure_optimizers`` (fused AdamW on a GPU), ``configure_gradient_clipping`` and
the EMA update; sizes come from the config (``stage=2 model=sdxl llm=qwen2.5-7b``, or the
demo defaults). A bare ``lightning.Trainer`` is attached only so that
``configure_optimizers`` can read the precision; no fit loop runs, so ``self.log`` is left
out of the timed step (it costs nothing on one device).

sdxl-7b builds random models directly on the device: the UNet and VAE from SDXL base's
config values (the UNet in fp32 as ``load_unet`` gives it, the VAE in the config's bf16 as
``load_vae`` does), the LLM through bench_stage1's ``InMemoryTextEncoder``. ``--tiny``
saves the tiny models and checks that the project's loaders (``LLMTextEncoder``,
``load_unet``, ``load_vae``, ``load_noise_scheduler``) give bit-identical outputs.
"""
from __future__ import annotations

import os

# Before torch touches the GPU: the full SDXL + 7B step runs close to an H200's memory, and
# expandable segments keep the caching allocator from failing on fragmentation.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the data workers tokenize

import argparse  # noqa: E402
import copy  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_stage1 import QWEN25_7B, TINY_LLM, InMemoryTextEncoder, synthetic_prompts  # noqa: E402
from timing import Row, finish_args, free_memory, measure, print_table, setup_torch, sync  # noqa: E402
from datamodules import build_datamodule  # noqa: E402
from linguadiff.models.diffusion import (  # noqa: E402
    diffusion_loss,
    load_noise_scheduler,
    load_unet,
    load_vae,
    sdxl_time_ids,
)
from linguadiff.models.frozen import freeze  # noqa: E402
from lightning_modules.diffusion_stage import DiffusionStage  # noqa: E402
from lightning_modules.settings import DiffusionSettings, StageSettings  # noqa: E402
from linguadiff.models.encode_ahead import NEXT_PROMPTS, EncodeAhead  # noqa: E402
from linguadiff.models.prompt_encoder import PromptEncoder, length_groups  # noqa: E402
from linguadiff.models.text_encoder import LLMTextEncoder, PromptTokenizer, torch_dtype  # noqa: E402
from linguadiff.config import load_config, resolve  # noqa: E402
from linguadiff.offline_tokenizers import save_byte_tokenizer  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json, vae/config.json, scheduler/.
SDXL_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
             "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816,  # pooled 1280 + 6 time ids x 256
             "use_linear_projection": True, "norm_num_groups": 32}
SDXL_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 1024,
            "scaling_factor": 0.13025, "force_upcast": True}
SDXL_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
                  "steps_offset": 1, "timestep_spacing": "leading"}
# --tiny: the same structure (3 UNet levels with text_time conditioning, a 4-level VAE) at
# sizes a CPU runs in seconds. The UNet's widths follow the tiny adapter's.
TINY_UNET = {**SDXL_UNET, "sample_size": 8, "layers_per_block": 1, "block_out_channels": (32, 64, 64),
             "transformer_layers_per_block": (1, 1, 2), "attention_head_dim": (2, 4, 4), "cross_attention_dim": 64,
             "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8}
TINY_VAE = {**SDXL_VAE, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "sample_size": 64}
TINY_ADAPTER = ["adapter.dim=64", "adapter.num_queries=17", "adapter.encoder_layers=2", "adapter.decoder_layers=2",
                "adapter.heads=4", "adapter.ffn_dim=128", "adapter.pooled_dim=32"]

# runwayml/stable-diffusion-v1-5: unet/config.json and vae/config.json (same noise schedule).
SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": 8, "cross_attention_dim": 768,
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "norm_num_groups": 32}
SD15_VAE = {**SDXL_VAE, "sample_size": 512, "scaling_factor": 0.18215}
PRESETS = {"demo": ["stage=2"], "sdxl-7b": ["stage=2", "model=sdxl", "llm=qwen2.5-7b"],
           "sd15-7b": ["stage=2", "model=sd15", "llm=qwen2.5-7b"]}
# Random-weight presets: (UNet config, VAE config, default batch) at real size, and --tiny's UNets.
RANDOM_BASES = {"sdxl-7b": (SDXL_UNET, SDXL_VAE, 8), "sd15-7b": (SD15_UNET, SD15_VAE, 32)}
TINY_UNETS = {"sdxl-7b": TINY_UNET,
              "sd15-7b": {**SD15_UNET, "sample_size": 8, "layers_per_block": 1, "block_out_channels": (32, 64, 64, 64),
                          "attention_head_dim": 4, "cross_attention_dim": 64}}
# The parts of a step, in the order the instrumented pass times them.
PARTS = ("data", "VAE encode", "LLM", "adapter fwd+bwd", "UNet fwd+bwd", "optimizer+clip+EMA")


# ---------------------------------------------------------------------------- models

def build_demo(cfg) -> tuple[LLMTextEncoder, Any, Any, Any]:
    """The committed demo through the project's own loaders (no VAE: a pixel-space UNet)."""
    m = cfg.model
    encoder = LLMTextEncoder(cfg.llm.path, dtype=cfg.llm.dtype, max_length=cfg.llm.max_length,
                             layers=tuple(cfg.llm.layers), layer_mix=cfg.llm.layer_mix, bos=cfg.llm.bos)
    return (encoder, load_unet(m.path), load_vae(m.path, m.kind, m.dtype),
            load_noise_scheduler(m.path, cfg.diffusion.prediction_type))


def build_random_base_7b(cfg, preset: str, folder: Path, device: torch.device, tiny: bool, llm_attn: str,
                         with_vae: bool) -> tuple[LLMTextEncoder, Any, Any, Any]:
    """Random Qwen2.5-7B, SDXL (or SD1.5) UNet and VAE, built on ``device`` in the dtypes training uses."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer, Qwen2Config

    llm_dir = folder / "llm"
    save_byte_tokenizer(llm_dir)
    tok = AutoTokenizer.from_pretrained(llm_dir)
    llm_config = Qwen2Config(**(TINY_LLM if tiny else QWEN25_7B), bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    llm_config.save_pretrained(llm_dir)  # config.json only: PromptTokenizer reads the position limit
    cuda = device.type == "cuda"
    llm_dtype = torch_dtype(cfg.llm.dtype) if cuda else torch.float32
    vae_dtype = torch_dtype(cfg.model.dtype) if cuda else torch.float32
    with torch.device(device):
        llm = AutoModel.from_config(llm_config, dtype=llm_dtype, attn_implementation=llm_attn)
        unet_config, vae_config, _ = RANDOM_BASES[preset]
        unet = UNet2DConditionModel(**(TINY_UNETS[preset] if tiny else unet_config))  # fp32, as load_unet gives it
        vae = freeze(AutoencoderKL(**(TINY_VAE if tiny else vae_config)).to(vae_dtype)) if with_vae else None
    scheduler = DDPMScheduler(**SDXL_SCHEDULER)
    if cfg.diffusion.prediction_type:
        scheduler.register_to_config(prediction_type=cfg.diffusion.prediction_type)
    encoder = InMemoryTextEncoder(llm, llm_dir, cfg.llm.max_length, tuple(cfg.llm.layers), cfg.llm.layer_mix,
                                   cfg.llm.bos)
    if tiny:  # the shortcut must be exact: compare with the project's loaders
        _check_same(cfg, folder, encoder, unet, vae, scheduler)
    return encoder, unet, vae, scheduler


@torch.no_grad()
def _check_same(cfg, folder: Path, encoder, unet, vae, scheduler) -> None:
    base = folder / "base"
    encoder.model.save_pretrained(folder / "llm")
    unet.save_pretrained(base / "unet")
    scheduler.save_pretrained(base / "scheduler")
    real_encoder = LLMTextEncoder(str(folder / "llm"), dtype="float32", max_length=cfg.llm.max_length,
                                  layers=tuple(cfg.llm.layers), layer_mix=cfg.llm.layer_mix, bos=cfg.llm.bos)
    texts = ["a red cat", "portrait of woman with blue hair " * 4, ""]
    (mine, mine_mask), (real, real_mask) = encoder.encode(texts), real_encoder.encode(texts)
    diffs = {"LLM": (mine - real).abs().max().item()}
    generator = torch.Generator().manual_seed(0)
    c = unet.config
    size = c.sample_size
    x = torch.randn(2, c.in_channels, size, size, generator=generator)
    context = torch.randn(2, 5, c.cross_attention_dim, generator=generator)
    added = None
    if c.addition_embed_type == "text_time":  # SDXL: pooled text and the size/crop ids
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=generator), "time_ids": torch.rand(2, 6, generator=generator)}
    t = torch.tensor([10, 900])
    real_unet = load_unet(str(base))
    diffs["UNet"] = (unet(x, t, context, added_cond_kwargs=added).sample
                     - real_unet(x, t, context, added_cond_kwargs=added).sample).abs().max().item()
    if vae is not None:
        vae.save_pretrained(base / "vae")
        real_vae = load_vae(str(base), cfg.model.kind, "float32")
        image = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
        diffs["VAE"] = (vae.encode(image).latent_dist.mean - real_vae.encode(image).latent_dist.mean).abs().max().item()
    real_scheduler = load_noise_scheduler(str(base), cfg.diffusion.prediction_type)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    same_scheduler = public(real_scheduler.config) == public(scheduler.config)
    same_mask = torch.equal(mine_mask, real_mask)
    print("self-check: in-memory vs the project's loaders max |diff| "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
          + f", masks equal {same_mask}, scheduler equal {same_scheduler}")
    # Float noise only (SD1.5's UNet, loaded, picks its attention kernels anew: ~1e-6).
    if max(diffs.values()) > 1e-5 or not same_mask or not same_scheduler:
        raise SystemExit("self-check failed: the in-memory models differ from the project's loaders")


# ---------------------------------------------------------------------------- batches

def to_device(batch: dict, device: torch.device) -> dict:
    """What Lightning's transfer does: every tensor (nested dicts included) to the device."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, dict):
            out[key] = to_device(value, device)
        else:
            out[key] = value
    return out


def synthetic_batch(module: DiffusionStage, size: int, resolution: int, latent_shape: tuple[int, ...],
                    args, rng: random.Random, pin: bool) -> dict:
    """A batch as ``ImageTextDataModule`` gives it (images in [-1, 1], tokens, SDXL sizes),
    plus ``latents``: what a latent cache would give instead of the images."""
    captions = synthetic_prompts(size, args.min_chars, args.max_chars, rng)
    batch = {
        "image": torch.rand(size, 3, resolution, resolution) * 2 - 1,
        "latents": torch.randn(size, *latent_shape),
        "caption": captions,
        "key": [f"{i:06d}" for i in range(size)],
        "original_size": torch.tensor([[resolution, resolution]] * size),
        "crop_top_left": torch.zeros(size, 2, dtype=torch.long),
        "target_size": torch.tensor([[resolution, resolution]] * size),
        "student_tokens": module.text_encoder.tokenizer(captions),
    }
    if pin:  # the DataLoader pins on GPUs (pin_memory=torch.cuda.is_available())
        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch["student_tokens"] = {k: v.pin_memory() for k, v in batch["student_tokens"].items()}
    return batch


# ---------------------------------------------------------------------------- timing

class PartTimer:
    """Seconds per part of one step: synchronizes the device at each boundary (so the GPU's
    queue is drained and each part is charged its own kernels)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.parts = dict.fromkeys(PARTS, 0.0)
        sync(device)
        self.last = time.perf_counter()

    def mark(self, part: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.parts[part] += now - self.last
        self.last = now


# ---------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--tiny", action="store_true", help="sdxl-7b's code path at tiny sizes (CPU self-check)")
    p.add_argument("--device", default=None, help="default: cuda for sdxl-7b (cpu with --tiny), cpu for demo")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: 8 for sdxl-7b (2 with --tiny), the config's for demo (32)")
    p.add_argument("--resolution", type=int, default=None, help="image side in px (default: the config's; 64 with --tiny)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per row (default 5 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 on GPU, 1 on CPU)")
    p.add_argument("--min-chars", type=int, default=20, help="sdxl-7b synthetic captions: shortest (about tokens)")
    p.add_argument("--max-chars", type=int, default=120, help="sdxl-7b synthetic captions: longest (about tokens)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="diffusion.gradient_checkpointing=true")
    p.add_argument("--cached-latents", action="store_true",
                   help="time training from a latent cache: no VAE is built; rows b and e are skipped; the parts are f's")
    p.add_argument("--compile", action="store_true",
                   help="also time rows a and f (cached latents; e without them) with the UNet under torch.compile")
    p.add_argument("--lora", action="store_true",
                   help="train.unet=lora: a LoRA (lora.* of the config) on the frozen UNet instead of the whole UNet")
    p.add_argument("--fsdp", action="store_true",
                   help="also time row g: the full step (cached latents) with LLM, adapter and UNet sharded as "
                        "strategy=fsdp shards them (one process: FSDP on one device; FSDP2 unless --fsdp-version 1; "
                        "with --compile their blocks are compiled first); the last row, as it rewraps the parts")
    p.add_argument("--fsdp-version", type=int, choices=(1, 2), default=2, help="--fsdp: fsdp.version (default 2)")
    p.add_argument("--fsdp-sharding", choices=("FULL_SHARD", "SHARD_GRAD_OP"), default="FULL_SHARD",
                   help="--fsdp (version 2): fsdp.sharding")
    p.add_argument("--encode-ahead", action="store_true",
                   help="also time row e+ (f+ with --cached-latents): the full step with speed.encode_ahead")
    p.add_argument("--float8", action="store_true",
                   help="after the plain rows, convert the UNet's and adapter's linear layers to float8 training "
                        "(speed.float8=[unet,adapter], torchao) and time row f8 (e8 without cached latents), "
                        "with --compile also a8' and f8'")
    p.add_argument("--only", default=None,
                   help="comma-separated row letters to time (e.g. a,g); default: all that apply")
    p.add_argument("--no-ema", action="store_true", help="leave the EMA update out of the step (and free its copy)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for the fp32 matmuls left outside autocast")
    p.add_argument("--llm-attn", default="sdpa", help="attn_implementation of the random LLM (sdpa, eager, ...)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra step per row)")
    p.add_argument("--loader", action="store_true", help="demo: also time the image-text loader alone")
    p.add_argument("--loader-only", action="store_true", help="demo: time the loader only (implies --loader)")
    p.add_argument("--crop", nargs="+", default=["square"], choices=["square", "buckets"],
                   help="loader rows: square crops and/or aspect-ratio buckets (data.crop)")
    p.add_argument("--bucket-step", type=int, default=64,
                   help="loader rows with --crop buckets: bucket sides are multiples of this (SD/SDXL: 64)")
    p.add_argument("--num-workers", type=int, nargs="+", default=[1], help="loader rows: DataLoader workers to try")
    p.add_argument("--loader-batches", type=int, default=20, help="loader rows: timed batches per setting")
    p.add_argument("--loader-urls", default=None, help="loader rows: your own image-text shards instead of the demo's")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here (rewritten after every row)")
    args = finish_args(p, p.parse_args(argv), gpu_iters=5, gpu_warmup=2)
    args.loader = args.loader or args.loader_only
    if args.loader and args.preset != "demo":
        p.error("--loader times the demo preset's image-text loader: use it with --preset demo "
                "(and --loader-urls for other shards)")
    if args.cached_latents and args.preset == "demo":
        p.error("--cached-latents: the demo's pixel-space base has no VAE, so it has no latents to cache")
    if args.float8 and (args.fsdp or args.lora):
        p.error("--float8 with --fsdp or --lora: speed.float8 is refused there (not verified)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = args.device
    cuda = device.type == "cuda"
    rng = setup_torch(args)

    overrides = list(PRESETS[args.preset]) + (TINY_ADAPTER if args.tiny else [])
    if args.tiny and args.preset == "sd15-7b":
        overrides.append("adapter.pooled_dim=null")  # SD1.5 has no pooled text input
    if args.gradient_checkpointing:
        overrides.append("diffusion.gradient_checkpointing=true")
    if args.lora:
        if args.fsdp:
            raise SystemExit("--lora with --fsdp: train.unet=lora does not run under strategy=fsdp (use DDP)")
        overrides.append("train.unet=lora")
    if args.resolution or args.tiny:
        overrides.append(f"model.resolution={args.resolution or 64}")
    if args.batch_size and args.preset == "demo":
        overrides.append(f"data.batch_size={args.batch_size}")  # the loader batches
    cfg = load_config(overrides)
    if args.preset != "demo":
        del cfg["data"]  # its resolvers would build the demo shards: sdxl-7b reads no data
    cfg = resolve(cfg)
    resolution = int(cfg.model.resolution)
    batch_size = args.batch_size or (int(cfg.data.batch_size) if args.preset == "demo" else 2 if args.tiny
                                     else RANDOM_BASES[args.preset][2])
    autocast = cuda  # as Lightning's bf16-mixed (precision "auto" on GPUs); fp32 on CPUs

    info: dict[str, Any] = {
        "preset": args.preset + (" --tiny" if args.tiny else ""),
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                                  f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__, "batch": batch_size, "resolution": resolution,
        "unet": f"lora (rank {cfg.lora.rank}, on {', '.join(cfg.lora.target_modules)})" if args.lora else "full",
    }
    rows: list[Row] = []
    shares: dict[str, Any] = {}

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"info": info, "rows": [asdict(r) for r in rows], "parts": shares}, indent=2))

    if args.loader:
        rows.extend(loader_rows(cfg, args, save))
    if args.loader_only:
        print_report(info, rows, {}, shares)
        return {"info": info, "rows": [asdict(r) for r in rows]}

    with tempfile.TemporaryDirectory(prefix="bench_stage2_") as tmp:
        started = time.perf_counter()
        if args.preset == "demo":
            encoder, unet, vae, scheduler = build_demo(cfg)
        else:
            encoder, unet, vae, scheduler = build_random_base_7b(cfg, args.preset, Path(tmp), device, args.tiny, args.llm_attn,
                                                                 with_vae=not args.cached_latents)
        with torch.device(device):
            prompt_encoder = PromptEncoder.with_new_adapter(encoder, cfg.adapter)
        # The stage module sets what trains, gradient checkpointing, the loss options and the EMA.
        module = DiffusionStage(StageSettings.from_config(cfg), DiffusionSettings.from_config(cfg), prompt_encoder,
                                unet, vae, scheduler).to(device)
        module.trainer = bare_trainer(device, autocast)  # configure_optimizers reads the precision
        module.on_fit_start()  # asserts the trainable set
        optimizer = module.configure_optimizers()["optimizer"]
        clip = float(cfg.trainer.gradient_clip_val or 0)
        build_s = time.perf_counter() - started
        print(f"built in {build_s:.1f} s", flush=True)

        def amp():
            return torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)

        def optimizer_step() -> None:
            """What Lightning does after backward: clip, step, zero_grad; then DiffusionStage.optimizer_step's EMA."""
            if clip:
                module.configure_gradient_clipping(optimizer, clip, "norm")
            initial = None if args.no_ema else module.ema.before_step(optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not args.no_ema:
                module.ema.after_step(optimizer, initial)

        # ------------------------------------------------ data
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else (
            8 if args.cached_latents else 1)
        latent_shape = (unet.config.in_channels, resolution // factor, resolution // factor)
        if args.preset == "demo":
            datamodule = build_datamodule(cfg, module.tokenizers())
            datamodule.next_prompts = args.encode_ahead  # batches carry the next one's tokens (NextPromptsLoader)
            loader = iter(datamodule.train_dataloader())
            first = next(loader)  # starts the workers (and builds the demo shards on first use)

            def next_batch(from_cache: bool) -> dict:
                return to_device(next(loader), device)
        else:
            first = synthetic_batch(module, batch_size, resolution, latent_shape, args, rng, pin=cuda)

            def next_batch(from_cache: bool) -> dict:
                # From pinned memory, as a GPU DataLoader delivers it; latents or images, not both.
                unused = "image" if from_cache else "latents"
                batch = to_device({k: v for k, v in first.items() if k != unused}, device)
                if args.encode_ahead:  # what NextPromptsLoader adds: the next batch's (the same) tokens
                    tokens = batch["student_tokens"]
                    batch[NEXT_PROMPTS] = {**tokens, "key": list(batch["key"]), "lengths": first_lengths}
                return batch
            first_lengths = first["student_tokens"]["attention_mask"].sum(1).tolist()

        lengths = first["student_tokens"]["attention_mask"].sum(1)
        groups = length_groups(lengths)
        sample = to_device(first, device)
        cached = args.cached_latents
        info.update({
            "model_input": f"{(batch_size, *latent_shape)}" + (" latents" if vae is not None or cached else " pixels"),
            "llm_tokens_mean": round(lengths.float().mean().item(), 1), "llm_tokens_max": int(lengths.max()),
            "length_groups": [len(g) for g in groups],
            "context": f"{(batch_size, cfg.adapter.num_queries, cfg.adapter.dim)}", "autocast_bf16": autocast,
            "llm_dtype": str(next(encoder.model.parameters()).dtype),
            "vae_dtype": str(vae.dtype) if vae is not None else None,
            "params_m": {name: round(total / 1e6, 1) for name, total, _ in module.trainable_report()},
            "fused_adamw": bool(optimizer.defaults.get("fused")), "grad_clip": clip,
            "ema": not args.no_ema, "gradient_checkpointing": bool(cfg.diffusion.gradient_checkpointing),
            "prediction_type": scheduler.config.prediction_type, "iters": args.iters, "warmup": args.warmup,
            "build_s": round(build_s, 1),
            "resident_gib": round(torch.cuda.memory_allocated(device) / 2**30, 1) if cuda else None,
        })
        save()

        # ------------------------------------------------ the steps
        def llm_features(tokens: dict):
            """DiffusionStage.conditioning's LLM calls (PromptEncoder.llm_features): per length group."""
            return module.prompt_encoder.llm_features(tokens["input_ids"], tokens["attention_mask"])

        def adapter_outputs(features, tokens: dict) -> dict:
            """DiffusionStage.conditioning's adapter calls and the reordering (PromptEncoder.adapt)."""
            return module.prompt_encoder.adapt(*features)

        with amp():
            features = llm_features(sample["student_tokens"])
            with torch.no_grad():
                probe = adapter_outputs(features, sample["student_tokens"])

        # Row a's random context is what the adapter gives the UNet: its dtype under autocast and
        # a gradient wanted (stage 2 backpropagates into the adapter). Besides being the real
        # work, identical inputs let a compiled UNet reuse one graph in rows a' and e'/f'.
        sdxl = cfg.model.kind == "sdxl"
        noise_context = torch.randn(probe["context"].shape, device=device, dtype=probe["context"].dtype,
                                    requires_grad=True)
        unet_added = None
        if sdxl:
            text_embeds = torch.randn(probe["pooled"].shape, device=device, dtype=probe["pooled"].dtype, requires_grad=True)
            time_ids = sdxl_time_ids(sample["original_size"], sample["crop_top_left"], sample["target_size"])
            unet_added = {"text_embeds": text_embeds, "time_ids": time_ids}
        random_x0 = torch.randn(batch_size, *latent_shape, device=device)
        del probe

        def unet_step() -> None:
            """(a) the reference: diffusion loss on random latents and context, backward, AdamW."""
            with amp():
                loss = diffusion_loss(module.unet, module.noise_scheduler, random_x0, noise_context,
                                      module.diffusion.loss, unet_added).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            noise_context.grad = None
            if unet_added is not None:
                unet_added["text_embeds"].grad = None

        def vae_encode():
            with amp():
                return module.to_model_space(sample)

        def llm_forward():
            with amp():
                return llm_features(sample["student_tokens"])

        def adapter_step() -> None:
            """(d) the adapter's forward and backward on precomputed LLM features (a stand-in loss)."""
            with amp():
                out = adapter_outputs(features, sample["student_tokens"])
                loss = out["context"].float().square().mean()
                if out["pooled"] is not None:
                    loss = loss + out["pooled"].float().square().mean()
            loss.backward()
            for p in module.adapter.parameters():
                p.grad = None

        def full_step(from_cache: bool, ahead: bool = False) -> Callable[[], None]:
            def step() -> None:
                """DiffusionStage.training_step's work, then Lightning's optimizer step."""
                batch = next_batch(from_cache)
                module.encode_ahead = encode_ahead if ahead else None
                with amp():
                    llm_ahead = module.llm_ahead(batch)  # speed.encode_ahead (row e+/f+)
                    x0 = batch["latents"] if from_cache else module.to_model_space(batch)
                    context, added = module.conditioning(batch, llm_ahead)
                    loss = diffusion_loss(module.unet, module.noise_scheduler, x0, context, module.diffusion.loss, added).mean()
                loss.backward()
                optimizer_step()
            return step

        def instrumented_step(from_cache: bool) -> dict[str, float]:
            """A full step cut at the part boundaries. The UNet's backward stops at a detached
            copy of the context; the adapter's backward then runs from the gradient it got,
            which gives the same gradients as one backward through both."""
            timer = PartTimer(device)
            batch = next_batch(from_cache)
            timer.mark("data")
            with amp():
                x0 = batch["latents"] if from_cache else module.to_model_space(batch)
                if not from_cache and module.vae is not None:
                    timer.mark("VAE encode")
                feats = llm_features(batch["student_tokens"])
                timer.mark("LLM")
                cond = adapter_outputs(feats, batch["student_tokens"])
                timer.mark("adapter fwd+bwd")
                context = cond["context"].detach().requires_grad_()
                added = None
                if sdxl:
                    pooled = cond["pooled"].detach().requires_grad_()
                    time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
                    added = {"text_embeds": pooled, "time_ids": time_ids.to(device)}
                loss = diffusion_loss(module.unet, module.noise_scheduler, x0, context, module.diffusion.loss, added).mean()
            loss.backward()
            timer.mark("UNet fwd+bwd")
            outputs, grads = [cond["context"]], [context.grad]
            if sdxl:
                outputs.append(cond["pooled"])
                grads.append(added["text_embeds"].grad)
            torch.autograd.backward(outputs, grads)
            timer.mark("adapter fwd+bwd")
            optimizer_step()
            timer.mark("optimizer+clip+EMA")
            return timer.parts

        # ------------------------------------------------ rows
        def add(row: Row) -> Row:
            rows.append(row)
            save()
            return row

        n = batch_size
        flops: dict[str, float | None] = {}
        wanted = set(args.only.split(",")) if args.only else None
        encode_ahead = EncodeAhead()

        def timed(key: str, name: str, step, **kwargs) -> Row | None:
            if wanted is not None and key not in wanted:
                return None
            row = add(measure(name, step, n, args, device, optimizer, **kwargs))
            flops.setdefault(key, row.tflops * row.ms_per_step / 1e3 * 1e12 if row.tflops else None)
            return row

        timed("a", "a UNet train step (reference)", unet_step)
        if module.vae is not None:
            timed("b", "b VAE encode (no grad)", vae_encode)
        timed("c", "c LLM forward (no grad)", llm_forward)
        timed("d", "d adapter fwd+bwd", adapter_step)
        main_key = "f" if cached else "e"
        if not cached:
            timed("e", "e full step, on the fly" + (" (with loader)" if args.preset == "demo" else ""), full_step(False))
        if args.encode_ahead:
            row = timed(f"{main_key}+", f"{main_key}+ full step, {'cached latents' if cached else 'on the fly'}, "
                        "speed.encode_ahead", full_step(cached, ahead=True), flops=flops.get(main_key))
            if row is not None:
                info["encode_ahead_hits"] = encode_ahead.hits  # steps whose LLM features were made ahead
        if wanted is None or "parts" in wanted:
            shares.update(part_shares(main_key, instrumented_step, cached, args, device, optimizer))
            save()
        latents = vae is not None or cached
        if latents:
            timed("f", "f full step, cached latents", full_step(True))

        def want(*keys: str) -> bool:
            return wanted is None or any(key in wanted for key in keys)

        if args.compile and want("a'", "e'", "f'"):  # (--fsdp alone compiles per block)
            started_compile = time.perf_counter()
            module.unet.compile()  # in place: parameter names (EMA, optimizer) stay the same
            try:
                unet_step()
                print(f"  torch.compile of the UNet: {time.perf_counter() - started_compile:.1f} s to first step", flush=True)
                info["compile_s"] = round(time.perf_counter() - started_compile, 1)
            except torch.cuda.OutOfMemoryError:
                print("  torch.compile of the UNet: out of memory on the first step", flush=True)
            free_memory(optimizer)
            timed("a'", "a' UNet train step, compiled", unet_step, flops=flops.get("a"))
            key = "f" if latents else "e"
            timed(f"{key}'", f"{key}' full step, {'cached latents, ' if latents else ''}UNet compiled", full_step(latents),
                  flops=flops.get(key))

        if args.float8:
            float8_rows(module, args, info, timed, unet_step, full_step, flops, latents, want, save)

        if args.fsdp:
            # FSDP shards the eager UNet; FSDP2 with --compile compiles each block before sharding.
            module.unet._compiled_call_impl = None
            compile_blocks = args.compile and args.fsdp_version == 2
            started = time.perf_counter()
            optimizer = wrap_like_fsdp(module, cfg, device, optimizer, args.fsdp_version, args.fsdp_sharding, compile_blocks)
            label = f"FSDP{args.fsdp_version} {args.fsdp_sharding if args.fsdp_version == 2 else ''}".strip()
            info["fsdp"] = (f"one process; {label}; units, bf16 mixed precision and activation checkpointing as "
                            f"strategy=fsdp" + ("; UNet and adapter blocks compiled" if compile_blocks else ""))
            if compile_blocks and (wanted is None or "g" in wanted):
                full_step(latents)()
                info["fsdp_compile_s"] = round(time.perf_counter() - started, 1)
                print(f"  FSDP2 + compiled blocks: {info['fsdp_compile_s']} s to first step", flush=True)
            timed("g", f"g full step, {'cached latents, ' if latents else ''}{label} (1 device)"
                  + (", blocks compiled" if compile_blocks else ""), full_step(latents), flops=flops.get("f" if latents else "e"))

    by_key = {r.name.split(" ")[0]: r for r in rows}
    ratios = {}
    for key in ("e", "f", "g", "e'", "f'", "e+", "f+", "e8", "f8", "a8'", "e8'", "f8'"):
        ref = by_key.get("a'") if key.endswith("'") and "a'" in by_key else by_key.get("a")
        if key in by_key and by_key[key].samples_per_s and ref is not None and ref.samples_per_s:
            ratios[f"{key}/{ref.name.split(' ')[0]}"] = by_key[key].samples_per_s / ref.samples_per_s
    print_report(info, rows, ratios, shares)
    result = {"info": info, "rows": [asdict(r) for r in rows], "ratios": ratios, "parts": shares}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


def float8_rows(module: DiffusionStage, args, info: dict, timed, unet_step, full_step, flops: dict, latents: bool,
                want, save) -> None:
    """Rows with the UNet's and adapter's linear layers in float8 (speed.float8=[unet,adapter]):
    the same conversion as the stage module's (linguadiff/models/float8.py), on the parts in
    place (weights and the optimizer's states stay), eager, then compiled with --compile."""
    from linguadiff.models.float8 import check_float8_device, convert_to_float8

    check_float8_device(args.device)
    module.unet._compiled_call_impl = None  # the eager UNet gets its layers swapped
    counts = {name: convert_to_float8(getattr(module, name), name) for name in ("unet", "adapter")}
    info["float8"] = {name: f"{done} of {total} linear layers" for name, (done, total) in counts.items()}
    print("  float8: " + ", ".join(f"{k} {v}" for k, v in info["float8"].items()), flush=True)
    save()
    key = "f" if latents else "e"
    timed(f"{key}8", f"{key}8 full step, {'cached latents, ' if latents else ''}float8 (eager)", full_step(latents),
          flops=flops.get(key))
    if args.compile and want("a8'", f"{key}8'"):
        started = time.perf_counter()
        module.unet.compile()
        try:
            unet_step()
            info["compile_float8_s"] = round(time.perf_counter() - started, 1)
            print(f"  torch.compile of the float8 UNet: {info['compile_float8_s']} s to first step", flush=True)
        except torch.cuda.OutOfMemoryError:
            print("  torch.compile of the float8 UNet: out of memory on the first step", flush=True)
        timed("a8'", "a8' UNet train step, float8, compiled", unet_step, flops=flops.get("a"))
        timed(f"{key}8'", f"{key}8' full step, {'cached latents, ' if latents else ''}float8, UNet compiled",
              full_step(latents), flops=flops.get(key))


def wrap_like_fsdp(module: DiffusionStage, cfg, device: torch.device, optimizer, version: int = 2,
                   sharding: str = "FULL_SHARD", compile_blocks: bool = False) -> torch.optim.Optimizer:
    """Shard the LLM, adapter and UNet as strategy=fsdp does (linguadiff/strategy.py: the same
    units, mixed precision and activation checkpointing): FSDP2 (`apply_fully_shard`, each part
    its own root; `compile_blocks`: the UNet's and adapter's blocks compiled before sharding, as
    speed.compile=[unet,adapter] does under FSDP2) or FSDP1 (version=1). The benchmark calls the
    parts rather than the module's forward. Returns the new optimizer (the old one's states are
    dropped first)."""
    import functools

    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from linguadiff.strategy import apply_fully_shard, check_units, fsdp2_mesh, fsdp_units, mixed_precision

    optimizer.state.clear()
    free_memory(optimizer)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="tcp://127.0.0.1:29517",
                                rank=0, world_size=1)
    units = fsdp_units(module, bool(cfg.fsdp.activation_checkpointing))
    check_units(module, units)
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    if version == 2:
        counts = apply_fully_shard(module, units, fsdp2_mesh(device.type, 1, 1, sharding), precision=precision,
                                   sharding=sharding, compile_parts=("unet", "adapter") if compile_blocks else ())
        print(f"  FSDP2 {sharding}: {counts}", flush=True)
        return module.configure_optimizers()["optimizer"]
    for name in ("text_encoder", "adapter", "unet"):
        wrapped = FSDP(getattr(module, name), auto_wrap_policy=units.wrap_policy(), mixed_precision=mixed_precision(precision),
                       device_id=device, use_orig_params=True, limit_all_gathers=True)
        if units.checkpoint:
            apply_activation_checkpointing(
                wrapped, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
                auto_wrap_policy=units.checkpoint_policy())
        setattr(module, name, wrapped)
    return module.configure_optimizers()["optimizer"]


def bare_trainer(device: torch.device, autocast: bool):
    """A Trainer that never fits: it only answers the module's questions (precision, clipping)."""
    import logging

    import lightning as L

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # no "GPU available" banner
    return L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                     precision="bf16-mixed" if autocast else "32-true", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def part_shares(key: str, instrumented_step, cached: bool, args, device, optimizer) -> dict[str, Any]:
    """Medians of each part over ``--iters`` instrumented steps (after ``--warmup``), and shares."""
    print(f"  parts of row {key} (synchronized at each boundary) ...", flush=True)
    try:
        free_memory(optimizer)
        for _ in range(args.warmup):
            instrumented_step(cached)
        runs = [instrumented_step(cached) for _ in range(args.iters)]
    except torch.cuda.OutOfMemoryError:
        free_memory(optimizer)
        print("  parts: out of memory", flush=True)
        return {"row": key, "note": "out of memory"}
    free_memory(optimizer)
    ms = {part: 1000 * statistics.median(run[part] for run in runs) for part in PARTS}
    total = sum(ms.values())
    print("  parts: " + ", ".join(f"{p} {v:.1f} ms" for p, v in ms.items() if v), flush=True)
    return {"row": key, "ms": ms, "share": {p: v / total for p, v in ms.items()}, "total_ms": total}


def loader_rows(cfg, args, save) -> list[Row]:
    """The image-text loader alone (read, decode, resize, crop, tokenize, collate in the workers)."""
    from omegaconf import open_dict

    rows = []
    tokenizer = PromptTokenizer(cfg.llm.path, cfg.llm.max_length, cfg.llm.bos)
    for crop, workers in itertools.product(args.crop, args.num_workers):
        c = copy.deepcopy(cfg)
        with open_dict(c):
            c.data.num_workers = workers
            c.data.crop = crop
            c.data.bucket_step = args.bucket_step
            if args.loader_urls:
                c.data.train = {"urls": args.loader_urls, "sources": []}
        name = f"loader, {workers} worker{'s' if workers != 1 else ''}" + (" (main process)" if workers == 0 else "")
        name += ", buckets" if crop == "buckets" else ""
        print(f"  row {name} ...", flush=True)
        loader = build_datamodule(c, {"student": tokenizer}).train_dataloader()
        batches = iter(loader)
        for _ in range(max(1, args.warmup) + workers):  # starts the workers; fills their prefetch queues
            next(batches)
        samples, start = 0, time.perf_counter()
        for _ in range(args.loader_batches):
            samples += len(next(batches)["key"])
        seconds = time.perf_counter() - start
        rate = samples / seconds
        row = Row(name, rate, 1000 * seconds / args.loader_batches, None, None, None,
                  f"{rate / max(1, workers):.0f} samples/s per worker")
        print(f"  measured {name}: {rate:.0f} samples/s ({row.note})", flush=True)
        rows.append(row)
        del batches, loader  # shuts the workers down
        save()
    return rows


def print_report(info: dict, rows: list[Row], ratios: dict[str, float], shares: dict) -> None:
    print_table(info, rows, {f"ratio {key}": value for key, value in ratios.items()}, "samples")
    if shares.get("ms"):
        print(f"\nparts of row {shares['row']} (separate pass, device synchronized at each boundary; "
              f"sum {shares['total_ms']:.1f} ms/step):")
        for part in PARTS:
            if shares["ms"][part]:
                print(f"  {part:<22} {shares['ms'][part]:>9.1f} ms {100 * shares['share'][part]:>6.1f} %")


if __name__ == "__main__":
    main()
