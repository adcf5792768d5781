"""train.py that also records the keys of every training batch, per rank, for the DDP tests.

Lightning starts the other ranks by running this same command again, so the probe is in
every rank: rank R appends its keys to `$LINGUADIFF_PROBE/rank{R}.txt` (when that is set).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402

import train  # noqa: E402


class KeyProbe(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if "LINGUADIFF_PROBE" not in os.environ:
            return
        with open(Path(os.environ["LINGUADIFF_PROBE"]) / f"rank{trainer.global_rank}.txt", "a") as out:
            out.write("".join(f"{key}\n" for key in batch["key"]))


if __name__ == "__main__":
    sys.exit(train.main(extra_callbacks=(KeyProbe(),)))
