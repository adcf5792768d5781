"""Sample images during stages 2-3: a fixed grid of prompts drawn with the EMA weights.

Several languages, one long prompt and a negative prompt (configs: `samples.*`), the same
seeds every time, so grids from step to step show what training changes. Drawing goes through
the same Generator as generate.py, so what you see here is what users get.

A grid must say what it shows: each row is numbered in a left margin (digits only:
a font with CJK glyphs may be missing, so prompts are never drawn into the image), and the
number -> prompt mapping is written beside it:

- run_dir/samples/step<N>.png and step<N>.json (each row's prompt, seeds, the negative prompt
  and drawing settings);
- TensorBoard: `samples/grid` (the numbered grid), `samples/prompt_<row>` (one row's images)
  and `samples/prompts` in the Text tab (a markdown table: row, prompt, negative prompt,
  seeds, step).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np

from linguadiff.generation import Generator, make_scheduler, pipeline_from_components
from linguadiff.images import image_grid
from linguadiff.strategy import is_fsdp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleSettings:
    """What to draw (configs: `samples.*`), how (`generate.*`) and for which base."""

    base_kind: str  # demo | sd15 | sdxl: which diffusers pipeline draws
    prompts: tuple[str, ...]
    every_n_steps: int = 1000  # 0: never
    negative_prompt: str = ""
    num_images: int = 2
    seed: int = 0
    scheduler: str = "dpm++"
    steps: int = 50
    guidance: float = 7.5
    batch_size: int = 16  # what fits for training fits for sampling: data.batch_size
    # (h, w) pixel sizes, a grid each (aspect-ratio buckets); empty: the base's own square.
    sizes: tuple[tuple[int, int], ...] = ()


class SampleImages(L.Callback):
    """Draws the grid every `every_n_steps` and at the end of training, with the stage module's
    EMA weights; the module provides `prompt_encoder`, `unet`, `vae`, `noise_scheduler` and
    `ema_weights()`."""

    def __init__(self, settings: SampleSettings, out_dir: str | Path) -> None:
        self.settings = settings
        self.every = int(settings.every_n_steps)
        self.out_dir = Path(out_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every > 0 and step % self.every == 0 and step > 0:
            self.draw_or_warn(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every > 0 and trainer.global_step % self.every:
            self.draw_or_warn(trainer, pl_module)

    def draw_or_warn(self, trainer: L.Trainer, pl_module) -> Path | None:
        """A grid is for people to look at: if drawing fails (a prompt, a dtype, the disk),
        say so and train on; a night's run must not die for a picture."""
        try:
            return self.draw(trainer, pl_module)
        except Exception:  # noqa: BLE001 - any failure of a side task
            log.exception("Sample grid at step %d failed; training goes on", trainer.global_step)
            return None

    def draw(self, trainer: L.Trainer, pl_module) -> Path | None:
        """Rank 0 draws and saves; under FSDP every rank runs the same forward passes (each
        layer's weights are gathered from all ranks) and rank 0 saves."""
        if not (trainer.is_global_zero or is_fsdp(trainer.strategy)):
            return None
        s = self.settings
        module_mode = pl_module.training
        pl_module.eval()
        try:
            with pl_module.ema_weights():
                generator = Generator(
                    encoder=pl_module.prompt_encoder,
                    pipeline=pipeline_from_components(
                        s.base_kind, pl_module.unet, pl_module.vae, make_scheduler(s.scheduler, pl_module.noise_scheduler.config),
                    ),
                    kind=s.base_kind,
                    metadata={},
                    defaults={"scheduler": s.scheduler, "steps": s.steps, "guidance": s.guidance},
                )
                generator.pipeline.set_progress_bar_config(disable=True)
                prompts = list(s.prompts)
                # The first size's grid keeps the plain names; each other size adds "_HxW".
                drawn_by_size = [
                    ("" if n == 0 else f"_{h}x{w}",
                     generator(prompts, negative_prompt=s.negative_prompt, num_images=s.num_images, seed=s.seed,
                               batch_size=s.batch_size, height=h, width=w))
                    for n, (h, w) in enumerate(s.sizes or ((None, None),))
                ]
        finally:
            pl_module.train(module_mode)
        if not trainer.is_global_zero:
            return None
        step = trainer.global_step
        self.out_dir.mkdir(parents=True, exist_ok=True)
        legend = self.legend(step)
        experiment = getattr(trainer.logger, "experiment", None)
        first = None
        for suffix, drawn in drawn_by_size:
            rows = [[im for i, _, im in drawn if i == p] for p in range(len(prompts))]
            grid = image_grid(rows, row_labels=[str(p) for p in range(len(prompts))])
            path = self.out_dir / f"step{step:08d}{suffix}.png"
            grid.save(path)
            first = first or path
            if experiment is not None and hasattr(experiment, "add_image"):
                experiment.add_image(f"samples/grid{suffix}", np.asarray(grid), step, dataformats="HWC")
                for p, row in enumerate(rows):
                    experiment.add_image(f"samples/prompt_{p:02d}{suffix}", np.asarray(image_grid([row])), step,
                                         dataformats="HWC")
        path = first
        path.with_suffix(".json").write_text(json.dumps(legend, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        if experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text("samples/prompts", prompts_table(legend), step)
        log.info("Sample grid (EMA weights, %d prompts x %d) at step %d: %s", len(prompts), s.num_images, step, path)
        return path

    def legend(self, step: int) -> dict:
        """What the grid drawn at `step` shows, row by row: image j of every row is drawn from
        seed `seed + j` (Generator's rule), so a column compares prompts on the same noise."""
        s = self.settings
        seeds = [s.seed + j for j in range(s.num_images)]
        return {
            "step": step, "weights": "ema", "negative_prompt": s.negative_prompt,
            "scheduler": s.scheduler, "steps": s.steps, "guidance": s.guidance,
            "rows": [{"row": p, "prompt": prompt, "seeds": seeds} for p, prompt in enumerate(s.prompts)],
            **({"sizes": [list(size) for size in s.sizes]} if s.sizes else {}),
        }


def prompts_table(legend: dict) -> str:
    """The legend as a markdown table for TensorBoard's Text tab, one line per grid row. A `|`
    in a prompt is escaped and a line break flattened, so a prompt stays in its own cell."""
    def cell(text: str) -> str:
        return " ".join(text.split("\n")).replace("|", "\\|")

    lines = ["| row | prompt | negative prompt | seeds | step |", "|---|---|---|---|---|"]
    for row in legend["rows"]:
        seeds = ", ".join(str(seed) for seed in row["seeds"])
        lines.append(f"| {row['row']} | {cell(row['prompt'])} | {cell(legend['negative_prompt'])} | {seeds} | {legend['step']} |")
    return "\n".join(lines)
