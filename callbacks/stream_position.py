"""Where the training data stream stands, step by step, for the checkpoints.

A training batch carries its stream's position after it; the datamodule takes it off when a
step takes the batch (`on_before_batch_transfer`). Batches are prefetched and a checkpoint
is written between steps (`linguadiff.run.RunCheckpoint`), so the position a checkpoint
saves must be that of the last batch whose step has *finished*: this callback tells the
datamodule so at the end of every step. Duck-typed: any datamodule with `step_done()`.
"""
from __future__ import annotations

from typing import Any

import lightning as L


class StreamPosition(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step_done = getattr(trainer.datamodule, "step_done", None)
        if callable(step_done):
            step_done()
