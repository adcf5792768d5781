"""Throughput and progress in plain log lines (SLURM logs have no progress bar) and TensorBoard."""
from __future__ import annotations

import logging
import time

import lightning as L

log = logging.getLogger(__name__)


class ThroughputLogger(L.Callback):
    """Samples/s, the share of time spent waiting for data, and an ETA every `every_n_steps`.

    Time between the end of one training batch and the start of the next is counted as
    waiting for data: if that share is high, the loader (num_workers) is the bottleneck.
    """

    def __init__(self, every_n_steps: int = 50, unit: str = "samples") -> None:
        self.every_n_steps = max(1, every_n_steps)
        self.unit = unit
        self._reset()

    def _reset(self) -> None:
        self._window_start = None
        self._batch_start = None
        self._last_batch_end = None
        self._samples = 0
        self._wait = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._reset()
        if trainer.is_global_zero:
            log.info(run_summary(trainer, pl_module, self.unit))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        # Validation is neither training nor waiting for data: take it out of the window.
        spent = time.perf_counter() - getattr(self, "_validation_start", time.perf_counter())
        if self._window_start is not None:
            self._window_start += spent
        if self._last_batch_end is not None:
            self._last_batch_end += spent

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._window_start is None:
            self._window_start = now
        elif self._last_batch_end is not None:
            self._wait += now - self._last_batch_end
        self._batch_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._last_batch_end = now
        self._samples += pl_module.batch_size_of(batch) * trainer.world_size
        step = trainer.global_step
        if step % self.every_n_steps or self._window_start is None:
            return
        elapsed = now - self._window_start
        if elapsed <= 0:
            return
        rate = self._samples / elapsed
        wait = self._wait / elapsed
        pl_module.log_dict({f"perf/{self.unit}_per_sec": rate, "perf/data_wait_fraction": wait}, on_step=True, on_epoch=False)
        remaining = max(0, trainer.max_steps - step)
        steps_per_sec = self.every_n_steps / elapsed if step >= self.every_n_steps else step / elapsed
        loss = trainer.callback_metrics.get("train/loss")
        # Samples a setting left out (the datamodule's `filter_reasons`) are not bad input.
        filters = getattr(trainer.datamodule, "filter_reasons", frozenset())
        skipped = sum(n for reason, n in getattr(pl_module, "skipped", {}).items() if reason not in filters)
        if trainer.is_global_zero:
            log.info(
                "step %d/%d | loss %s | %.1f %s/s | data wait %.0f%% | ETA %s%s",
                step, trainer.max_steps, f"{float(loss):.4f}" if loss is not None else "-", rate, self.unit,
                100 * wait, _duration(remaining / steps_per_sec if steps_per_sec > 0 else 0),
                f" | skipped inputs {skipped} (data/skipped_* in TensorBoard)" if skipped else "",
            )
        self._window_start, self._samples, self._wait = now, 0, 0.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def run_summary(trainer, pl_module, unit: str) -> str:
    """The effective global batch, steps per pass over the training data, and where it starts."""
    per_device = int(getattr(trainer.datamodule, "batch_size", 0) or 0)
    accumulate = int(trainer.accumulate_grad_batches)
    global_batch = per_device * trainer.world_size * accumulate
    line = (f"global batch {global_batch} {unit} = {per_device} per device x {trainer.num_devices} devices x "
            f"{trainer.num_nodes} nodes x {accumulate} accumulated; {type(trainer.strategy).__name__}, "
            f"precision {trainer.precision}; from step {trainer.global_step} to {trainer.max_steps}")
    # Duck-typed, so this callback need not import its sibling datamodules/: any datamodule
    # with `samples_per_epoch()` (the shard datamodules have it) gives steps per epoch.
    samples_per_epoch = getattr(trainer.datamodule, "samples_per_epoch", None)
    samples = samples_per_epoch() if callable(samples_per_epoch) else None
    if global_batch and samples is not None:
        line += f"; {samples} training samples: {samples / global_batch:.1f} steps per epoch"
    else:
        line += "; steps per epoch unknown (streamed shards without img2dataset *_stats.json)"
    return line
