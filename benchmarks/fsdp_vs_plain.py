"""Compare bench_stage2.py's FSDP rows (g) with the same step without FSDP (f', compiled UNet).

    python benchmarks/fsdp_vs_plain.py OUT/sdxl.json OUT/sdxl_fsdp.json [OUT/sdxl_fsdp_grad_op.json ...]

The issue's target: FSDP2 on one GPU within 10% of the same step without it, with compile on.
Prints one line per FSDP file: img/s, the ratio to f', peak memory, and whether it is within 10%.
Exit status 1 when a file or row is missing (a benchmark that failed), else 0.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def row(path: Path, key: str) -> dict | None:
    rows = json.loads(path.read_text())["rows"]
    return next((r for r in rows if r["name"].split(" ")[0] == key), None)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    plain_file, *fsdp_files = map(Path, argv)
    status = 0
    plain = row(plain_file, "f'") if plain_file.is_file() else None
    if plain is None or not plain.get("samples_per_s"):
        print(f"no row f' in {plain_file}: the compiled step without FSDP was not measured")
        return 1
    print(f"without FSDP (f', compiled UNet): {plain['samples_per_s']:.2f} img/s, peak {plain.get('peak_gib')} GiB")
    for path in fsdp_files:
        g = row(path, "g") if path.is_file() else None
        if g is None or not g.get("samples_per_s"):
            print(f"{path.name}: no row g (failed or not run)")
            status = 1
            continue
        ratio = g["samples_per_s"] / plain["samples_per_s"]
        print(f"{path.name}: {g['name']}: {g['samples_per_s']:.2f} img/s = {ratio:.2f} x f', peak {g.get('peak_gib')} GiB; "
              f"within 10%: {'yes' if ratio >= 0.9 else 'no'}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
