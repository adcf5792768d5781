"""Export at the end of a run: what the next stage and generate.py start from."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import lightning as L

from linguadiff.distributed import unwrap
from linguadiff.export import export_complete, mark_complete, stamped, write_model_card

log = logging.getLogger(__name__)


class RunExport(L.Callback):
    """Writes ``run_dir/export/`` when training ends: the stage module's export (the adapter as
    safetensors + metadata; from stage 2 on, the EMA UNet in diffusers format too) and a
    model card saying how it was trained and how to load it.

    The export is written into a temporary folder beside it, marked complete (COMPLETE_FILE,
    last) and renamed into place, so a kill during it never leaves a half export that looks
    whole. A finished run relaunched without a complete export exports again (on_fit_end)."""

    def __init__(self, export_dir: str | Path, metadata: dict) -> None:
        """`metadata`: what the export records of the run (`linguadiff.export.adapter_metadata`)."""
        self.export_dir = Path(export_dir)
        self.metadata = metadata
        self._exported = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step < trainer.max_steps:  # stopped early (preempted): not a finished run
            if trainer.is_global_zero:
                log.info("Stopped at step %d of %d: no export until the run finishes (rerun to resume)",
                         trainer.global_step, trainer.max_steps)
            return
        self._export(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A relaunch of a finished run whose export is missing: Lightning restored the last
        # checkpoint (EMA included) and skipped training, so on_train_end never ran.
        missing = not self._exported and trainer.global_step >= trainer.max_steps and not export_complete(self.export_dir)
        # Rank 0's view for all: every rank must take part (FSDP gathers the weights to rank 0),
        # and another rank must not see rank 0's fresh export and skip the gathering.
        if trainer.strategy.broadcast(missing):
            self._export(trainer, pl_module)

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metadata = stamped(self.metadata, trainer.global_step, getattr(pl_module.prompt_encoder.tokenizer, "bos_id", None))
        partial = self.export_dir.with_name(f".{self.export_dir.name}.partial")
        if trainer.is_global_zero:
            log.info("Exporting stage %d (step %d) to %s", metadata["stage"], trainer.global_step, self.export_dir)
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        pl_module.export(partial, metadata)  # on every rank: FSDP gathers shards for rank 0, which writes
        if trainer.is_global_zero:
            adapter = getattr(pl_module, "adapter", None)  # None: a control run (text_encoder=clip)
            write_model_card(partial, metadata, None if adapter is None else unwrap(adapter).config)
            mark_complete(partial, trainer.global_step)
            old = self.export_dir.with_name(f".{self.export_dir.name}.old")
            if old.exists():
                shutil.rmtree(old)
            if self.export_dir.exists():
                os.rename(self.export_dir, old)
            os.rename(partial, self.export_dir)
            shutil.rmtree(old, ignore_errors=True)
            log.info("Exported stage %d (step %d) to %s", metadata["stage"], trainer.global_step, self.export_dir)
        trainer.strategy.barrier("export_done")  # no rank returns before the export is in place
        self._exported = True
