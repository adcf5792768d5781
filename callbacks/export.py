"""Export at the end of a run: what the next stage and generate.py start from."""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def adapter_metadata(cfg: DictConfig, global_step: int) -> dict:
    """Everything a stranger needs to use the adapter without the training config."""
    return {
        "stage": int(cfg.stage),
        "global_step": int(global_step),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "presets": {k: v for k, v in cfg.presets.items() if v},
        "llm": {
            "name": cfg.llm.name,
            "path": cfg.llm.path,
            "revision": cfg.llm.revision,
            "dtype": cfg.llm.dtype,
            "layers": list(cfg.llm.layers),
            "layer_mix": cfg.llm.layer_mix,
            "max_length": int(cfg.llm.max_length),
            "add_bos": bool(cfg.llm.add_bos),
            "trust_remote_code": bool(cfg.llm.trust_remote_code),
        },
        "base_model": {"name": cfg.model.name, "kind": cfg.model.kind, "path": cfg.model.path, "revision": cfg.model.revision},
        "generate": {k: cfg.generate[k] for k in cfg.generate},
    }


class AdapterExport(L.Callback):
    """Writes ``run_dir/export/adapter.safetensors`` (weights + metadata) when training ends."""

    def __init__(self, cfg: DictConfig, export_dir: str | Path) -> None:
        self.cfg = cfg
        self.export_dir = Path(export_dir)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.export_dir / "adapter.safetensors"
        pl_module.adapter.save(path, adapter_metadata(self.cfg, trainer.global_step))
        log.info("Exported the adapter (step %d) to %s", trainer.global_step, path)
