"""Callbacks: export, sample grids, throughput and progress, preemption, random state, and
stopping every rank when one fails.

`build_callbacks` maps the run's config onto the callbacks' typed constructor arguments, in
one place (as `datamodules.build_datamodule` does for the data); the callbacks never see the
config.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
from omegaconf import DictConfig


def build_callbacks(cfg: DictConfig, run_root: Path, export_dir: Path) -> list[L.Callback]:
    from callbacks.export import RunExport
    from callbacks.preemption import PreemptionHandler
    from callbacks.progress import ThroughputLogger
    from callbacks.rank_failure import StopAllRanksOnError
    from callbacks.rng_state import RNGState
    from callbacks.sample_images import SampleImages, SampleSettings
    from callbacks.stream_position import StreamPosition
    from linguadiff.export import adapter_metadata

    callbacks: list[L.Callback] = [
        ThroughputLogger(cfg.trainer.log_every_n_steps * 5, unit="prompts" if cfg.stage == 1 else "images"),
        RunExport(export_dir, adapter_metadata(cfg)),
        PreemptionHandler(),
        RNGState(cfg.seed),
        StreamPosition(),
    ]
    if cfg.stage > 1:
        s, g = cfg.samples, cfg.generate
        settings = SampleSettings(
            base_kind=str(cfg.model.kind), prompts=tuple(s.prompts), every_n_steps=int(s.every_n_steps),
            negative_prompt=str(s.negative_prompt), num_images=int(s.num_images), seed=int(s.seed),
            scheduler=str(g.scheduler), steps=int(g.steps), guidance=float(g.guidance), batch_size=int(cfg.data.batch_size),
            sizes=tuple((int(h), int(w)) for h, w in (s.sizes or ())),
        )
        callbacks.append(SampleImages(settings, run_root / "samples"))
    return [*callbacks, StopAllRanksOnError()]  # last: its on_exception ends the process
