"""The memory planner's predicted peak against one measured by bench_stage2.py.

    python benchmarks/plan_vs_peak.py OUT/sdxl_gc.json f stage=2 model=sdxl llm=qwen2.5-7b ...

reads the row (by its letter) of a ``bench_stage2.py --json`` file, plans the same setting
with ``python -m linguadiff.plan`` (the bench's padded prompt length from its json as
``tokens=``) and prints predicted vs measured ``torch.cuda.max_memory_allocated``. The issue's
target: within 10%. Prints only; the exit status is 0 whenever both figures exist.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linguadiff import plan as planner  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    bench_json, letter, plan_args = Path(argv[0]), argv[1], argv[2:]
    result = json.loads(bench_json.read_text())
    row = next((r for r in result["rows"] if r["name"].startswith(f"{letter} ")), None)
    if row is None or row.get("peak_gib") is None:
        print(f"{bench_json.stem}: no measured peak for row {letter} in {bench_json}")
        return 1
    tokens = result["info"].get("llm_tokens_max")
    train_args, options, _ = planner.split_arguments(plan_args + ([f"tokens={tokens}"] if tokens else []))
    plan = planner.make_plan(train_args, options)
    error = (plan.allocated_gib - row["peak_gib"]) / row["peak_gib"]
    print(f"{bench_json.stem}: predicted {plan.allocated_gib:.1f} GiB, measured {row['peak_gib']:.1f} GiB "
          f"(row {row['name']!r}), error {error:+.1%} -> {'within 10%' if abs(error) <= 0.10 else 'OFF by more than 10%'}"
          f"  [{plan.summary}]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
