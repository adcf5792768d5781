"""Precompute stage-2/3 inputs once: VAE latents (and optionally LLM features) into new shards.

    python scripts/cache_features.py stage=2 model=sdxl llm=qwen2.5-7b \
        data.train.urls='/data/laion/{00000..09999}.tar' data.val.urls=/data/laion-val.tar \
        cache.out=/data/laion-sdxl-cached [cache.llm_states=true]
    # then train on the cached shards (the datamodule detects the cached fields):
    python train.py stage=2 ... data.train.urls='/data/laion-sdxl-cached/train/{00000..09999}.tar' \
        data.val.urls=/data/laion-sdxl-cached/val/laion-val.tar

The same config as training (model=, llm=, data=; the crop size is model.resolution, or with
data.crop=buckets each image's bucket, chosen as training chooses it: train on the cache with
the same bucket settings); the member formats are in datamodules/cached.py. Each output
shard holds the input's samples, in their order, with the image replaced by its centre
crop's VAE latent distribution (pixels for the demo's
pixel-space base), captions and json kept, and beside it NAME_stats.json (img2dataset's
format: the trainer reads steps per epoch from it).

Runs split over processes: every process takes every N-th input shard, by its rank from
torchrun (RANK / WORLD_SIZE) or srun (SLURM_PROCID / SLURM_NTASKS), on its own GPU. Output
shards are written under a temporary name and renamed when complete, so a rerun (after a
failure or preemption) skips the shards that are done and redoes only the unfinished ones.
Bad samples are skipped and counted, as in training (any error while decoding one sample
is that sample's fault). An input shard whose reading failed (unreadable, truncated,
corrupt headers, a stalled or failing `pipe:`) is not committed: its partial output is
deleted, the others go on, and the exit status is 1 so that a rerun retries it.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

log = logging.getLogger("cache_features")


def output_names(urls: list[str]) -> list[str]:
    """Output shard names: the input's file name, prefixed by its position where two collide."""
    names = [Path(url.split("::")[0].rstrip("/")).name or f"shard{i:05d}.tar" for i, url in enumerate(urls)]
    names = [name if name.endswith(".tar") else f"{name}.tar" for name in names]
    if len(set(names)) < len(names):
        names = [f"{i:05d}-{name}" for i, name in enumerate(names)]
    return names


class FeatureWriter:
    """Turns raw image-text samples into cached samples, a batch at a time on one device."""

    def __init__(self, cfg, device: torch.device) -> None:
        from linguadiff.models.diffusion import load_vae
        from linguadiff.models.text_encoder import LLMTextEncoder

        from datamodules.cached import llm_signature

        from datamodules.image_shards import ImageTextDecoder
        from linguadiff.buckets import configured_buckets
        from linguadiff.settings_check import resolution_multiple

        m = cfg.model
        self.resolution = int(m.resolution)
        # The size each image is cropped to: its bucket (data.crop=buckets) or the square,
        # chosen exactly as the training stream chooses it.
        buckets = configured_buckets(cfg.data, self.resolution, resolution_multiple(m)[0])
        self.sizer = ImageTextDecoder(self.resolution, train=False, buckets=None if buckets is None else tuple(buckets))
        self.device = device
        self.vae = load_vae(m.path, m.kind, m.dtype, m.revision)
        if self.vae is not None:
            self.vae.to(device)
        self.text_encoder = None
        self.llm_chunk = max(1, int(cfg.data.batch_size))  # captions per LLM call
        if cfg.cache.llm_states:
            self.text_encoder = LLMTextEncoder.from_settings(cfg.llm, device=device if device.type == "cuda" else None)
            self.text_encoder.to(device)
            self.signature = llm_signature(cfg.llm)

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Raw sample -> centre crop and metadata; raises BadSample like the training decoder."""
        from datamodules.image_shards import (
            DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadSample, caption_candidates, cover_crop, open_image, read_json,
        )

        from datamodules.cached import CACHE_MEMBERS

        meta = read_json(raw["json"]) if "json" in raw else {}
        try:
            json.dumps(meta, ensure_ascii=False)  # written back later: fail here, per sample
        except Exception as error:  # noqa: BLE001
            raise BadSample("bad_json", f"cannot be written back: {type(error).__name__}") from None
        captions = caption_candidates(raw, meta)
        if CACHE_MEMBERS & set(raw):
            raise BadSample("already_cached", "the input sample holds cached features, not an image")
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if extension is None:
            raise BadSample("missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} member")
        image = open_image(raw[extension], DEFAULT_MAX_PIXELS)
        crop = cover_crop(image, self.sizer.target_size(image.height, image.width), None)
        return {"raw": raw, "meta": meta, "captions": captions, "crop": crop}

    @torch.no_grad()
    def encode(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Decoded items -> the samples to write (datamodules/cached.py formats)."""
        from datamodules.cached import EMPTY, LLM_STATES, META_KEY, MOMENTS, PIXELS, caption_name, llm_npz, to_npy

        moments: list[torch.Tensor] = [None] * len(items)
        if self.vae is not None:  # one VAE call per crop size: buckets mix sizes in a chunk
            by_size: dict[tuple, list[int]] = {}
            for i, item in enumerate(items):
                by_size.setdefault(tuple(item["crop"].pixels.shape), []).append(i)
            for indices in by_size.values():
                pixels = torch.stack([items[i]["crop"].pixels for i in indices])
                encoded = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.parameters
                for i, row in zip(indices, encoded):
                    moments[i] = row
        states, empty = self._llm_states(items) if self.text_encoder is not None else (None, None)
        samples = []
        for i, item in enumerate(items):
            raw, crop = item["raw"], item["crop"]
            cache = {"resolution": self.resolution, "original_size": list(crop.original_size),
                     "crop_top_left": list(crop.crop_top_left), "target_size": list(crop.pixels.shape[1:])}
            sample = {"__key__": raw["__key__"]}
            if "txt" in raw:
                sample["txt"] = raw["txt"]
            if self.vae is not None:
                sample[MOMENTS] = to_npy(moments[i])
            else:  # uint8, exactly the crop the trainer would make
                sample[PIXELS] = to_npy(((crop.pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8))
            if states is not None:
                cache["llm"] = self.signature
                named = {caption_name(lang, j): states[i][(lang, j)]
                         for lang, texts in item["captions"].items() for j in range(len(texts))}
                sample[LLM_STATES] = llm_npz({**named, EMPTY: empty})
            sample["json"] = json.dumps({**item["meta"], META_KEY: cache}, ensure_ascii=False).encode("utf-8")
            samples.append(sample)
        return samples

    def _llm_states(self, items: list[dict[str, Any]]) -> tuple[list[dict], torch.Tensor]:
        """Per item {(lang, index): [T, D]} for every caption, and the empty prompt's [T, D]."""
        texts, where = [""], [None]
        for i, item in enumerate(items):
            for lang, captions in item["captions"].items():
                for j, text in enumerate(captions):
                    texts.append(text)
                    where.append((i, lang, j))
        tokens = self.text_encoder.tokenizer(texts)
        ids, attention = tokens["input_ids"], tokens["attention_mask"]
        lengths = attention.sum(1)
        trimmed_by_text: list[torch.Tensor | None] = [None] * len(texts)
        # Sorted by length, in chunks cut to their longest: a few long captions do not pad the rest.
        order = torch.argsort(lengths)
        for chunk in order.split(self.llm_chunk):
            width = int(lengths[chunk].max())
            features, _ = self.text_encoder(ids[chunk, :width].to(self.device), attention[chunk, :width].to(self.device))
            for n, feature in zip(chunk.tolist(), features):
                trimmed_by_text[n] = feature[: int(lengths[n])].cpu()  # right padding: the caption's own tokens
        per_item: list[dict] = [{} for _ in items]
        for trimmed, place in zip(trimmed_by_text, where):
            if place is None:
                empty = trimmed
            else:
                i, lang, j = place
                per_item[i][(lang, j)] = trimmed
        return per_item, empty


def cache_shard(writer: FeatureWriter, url: str, out_path: Path, batch_size: int) -> dict[str, Any]:
    """One input shard -> one output shard (written whole, then renamed into place).

    Committed (renamed, with its stats) only when the reader saw the whole input shard
    without a shard-level error; otherwise the partial output is deleted and the returned
    stats carry `error` (a shard cut short must not be taken for a finished one by reruns).
    """
    import webdataset as wds

    from datamodules.image_shards import is_image_text_member
    from datamodules.skips import SkipCounter
    from datamodules.tar_reading import ShardOutcome, iter_tar_samples

    skips = SkipCounter()
    outcome = ShardOutcome()
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    written = 0
    try:
        with wds.TarWriter(str(tmp)) as sink:
            raw_samples = iter_tar_samples(url, skips, is_image_text_member, outcome=outcome)
            for batch in _batches(raw_samples, batch_size, writer, skips):
                for sample in writer.encode(batch):
                    sink.write(sample)
                    written += 1
        if not outcome.complete:
            tmp.unlink(missing_ok=True)
            return {"successes": written, "failed": sum(skips.totals.values()), "skipped": dict(skips.totals),
                    "source": url, "error": outcome.error or "shard not read to its end"}
        tmp.rename(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    stats = {"successes": written, "failed": sum(skips.totals.values()), "skipped": dict(skips.totals), "source": url}
    out_path.with_name(out_path.name[: -len(".tar")] + "_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def _batches(raw_samples: Iterator[dict], size: int, writer: FeatureWriter, skips) -> Iterator[list[dict]]:
    from datamodules.image_shards import BadSample

    batch: list[dict] = []
    for raw in raw_samples:
        try:
            batch.append(writer.decode(raw))
        except Exception as error:  # noqa: BLE001 - one bad sample costs that sample, not the shard
            bad = error if isinstance(error, BadSample) else BadSample(
                "bad_sample", f"{type(error).__name__}: {str(error)[:200]}")
            skips.skip(bad.reason, url_of(raw), raw.get("__key__", ""), bad.detail, warn=bad.warn)
            continue
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def url_of(raw: dict) -> str:
    return str(raw.get("__url__", ""))


def main(argv: list[str] | None = None) -> int:
    from train import setup_logging

    setup_logging()
    from datamodules import shard_problems, shard_spec  # importing datamodules registers ${demo_shards:...}: before resolve
    from datamodules.sources import parse_sources
    from linguadiff.config import ConfigError, load_config, resolve
    from linguadiff.settings_check import check_settings

    try:
        cfg = resolve(load_config(sys.argv[1:] if argv is None else argv))
        check_settings(cfg, extra=[shard_problems], training=False)  # before the LLM and the VAE load
        if not cfg.cache.out:
            raise ConfigError("set cache.out=FOLDER (where the cached shards go)")
        if cfg.stage == 1:
            raise ConfigError("caching is for the image-text stages: give stage=2 (or 3) and their data")
        unknown = sorted(set(cfg.cache.splits) - {"train", "val"})
        if unknown:
            raise ConfigError(f"config key 'cache.splits' may hold train and val, got {unknown}")
        splits = {split: parse_sources(spec) for split in cfg.cache.splits
                  if (spec := shard_spec(cfg.data[split])) is not None}
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from linguadiff.distributed import launch_world

    rank, world, local_rank = launch_world()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    writer = FeatureWriter(cfg, device)
    out_root = Path(cfg.cache.out).expanduser()
    failed_shards: list[str] = []
    for split, sources in splits.items():
        urls = [url for source in sources for url in source.urls]
        names = output_names(urls)
        (out_root / split).mkdir(parents=True, exist_ok=True)
        mine = list(range(rank, len(urls), world))
        log.info("rank %d/%d: %d of %d %s shards -> %s", rank, world, len(mine), len(urls), split, out_root / split)
        for n, index in enumerate(mine, 1):
            out_path = out_root / split / names[index]
            if out_path.exists():
                log.info("[%d/%d] %s: done before, skipped", n, len(mine), out_path.name)
                continue
            started = time.perf_counter()
            stats = cache_shard(writer, urls[index], out_path, int(cfg.data.batch_size))
            seconds = time.perf_counter() - started
            if "error" in stats:
                log.error("[%d/%d] %s: NOT written, the input shard failed (%s); a rerun retries it",
                          n, len(mine), out_path.name, stats["error"])
                failed_shards.append(urls[index])
                continue
            log.info("[%d/%d] %s: %d samples, %.1f/s%s", n, len(mine), out_path.name, stats["successes"],
                     stats["successes"] / max(seconds, 1e-9),
                     f", skipped {stats['skipped']}" if stats["skipped"] else "")
    if failed_shards:
        log.error("rank %d: %d input shard(s) failed and were not written: %s", rank, len(failed_shards),
                  ", ".join(failed_shards[:10]) + (" ..." if len(failed_shards) > 10 else ""))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
