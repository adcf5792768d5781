"""Kill a stage-2 run at any instant, as often as the cluster likes: the relaunches end where one
uninterrupted run ends, bit for bit.

One run goes through uninterrupted. Another is killed with SIGKILL at random instants, sent
SIGUSR1 while its models load, in training and while it exports, and has its last.ckpt
truncated and emptied between launches; each time the same command is launched again. Both
run as `python train.py` subprocesses with the same settings (two DataLoader workers, EMA,
checkpoints every 2 steps, an epoch boundary of the data in the middle). The trained weights,
the EMA, the optimizer state, the export and every logged loss must be equal, and TensorBoard
must show every step once. The instants are drawn anew every time (the seed is printed).
"""
from __future__ import annotations

import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from tests.test_stage23_training import stage1_run, stage_args, world  # noqa: F401  (module fixtures)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16  # 128 samples: the 96 training samples are read once, then the next pass begins


def _args(world, stage1, run_dir: Path) -> list[str]:  # noqa: F811 - the fixture's value
    return stage_args(world, run_dir, 2, init_from=stage1, **{
        "trainer.max_steps": STEPS, "trainer.val_check_interval": 8, "trainer.log_every_n_steps": 1,
        "checkpoint.every_n_steps": 2, "checkpoint.keep_last": 2, "samples.every_n_steps": 0,
        "data.num_workers": 2,
    })


class Launch:
    """`python train.py ARGS` in a subprocess, its output read line by line."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "train.py", *args], cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.output = ""

    def wait_for(self, *texts: str, timeout: float = 180) -> bool:
        """Read until a line holds one of `texts` (True) or the process ends first (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                return False
            self.output += line
            if any(text in line for text in texts):
                return True
        self.proc.kill()
        raise AssertionError(f"never saw {texts} in {timeout} s; output:\n{self.output[-4000:]}")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def finish(self, timeout: float = 300) -> int:
        rest, _ = self.proc.communicate(timeout=timeout)
        self.output += rest
        return self.proc.returncode


def _trained_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """Trained weights and optimizer state (the EMA averages ride in it) of the final
    checkpoint, flattened, and the EMA's counters."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    flat = {f"model/{k}": v for k, v in ckpt["state_dict"].items()}
    flat.update({f"ema/{k}": torch.tensor(v) for k, v in ckpt["ema"].items()})
    for index, state in ckpt["optimizer_states"][0]["state"].items():
        flat.update({f"optim/{index}/{name}": value for name, value in state.items()})
    return flat


def _exported(run_dir: Path) -> dict[str, torch.Tensor]:
    export = run_dir / "export"
    assert (export / "export_complete.json").is_file()
    tensors = {f"adapter/{k}": v for k, v in load_file(export / "adapter.safetensors").items()}
    for path in sorted((export / "unet").glob("*.safetensors")):
        tensors.update({f"unet/{k}": v for k, v in load_file(path).items()})
    assert any(name.startswith("unet/") for name in tensors)
    return tensors


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    """train/loss as TensorBoard shows it (events orphaned by a kill are purged on reload)."""
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={SCALARS: 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars("train/loss")]


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: {sorted(got.keys() ^ want.keys())[:5]}"
    differ = [name for name in want if not torch.equal(got[name], want[name])]
    assert not differ, f"{what} differ from the uninterrupted run's: {differ[:5]}"


def test_killed_and_relaunched_run_ends_bit_identical(world, stage1_run, tmp_path):  # noqa: F811
    seed = int(os.environ.get("LINGUADIFF_FAULT_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    print(f"fault seed {seed} (LINGUADIFF_FAULT_SEED={seed} replays these instants)")

    reference = tmp_path / "reference"
    straight = Launch(_args(world, stage1_run, reference))
    assert straight.finish() == 0, straight.output[-4000:]

    run_dir = tmp_path / "faulted"
    args = _args(world, stage1_run, run_dir)
    log = []

    def launch() -> Launch:
        log.append(f"launch {len(log)}")
        return Launch(args)

    def kill_after(run: Launch, text: str, within: float) -> None:
        """SIGKILL at a random instant up to `within` seconds after `text` shows up."""
        assert run.wait_for(text), run.output[-4000:]
        time.sleep(rng.uniform(0.0, within))
        run.signal(signal.SIGKILL)
        run.finish()
        log.append(f"SIGKILL after {text!r}")

    last = run_dir / "checkpoints" / "last.ckpt"
    # 1. SIGKILL in the first steps (or while the first checkpoint is written), and a
    #    zero-byte last.ckpt left behind (a node that died while the file was created).
    kill_after(launch(), "step 5/", 0.6)
    last.write_bytes(b"")
    log.append("emptied last.ckpt")
    # 2. SIGUSR1 while the models load: a clean exit that leaves the checkpoints as they are.
    run = launch()
    assert run.wait_for("newest intact checkpoint"), run.output[-4000:]
    run.signal(signal.SIGUSR1)
    assert run.finish() == 0, run.output[-4000:]
    assert "before training started" in run.output, run.output[-4000:]
    assert last.stat().st_size == 0
    # 3. SIGUSR1 in training: a checkpoint at the next step and a clean exit.
    run = launch()
    assert run.wait_for("step 10/"), run.output[-4000:]
    time.sleep(rng.uniform(0.0, 0.3))
    run.signal(signal.SIGUSR1)
    assert run.finish() == 0, run.output[-4000:]
    assert "stopping at step" in run.output and "Not under SLURM" in run.output, run.output[-4000:]
    assert not (run_dir / "export").exists()  # unfinished: nothing exported
    log.append("SIGUSR1 after 'step 10/'")
    # 4. A truncated last.ckpt (a disk that filled up), then SIGKILL near the end.
    with open(last, "rb+") as f:
        f.truncate(last.stat().st_size // 2)
    log.append("truncated last.ckpt")
    run = launch()
    assert run.wait_for("newest intact checkpoint"), run.output[-4000:]
    kill_after(run, "step 15/", 0.3)
    # 5. SIGUSR1 while the export is written (after removing an export that a kill may
    #    have let finish): the export completes anyway.
    if (run_dir / "export").exists():
        shutil.rmtree(run_dir / "export")
        log.append("removed the export")
    run = launch()
    assert run.wait_for("Exporting stage"), run.output[-4000:]
    run.signal(signal.SIGUSR1)
    log.append("SIGUSR1 during the export")
    assert run.finish() == 0, run.output[-4000:]
    print("\n".join(log))

    _assert_equal(_trained_state(run_dir), _trained_state(reference), "trained weights, EMA or optimizer state")
    _assert_equal(_exported(run_dir), _exported(reference), "exported weights")
    losses, want = _losses(run_dir), _losses(reference)
    assert [step for step, _ in losses] == list(range(STEPS)), f"steps in TensorBoard: {[s for s, _ in losses]}"
    assert losses == want, "a logged loss differs from the uninterrupted run's"
