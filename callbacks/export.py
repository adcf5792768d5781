"""Export at the end of a run: what the next stage and generate.py start from."""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from lightning_modules.base import unwrap

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


class RunExport(L.Callback):
    """Writes ``run_dir/export/`` when training ends: the stage module's export (the adapter as
    safetensors + metadata; from stage 2 on, the EMA UNet in diffusers format too) and a
    model card saying how it was trained and how to load it."""

    def __init__(self, cfg: DictConfig, export_dir: str | Path) -> None:
        self.cfg = cfg
        self.export_dir = Path(export_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step < trainer.max_steps:  # stopped early (preempted): not a finished run
            if trainer.is_global_zero:
                log.info("Stopped at step %d of %d: no export until the run finishes (rerun to resume)",
                         trainer.global_step, trainer.max_steps)
            return
        metadata = adapter_metadata(self.cfg, trainer.global_step)
        pl_module.export(self.export_dir, metadata)  # on every rank: FSDP gathers shards for rank 0
        if trainer.is_global_zero:
            write_model_card(self.export_dir, self.cfg, metadata, unwrap(pl_module.adapter).config)
            log.info("Exported stage %d (step %d) to %s", self.cfg.stage, trainer.global_step, self.export_dir)


STAGE_NAMES = {1: "text-only alignment to the base's CLIP features", 2: "end-to-end image-text training",
               3: "aesthetic fine-tuning"}


def write_model_card(directory: Path, cfg: DictConfig, metadata: dict, adapter: dict) -> None:
    """export/README.md: what this is, how it was trained, how to load it."""
    has_unet = (directory / "unet").is_dir()
    trained = ", ".join(cfg.train.trainable)
    lines = [
        f"# LinguaDiff export: {cfg.model.name} + {cfg.llm.name} (stage {cfg.stage})",
        "",
        f"An adapter that lets the frozen LLM `{cfg.llm.path}` replace CLIP as the text encoder of",
        f"`{cfg.model.path}` ({cfg.model.kind}), after OmniDiffusion (ECCV 2024).",
        f"Stage {cfg.stage}, {STAGE_NAMES[int(cfg.stage)]}: trained {trained} for {metadata['global_step']} steps"
        + (f", starting from `{cfg.init_from}`." if cfg.init_from else "."),
        "",
        "## Files",
        "",
        "- `adapter.safetensors`: the adapter; its metadata names the LLM, layers, base model and sizes.",
    ]
    if has_unet:
        lines.append("- `unet/`: the trained UNet (EMA weights) in diffusers format.")
    lines += [
        "",
        "## Training settings",
        "",
        f"- LLM layers {list(cfg.llm.layers)} ({cfg.llm.layer_mix}), max {cfg.llm.max_length} tokens, dtype {cfg.llm.dtype}",
        f"- adapter: width {adapter['dim']}, {adapter['num_queries']} queries, "
        f"{adapter['encoder_layers']}+{adapter['decoder_layers']} layers, {adapter['heads']} heads"
        + (f", pooled {adapter['pooled_dim']}" if adapter.get("pooled_dim") else ""),
        f"- AdamW lr {cfg.optim.lr}, weight decay {cfg.optim.weight_decay}, batch {cfg.data.batch_size} per device, "
        f"{cfg.trainer.devices} device(s) x {cfg.trainer.num_nodes} node(s), precision {cfg.trainer.precision}",
        f"- data: `{cfg.data.train.urls or [s.urls for s in cfg.data.train.sources]}`",
        "",
        "## Use",
        "",
        "```bash",
        f"python generate.py run_dir={directory.parent} prompt=\"a red circle\" num_images=4 out_dir=out",
        "```",
        "",
        "```python",
        "from linguadiff.generation import AdapterTextEncoder",
        f"encoder, meta = AdapterTextEncoder.from_export(\"{directory / 'adapter.safetensors'}\")",
        "cond = encoder([\"a red circle\"])  # {'context': [1, N, D], 'pooled': ... or None}",
        "# then pass cond['context'] as prompt_embeds to the diffusers pipeline of the base model",
        "```",
        "",
    ]
    (directory / "README.md").write_text("\n".join(lines), encoding="utf-8")
