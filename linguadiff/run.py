"""A run's folder and its Trainer: everything of a run lives under ``run_dir``.

    run_dir/config.yaml       the resolved config of the latest launch
    run_dir/checkpoints/      last.ckpt + the latest periodic ones (trained weights only)
    run_dir/tensorboard/      one fixed folder, so a resumed run continues the same curves
    run_dir/export/           adapter.safetensors (+ more in later stages)

Launching the same command with the same run_dir resumes from checkpoints/last.ckpt (or, when
that is damaged, the newest intact checkpoints/step*.ckpt): this is
what a requeued SLURM job does.

A sharded (FSDP) checkpoint is a folder written whole under its own name,
checkpoints/.shards/stepNNNNNNNN-XXXXXXXX/, and last.ckpt / step*.ckpt are symlinks to such
folders, each moved by one atomic rename (`point_checkpoint`): a kill at any instant leaves
every name pointing at a complete folder. A folder no name points to is garbage: left by a
kill, it is removed at the next launch (`remove_partial_saves`).
"""
from __future__ import annotations

import fcntl
import logging
import os
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
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
    "stage", "text_encoder",
    "model.path", "model.kind", "model.revision", "model.dtype", "model.resolution",  # the base
    "llm.path", "llm.revision", "llm.dtype", "llm.max_length", "llm.layers", "llm.layer_mix",
    "llm.bos",  # the LLM features
    "adapter",  # its shape
    "train.trainable",  # what the checkpoint holds and the optimizer states
    "train.unet", "lora.rank", "lora.alpha", "lora.target_modules",  # a UNet LoRA's (or the full UNet's) weights
    "diffusion.prediction_type", "loss.type", "loss.per_encoder",  # the objective
    "trainer.strategy",  # compared by family: auto and ddp save whole checkpoints, fsdp sharded ones
    "fsdp.version",  # under strategy=fsdp: FSDP1 and FSDP2 shard checkpoints differently
)
# What a run saved before an identity key existed had for it (FSDP runs before fsdp.version: FSDP1).
SAVED_BEFORE_THE_KEY = {"fsdp.version": 1}
# Identity keys a control run (text_encoder=clip) does not use.
CONTROL_UNUSED = ("llm.", "adapter")
_ABSENT = object()
# trainer.strategy values whose checkpoints read alike.
STRATEGY_FAMILIES = {"auto": "unsharded", "ddp": "unsharded", "fsdp": "sharded"}


@dataclass
class RunDir:
    root: Path
    checkpoint: Path | None  # last.ckpt to resume from, if any
    resume_step: int  # global step of that checkpoint (0 for a new run)
    lock: "RunLock | None" = None  # rank 0's hold on the run folder

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
        lock = RunLock.take(root) if launch_rank() == 0 else None  # before anything in it is read or written
        try:
            return cls._open(cfg, root, lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    @classmethod
    def _open(cls, cfg: DictConfig, root: Path, lock: "RunLock | None") -> "RunDir":
        saved = root / "config.yaml"
        if saved.exists():
            previous = OmegaConf.load(saved)
            # A control run (text_encoder=clip, compared first) reads no LLM and has no adapter.
            control = OmegaConf.select(cfg, "text_encoder") == "clip"
            for key in IDENTITY_KEYS:
                if control and key.startswith(CONTROL_UNUSED):
                    continue
                if key == "fsdp.version" and OmegaConf.select(cfg, "trainer.strategy") != "fsdp":
                    continue  # (a switch to or from fsdp is refused by trainer.strategy's family)
                old, new = OmegaConf.select(previous, key, default=_ABSENT), OmegaConf.select(cfg, key)
                if old is _ABSENT:
                    old = SAVED_BEFORE_THE_KEY.get(key, _ABSENT)
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
        if launch_rank() == 0:
            remove_partial_saves(root / "checkpoints")
        checkpoint, step = resume_checkpoint(root / "checkpoints")
        if checkpoint is not None:
            log.info("Resuming from %s (step %d)", checkpoint, step)
        return cls(root=root, checkpoint=checkpoint, resume_step=step, lock=lock)

    def release(self) -> None:
        """Let another launch use this run_dir (the kernel also does this when the process dies)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


class RunLock:
    """One launch per run_dir: rank 0 holds an flock on run_dir/.lock for the run's life.

    The kernel drops an flock when its process dies (killed, preempted, crashed), so a lock
    left by a dead launch is taken over without asking; the pid and host written into the
    file only make the refusal say who holds it. (flock on network filesystems: Lustre and
    NFSv4 honour it across nodes when mounted with flock support, the default on most
    clusters.)"""

    def __init__(self, path: Path, handle) -> None:
        self.path, self._handle = path, handle

    @classmethod
    def take(cls, root: Path) -> "RunLock":
        path = root / ".lock"
        handle = open(path, "a+")  # noqa: SIM115 - held open for the run's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"run_dir {root} is in use by {holder}: one launch per run_dir (wait for it to end, "
                "or use another run_dir)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        return cls(path, handle)

    def release(self) -> None:
        if not self._handle.closed:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from (truncated, not a checkpoint, or holding code)."""


def read_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint's dict (tensors memory-mapped, not read), or CheckpointError.

    Files are data, never code: `weights_only=True` refuses anything but tensors and plain
    types, so a checkpoint carrying a pickle payload is rejected, never run. A sharded (FSDP)
    checkpoint is a folder whose meta.pt holds everything but the tensors."""
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"points to {os.readlink(path)}, which is missing")
    sharded = path.is_dir()
    file = path / "meta.pt" if sharded else path
    try:
        if not file.is_file() or file.stat().st_size == 0:
            raise CheckpointError("missing or empty")
        if sharded and not (path / ".metadata").is_file():
            raise CheckpointError("no .metadata: an unfinished sharded save")
        ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=not sharded)
    except CheckpointError:
        raise
    except Exception as err:  # truncated zip, pickle payload, not a torch file at all
        raise CheckpointError(f"unreadable ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from err
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise CheckpointError("no global_step: not a Lightning checkpoint")
    # (A sharded checkpoint keeps weights and optimizer states in its .distcp files.)
    if not sharded and ("state_dict" not in ckpt or "optimizer_states" not in ckpt):
        raise CheckpointError("no weights or optimizer states")
    return ckpt


def checkpoint_step(path: Path) -> int:
    """The global step stored in a Lightning checkpoint (read with weights_only, see read_checkpoint)."""
    return int(read_checkpoint(path)["global_step"])


def resume_checkpoint(checkpoints: Path) -> tuple[Path | None, int]:
    """The checkpoint to resume from and its step: last.ckpt when it is intact, otherwise the
    newest intact periodic one (with a warning), so a bad last.ckpt cannot crash every requeue."""
    last = checkpoints / "last.ckpt"
    candidates = sorted(checkpoints.glob("step*.ckpt"), reverse=True) if checkpoints.is_dir() else []
    has_last = last.exists() or last.is_symlink()  # (a symlink to a missing folder does not "exist")
    if not has_last:
        if candidates:
            log.warning("%s has no last.ckpt: trying its periodic checkpoints", checkpoints)
        else:
            return None, 0
    rejected = []
    for path in ([last] if has_last else []) + candidates:
        try:
            step = checkpoint_step(path)
        except CheckpointError as err:
            log.warning("Not resuming from %s: %s", path, err)
            rejected.append(path)
            continue
        if rejected:
            log.warning("Resuming from the newest intact checkpoint %s (step %d) instead of %s",
                        path, step, ", ".join(p.name for p in rejected))
        return path, step
    raise ConfigError(
        f"no intact checkpoint in {checkpoints} ({', '.join(p.name for p in rejected)} are unreadable): "
        "move them away to start this run afresh, or use another run_dir"
    )


def remove_partial_saves(checkpoints: Path) -> None:
    """Leftovers of saves that a kill interrupted (the checkpoints they were to replace are
    intact): temporary files and links, and sharded folders that no checkpoint name points to
    (half written, or superseded and not yet removed)."""
    import shutil

    if not checkpoints.is_dir():
        return
    leftovers = [*checkpoints.glob(".*.partial*"), *checkpoints.glob(".*.old")]
    shards = checkpoints / SHARDS_DIR
    if shards.is_dir():
        kept = pointed_folders(checkpoints)
        leftovers += [folder for folder in shards.iterdir() if folder.resolve() not in kept]
    for partial in leftovers:
        log.info("Removing %s, left by an interrupted save", partial)
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


# ---------------------------------------------------------------------- sharded checkpoints

SHARDS_DIR = ".shards"  # in checkpoints/: the folders of sharded checkpoints, one per save


def new_shard_folder(checkpoints: Path, step: int) -> Path:
    """A fresh, unique name for the folder of one sharded save (not created)."""
    return checkpoints / SHARDS_DIR / f"step{step:08d}-{secrets.token_hex(4)}"


def pointed_folders(checkpoints: Path) -> set[Path]:
    """The folders (resolved) that the checkpoint names in `checkpoints` point to."""
    return {path.resolve() for path in checkpoints.iterdir() if path.is_symlink() and not path.name.startswith(".")}


def remove_unpointed(checkpoints: Path, folder: Path) -> None:
    """Removes a sharded folder once no checkpoint name points to it any more."""
    import shutil

    if folder.is_dir() and folder.resolve() not in pointed_folders(checkpoints):
        shutil.rmtree(folder, ignore_errors=True)


def point_checkpoint(path: Path, folder: Path) -> None:
    """Makes the checkpoint name `path` (last.ckpt, step*.ckpt) point to the complete `folder`
    in one atomic step: a new symlink, renamed over the name. The folder it pointed to before
    is removed unless another name still points to it.

    A name that is still a real folder (saved before pointers) is first moved into the shards
    folder; a kill between that rename and the next leaves no such name for that one save,
    and resuming falls back to the newest periodic checkpoint."""
    checkpoints = path.parent
    previous = path.resolve() if path.is_symlink() else None
    link = path.with_name(f".{path.name}.partial-link-{os.getpid()}")
    link.unlink(missing_ok=True)
    os.symlink(os.path.relpath(folder, checkpoints), link)  # relative: the run_dir can move
    if path.is_dir() and not path.is_symlink():
        previous = checkpoints / SHARDS_DIR / f"legacy-{path.name}-{secrets.token_hex(4)}"
        previous.parent.mkdir(exist_ok=True)
        os.rename(path, previous)
    os.replace(link, path)
    fsync_dir(checkpoints)
    if previous is not None and previous != folder.resolve():
        remove_unpointed(checkpoints, previous)


def remove_pointer(path: Path) -> None:
    """Deletes the checkpoint name `path` (a rotated-out step*.ckpt), and its folder unless
    another name (last.ckpt) still points to it."""
    folder = path.resolve()
    path.unlink()
    fsync_dir(path.parent)
    remove_unpointed(path.parent, folder)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file next to it, syncs it, then renames it over the
    target: a kill at any byte leaves the previous checkpoint whole.

    Lightning's own save (fsspec transaction) writes the temporary file to /tmp and moves it,
    which is a copy straight into the target, not a rename, when /tmp is another filesystem
    (the usual case on cluster nodes, and the whole checkpoint is held in memory once more)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        fsync_dir(path.parent)


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
    """ModelCheckpoint that saves a step once everything of it is on disk, and always leaves
    ``last.ckpt`` at the final step of a launch.

    - A periodic checkpoint of step N is written when step N+1 starts, not when step N's
      batch ends: Lightning logs a step's metrics and runs its validation after the
      batch-end hooks, so a checkpoint written there and a kill right after it would lose
      them for good (the resumed run starts after them). Before each save the loggers are
      flushed, so every event of the steps a checkpoint covers is on disk before it exists,
      and the resumed run's TensorBoard purge (`build_trainer`) drops only what it redoes.
    - Lightning skips its end-of-training save when a periodic save already wrote last.ckpt
      in this launch, even many steps earlier: a run of 300 steps saving every 200 would
      leave last.ckpt at step 200, and a relaunch would redo 100 steps (seen on a GPU run).
    """

    _launch_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._launch_step = trainer.global_step  # what this launch resumed from is saved already

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pass  # see the class docstring: the save waits for the next step's start

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self._launch_step:
            super().on_train_batch_end(trainer, pl_module, None, batch, batch_idx)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Our saves come between steps or at the end of training, after the step's
        validation; Lightning's own come at a batch's end, and its restart logic (which
        decides at which step a resumed run logs and validates next) reads the loop progress
        as such. So the progress is written as Lightning's batch-end save of the same step
        would have it: the step's batch processed, not yet completed, the logging step not
        yet advanced (the batch a save between steps already fetched is not counted)."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        progress, state = loop.get("epoch_loop.batch_progress"), loop.get("epoch_loop.state_dict")
        if progress is None or state is None or "_batches_that_stepped" not in state:
            raise RuntimeError("this Lightning version keeps its loop progress elsewhere: update RunCheckpoint")
        done = progress["total"]["completed"]
        if done == 0 or state["_batches_that_stepped"] != trainer.global_step:
            return  # not a state between steps (gradient accumulation, an empty launch): as it is
        for part in ("total", "current"):
            counts = progress[part]
            finished = counts["completed"]
            counts.update(ready=finished, started=finished, processed=finished, completed=finished - 1)
        state["_batches_that_stepped"] -= 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._launch_step:  # the last step's periodic save, when one is due
            super().on_train_batch_end(trainer, pl_module, None, None, 0)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                flush = getattr(logger.experiment, "flush", None)
                if callable(flush):
                    flush()
        super()._save_checkpoint(trainer, filepath)


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
        # (Steps log 0-based: the resumed run's first step logs as `resume_step`.)
        purge_step=run.resume_step if run.resume_step else None,
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
    plugins.append(AtomicCheckpointIO())
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
