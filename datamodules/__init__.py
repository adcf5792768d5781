"""Data for each stage: WebDataset-layout tar shards streamed into batches.

One idea per file, lowest first: `sources` (shard URLs, weighted sources, language codes),
`skips` (skipped inputs, counted and warned about, summed over ranks), `checks` (bounds
on one sample's untrusted contents), `tar_reading` (shards -> raw samples),
`streams` (which consumer reads what, and the combinators down to worker-made batches),
`datamodule` (the LightningDataModule base); then what a sample means: `text_shards`
(stage 1), `image_shards` and `cached` (stages 2-3), and the demo data set (`demo_data`).
"""
from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from linguadiff.config import ConfigError, register_resolver


def _demo_shards(stage: int, split: str, images: str = "square") -> str:
    """Shard URLs of the demo data set for a stage: parallel text for stage 1, image-text
    shards for stages 2-3 (square or mixed-aspect images; generated on first use)."""
    from datamodules.demo_data import demo_shard_urls

    return demo_shard_urls(int(stage), split, images)


# ${demo_shards:${stage},train} -> the demo's shards for that stage (configs/data/demo.yaml);
# ${demo_shards:${stage},train,mixed}: its mixed-aspect images (configs/data/demo_buckets.yaml).
# Registered here, on import, because config must not import data code: an entry point that
# resolves a config imports datamodules first (linguadiff.config.resolve says so otherwise).
register_resolver("demo_shards", _demo_shards)


def shard_spec(split: DictConfig | None) -> dict[str, Any] | None:
    """The config's ``{urls, sources}`` pair as the shard readers take it (None: no shards)."""
    if split is None:
        return None
    sources = list(split.get("sources") or [])
    if sources:
        if split.get("urls"):
            raise ConfigError("set either data.*.urls or data.*.sources, not both")
        return {"sources": [dict(s) for s in sources]}
    return {"urls": split.urls} if split.get("urls") else None


def shard_problems(cfg: DictConfig) -> list[str]:
    """What is wrong with the config's shard URLs, before any model loads: a local path or
    glob that matches no file, both urls and sources, a bad source entry (one sentence each,
    naming the key; `pipe:` and remote URLs are only checked when opened). For
    `linguadiff.settings_check.check_settings(cfg, extra=[shard_problems])`."""
    from datamodules.sources import parse_sources

    problems = []
    for split in ("train", "val"):
        node = cfg.data[split]
        key = f"data.{split}.sources" if node.get("sources") else f"data.{split}.urls"
        try:
            spec = shard_spec(node)
            if spec is None:
                if split == "train":
                    problems.append("config key 'data.train.urls' must be set (or data.train.sources)")
                continue
            parse_sources(spec)
        except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
            problems.append(f"config key '{key}': {err}")
    return problems


def build_datamodule(cfg: DictConfig, tokenizers: dict[str, Any] | None = None):
    """The datamodule of ``cfg.stage`` (text shards for stage 1, image-text shards for stages
    2-3), with the stage module's tokenizers run in its workers."""
    d = cfg.data
    train = shard_spec(d.train)
    if train is None:
        raise ConfigError("config key 'data.train.urls' must be set (or data.train.sources)")
    common = dict(
        train=train,
        val=shard_spec(d.val),
        batch_size=d.batch_size,
        val_batch_size=d.val_batch_size,
        num_workers=d.num_workers,
        shuffle_buffer=d.shuffle_buffer,
        languages=dict(d.languages),
        seed=cfg.seed,
        tokenizers=tokenizers,
    )
    if cfg.stage == 1:
        from datamodules.text_shards import TextShardsDataModule

        datamodule = TextShardsDataModule(**common)
    else:
        from datamodules.cached import llm_signature
        from datamodules.image_shards import ImageTextDataModule
        from linguadiff.buckets import configured_buckets
        from linguadiff.settings_check import resolution_multiple

        # A control run (the base's own CLIP) never reads cached LLM states; cached latents it does.
        control = cfg.get("text_encoder") == "clip"
        if control:
            logging.getLogger(__name__).info("text_encoder=clip: the base's CLIP encodes every caption; LLM states "
                                             "cached in the shards (if any) are not read, cached latents are")
        datamodule = ImageTextDataModule(
            resolution=cfg.model.resolution,
            caption_dropout=d.caption_dropout,
            random_crop=d.random_crop,
            random_flip=d.random_flip,
            min_size=d.min_size,
            min_aesthetic=d.min_aesthetic,
            llm_signature=None if control else llm_signature(cfg.llm),
            buckets=configured_buckets(d, cfg.model.resolution, resolution_multiple(cfg.model)[0]),
            **common,
        )
    datamodule.even_val_batches = cfg.trainer.strategy == "fsdp"
    datamodule.next_prompts = cfg.stage != 1 and bool(cfg.speed.get("encode_ahead", False))
    return datamodule
