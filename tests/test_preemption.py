"""SIGUSR1 (SLURM's warning before a time limit or preemption) while the models load ends the
launch at once. SIGUSR1 in training (a checkpoint at the next step, a clean exit, a resume that
continues bit for bit) is in tests/test_fault_injection.py, under SLURM in tests/test_slurm.py."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

import train
from tests.test_stage1_training import assets, tiny_args  # noqa: F401  (module fixture)

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
