"""train.py that also records the keys of every training batch, per rank, for the DDP tests.

Lightning starts the other ranks by running this same command again, so the probe is in
every rank: rank R appends its keys to `$LINGUADIFF_PROBE/rank{R}.txt` (when that is set).
With `$LINGUADIFF_FAIL_RANK` set, that rank alone raises NoUsableData (as its data stream
would with only bad shards) at step `$LINGUADIFF_FAIL_STEP` (default 1); with
`$LINGUADIFF_FAIL_HANG` set too, that rank also leaves a thread that keeps its process from
exiting (a stuck reader): its peers see no closed connection, as NCCL peers see no dead rank.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402

import train  # noqa: E402
from datamodules.streams import NoUsableData  # noqa: E402


class KeyProbe(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if "LINGUADIFF_PROBE" not in os.environ:
            return
        with open(Path(os.environ["LINGUADIFF_PROBE"]) / f"rank{trainer.global_rank}.txt", "a") as out:
            out.write("".join(f"{key}\n" for key in batch["key"]))


class FailOneRank(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if str(trainer.global_rank) == os.environ.get("LINGUADIFF_FAIL_RANK") \
                and trainer.global_step >= int(os.environ.get("LINGUADIFF_FAIL_STEP", "1")):
            if os.environ.get("LINGUADIFF_FAIL_HANG"):
                threading.Thread(target=time.sleep, args=(3600,), name="stuck-reader").start()
            raise NoUsableData(f"no usable sample on rank {trainer.global_rank} (probe)")


if __name__ == "__main__":
    sys.exit(train.main(extra_callbacks=(KeyProbe(), FailOneRank())))
