"""Timing helpers the benchmark scripts share: one row = warm-up, timed steps, median."""
from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def count_flops(step: Callable[[], object]) -> float:
    """FLOPs of one call of `step` (matmuls, convolutions, attention), from torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


@dataclass
class Row:
    name: str
    samples_per_s: float | None  # images (or prompts, for the LLM and adapter rows) per second
    ms_per_step: float | None
    ms_spread: tuple[float, float] | None  # fastest, slowest timed step
    peak_gib: float | None  # torch.cuda.max_memory_allocated during the row (resident models included)
    tflops: float | None  # achieved, from torch's FLOP counter on one eager step (matmuls, convs, attention)
    note: str = ""


def free_memory(optimizer=None) -> None:
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, step: Callable[[], object], batch: int, args, device: torch.device, optimizer=None,
            count: bool = True, flops: float | None = None) -> Row:
    """Warm-up steps, then ``--iters`` steps each timed between synchronizations; the median.

    A row that runs out of GPU memory is reported as such and the next row still runs.
    """
    cuda = device.type == "cuda"
    print(f"  row {name} ...", flush=True)
    started = time.perf_counter()
    try:
        free_memory(optimizer)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        if count and flops is None and not args.no_flops:
            flops = count_flops(step)
        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.iters):
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        row = Row(name, None, None, None, peak, None, "out of memory")
    else:
        median = statistics.median(times)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        row = Row(name, batch / median, 1000 * median, (1000 * min(times), 1000 * max(times)), peak,
                  flops / median / 1e12 if flops else None)
    free_memory(optimizer)
    rate = f"{row.samples_per_s:.2f}/s, {row.ms_per_step:.1f} ms/step" if row.samples_per_s else row.note
    peak = f", peak {row.peak_gib:.1f} GiB" if row.peak_gib is not None else ""
    print(f"  measured {name}: {rate}{peak} ({time.perf_counter() - started:.1f} s)", flush=True)
    return row


def finish_args(parser: argparse.ArgumentParser, args: argparse.Namespace, gpu_iters: int, gpu_warmup: int) -> argparse.Namespace:
    """Shared option rules: --tiny means a random-weight preset's path on the CPU; iteration defaults per device."""
    if args.tiny and not args.preset.endswith("-7b"):
        parser.error("--tiny runs a random-weight preset's code path: use it with --preset sdxl-7b (or sd15-7b)")
    default_device = "cuda" if args.preset != "demo" and not args.tiny else "cpu"
    args.device = torch.device(args.device or default_device)
    on_gpu = args.device.type == "cuda"
    args.iters = args.iters if args.iters is not None else (gpu_iters if on_gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (gpu_warmup if on_gpu else 1)
    return args


def setup_torch(args: argparse.Namespace) -> random.Random:
    """Threads, TF32 and seeds as the options say; returns the run's Python RNG."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    return random.Random(args.seed)


def print_table(info: dict, rows: list[Row], ratios: dict[str, str | float], unit: str, name_width: int = 46) -> None:
    """The run's settings, one line per row, then the ratios (label -> value) under the rows."""
    print()
    width = max((len(key) for key in info), default=0)
    for key, value in info.items():
        print(f"{key:>{width}}: {value}")
    print()
    header = (f"{'row':<{name_width}} {unit + '/s':>10} {'ms/step':>9} {'min..max ms':>17} {'peak GiB':>9} "
              f"{'TFLOP/s':>8}  note")
    print(header)
    print("-" * len(header))

    def cell(value, spec: str) -> str:
        return format(value, spec) if value is not None else "-"

    for r in rows:
        spread = f"{r.ms_spread[0]:.1f}..{r.ms_spread[1]:.1f}" if r.ms_spread else "-"
        print(f"{r.name:<{name_width}} {cell(r.samples_per_s, '.2f'):>10} {cell(r.ms_per_step, '.1f'):>9} {spread:>17} "
              f"{cell(r.peak_gib, '.1f'):>9} {cell(r.tflops, '.2f'):>8}  {r.note or ''}")
    for label, value in ratios.items():
        print(f"{label:<{name_width}} {value:>10.2f}")
