"""train.py that also records the keys of every training batch, per rank, for the DDP tests.

Lightning starts the other ranks by running this same command again, so the probe is in
every rank: rank R appends its keys to `$LINGUADIFF_PROBE/rank{R}.txt` (when that is set).
With `$LINGUADIFF_FAIL_RANK` set, that rank alone raises NoUsableData (as its data stream
would with only bad shards) at step `$LINGUADIFF_FAIL_STEP` (default 1); with
`$LINGUADIFF_FAIL_HANG` set too, that rank also leaves a thread that keeps its process from
exiting (a stuck reader): its peers see no closed connection, as NCCL peers see no dead rank.
With `$LINGUADIFF_SHARD_PROBE` set, every rank writes `rank{R}.json` there after its first
step: the elements of its own weights (per part), gradients and optimizer state (for the
memory planner's test, tests/test_plan.py).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json  # noqa: E402

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


class ShardProbe(L.Callback):
    """What this rank holds once the optimizer has state and the last backward's gradients are
    still there: elements (and bytes) of each part's local weights, of the gradients and of
    each optimizer state (AdamW's moments, the EMA)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        folder = os.environ.get("LINGUADIFF_SHARD_PROBE")
        if not folder or trainer.global_step != 1:
            return
        def local(t):  # FSDP2's weights and states are DTensors: count this rank's shard
            return t.to_local() if hasattr(t, "to_local") else t

        parts: dict[str, dict[str, int]] = {}
        for name, p in pl_module.named_parameters():
            p = local(p)
            entry = parts.setdefault(name.split(".", 1)[0], {"elements": 0, "bytes": 0, "trained": 0})
            entry["elements"] += p.numel()
            entry["bytes"] += p.numel() * p.element_size()
            entry["trained"] += p.numel() if p.requires_grad else 0
        grads = sum(local(p.grad).numel() for p in pl_module.parameters() if p.grad is not None)
        states: dict[str, int] = {}
        for optimizer in trainer.optimizers:
            for state in optimizer.state.values():
                for key, value in state.items():
                    if hasattr(value, "numel") and value.dim() > 0:
                        states[key] = states.get(key, 0) + local(value).numel()
        out = {"rank": trainer.global_rank, "world": trainer.world_size, "parts": parts, "grad_elements": grads,
               "optimizer_state_elements": states}
        (Path(folder) / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    sys.exit(train.main(extra_callbacks=(KeyProbe(), FailOneRank(), ShardProbe())))
