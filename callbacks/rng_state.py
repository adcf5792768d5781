"""Random number generator states: a different stream per rank, saved and restored exactly.

Lightning seeds every rank alike and keeps no generator state in its checkpoints. Alike is
right while the models are built (every rank must start from the same fresh adapter) but
wrong for training: with the same generator, every rank would draw the same diffusion
timesteps and noise for its batch. So when training starts each rank reseeds from (seed,
rank), and each checkpoint stores the generator states (Python, NumPy, torch CPU and CUDA)
of every rank, gathered to the one file rank 0 writes; a resumed run with the same number
of ranks puts each rank's states back, so it draws what the uninterrupted run would have.
With another number of ranks it reseeds from (seed, rank, step) instead and says so.

Validation inside a fit draws from the same generators (noise, timesteps) but leaves them as
it found them: a checkpoint is written at the end of a step, before that step's validation,
so a run resumed from it (which does not validate that step again) would otherwise draw
other noise for every later step than the uninterrupted run did.
"""
from __future__ import annotations

import hashlib
import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch

from linguadiff.distributed import gather_objects

log = logging.getLogger(__name__)


def collect_rng_states() -> dict[str, Any]:
    """Plain types and tensors only: Lightning reads checkpoints with torch.load(weights_only=True)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached))
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def derived_seed(*parts: Any) -> int:
    """A 32-bit seed from any parts (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all CUDA devices too


class RNGState(L.Callback):
    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._loaded: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is assembled: gather them all.
        return {"states": gather_objects(collect_rng_states())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict  # applied when training starts, after the rest is restored

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        saved = (self._loaded or {}).get("states")
        if saved is not None and len(saved) == world:
            set_rng_states(saved[rank])
            return
        if saved is not None and trainer.is_global_zero:
            log.warning("The checkpoint holds random states of %d ranks, this run has %d: reseeding instead "
                        "(training goes on, but not bit for bit as it would have)", len(saved), world)
        seed_all(derived_seed(self.seed, rank, trainer.global_step))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._before_validation = collect_rng_states()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._before_validation is not None:
            set_rng_states(self._before_validation)
            self._before_validation = None
