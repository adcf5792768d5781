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
- ``text``: stage-1 measures on held-out parallel text (no images).

What several runs share (CLIP, the aesthetic head, the reference features) is loaded once
in :class:`SharedTools`; each run then gets its own ``eval/metrics.json``.
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
from evaluation.clip_models import CLIPBundle, cross_language_similarity, image_tensors, load_clip, stand_in_clip
from evaluation.image_features import FID_FEATURES, DistributionDistance, feature_space
from evaluation.references import reference_batches
from evaluation.report import GRID_FILE, Report, write_tensorboard
from evaluation.text_alignment import held_out_text_metrics
from linguadiff.generation import Generator

log = logging.getLogger(__name__)

SETS = ("captions", "multilingual", "long", "text")
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
        for name in ("clip", "inception_weights", "aesthetic_head", "base", "llm"):  # paths, even if YAML reads a number
            fields[name] = None if fields[name] is None else str(fields[name])
        fields.update(sets=sets, languages=languages, device=device, dtype=dtype,
                      trust_remote_code=bool(args.get("llm.trust_remote_code", False)))
        return cls(**fields)

    def describe(self) -> dict[str, Any]:
        """The settings metrics.json records (what decides the numbers)."""
        keep = ("sets", "languages", "multilingual", "captions", "long_prompts", "reference", "reference_images", "text",
                "num_images", "fid_images", "seed", "fid_features", "device", "dtype")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if k in keep}


def pil_to_uint8(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> uint8 [N, 3, H, W]."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


def output_size(generator: Generator) -> int:
    """Side of the images the run draws: the UNet's sample size times the VAE's downscaling (1 for the demo)."""
    return int(generator.pipeline.unet.config.sample_size) * int(getattr(generator.pipeline, "vae_scale_factor", 1))


class SharedTools:
    """What every run of one call uses: CLIP, the aesthetic head, the reference images' features."""

    def __init__(self, settings: EvalSettings) -> None:
        self.settings = settings
        self._reference: tuple[DistributionDistance | None, list[str]] | None = None

    @cached_property
    def clip(self) -> CLIPBundle:
        if self.settings.clip:
            log.info("Loading CLIP from %s", self.settings.clip)
            return load_clip(self.settings.clip, self.settings.device)
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
        "base_model": meta.get("base_model", {}).get("name"), "llm": meta.get("llm", {}).get("name"),
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
                          "description": clip.name if clip.stand_in else f"CLIP from {settings.clip}"}
    if tools.distance is not None:
        space = tools.distance.space
        models["fid_features"] = {"name": space.name, "stand_in": space.stand_in, "description": space.description}
    models["aesthetic_head"] = settings.aesthetic_head
    return models


def evaluate_run(run_dir: Path, settings: EvalSettings, tools: SharedTools) -> Report:
    """Evaluate one run's export; writes run_dir/eval/metrics.json, grid.png and TensorBoard."""
    from linguadiff.images import image_grid

    started = time.perf_counter()
    generator = Generator.from_run(run_dir, device=settings.device, dtype=settings.dtype, base_path=settings.base,
                                   llm_path=settings.llm, trust_remote_code=settings.trust_remote_code)
    demo = generator.kind == "demo"
    report = Report(run_dir, header=run_header(run_dir, generator, settings))
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
        else:
            text_set(generator, load_run_config(run_dir), settings, report)
        report.timings_s[name] = time.perf_counter() - set_started
        log.info("%s: %s set done in %.1f s", run_dir.name, name, report.timings_s[name])
    report.models = models_used(settings, tools)
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
