"""One rank's error ends the whole job within seconds, with that error on screen.

Without this, an exception on one rank (its data stream found only bad shards, a file it
alone reads is damaged...) leaves every other rank blocked in the next collective until
its timeout: 30 minutes under Lightning with NCCL, and for good with gloo while the failed
process lingers (a stuck reader thread). Whether the launcher ends the others depends on it
(`srun --kill-on-bad-exit=1`, torchrun, and Lightning's own launcher only when a rank other
than 0 fails). So the failing rank logs its error, announces it in the process group's
key-value store and exits at once, skipping a teardown that could wait on its peers; every
other rank watches the store (`FailureWatch`) and exits as soon as a failure appears.
"""
from __future__ import annotations

import logging
import time

import lightning as L

from linguadiff.distributed import FailureWatch, announce_failure, announced_failure, exit_now

log = logging.getLogger(__name__)


class StopAllRanksOnError(L.Callback):
    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self._watch: FailureWatch | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1 and self._watch is None:  # the process group exists by now
            self._watch = FailureWatch(trainer.global_rank, self.interval)
            self._watch.start()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.world_size == 1 or isinstance(exception, (KeyboardInterrupt, SystemExit)):
            return  # one process: Lightning's own handling; Ctrl+C reaches every rank anyway
        rank = trainer.global_rank
        if self._watch is not None:
            self._watch.stop()
        earlier = announced_failure()
        if earlier is not None and not earlier.startswith(f"rank {rank}:"):
            # Most likely this rank's collective broke because that rank died: name the cause.
            log.error("Stopping rank %d after %s (here: %s: %s)", rank, earlier, type(exception).__name__, exception)
        else:
            announce_failure(rank, f"{type(exception).__name__}: {exception}")
            log.error("Rank %d failed, stopping every rank:", rank, exc_info=exception)
            if rank == 0:
                time.sleep(self.interval + 1)  # the store lives in this process: let the others read it
        launcher = trainer.strategy.launcher
        for proc in getattr(launcher, "procs", None) or ():  # ranks Lightning started from this one
            proc.kill()
        exit_now(1)
