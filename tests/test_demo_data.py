"""The demo data set is generated on first use by every process that asks at once (the ranks of
a SLURM job on a fresh clone, several jobs sharing a cache): nobody may crash, wait forever or
read a half-written shard, and the work is done once."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from datamodules import demo_data

ROOT = Path(__file__).resolve().parents[1]

# A child process: the real generator with small shards (and a pause, so that the processes
# are certainly generating at the same time), started together through a "go" file.
CHILD = r"""
import logging, sys, time
from pathlib import Path
from datamodules import demo_data

logging.basicConfig(level=logging.INFO)

mode, root, calls, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
real = demo_data.write_demo_shards

def small(out_dir, **kw):
    with open(calls, "a") as f:
        f.write(kw["prefix"] + "\n")
    time.sleep(2.0)
    kw.update(num_samples=min(kw["num_samples"], 60), samples_per_shard=min(kw["samples_per_shard"], 20))
    return real(out_dir, **kw)

demo_data.write_demo_shards = small
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
if mode == "ensure":
    print(demo_data.ensure_demo_data("text", root))
else:  # the shard writer alone, same shards from every process, no lock
    small(root, num_samples=600, samples_per_shard=300, seed=2, image_size=16, prefix="val", with_images=False)
"""


def _at_once(mode: str, root: Path, n: int = 3) -> tuple[list[subprocess.CompletedProcess], list[str]]:
    calls, go = root.parent / f"{mode}-calls.txt", root.parent / f"{mode}-go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, mode, str(root), str(calls), str(go)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    time.sleep(3)  # every child imported and waiting
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results, calls.read_text().split() if calls.exists() else []


def _samples(shard: Path) -> int:
    with tarfile.open(shard) as tar:
        return len({Path(m.name).name.split(".")[0] for m in tar.getmembers()})


def test_processes_generating_at_once_all_succeed_and_generate_once(tmp_path):
    root = tmp_path / "cache"
    results, calls = _at_once("ensure", root)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip() == str(root / "text")
    assert calls == ["train", "val"], f"the data was generated more than once: {calls}"
    folder = root / "text"
    assert sorted(p.name for p in folder.glob("*.tar")) == ["train-00000.tar", "train-00001.tar", "train-00002.tar",
                                                            "val-00000.tar", "val-00001.tar", "val-00002.tar"]
    assert all(_samples(p) == 20 for p in folder.glob("*.tar"))
    assert (folder / f"COMPLETE-v{demo_data.DATA_VERSION}-16px").is_file()
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))
    assert "waiting for it" in "".join(r.stderr for r in results)  # the others waited, then reused


def test_shard_writers_racing_on_the_same_shards_never_collide(tmp_path):
    root = tmp_path / "shards"
    results, calls = _at_once("write", root)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    assert len(calls) == 3  # all wrote, none had to wait
    assert sorted(p.name for p in root.iterdir()) == ["val-00000.tar", "val-00001.tar", "val-00002.tar"]
    assert all(_samples(p) == 20 for p in root.glob("*.tar"))


def test_generation_goes_on_where_the_filesystem_has_no_locks(tmp_path, monkeypatch):
    import fcntl

    def no_locks(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    real = demo_data.write_demo_shards
    monkeypatch.setattr(demo_data, "write_demo_shards",
                        lambda out_dir, **kw: real(out_dir, **{**kw, "num_samples": 10, "samples_per_shard": 10}))
    folder = demo_data.ensure_demo_data("images", tmp_path)
    assert sorted(p.name for p in folder.glob("*.tar")) == ["train-00000.tar", "val-00000.tar"]
    assert (folder / f"COMPLETE-v{demo_data.DATA_VERSION}-16px").is_file()
    assert demo_data.ensure_demo_data("images", tmp_path) == folder  # done: reused
