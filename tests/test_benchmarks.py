"""The benchmark scripts keep working: their GPU code paths at tiny sizes, on the CPU.

They measure and print (never assert speed); this only checks that every row runs and is
written, so a change in the project's code cannot silently break them.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "rows"),
    [
        ("bench_stage1.py", ["1 LLM forward", "2 teacher forward", "3 adapter train step", "4 full stage-1 step"]),
        ("bench_stage2.py", ["a UNet train step", "b VAE encode", "c LLM forward", "d adapter", "e full step", "f full step"]),
    ],
)
def test_benchmark_runs_its_gpu_path_tiny(script, rows, tmp_path):
    out = tmp_path / "bench.json"
    levers = []
    if script == "bench_stage2.py":  # the speed levers' rows (float8 where torchao is installed)
        float8 = importlib.util.find_spec("torchao") is not None
        levers = ["--encode-ahead"] + (["--float8"] if float8 else [])
        rows = [*rows, "e+ full step"] + (["f8 full step"] if float8 else [])
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--preset", "sdxl-7b", "--tiny", "--iters", "1", "--warmup", "1",
         "--no-flops", "--threads", "1", "--batch-size", "4", "--json", str(out), *levers],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    names = [row["name"] for row in json.loads(out.read_text())["rows"]]
    for row in rows:
        assert any(name.startswith(row) for name in names), f"{row!r} missing from {names}"
