"""Which process am I, among how many: one place for ranks, worlds and unwrapping.

Two sources answer, at different moments of a run:

- before any process group exists (loading an LLM onto this rank's GPU, writing the run
  folder once, splitting a feature-caching job), the launcher's environment: srun sets
  `SLURM_*`, torchrun and Lightning's own launcher set `RANK` / `LOCAL_RANK` / `WORLD_SIZE`;
- once `torch.distributed` is initialised, the process group itself (`group_rank_and_world`).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def local_rank() -> int:
    """This process's GPU index on its node, from the launcher's environment (0 when alone).

    Read before the Trainer exists, so that an FSDP run can load its LLM straight onto its
    own GPU; Lightning's launcher and srun both set one of these."""
    return _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0


def launch_rank() -> int:
    """This process's global rank as its launcher tells it (srun, torchrun, or Lightning's own
    launcher, which starts ranks 1.. with LOCAL_RANK set); 0 for a single process."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    return _env_int("LOCAL_RANK") or 0


def launch_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or srun's environment; (0, 1, 0) alone.
    For jobs that split work by rank without a process group (feature caching)."""
    for rank_var, world_var, local_var in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                                           ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        rank, world = _env_int(rank_var), _env_int(world_var)
        if rank is not None and world is not None:
            return rank, world, _env_int(local_var) or 0
    return 0, 1, 0


def group_rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else (0, 1).

    Called in the main process when a DataLoader is built: DataLoader workers started with
    `spawn` do not inherit the process group, so workers must not ask themselves."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_objects(item: Any) -> list[Any]:
    """`item` from every rank, in rank order, on every rank ([item] outside distributed runs)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [item]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, item)
    return gathered


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside an FSDP (or compile) wrapper, for saving; the module itself otherwise."""
    while hasattr(module, "_fsdp_wrapped_module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "_fsdp_wrapped_module", None) or module._orig_mod
    return module


# ---------------------------------------------------------------------- one rank fails, all stop

FAILURE_KEY = "linguadiff/failed"  # in the process group's key-value store: "rank R: what failed"


def _store():
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def announce_failure(rank: int, what: str) -> None:
    """Tells every rank that this one failed, through the process group's key-value store (the
    rendezvous server of rank 0, reachable while collectives hang). The first failure stays.
    Best effort: a failing rank must not hang here either."""
    from datetime import timedelta

    try:
        store = _store()
        store.set_timeout(timedelta(seconds=5))
        store.compare_set(FAILURE_KEY, "", f"rank {rank}: {what}")
    except Exception:  # noqa: BLE001 - the store may be gone with rank 0
        pass


def announced_failure() -> str | None:
    """What the first failed rank announced ("rank R: error"), or None."""
    try:
        store = _store()
        return store.get(FAILURE_KEY).decode() if store.check([FAILURE_KEY]) else None
    except Exception:  # noqa: BLE001 - store gone (rank 0 ended) or not there: nothing to tell
        return None


class FailureWatch(threading.Thread):
    """Ends this rank (exit status 1) as soon as another rank announces a failure.

    A rank blocked in a collective never learns that a peer died: NCCL waits for its timeout
    (30 minutes under Lightning), gloo too while the dead rank's process lingers. The watch
    runs beside the training loop and reads the store every `interval` seconds instead."""

    def __init__(self, rank: int, interval: float = 2.0) -> None:
        super().__init__(daemon=True, name="linguadiff-failure-watch")
        self.rank, self.interval = rank, interval
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            failure = announced_failure()
            if failure is not None and not failure.startswith(f"rank {self.rank}:") and not self._done.is_set():
                log.error("Stopping rank %d: %s", self.rank, failure)
                exit_now(1)

    def stop(self) -> None:
        self._done.set()


def exit_now(status: int) -> None:
    """Ends this process at once, skipping clean-ups that could wait on dead peers."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
