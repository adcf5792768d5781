"""Export at the end of a run: what the next stage and generate.py start from."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from linguadiff.distributed import unwrap
from linguadiff.export import stamped, write_model_card

log = logging.getLogger(__name__)


class RunExport(L.Callback):
    """Writes ``run_dir/export/`` when training ends: the stage module's export (the adapter as
    safetensors + metadata; from stage 2 on, the EMA UNet in diffusers format too) and a
    model card saying how it was trained and how to load it."""

    def __init__(self, export_dir: str | Path, metadata: dict) -> None:
        """`metadata`: what the export records of the run (`linguadiff.export.adapter_metadata`)."""
        self.export_dir = Path(export_dir)
        self.metadata = metadata

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step < trainer.max_steps:  # stopped early (preempted): not a finished run
            if trainer.is_global_zero:
                log.info("Stopped at step %d of %d: no export until the run finishes (rerun to resume)",
                         trainer.global_step, trainer.max_steps)
            return
        metadata = stamped(self.metadata, trainer.global_step, pl_module.prompt_encoder.tokenizer.bos_id)
        pl_module.export(self.export_dir, metadata)  # on every rank: FSDP gathers shards for rank 0
        if trainer.is_global_zero:
            write_model_card(self.export_dir, metadata, unwrap(pl_module.adapter).config)
            log.info("Exported stage %d (step %d) to %s", metadata["stage"], trainer.global_step, self.export_dir)
