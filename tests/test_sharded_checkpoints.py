"""Sharded (FSDP) checkpoints: each save is a folder of its own and the checkpoint names are
symlinks moved atomically, so a kill at any instant of a save leaves a resumable checkpoint.

Driven through the real `save_checkpoint` of both FSDP strategies (FSDP2Strategy and FSDP1's
ShardedFSDPStrategy) in one process: the shard writer (torch.distributed.checkpoint) is replaced
by one that writes what it writes (shard files, then .metadata last), and the kill is an
exception raised at each step in turn. The 2-rank run that saves, resumes and continues is
tests/test_scale_out.py::test_fsdp_on_cpu_trains_saves_sharded_trained_weights_and_resumes."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from linguadiff.run import SHARDS_DIR, checkpoint_step, remove_partial_saves, resume_checkpoint
from linguadiff.strategy import FSDP2Strategy, FSDPUnits, ShardedFSDPStrategy


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no cleanup (BaseException: no except catches it)."""


def fake_shard_writer(state: dict, path: Path) -> None:
    """What torch.distributed.checkpoint leaves: one file per rank, then .metadata."""
    (Path(path) / "__0_0.distcp").write_bytes(b"shard")
    (Path(path) / ".metadata").write_bytes(b"metadata")


def save(strategy, path: Path, step: int) -> None:
    strategy.save_checkpoint({"global_step": step, "state_dict": {}, "optimizer_states": []}, path)


# Where each version's shard writer and meta.pt writer are looked up (what a kill can interrupt).
WRITERS = {1: ("lightning.pytorch.strategies.fsdp._distributed_checkpoint_save", "lightning.pytorch.strategies.fsdp.torch.save"),
           2: ("linguadiff.strategy.write_distributed_checkpoint", "linguadiff.strategy.torch.save")}


@pytest.fixture(params=[2, 1], ids=["fsdp2", "fsdp1"])
def strategy(request, monkeypatch):
    monkeypatch.setattr(WRITERS[request.param][0], fake_shard_writer)
    # One process: broadcast and barrier pass through.
    if request.param == 1:
        made = ShardedFSDPStrategy(state_dict_type="sharded")
    else:
        made = FSDP2Strategy(FSDPUnits(frozenset(), frozenset(), {}), "32-true")
    made.version = request.param
    return made


def folders(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in (checkpoints / SHARDS_DIR).iterdir())


def test_names_point_to_complete_folders_shared_and_collected(strategy, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    save(strategy, checkpoints / "step00000002.ckpt", 2)
    save(strategy, checkpoints / "last.ckpt", 2)  # the same step: the same folder, not written twice
    last, step2 = checkpoints / "last.ckpt", checkpoints / "step00000002.ckpt"
    assert last.is_symlink() and last.resolve() == step2.resolve() and len(folders(checkpoints)) == 1
    assert not os.path.isabs(os.readlink(last))  # relative: a moved run_dir still resumes
    assert checkpoint_step(last) == 2

    save(strategy, checkpoints / "step00000004.ckpt", 4)
    save(strategy, checkpoints / "last.ckpt", 4)
    # last.ckpt moved on, but step00000002.ckpt still points to the old folder: kept.
    assert len(folders(checkpoints)) == 2 and checkpoint_step(step2) == 2
    # Rotating step00000002.ckpt out removes its folder; step00000004.ckpt's stays for last.ckpt.
    strategy.remove_checkpoint(step2)
    strategy.remove_checkpoint(checkpoints / "step00000004.ckpt")
    assert not step2.exists() and folders(checkpoints) == [last.resolve().name]
    assert resume_checkpoint(checkpoints) == (last, 4)
    assert sorted(p.name for p in checkpoints.iterdir()) == [SHARDS_DIR, "last.ckpt"]


def _write_meta_then_die(*args, **kwargs):
    raise Killed


# Each stage of a save of last.ckpt at step 4 where a kill can land: (what to break, expected step).
KILLS = {
    "while the shards are written": ("shard writer", 2),
    "while meta.pt is written": ("meta writer", 2),
    "before the new link exists": ("linguadiff.run.os.symlink", 2),
    "between the link and its rename": ("linguadiff.run.os.replace", 2),
    "before the old folder is removed": ("linguadiff.run.remove_unpointed", 4),
}


@pytest.mark.parametrize("stage", KILLS)
def test_a_kill_at_any_stage_of_a_sharded_save_leaves_a_resumable_checkpoint(strategy, tmp_path, monkeypatch, stage):
    target, expected = KILLS[stage]
    target = {"shard writer": WRITERS[strategy.version][0], "meta writer": WRITERS[strategy.version][1]}.get(target, target)
    checkpoints = tmp_path / "checkpoints"
    save(strategy, checkpoints / "last.ckpt", 2)  # no periodic checkpoint: last.ckpt is the only one
    strategy._last_shard_folder = None

    if target == WRITERS[strategy.version][0]:
        def dies(state, path):  # one shard on disk, no .metadata
            (Path(path) / "__0_0.distcp").write_bytes(b"sh")
            raise Killed
        monkeypatch.setattr(target, dies)
    elif target == WRITERS[strategy.version][1]:
        def dies(obj, f, *args, **kwargs):
            Path(f).write_bytes(b"PK\x03\x04 half")
            raise Killed
        monkeypatch.setattr(target, dies)
    else:
        monkeypatch.setattr(target, _write_meta_then_die)
    with pytest.raises(Killed):
        save(strategy, checkpoints / "last.ckpt", 4)
    monkeypatch.undo()

    assert resume_checkpoint(checkpoints) == (checkpoints / "last.ckpt", expected)
    # The next launch removes what the kill left and keeps what last.ckpt points to.
    remove_partial_saves(checkpoints)
    assert sorted(p.name for p in checkpoints.iterdir()) == [SHARDS_DIR, "last.ckpt"]
    assert folders(checkpoints) == [(checkpoints / "last.ckpt").resolve().name]
    assert resume_checkpoint(checkpoints) == (checkpoints / "last.ckpt", expected)


def test_a_missing_or_damaged_folder_falls_back_to_the_newest_intact_checkpoint(strategy, tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    for step in (2, 4):
        save(strategy, checkpoints / f"step{step:08d}.ckpt", step)
    save(strategy, checkpoints / "last.ckpt", 6)
    last = checkpoints / "last.ckpt"
    (last.resolve() / "meta.pt").write_bytes(b"")  # damaged
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(checkpoints) == (checkpoints / "step00000004.ckpt", 4)
    assert "newest intact checkpoint" in caplog.text
    shutil.rmtree(last.resolve())  # gone: last.ckpt points nowhere
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(checkpoints) == (checkpoints / "step00000004.ckpt", 4)
    assert "which is missing" in caplog.text
    # A folder-shaped last.ckpt saved before pointers existed becomes a pointer on the next save.
    shutil.rmtree(checkpoints / SHARDS_DIR)
    last.unlink()
    for name in ("step00000002.ckpt", "step00000004.ckpt"):
        (checkpoints / name).unlink()
    last.mkdir()
    torch.save({"global_step": 8}, last / "meta.pt")
    (last / ".metadata").write_bytes(b"metadata")
    assert resume_checkpoint(checkpoints) == (last, 8)
    save(strategy, last, 10)
    assert last.is_symlink() and checkpoint_step(last) == 10 and len(folders(checkpoints)) == 1
