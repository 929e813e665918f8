"""Hardware efficiency: the model FLOPs adaptkit achieves per second over the machine's peak
matrix-multiply rate, both measured in one run.

The peak is the best rate of ``torch.matmul`` on large float32 matrices (the dtype the run trains
in, with the same torch threads), measured before and after the training runs. Training FLOPs per
token are counted per strategy: 6N when every one of the N weights trains (forward 2N, backward
4N), and 4N + 6T when only T adapter weights train on a frozen base (the frozen weights need no
weight gradient). N counts every weight that multiplies (a tied embedding once, as the output
layer). Attention's own matrix products (12 x layers x sequence x width per token) are left out
of the model FLOPs, as usual; the script prints how much they would add.

    python benchmarks/mfu.py [--repeats 2] [--cases lora]       # target: >= 55% for LoRA at sequence 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CASES, machine, measure, median, model_path  # noqa: E402

LOOP_SCRIPT = Path(__file__).resolve().parent / "loop_overhead.py"


def peak_matmul_flops(sizes: tuple[int, ...] = (1024, 2048, 3072), seconds: float = 3.0) -> tuple[float, int]:
    """The best float32 matmul rate (FLOP/s) over ``sizes``, each timed for about ``seconds``."""
    import torch

    best, best_n = 0.0, 0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)  # warm-up: thread pool and caches
        reps, start = 0, time.perf_counter()
        while True:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            rate = 2 * n**3 / (time.perf_counter() - t0)
            if rate > best:
                best, best_n = rate, n
            reps += 1
            if time.perf_counter() - start > seconds and reps >= 3:
                break
    return best, best_n


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
    parser.add_argument("--cases", nargs="+", default=["lora"], choices=list(CASES))
    parser.add_argument("--baseline", action="store_true", help="also time the hand-written loop, for comparison")
    args = parser.parse_args()
    import torch

    print(f"machine: {machine()}")
    for name in args.cases:
        model_path(CASES[name].model)
    peak_before, n_before = peak_matmul_flops()
    print(f"peak float32 matmul before: {peak_before / 1e9:.1f} GFLOP/s (n={n_before}, {torch.get_num_threads()} threads)")
    loops = ["adaptkit", "baseline"] if args.baseline else ["adaptkit"]
    results = {(name, loop): [] for name in args.cases for loop in loops}
    for name in args.cases:
        for _ in range(args.repeats):
            for loop in loops:
                results[name, loop].append(measure(LOOP_SCRIPT, loop, name))
    peak_after, n_after = peak_matmul_flops()
    print(f"peak float32 matmul after:  {peak_after / 1e9:.1f} GFLOP/s (n={n_after})")
    peak = max(peak_before, peak_after)
    for name in args.cases:
        case = CASES[name]
        print(f"\n[{name}] {case.model}, strategy {case.strategy}, batch {case.batch} x {case.seq} tokens, "
              f"{case.warmup} warm-up + {case.steps} timed steps")
        attn = attention_flops_per_token(case.model, case.seq)
        mfu = {}
        for loop in loops:
            runs = results[name, loop]
            per_token = flops_per_token(case.strategy, runs[0].total, runs[0].trainable)
            tput = median([x.tokens_per_s for x in runs])
            mfu[loop] = tput * per_token / peak
            print(f"  {loop:9s} {tput:7.1f} tokens/s x {per_token / 1e6:.0f} MFLOP/token = {tput * per_token / 1e9:6.1f} GFLOP/s; "
                  f"MFU {mfu[loop]:6.1%} (runs: {', '.join(f'{x.tokens_per_s:.1f}' for x in runs)} tokens/s; counting "
                  f"attention's {attn / 1e6:.0f} MFLOP/token too: {tput * (per_token + attn) / peak:.1%})")
        if name == "lora":
            print(f"  adaptkit LoRA MFU {mfu['adaptkit']:.1%}: {'meets' if mfu['adaptkit'] >= 0.55 else 'misses'} the 55% target")


if __name__ == "__main__":
    main()
