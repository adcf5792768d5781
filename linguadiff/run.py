"""A run's folder and its Trainer: everything of a run lives under ``run_dir``.

    run_dir/config.yaml       the resolved config of the latest launch
    run_dir/checkpoints/      last.ckpt + the latest periodic ones (trained weights only)
    run_dir/tensorboard/      one fixed folder, so a resumed run continues the same curves
    run_dir/export/           adapter.safetensors (+ more in later stages)

Launching the same command with the same run_dir resumes from checkpoints/last.ckpt: this is
what a requeued SLURM job does.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from linguadiff.config import ConfigError
from linguadiff.distributed import launch_rank

log = logging.getLogger(__name__)

# Keys whose change makes an existing run_dir a different experiment: resuming it would
# load weights into the wrong shapes, train against another model or objective, or read a
# checkpoint in a layout the new strategy cannot. A relaunch that changes one is refused,
# naming it; every other change (steps, learning rates, batch sizes...) is logged and kept.
IDENTITY_KEYS = (
    "stage",
    "model.path", "model.kind", "model.revision", "model.dtype", "model.resolution",  # the base
    "llm.path", "llm.revision", "llm.dtype", "llm.max_length", "llm.layers", "llm.layer_mix",
    "llm.bos",  # the LLM features
    "adapter",  # its shape
    "train.trainable",  # what the checkpoint holds and the optimizer states
    "diffusion.prediction_type", "loss.type", "loss.per_encoder",  # the objective
    "trainer.strategy",  # compared by family: auto and ddp save whole checkpoints, fsdp sharded ones
)
_ABSENT = object()
# trainer.strategy values whose checkpoints read alike.
STRATEGY_FAMILIES = {"auto": "unsharded", "ddp": "unsharded", "fsdp": "sharded"}


@dataclass
class RunDir:
    root: Path
    checkpoint: Path | None  # last.ckpt to resume from, if any
    resume_step: int  # global step of that checkpoint (0 for a new run)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @classmethod
    def prepare(cls, cfg: DictConfig) -> "RunDir":
        """Create (or reopen) the run folder, refuse a mismatched one, and record the config."""
        root = Path(cfg.run_dir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        saved = root / "config.yaml"
        last = root / "checkpoints" / "last.ckpt"
        if saved.exists():
            previous = OmegaConf.load(saved)
            for key in IDENTITY_KEYS:
                old, new = OmegaConf.select(previous, key, default=_ABSENT), OmegaConf.select(cfg, key)
                if old is _ABSENT:
                    continue  # saved before this key existed: nothing to compare with
                if _identity(key, old) != _identity(key, new):
                    why = (f" ({_identity(key, old)} checkpoints cannot be resumed {_identity(key, new)})"
                           if key == "trainer.strategy" else "")
                    raise ConfigError(
                        f"run_dir {root} holds a run with {key}={_show(old)}, this launch has {key}={_show(new)}{why}: "
                        "a resume may not change it; use another run_dir (or delete that one) to start a different run"
                    )
            changed = _changed_keys(previous, cfg)
            if changed:
                log.info("Relaunching %s with changed settings: %s", root, ", ".join(changed))
        if launch_rank() == 0:  # other ranks read it at most; a replace is atomic for them
            partial = saved.with_name(f".config.yaml.{os.getpid()}")
            OmegaConf.save(cfg, partial, resolve=True)
            os.replace(partial, saved)
        step = checkpoint_step(last) if last.exists() else 0
        if last.exists():
            log.info("Resuming from %s (step %d)", last, step)
        return cls(root=root, checkpoint=last if last.exists() else None, resume_step=step)


def checkpoint_step(path: Path) -> int:
    """The global step stored in a Lightning checkpoint, read without loading its tensors.
    A sharded (FSDP) checkpoint is a folder whose meta.pt holds everything but the tensors."""
    if path.is_dir():
        path = path / "meta.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=not path.name == "meta.pt")
    return int(ckpt.get("global_step", 0))


def _identity(key: str, value):
    """What must stay equal across relaunches: the value itself, the strategy's family."""
    if key == "trainer.strategy":
        return STRATEGY_FAMILIES.get(value, value)
    if key == "train.trainable" and value is not None:
        return sorted(value)  # a set of parts: [unet, adapter] is [adapter, unet]
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _show(value) -> str:
    return str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def _changed_keys(old: DictConfig, new: DictConfig, prefix: str = "") -> list[str]:
    changed = []
    for key in set(old.keys()) | set(new.keys()):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if OmegaConf.is_dict(a) and OmegaConf.is_dict(b):
            changed += _changed_keys(a, b, path + ".")
        elif a != b:
            changed.append(f"{path}: {_show(a)} -> {_show(b)}")
    return sorted(changed)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that always leaves ``last.ckpt`` at the final step of a launch.

    Lightning skips its end-of-training save when a periodic save already wrote last.ckpt
    in this launch, even many steps earlier: a run of 300 steps saving every 200 would
    leave last.ckpt at step 200, and a relaunch would redo 100 steps (seen on a GPU run).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


def precision_for(cfg: DictConfig) -> str:
    """`auto`: bf16 mixed precision on GPUs (the paper's), full fp32 on CPUs."""
    if cfg.trainer.precision != "auto":
        return str(cfg.trainer.precision)
    return "bf16-mixed" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "32-true"


def build_trainer(cfg: DictConfig, run: RunDir, callbacks: list[L.Callback], module: L.LightningModule | None = None) -> L.Trainer:
    """The Trainer for `cfg` (`module`: the stage module, which FSDP's units are chosen from)."""
    from linguadiff.strategy import build_strategy

    t = cfg.trainer
    precision = precision_for(cfg)
    strategy = build_strategy(cfg, module, precision) if module is not None else t.strategy
    logger = TensorBoardLogger(
        save_dir=str(run.root),
        name="tensorboard",
        version="",
        default_hp_metric=False,
        # A run killed after its last checkpoint logged steps that the resumed run logs
        # again: TensorBoard drops events from that step on, so no step appears twice.
        purge_step=run.resume_step + 1 if run.resume_step else None,
    )
    checkpointing = RunCheckpoint(
        dirpath=run.checkpoints,
        filename="step{step:08d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_steps,
        save_last=True,
        monitor="step",  # "best" = latest: keep the newest keep_last checkpoints
        mode="max",
        save_top_k=cfg.checkpoint.keep_last,
        enable_version_counter=False,  # last.ckpt is overwritten, never last-v1.ckpt
    )
    if torch.cuda.is_available() and cfg.speed.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    plugins = []
    if SLURMEnvironment.detect():
        # Our PreemptionHandler stops and requeues on SIGUSR1; Lightning's own SLURM requeue
        # would save a second, differently named checkpoint that our relaunch never reads.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        plugins=plugins,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None,  # validate every val_check_interval steps of the endless stream
        limit_val_batches=t.limit_val_batches,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        logger=logger,
        callbacks=[checkpointing, *callbacks],
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,  # the stage module logs its own table of what trains
        default_root_dir=str(run.root),
    )
