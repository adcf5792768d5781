"""What an evaluation leaves behind: metrics.json, the sample grid, TensorBoard, the table.

TensorBoard: scalars ``eval/<metric>`` and the image ``eval/grid`` go to
``run_dir/tensorboard/eval``, a folder of its own beside the training curves (which stay
untouched), at the run's final global step. TensorBoard pointed at ``run_dir/tensorboard``
shows it as the run "eval"; evaluating the same export again replaces those points
(``purge_step``) instead of stacking a second value on the same step.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

METRICS_FILE = "metrics.json"
GRID_FILE = "grid.png"
TENSORBOARD_SUBDIR = "eval"

# Metrics where smaller is better; spreads and counts have no direction; for the rest higher is better.
_LOWER_IS_BETTER = {"fid", "kid_mean"}
_LOWER_IS_BETTER_FAMILIES = ("text/loss/",)
_NO_DIRECTION = {"kid_std", "text/recall_pool_size"}


@dataclass
class Report:
    """One run's evaluation as it is collected, then written as metrics.json."""

    run_dir: Path
    header: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"

    def stand_ins(self) -> list[str]:
        """Human-readable warnings for every stand-in whose numbers must not meet a paper's."""
        return [f"{role}: {info['description']}" for role, info in self.models.items()
                if isinstance(info, dict) and info.get("stand_in")]

    def as_dict(self) -> dict[str, Any]:
        metrics = {k: (v if math.isfinite(v) else None) for k, v in self.metrics.items()}  # JSON has no NaN
        return {**self.header, "stand_ins": self.stand_ins(), "models": self.models, "metrics": metrics,
                "counts": self.counts, "skipped": self.skipped, "timings_s": {k: round(v, 2) for k, v in self.timings_s.items()}}

    def write(self) -> Path:
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        path = self.eval_dir / METRICS_FILE
        path.write_text(json.dumps(self.as_dict(), indent=1, ensure_ascii=False, allow_nan=False, default=_json_value) + "\n",
                        encoding="utf-8")
        return path


def _json_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def direction(metric: str) -> str:
    """'lower' / 'higher' is better, or '' (a count or a spread)."""
    if metric in _NO_DIRECTION:
        return ""
    return "lower" if metric in _LOWER_IS_BETTER or metric.startswith(_LOWER_IS_BETTER_FAMILIES) else "higher"


def format_value(metric: str, value: float | None) -> str:
    """Accuracies and recalls as percentages, everything else with 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if metric.startswith(("colour/", "shape/", "binding_objects/")) or "/recall@" in metric:
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def comparison_table(names: Sequence[str], metrics: Sequence[dict[str, float]]) -> str:
    """Rows = metrics (in first-seen order), columns = runs; '-' where a run lacks a metric.

    The second column says which way is better, so two runs can be read against each other.
    """
    keys: list[str] = []
    for run in metrics:
        keys += [k for k in run if k not in keys]
    arrows = {"lower": "↓", "higher": "↑", "": ""}
    rows = [["metric", "", *names]] + [[k, arrows[direction(k)], *(format_value(k, run.get(k)) for run in metrics)] for k in keys]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Short column names: the folder name, with its parent where two runs share a name."""
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


def write_tensorboard(run_dir: Path, step: int, metrics: dict[str, float], grid: Image.Image | None) -> Path:
    """Scalars eval/<metric> and the grid at `step` in run_dir/tensorboard/eval."""
    from torch.utils.tensorboard import SummaryWriter

    folder = run_dir / "tensorboard" / TENSORBOARD_SUBDIR
    writer = SummaryWriter(log_dir=str(folder), purge_step=step)
    try:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(f"eval/{name}", value, step)
        if grid is not None:
            writer.add_image("eval/grid", np.asarray(grid), step, dataformats="HWC")
    finally:
        writer.close()
    return folder
