"""Hardware efficiency: the model FLOPs adaptkit achieves per second over the machine's peak
matrix-multiply rate, both measured in one run, and over the device's published peak where one
is known (``_peaks.py``; most CPUs have none).

The peak is the best rate of ``torch.matmul`` on large float32 matrices (the dtype the run trains
in, with the same torch threads), measured before the first training run and after each one; a
run is compared with the mean of the peaks measured just before and just after it, so that a
shared machine's drift (its matmul rate moved by a third within one run here) hits both. Training FLOPs per
token are counted per strategy: 6N when every one of the N weights trains (forward 2N, backward
4N), and 4N + 6T when only T adapter weights train on a frozen base (the frozen weights need no
weight gradient). N counts every weight that multiplies (a tied embedding once, as the output
layer). Attention's own matrix products (12 x layers x sequence x width per token) are left out
of the model FLOPs, as usual; the script prints how much they would add. The same ratio per
CPU-second (model FLOPs per CPU-second of the training process over matmul FLOPs per CPU-second)
is printed too: on a machine shared with other work it is the steadier figure.

    python benchmarks/mfu.py [--repeats 2] [--cases lora-b8 lora] [--baseline]   # target: >= 55% for LoRA at 256 tokens
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CASES, machine, measure, median, model_path  # noqa: E402
from _peaks import describe_peak, device_name, published_peak  # noqa: E402

LOOP_SCRIPT = Path(__file__).resolve().parent / "loop_overhead.py"


def cpu_seconds() -> float:
    """User + system time of this process (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_matmul_flops(
    sizes: tuple[int, ...] = (1024, 2048, 3072), seconds: float = 3.0
) -> tuple[float, float, int]:
    """The best float32 matmul rate over ``sizes``: FLOP per wall second, FLOP per CPU-second, and the size."""
    import torch

    best, best_cpu, best_n = 0.0, 0.0, 0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)  # warm-up: thread pool and caches
        reps, start = 0, time.perf_counter()
        while True:
            t0, c0 = time.perf_counter(), cpu_seconds()
            torch.matmul(a, b)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            if 2 * n**3 / wall > best:
                best, best_n = 2 * n**3 / wall, n
            best_cpu = max(best_cpu, 2 * n**3 / max(cpu, 1e-6))
            reps += 1
            if time.perf_counter() - start > seconds and reps >= 3:
                break
    return best, best_cpu, best_n


def flops_per_token(strategy: str, total: int, trainable: int) -> float:
    """Training FLOPs per token: 6N if everything trains, else 4N + 6T (N the frozen base, T the trainable weights)."""
    if trainable >= total:
        return 6.0 * total
    return 4.0 * (total - trainable) + 6.0 * trainable


def attention_flops_per_token(model: str, seq: int) -> float:
    """Attention scores and weighted values: 4 x layers x seq x width forward, three times that to train."""
    import json

    cfg = json.loads((Path(model_path(model)) / "config.json").read_text())
    return 12.0 * cfg["num_hidden_layers"] * seq * cfg["hidden_size"]


def main() -> None:
    """Measure the peak, run the cases, print achieved FLOP/s and the fraction of the peak."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each loop per case (alternating)")
    parser.add_argument("--cases", nargs="+", default=["lora-b8", "lora"], choices=list(CASES))
    parser.add_argument(
        "--baseline", action="store_true", help="also time the hand-written loop, for comparison"
    )
    args = parser.parse_args()
    import torch

    print(f"machine: {machine()}")
    for name in args.cases:
        model_path(CASES[name].model)
    peaks = [peak_matmul_flops()]
    print(
        f"peak float32 matmul: {peaks[0][0] / 1e9:.1f} GFLOP/s, {peaks[0][1] / 1e9:.1f} GFLOP per CPU-second "
        f"(n={peaks[0][2]}, {torch.get_num_threads()} threads)"
    )
    loops = ["adaptkit"] + (["baseline"] if args.baseline else [])
    # per run: its result and the peak (FLOP/s, FLOP per CPU-second) bracketing it
    results: dict[tuple[str, str], list[tuple[Any, float, float]]] = {
        (name, loop): [] for name in args.cases for loop in loops
    }
    for name in args.cases:
        for _ in range(args.repeats):
            for loop in loops:
                result = measure(LOOP_SCRIPT, loop, name)
                peaks.append(peak_matmul_flops())
                before, after = peaks[-2], peaks[-1]
                print(
                    f"  {name} {loop}: {result.tokens_per_s:.1f} tokens/s; peak after it {after[0] / 1e9:.1f} GFLOP/s",
                    flush=True,
                )
                results[name, loop].append((result, (before[0] + after[0]) / 2, (before[1] + after[1]) / 2))
    rates = [p[0] / 1e9 for p in peaks]
    print(f"peak float32 matmul over the run: {min(rates):.1f} to {max(rates):.1f} GFLOP/s")
    device = device_name()
    print(describe_peak(device, "float32", median([p[0] for p in peaks])))
    published = published_peak(device, "float32")
    for name in args.cases:
        case = CASES[name]
        print(
            f"\n[{name}] {case.model}, strategy {case.strategy}, batch {case.batch} x {case.seq} tokens, "
            f"{case.warmup} warm-up + {case.steps} timed steps"
        )
        attn = attention_flops_per_token(case.model, case.seq)
        mfu = {}
        for loop in loops:
            runs = results[name, loop]
            per_token = flops_per_token(case.strategy, runs[0][0].total, runs[0][0].trainable)
            tput = median([x.tokens_per_s for x, _, _ in runs])
            mfu[loop] = median([x.tokens_per_s * per_token / peak for x, peak, _ in runs])
            with_attn = median([x.tokens_per_s * (per_token + attn) / peak for x, peak, _ in runs])
            per_cpu = median(
                [
                    case.batch * case.seq / x.cpu_seconds_per_step * per_token / peak_cpu
                    for x, _, peak_cpu in runs
                ]
            )
            against_published = (
                "" if published is None else f"; {tput * per_token / published[0]:.1%} of the published peak"
            )
            print(
                f"  {loop}: {tput:.1f} tokens/s (runs: {', '.join(f'{x.tokens_per_s:.1f}' for x, _, _ in runs)}) x "
                f"{per_token / 1e6:.0f} MFLOP/token = {tput * per_token / 1e9:.1f} GFLOP/s: MFU {mfu[loop]:.1%} "
                f"(with attention's {attn / 1e6:.0f} MFLOP/token: {with_attn:.1%}); per CPU-second {per_cpu:.1%}"
                f"{against_published}"
            )
        if case.strategy == "lora":
            print(
                f"  adaptkit LoRA MFU {mfu['adaptkit']:.1%}: {'meets' if mfu['adaptkit'] >= 0.55 else 'misses'} the 55% target"
            )


if __name__ == "__main__":
    main()
