"""Sample images during stages 2-3: a fixed grid of prompts drawn with the EMA weights.

Several languages, one long prompt and a negative prompt (configs: `samples.*`), the same
seeds every time, so grids from step to step show what training changes. Written to
TensorBoard (`samples/grid`) and to run_dir/samples/step<N>.png. Drawing goes through the
same Generator as generate.py, so what you see here is what users get.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
from omegaconf import DictConfig

from linguadiff.generation import AdapterTextEncoder, Generator, make_scheduler, pipeline_from_components
from linguadiff.images import image_grid
from linguadiff.strategy import is_fsdp

log = logging.getLogger(__name__)


class SampleImages(L.Callback):
    def __init__(self, cfg: DictConfig, out_dir: str | Path) -> None:
        self.cfg = cfg
        self.every = int(cfg.samples.every_n_steps)
        self.out_dir = Path(out_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every > 0 and step % self.every == 0 and step > 0:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every > 0 and trainer.global_step % self.every:
            self.draw(trainer, pl_module)

    def draw(self, trainer: L.Trainer, pl_module) -> Path | None:
        """Rank 0 draws and saves; under FSDP every rank runs the same forward passes (each
        layer's weights are gathered from all ranks) and rank 0 saves."""
        if not (trainer.is_global_zero or is_fsdp(trainer.strategy)):
            return None
        s, g = self.cfg.samples, self.cfg.generate
        module_mode = pl_module.training
        pl_module.eval()
        try:
            with pl_module.ema_weights():
                generator = Generator(
                    encoder=AdapterTextEncoder(pl_module.text_encoder, pl_module.adapter),
                    pipeline=pipeline_from_components(
                        self.cfg.model.kind, pl_module.unet, pl_module.vae,
                        make_scheduler(g.scheduler, pl_module.noise_scheduler.config),
                    ),
                    kind=self.cfg.model.kind,
                    metadata={},
                    defaults={"scheduler": g.scheduler, "steps": g.steps, "guidance": g.guidance},
                )
                generator.pipeline.set_progress_bar_config(disable=True)
                prompts = list(s.prompts)
                drawn = generator(prompts, negative_prompt=s.negative_prompt, num_images=s.num_images, seed=s.seed,
                                  batch_size=self.cfg.data.batch_size)  # what fits for training fits for sampling
        finally:
            pl_module.train(module_mode)
        if not trainer.is_global_zero:
            return None
        rows = [[im for i, _, im in drawn if i == p] for p in range(len(prompts))]
        grid = image_grid(rows)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step{trainer.global_step:08d}.png"
        grid.save(path)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image("samples/grid", np.asarray(grid), trainer.global_step, dataformats="HWC")
        log.info("Sample grid (EMA weights, %d prompts x %d) at step %d: %s", len(prompts), s.num_images, trainer.global_step, path)
        return path
