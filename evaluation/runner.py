"""One evaluation: draw each prompt set with a run's export, measure, write the report.

Prompt sets and what they measure (option ``sets``):

- ``captions``: one image per caption (a caption file, else the reference images' own
  captions), each from its own seed: FID and KID against the reference images, the CLIP
  score against the caption, the aesthetic head's score;
- ``multilingual``: every prompt of a parallel set in every language, image j of prompt i
  from the same seed in all languages: each language's CLIP score against the English
  prompt, the CLIP-space cosine between its images and the English ones, and on the demo
  the colour / shape accuracy and aesthetic measure read back from the pixels;
- ``long``: prompts past CLIP's 77 tokens: the CLIP score against their first 77 tokens
  (all CLIP reads) and against the rest (what only the LLM read);
- ``text``: stage-1 measures on held-out parallel text (no images);
- ``binding``: attribute binding (T2I-CompBench's colour / shape / texture), two objects per
  prompt, every language, scored per object by a VQA model (``binding_vqa=PATH``, BLIP-VQA;
  on the demo its pixel read-back stands in; see `evaluation.binding`).

What several runs share (CLIP, the aesthetic head, the reference features) is loaded once
in :class:`SharedTools`; each run then gets its own ``eval/metrics.json``.

``run_dir=base`` (alone or in a list) evaluates the base model with its own CLIP text encoder
on the same sets, languages, seeds and drawing settings as the runs beside it: the row that
says what the LLM adds over the encoder it replaced.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image

from datamodules import demo_data
from linguadiff.config import CONFIG_DIR, ConfigError
from evaluation.demo_eval import score_demo_images
from evaluation import prompt_sets
from evaluation.aesthetic import AestheticHead
from evaluation.binding import VQA, BlipVQA, binding_set
from evaluation.demo_readback import DemoVQA
from evaluation.clip_models import (DEMO_CLIP_DESCRIPTION, DEMO_CLIP_NAME, CLIPBundle, cross_language_similarity, demo_clip,
                                     image_tensors, load_clip, stand_in_clip)
from evaluation.image_features import FID_FEATURES, DistributionDistance, feature_space
from evaluation.references import reference_batches
from evaluation.report import GRID_FILE, Report, write_tensorboard
from evaluation.text_alignment import held_out_text_metrics
from linguadiff.export import find_export, read_export_metadata
from linguadiff.generation import Generator, require_on_this_machine

log = logging.getLogger(__name__)

SETS = ("captions", "multilingual", "long", "text", "binding")
BASE_RUN = "base"  # run_dir=base: the base model with its own CLIP, evaluated like a run
PROGRESS_EVERY_S = 10.0


def as_list(value: Any, option: str) -> list[str] | None:
    """A list option given as ``[a,b]`` (YAML) or ``a,b``; None stays None (the default)."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else str(value).split(",")
    items = [str(v).strip() for v in items if str(v).strip()]
    if not items:
        raise ConfigError(f"option '{option}' is empty")
    return items


@dataclass(frozen=True)
class EvalSettings:
    """The command line's options, checked (see evaluate.py for what each one does)."""

    sets: tuple[str, ...]
    languages: list[str]
    multilingual: str
    captions: str
    long_prompts: str
    reference: str
    reference_images: int
    text: str
    text_pool: int
    num_images: int
    fid_images: int
    seed: int
    steps: int | None
    guidance: float | None
    scheduler: str | None
    batch_size: int
    clip: str | None
    fid_features: str
    inception_weights: str | None
    aesthetic_head: str | None
    grid_prompts: int
    tensorboard: bool
    device: str
    dtype: str
    base: str | None
    llm: str | None
    binding: str = "auto"
    binding_vqa: str | None = None
    trust_remote_code: bool = False  # the user's `llm.trust_remote_code=true`: an export's LLM may run its own code

    @classmethod
    def from_args(cls, args: dict[str, Any], device: str, dtype: str) -> "EvalSettings":
        sets = tuple(as_list(args["sets"], "sets") or SETS)
        unknown = [s for s in sets if s not in SETS]
        if unknown:
            raise ConfigError(f"option 'sets': unknown set {unknown[0]!r}; choose among {', '.join(SETS)}")
        if args["fid_features"] not in FID_FEATURES:
            raise ConfigError(f"option 'fid_features' must be one of {', '.join(FID_FEATURES)}, got {args['fid_features']!r}")
        for name in ("num_images", "fid_images", "batch_size"):
            if args[name] < 1:
                raise ConfigError(f"option '{name}' must be at least 1, got {args[name]}")
        for name in ("reference_images", "text_pool", "grid_prompts"):
            if args[name] < 0:
                raise ConfigError(f"option '{name}' must be 0 or more, got {args[name]}")
        languages = as_list(args["languages"], "languages") or list(demo_data.LANGUAGES)
        if prompt_sets.REFERENCE_LANGUAGE not in languages:
            raise ConfigError(f"option 'languages' must include '{prompt_sets.REFERENCE_LANGUAGE}' (the CLIP score reads English)")
        fields = {k: args[k] for k in cls.__dataclass_fields__ if k in args}
        for name in ("clip", "inception_weights", "aesthetic_head", "base", "llm", "binding_vqa"):  # paths, even if YAML reads a number
            if name in fields:
                fields[name] = None if fields[name] is None else str(fields[name])
        fields.update(sets=sets, languages=languages, device=device, dtype=dtype,
                      trust_remote_code=bool(args.get("llm.trust_remote_code", False)))
        return cls(**fields)

    def describe(self) -> dict[str, Any]:
        """The settings metrics.json records (what decides the numbers)."""
        keep = ("sets", "languages", "multilingual", "captions", "long_prompts", "reference", "reference_images", "text", "binding",
                "num_images", "fid_images", "seed", "fid_features", "device", "dtype")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if k in keep}


def pil_to_uint8(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> uint8 [N, 3, H, W]."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


def output_size(generator: Generator) -> int:
    """Side of the images the run draws: the UNet's sample size times the VAE's downscaling (1 for the demo)."""
    return int(generator.pipeline.unet.config.sample_size) * int(getattr(generator.pipeline, "vae_scale_factor", 1))


class SharedTools:
    """What every run of one call uses: CLIP, the aesthetic head, the reference images' features.

    `demo`: every run of the call is on the demo base, so without clip=PATH the demo's own
    CLIP scores them (a random stand-in otherwise)."""

    def __init__(self, settings: EvalSettings, demo: bool = False) -> None:
        self.settings = settings
        self.demo = demo
        self._reference: tuple[DistributionDistance | None, list[str]] | None = None

    @cached_property
    def clip(self) -> CLIPBundle:
        if self.settings.clip:
            log.info("Loading CLIP from %s", self.settings.clip)
            return load_clip(self.settings.clip, self.settings.device)
        if self.demo:
            log.info("No clip=PATH: demo runs are scored with the demo's own CLIP")
            return demo_clip(self.settings.device)
        log.warning("No clip=PATH: CLIP scores use a random stand-in CLIP (a code-path check, not a measure)")
        return stand_in_clip(self.settings.device)

    @cached_property
    def aesthetic(self) -> AestheticHead | None:
        if not self.settings.aesthetic_head:
            return None
        head = AestheticHead.from_file(self.settings.aesthetic_head)
        width = int(self.clip.model.config.projection_dim)
        if head.input_dim != width:
            raise ConfigError(f"option 'aesthetic_head': the head reads {head.input_dim}-d embeddings but "
                              f"clip={self.settings.clip} gives {width}-d ones (LAION's heads are for CLIP ViT-L/14: 768)")
        return head.to(self.settings.device)

    @cached_property
    def binding_vqa(self) -> BlipVQA:
        log.info("Loading BLIP-VQA from %s", self.settings.binding_vqa)
        return BlipVQA(self.settings.binding_vqa, self.settings.device, self.settings.dtype, self.settings.batch_size)

    @property
    def distance(self) -> DistributionDistance | None:
        """The FID/KID accumulator, once a run has read the reference images."""
        return self._reference[0] if self._reference else None

    def reference(self, spec: str | None, size: int) -> tuple[DistributionDistance | None, list[str]]:
        """The reference images' FID/KID features and captions, read once for all runs."""
        if self._reference is None:
            self._reference = (None, []) if spec is None else self._read_reference(spec, size)
        return self._reference

    def _read_reference(self, spec: str, size: int) -> tuple[DistributionDistance, list[str]]:
        started = time.perf_counter()
        space = feature_space(self.settings.fid_features, self.settings.inception_weights, lambda: self.clip.feature_space())
        distance = DistributionDistance(space, self.settings.device)
        captions: list[str] = []
        for batch in reference_batches(spec, size, self.settings.batch_size * 4, self.settings.reference_images):
            distance.update(batch.images, real=True)
            captions += batch.captions
        if distance.counts["real"] < 2:
            raise ConfigError(f"option 'reference': {spec} gave {distance.counts['real']} usable image(s); FID needs at least 2")
        log.info("Reference: %d images at %d px from %s, %s features (%.1f s)", len(captions), size, spec, space.name,
                 time.perf_counter() - started)
        return distance, captions


@dataclass
class Drawer:
    """Draws prompt sets in chunks with the run's generator, logging progress."""

    generator: Generator
    steps: int | None
    guidance: float | None
    scheduler: str | None
    batch_size: int

    def __call__(self, prompts: list[str], seeds: list[int], num_images: int, label: str) -> Iterator[list[tuple[int, int, Image.Image]]]:
        """Chunks of (prompt index, image index, image), prompt-major; image j of prompt i has seed seeds[i] + j."""
        total, done = len(prompts) * num_images, 0
        per_chunk = max(1, self.batch_size // num_images)
        started = last_log = time.perf_counter()
        for start in range(0, len(prompts), per_chunk):
            stop = min(len(prompts), start + per_chunk)
            drawn = self.generator(prompts[start:stop], num_images=num_images, seed=seeds[start:stop], steps=self.steps,
                                   guidance=self.guidance, scheduler=self.scheduler, batch_size=self.batch_size)
            done += len(drawn)
            now = time.perf_counter()
            if now - last_log >= PROGRESS_EVERY_S or done == total:
                log.info("%s: %d/%d images (%.1f img/s)", label, done, total, done / max(now - started, 1e-9))
                last_log = now
            yield [(start + i, j, image) for i, j, image in drawn]


def _score(metric) -> float | None:
    """A CLIPScore's value, None when it saw nothing."""
    return float(metric.compute()) if int(metric.n_samples) > 0 else None


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values))


# ----------------------------------------------------------------------------- prompt sets


def caption_set(drawer: Drawer, settings: EvalSettings, tools: SharedTools, report: Report, reference: str | None, size: int) -> None:
    """FID/KID against the reference, CLIP score against the captions, aesthetic head score."""
    distance, reference_captions = tools.reference(reference, size)
    if settings.captions != "auto":
        captions = prompt_sets.read_captions(settings.captions)
    else:
        captions = [c for c in reference_captions if c]
    if not captions:
        report.skipped["captions"] = ("no captions: give captions=FILE (COCO json or one prompt per line) or "
                                      "reference= images that carry captions")
        return
    captions = captions[: settings.fid_images]
    clip, head = tools.clip, tools.aesthetic
    clip_score, aesthetic = clip.score_metric(), []
    if distance is not None:
        distance.reset_generated()
    seeds = [settings.seed + i for i in range(len(captions))]  # one image per caption, each from its own noise
    for drawn in drawer(captions, seeds, 1, "captions"):
        images = pil_to_uint8([im for _, _, im in drawn])
        if distance is not None:
            distance.update(images, real=False)
        clip_score.update(image_tensors(images, clip.device), [captions[i] for i, _, _ in drawn])
        if head is not None:
            aesthetic += head(clip.image_features(images)).tolist()
    report.metrics["clip_score"] = _score(clip_score)
    report.counts["captions/images"] = len(captions)
    if distance is None:
        report.skipped["fid"] = "no reference images: give reference=FOLDER or reference=SHARD_URLS"
    else:
        report.metrics.update(distance.compute(seed=settings.seed))
        report.counts.update({"fid/reference_images": distance.counts["real"], "fid/generated_images": distance.counts["generated"]})
    if head is not None:
        report.metrics["aesthetic"] = _mean(aesthetic)
    else:
        report.skipped["aesthetic"] = "no aesthetic_head=PATH (a LAION-style head over CLIP image embeddings)"


def multilingual_set(drawer: Drawer, settings: EvalSettings, tools: SharedTools, report: Report,
                     parallel: prompt_sets.ParallelSet, demo: bool) -> list[list[Image.Image]]:
    """Per language: CLIP score against the English prompt, image cosine to the English images,
    and on the demo colour/shape accuracy. Returns the grid rows (prompt x language, first image)."""
    n, english, clip = settings.num_images, parallel.prompts[prompt_sets.REFERENCE_LANGUAGE], tools.clip
    seeds = [settings.seed + i * n for i in range(len(parallel))]
    # Grid rows spread over the set (the demo's prompts run colour by colour).
    rows = min(settings.grid_prompts, len(parallel))
    grid_prompts = {k * len(parallel) // rows: k for k in range(rows)}
    grid_rows: list[list[Image.Image]] = [[] for _ in range(rows)]
    embeddings: dict[str, torch.Tensor] = {}
    read_back = demo and parallel.labels is not None
    demo_scores: dict[str, dict] = {}
    for lang in parallel.languages:
        score, chunks, drawn_all = clip.score_metric(), [], []
        for drawn in drawer(parallel.prompts[lang], seeds, n, f"multilingual {lang}"):
            images = pil_to_uint8([im for _, _, im in drawn])
            score.update(image_tensors(images, clip.device), [english[i] for i, _, _ in drawn])
            chunks.append(clip.image_embeddings(images))
            for i, j, image in drawn:
                if j == 0 and i in grid_prompts:
                    grid_rows[grid_prompts[i]].append(image)
            if read_back:
                drawn_all += drawn
        embeddings[lang] = torch.cat(chunks)
        report.metrics[f"multilingual/clip_score/{lang}"] = _score(score)
        if read_back:
            demo_scores[lang] = score_demo_images(parallel.labels, drawn_all)
    similarity = cross_language_similarity(embeddings, prompt_sets.REFERENCE_LANGUAGE)
    report.metrics.update({f"multilingual/image_cosine/{lang}": value for lang, value in similarity.items()})
    if similarity:
        report.metrics["multilingual/image_cosine/non_english"] = _mean(list(similarity.values()))
    for name, field in (("colour", "colour"), ("shape", "shape"), ("demo_aesthetic", "aesthetic")):  # grouped rows
        report.metrics.update({f"{name}/{lang}": scores[field] for lang, scores in demo_scores.items()})
    report.counts["multilingual/images_per_language"] = len(parallel) * n
    if not read_back:
        report.skipped["colour"] = "colour accuracy reads the demo's shapes back: demo base and demo prompts only"
    return grid_rows


def long_set(drawer: Drawer, settings: EvalSettings, tools: SharedTools, report: Report) -> None:
    """CLIP score of images drawn from long prompts, against the first 77 tokens and against the rest."""
    prompts = prompt_sets.read_long_prompts(prompt_sets.BUNDLED_LONG if settings.long_prompts == "bundled" else settings.long_prompts)
    clip, n = tools.clip, settings.num_images
    beyond = [clip.text_after_limit(p) for p in prompts]
    head, tail = clip.score_metric(), clip.score_metric()
    seeds = [settings.seed + i * n for i in range(len(prompts))]
    for drawn in drawer(prompts, seeds, n, "long prompts"):
        images = image_tensors(pil_to_uint8([im for _, _, im in drawn]), clip.device)
        head.update(images, [prompts[i] for i, _, _ in drawn])  # the processor cuts each to CLIP's 77 tokens
        rest = [k for k, (i, _, _) in enumerate(drawn) if beyond[i]]
        if rest:
            tail.update([images[k] for k in rest], [beyond[drawn[k][0]] for k in rest])
    report.metrics["long/clip_score"] = _score(head)
    report.metrics["long/clip_score_beyond_77"] = _score(tail)
    report.counts.update({"long/prompts": len(prompts), "long/prompts_beyond_77": sum(bool(b) for b in beyond)})


def binding_for(option: str, languages: list[str], demo: bool) -> prompt_sets.BindingSet | str:
    """`auto`: the demo's two-object scenes on the demo base, else the bundled set; a string says why there is none."""
    choice = ("demo" if demo else "bundled") if option == "auto" else option
    if choice == "demo":
        if not hasattr(demo_data, "binding_prompts"):
            return "the demo data has no two-object scenes (demo_data.binding_prompts) in this version"
        return prompt_sets.demo_binding_set(languages)
    return prompt_sets.read_binding_file(prompt_sets.BUNDLED_BINDING if choice == "bundled" else choice, languages)


def binding_vqa_for(settings: EvalSettings, tools: SharedTools, bset: prompt_sets.BindingSet) -> VQA | str:
    """BLIP-VQA from `binding_vqa=PATH`; without it, the demo read-back for the demo's own scenes; a string says why none."""
    if settings.binding_vqa:
        return tools.binding_vqa
    if bset.name == "demo":
        return DemoVQA()
    return ("no binding_vqa=PATH (a BlipForQuestionAnswering folder, e.g. Salesforce/blip-vqa-base); "
            "the demo's read-back answers only for the demo's own scenes")


def run_binding_set(drawer: Drawer, settings: EvalSettings, tools: SharedTools, report: Report, demo: bool) -> None:
    bset = binding_for(settings.binding, settings.languages, demo)
    vqa = binding_vqa_for(settings, tools, bset) if not isinstance(bset, str) else bset
    if isinstance(vqa, str):
        report.skipped["binding"] = vqa
        return
    metrics, counts = binding_set(drawer, settings.languages, bset, vqa, settings.num_images, settings.seed,
                                  settings.batch_size)
    report.metrics.update(metrics)
    report.counts.update(counts)
    report.models["binding_vqa"] = {"name": vqa.name, "stand_in": vqa.stand_in, "description": vqa.name}


def text_set(generator: Generator, cfg: DictConfig | None, settings: EvalSettings, report: Report) -> None:
    if cfg is None:
        report.skipped["text"] = "no config.yaml in run_dir (the stage-1 measures use the run's loss settings)"
        return
    try:
        urls = held_out_text_urls(settings.text, cfg)
    except SavedCommandRefused as err:
        report.skipped["text"] = str(err)
        return
    if urls is None:
        report.skipped["text"] = ("no held-out parallel text: give text=SHARD_URLS (stage-1 text shards)"
                                  if settings.text != "none" else "text=none")
        return
    pool = settings.text_pool or int(cfg.eval.retrieval_pool)
    report.metrics.update(held_out_text_metrics(generator.encoder, cfg, urls, pool, base_path=settings.base))


class SavedCommandRefused(ValueError):
    """A saved config asks to run a command (a `pipe:` URL) that the user did not give."""


def held_out_text_urls(option: str, cfg: DictConfig) -> str | None:
    """`auto`: a stage-1 run's own validation shards, else the demo's held-out text for demo-data runs."""
    if option == "none":
        return None
    if option != "auto":
        return option
    if int(cfg.stage) == 1 and OmegaConf.select(cfg, "data.val.urls"):
        urls = str(cfg.data.val.urls)
        if "pipe:" in urls:  # a run folder is a file from elsewhere: its config does not get to run commands
            raise SavedCommandRefused(
                "the run's saved config reads its validation text through a pipe: command, which is not run on a "
                "saved file's say-so: give text=SHARD_URLS on the command line to measure it")
        return urls
    if OmegaConf.select(cfg, "presets.data") == "demo":
        return demo_data.demo_shard_urls(1, "val")
    return None


# ----------------------------------------------------------------------------- one run


def parallel_set_for(option: str, languages: list[str], demo: bool) -> prompt_sets.ParallelSet:
    """`auto`: the demo's plain prompts on the demo base (colour can be read back), else the bundled set."""
    choice = ("demo" if demo else "parallel") if option == "auto" else option
    if choice == "demo":
        return prompt_sets.demo_parallel_set(languages)
    return prompt_sets.read_parallel_file(prompt_sets.BUNDLED_PARALLEL if choice == "parallel" else choice, languages)


def reference_for(option: str, demo: bool) -> str | None:
    """`auto`: the demo's held-out image shards on the demo base; nothing otherwise."""
    if option == "none":
        return None
    if option == "auto":
        return demo_data.demo_shard_urls(2, "val") if demo else None
    return option


def load_run_config(run_dir: Path) -> DictConfig | None:
    """The run's saved config over today's defaults: a run saved before a key existed
    (speed.*, say) still builds today's modules."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    return OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "base.yaml"), OmegaConf.load(path))


def run_header(run_dir: Path, generator: Generator, settings: EvalSettings) -> dict[str, Any]:
    """What metrics.json says about the run and the drawing settings (the run's defaults filled in)."""
    meta = generator.metadata
    return {
        "run_dir": str(run_dir), "stage": meta.get("stage"), "global_step": meta.get("global_step"),
        "base_model": meta.get("base_model", {}).get("name"), "llm": (meta.get("llm") or {}).get("name"),
        "text_encoder": meta.get("text_encoder", "llm"),
        "evaluated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "settings": settings.describe(),
        "sampling": {name: getattr(settings, name) if getattr(settings, name) is not None else generator.defaults.get(name)
                     for name in ("scheduler", "steps", "guidance")},
    }


def models_used(settings: EvalSettings, tools: SharedTools) -> dict[str, Any]:
    """Which CLIP, FID features and aesthetic head made the numbers, stand-ins marked as such."""
    models: dict[str, Any] = {}
    if {"captions", "multilingual", "long"} & set(settings.sets):
        clip = tools.clip
        models["clip"] = {"name": clip.name, "stand_in": clip.stand_in,
                          "description": (f"CLIP from {settings.clip}" if settings.clip
                                          else DEMO_CLIP_DESCRIPTION if clip.name == DEMO_CLIP_NAME else clip.name)}
    if tools.distance is not None:
        space = tools.distance.space
        models["fid_features"] = {"name": space.name, "stand_in": space.stand_in, "description": space.description}
    models["aesthetic_head"] = settings.aesthetic_head
    return models


@dataclass(frozen=True)
class BaseModel:
    """The base model evaluated with its own CLIP (``run_dir=base``) and how to draw with it."""

    path: str
    kind: str  # demo | sd15 | sdxl
    revision: str | None
    defaults: dict[str, Any]  # scheduler, steps, guidance, negative prompt: the runs' own when there are runs

    @property
    def name(self) -> str:
        return Path(self.path.rstrip("/")).name or self.path


def all_on_demo_base(run_dirs: list[Path], base: BaseModel | None) -> bool:
    """Every run of the call (and the base row, if any) is on the demo base, as its export says."""
    kinds = [str(read_export_metadata(find_export(run_dir))["base_model"]["kind"]) for run_dir in run_dirs]
    if base is not None:
        kinds.append(base.kind)
    return bool(kinds) and all(kind == "demo" for kind in kinds)


def base_kind_of(path: str, revision: str | None) -> str:
    """demo | sd15 | sdxl, from the pipeline's model_index.json (a local folder or the HF cache)."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(path, revision=revision)
    except (OSError, ValueError) as err:
        raise ConfigError(f"option 'base': cannot read {path}'s model_index.json: {err}") from err
    name = str(config.get("_class_name", ""))
    if config.get("linguadiff_base") == "demo":
        return "demo"
    if name.startswith("StableDiffusionXL"):
        return "sdxl"
    if name.startswith("StableDiffusion"):
        return "sd15"
    raise ConfigError(f"option 'base': {path} is a {name or 'pipeline without _class_name'}; "
                      "run_dir=base evaluates Stable Diffusion 1.x/2.x, SDXL or the demo base")


def resolve_base(settings: EvalSettings, run_dirs: list[Path]) -> BaseModel:
    """The base for ``run_dir=base``: ``base=PATH``, else the one the runs' exports name (they must agree).

    Drawing defaults come from the first run's export, so the base is drawn exactly as the
    runs beside it; without runs, from the configs of the base's kind."""
    metas = [read_export_metadata(find_export(run_dir)) for run_dir in run_dirs]
    named = sorted({(str(m["base_model"]["path"]), m["base_model"].get("revision")) for m in metas}, key=str)
    if settings.base:
        path, revision = settings.base, None
    elif len(named) == 1:
        path, revision = named[0]
        require_on_this_machine(path, "base model", "base", revision, "model_index.json")  # an export's say-so
    elif not named:
        raise ConfigError("run_dir=base needs base=PATH (the base model to evaluate with its own CLIP) "
                          "or a run beside it whose export names its base")
    else:
        raise ConfigError(f"run_dir=base: the runs were trained on different bases ({', '.join(p for p, _ in named)}); "
                          "give base=PATH")
    kinds = {str(m["base_model"]["kind"]) for m in metas}
    kind = kinds.pop() if len(kinds) == 1 else base_kind_of(path, revision)
    if metas:
        defaults = dict(metas[0].get("generate", {}))
    else:
        defaults = dict(OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "base.yaml").generate))
        preset = CONFIG_DIR / "model" / f"{kind}.yaml"
        if preset.is_file():
            defaults.update(OmegaConf.to_container(OmegaConf.load(preset).get("generate", {})) or {})
    return BaseModel(path=path, kind=kind, revision=revision, defaults=defaults)


def evaluate_base(base: BaseModel, out_dir: Path, settings: EvalSettings, tools: SharedTools) -> Report:
    """The base with its own CLIP on every set and language; writes out_dir/eval/metrics.json,
    grid.png and TensorBoard like a run. The text set is skipped: its measures compare an
    encoder with this very CLIP."""
    started = time.perf_counter()
    log.info("Evaluating the base %s with its own CLIP text encoder (results in %s)", base.path, out_dir)
    generator = Generator.from_base(base.path, base.kind, device=settings.device, dtype=settings.dtype,
                                    revision=base.revision, **base.defaults)
    header = {
        "run_dir": str(out_dir), "stage": "base", "global_step": 0, "base_model": base.path, "llm": None,
        "text_encoder": "the base's own CLIP",
        "evaluated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "settings": settings.describe(),
        "sampling": {name: getattr(settings, name) if getattr(settings, name) is not None else base.defaults.get(name)
                     for name in ("scheduler", "steps", "guidance")},
    }
    skip_text = "the text measures compare an encoder with the base's own CLIP: nothing to measure for the base itself"
    return _evaluate(generator, Report(out_dir, header=header), None, settings, tools, started, skip_text)


def evaluate_run(run_dir: Path, settings: EvalSettings, tools: SharedTools) -> Report:
    """Evaluate one run's export; writes run_dir/eval/metrics.json, grid.png and TensorBoard."""
    started = time.perf_counter()
    generator = Generator.from_run(run_dir, device=settings.device, dtype=settings.dtype, base_path=settings.base,
                                   llm_path=settings.llm, trust_remote_code=settings.trust_remote_code)
    report = Report(run_dir, header=run_header(run_dir, generator, settings))
    skip_text = (CONTROL_SKIPS_TEXT if generator.metadata.get("text_encoder") == "clip" else None)
    return _evaluate(generator, report, load_run_config(run_dir), settings, tools, started, skip_text)


# A control run (text_encoder=clip) draws with the base's own CLIP, as the base does.
CONTROL_SKIPS_TEXT = ("a control run (text_encoder=clip) encodes with the base's own CLIP: the text measures compare "
                      "an encoder with that very CLIP, nothing to measure")


def _evaluate(generator: Generator, report: Report, cfg: DictConfig | None, settings: EvalSettings, tools: SharedTools,
              started: float, skip_text: str | None = None) -> Report:
    from linguadiff.images import image_grid

    run_dir = report.run_dir
    demo = generator.kind == "demo"
    report.timings_s["load"] = time.perf_counter() - started
    drawer = Drawer(generator, settings.steps, settings.guidance, settings.scheduler, settings.batch_size)
    grid_rows: list[list[Image.Image]] = []
    for name in settings.sets:
        set_started = time.perf_counter()
        if name == "captions":
            caption_set(drawer, settings, tools, report, reference_for(settings.reference, demo), output_size(generator))
        elif name == "multilingual":
            parallel = parallel_set_for(settings.multilingual, settings.languages, demo)
            grid_rows = multilingual_set(drawer, settings, tools, report, parallel, demo)
        elif name == "long":
            long_set(drawer, settings, tools, report)
        elif name == "binding":
            run_binding_set(drawer, settings, tools, report, demo)
        elif skip_text:
            report.skipped["text"] = skip_text
        else:
            text_set(generator, cfg, settings, report)
        report.timings_s[name] = time.perf_counter() - set_started
        log.info("%s: %s set done in %.1f s", run_dir.name, name, report.timings_s[name])
    report.models = {**models_used(settings, tools), **report.models}
    report.metrics = {k: v for k, v in report.metrics.items() if v is not None}
    grid = image_grid([row for row in grid_rows if row]) if any(grid_rows) else None
    if grid is not None:
        report.eval_dir.mkdir(parents=True, exist_ok=True)
        grid.save(report.eval_dir / GRID_FILE)
    report.timings_s["total"] = time.perf_counter() - started
    path = report.write()
    if settings.tensorboard:
        write_tensorboard(run_dir, int(generator.metadata.get("global_step") or 0), report.metrics, grid)
    log.info("%s: wrote %s (%.1f s)", run_dir.name, path, report.timings_s["total"])
    return report
