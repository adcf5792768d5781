"""What a run does when things go wrong: hostile or damaged checkpoints, a kill during a save or
an export, SIGUSR1 while models load, and two launches into one run_dir."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

import train
from linguadiff.config import ConfigError
from linguadiff.export import COMPLETE_FILE, export_complete, init_export
from linguadiff.run import AtomicCheckpointIO, CheckpointError, RunLock, read_checkpoint, resume_checkpoint
from tests.test_preemption import _wait_for
from tests.test_stage1_training import assets, tiny_args  # noqa: F401  (module fixture)

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _payload_checkpoint(path: Path, marker: Path) -> None:
    torch.save({"global_step": 1_000, "state_dict": {}, "optimizer_states": [], "x": Payload(marker)}, path)


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory):  # noqa: F811
    """A stage-1 run of 3 steps: checkpoints/step00000003.ckpt, last.ckpt, a complete export."""
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    assert train.main(tiny_args(assets, run_dir, **{"trainer.max_steps": 3})) == 0
    return run_dir


def test_checkpoints_are_plain_data_and_saves_leave_no_temporaries(finished_run):
    for path in (finished_run / "checkpoints").iterdir():
        assert not path.name.startswith("."), f"left over from a save: {path}"
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # what resuming does
        assert ckpt["global_step"] == 3 and ckpt["state_dict"] and ckpt["optimizer_states"]
    assert export_complete(finished_run / "export")
    assert not (finished_run / ".lock").read_text() == ""  # pid and host of the last holder


def test_damaged_or_hostile_last_checkpoint_falls_back(finished_run, tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(finished_run / "checkpoints", checkpoints)
    good = checkpoints / "step00000003.ckpt"
    last = checkpoints / "last.ckpt"
    marker = tmp_path / "payload-ran"
    data = good.read_bytes()
    damages = {
        "zero bytes": lambda: last.write_bytes(b""),
        "truncated": lambda: last.write_bytes(data[: len(data) // 2]),
        "pickle payload": lambda: _payload_checkpoint(last, marker),
        "not a checkpoint": lambda: torch.save({"weights": torch.zeros(2)}, last),
    }
    for name, damage in damages.items():
        damage()
        with pytest.raises(CheckpointError):
            read_checkpoint(last)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert resume_checkpoint(checkpoints) == (good, 3), name
        assert "newest intact checkpoint" in caplog.text, name
    assert not marker.exists(), "a checkpoint's pickle ran"
    # Nothing intact at all: a clear error, not a traceback on every requeue.
    good.write_bytes(b"")
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        resume_checkpoint(checkpoints)


def test_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_resume_never_runs_a_checkpoints_pickle_and_reexports(assets, finished_run, tmp_path, caplog):  # noqa: F811
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir, ignore=shutil.ignore_patterns(".lock"))
    marker = tmp_path / "payload-ran"
    _payload_checkpoint(run_dir / "checkpoints" / "last.ckpt", marker)
    # An export that a kill left unfinished (no completion marker) is exported again, and a
    # later stage refuses to start from it meanwhile.
    (run_dir / "export" / COMPLETE_FILE).unlink()
    cfg = OmegaConf.create({"stage": 2, "init_from": str(run_dir)})
    with pytest.raises(ConfigError, match="incomplete"):
        init_export(cfg, 1)
    with caplog.at_level(logging.WARNING):
        assert train.main(tiny_args(assets, run_dir, **{"trainer.max_steps": 3})) == 0
    assert not marker.exists(), "a checkpoint's pickle ran"
    assert "newest intact checkpoint" in caplog.text and "exporting it again" in caplog.text
    assert export_complete(run_dir / "export") and init_export(cfg, 1) == run_dir / "export"
    assert not (run_dir / ".export.partial").exists() and not (run_dir / ".export.old").exists()
    # Complete now: the same command has nothing left to do.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert train.main(tiny_args(assets, run_dir, **{"trainer.max_steps": 3})) == 0
    assert "already reached step 3" in caplog.text


def test_stage2_export_without_unet_is_refused(finished_run, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(finished_run / "export", export)
    adapter = export / "adapter.safetensors"
    with safe_open(str(adapter), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(adapter), metadata={**header, "stage": json.dumps(2)})
    cfg = OmegaConf.create({"stage": 3, "init_from": str(export)})
    with pytest.raises(ConfigError, match="without its unet"):
        init_export(cfg, 2)


def test_second_launch_into_a_run_dir_is_refused(assets, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from linguadiff.run import RunLock; "
         "lock = RunLock.take(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)", str(run_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_for(holder, "locked", timeout=60)
        assert train.main(tiny_args(assets, run_dir)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert f"in use by pid {holder.pid} on " in err
        assert not (run_dir / "config.yaml").exists()  # the running launch's files are untouched
    finally:
        holder.kill()
        holder.wait()
    # The holder died: its lock went with it, and the next launch takes it over.
    RunLock.take(run_dir).release()
