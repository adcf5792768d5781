"""SIGUSR1 (SLURM's warning before a time limit or preemption) -> a checkpoint at the next step
and a clean exit; the same command then resumes from it."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import train
from tests.test_scale_out import _StateProbe
from tests.test_stage1_training import assets, scalars, tiny_args  # noqa: F401  (module fixture)

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """Read the child's output until `text` shows up (or fail after `timeout` seconds)."""
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            seen += line
            if text in line:
                return seen
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(f"never saw {text!r}; output so far:\n{seen[-3000:]}")


def test_sigusr1_checkpoints_stops_and_resumes(assets, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    endless = {"trainer.max_steps": 1_000_000, "trainer.val_check_interval": 1_000_000, "checkpoint.every_n_steps": 1_000_000}
    proc = subprocess.Popen(
        [sys.executable, "train.py", *tiny_args(assets, run_dir, **endless)],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    _wait_for(proc, "step 10/", timeout=120)  # training is under way
    started = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-3000:]
    assert time.monotonic() - started < 60
    assert "stopping at step" in output and "Not under SLURM" in output

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    stopped = ckpt["global_step"]
    assert 10 <= stopped < 1_000_000
    assert not (run_dir / "export" / "adapter.safetensors").exists()  # unfinished: nothing exported

    # The same command with a reachable max_steps goes on from there, with the optimizer,
    # schedule and random state the signal's checkpoint holds, and finishes.
    probe = _StateProbe()
    longer = tiny_args(assets, run_dir, **{**endless, "trainer.max_steps": stopped + 3})
    assert train.main(longer, extra_callbacks=(probe.callback,)) == 0
    assert probe.step == stopped and probe.scheduler_epoch == ckpt["lr_schedulers"][0]["last_epoch"]
    for index, state in ckpt["optimizer_states"][0]["state"].items():
        assert all(torch.equal(probe.optimizer[index][name], value) for name, value in state.items())
    assert torch.equal(probe.rng, ckpt["callbacks"]["RNGState"]["states"][0]["torch"])
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == stopped + 3
    assert (run_dir / "export" / "adapter.safetensors").is_file()
    steps = [s for s, _ in scalars(run_dir, "train/loss")]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    assert max(steps) == stopped + 2  # steps are 0-based in the logs


def test_sigusr1_during_a_long_model_load_ends_the_launch_at_once(assets, tmp_path, monkeypatch, caplog):  # noqa: F811
    """A 7B model can take longer to load than SLURM's grace time: one process acts on the
    signal while it loads instead of after."""
    import lightning_modules

    class SlowToLoad:
        @classmethod
        def from_config(cls, cfg):
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning comes mid-load
            time.sleep(120)
            raise AssertionError("the load went on after the signal")

    monkeypatch.setattr(lightning_modules, "stage_class", lambda stage: SlowToLoad)
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # as in a fresh `python train.py`
    try:
        started = time.monotonic()
        assert train.main(tiny_args(assets, tmp_path / "run")) == 0
        assert time.monotonic() - started < 60
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert "before training started" in caplog.text
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
