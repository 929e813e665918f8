"""adaptkit's training loop against the loop a user would write by hand, measured in one run.

For each case (LoRA and full fine-tuning of SmolLM2-135M as a language model, and a classifier on
all-MiniLM-L6-v2 with its top two blocks trainable) it runs adaptkit and a minimal
transformers + peft + Accelerate loop on the same model, data, batch, sequence length and seed,
each in its own process, alternating (adaptkit, baseline, adaptkit, baseline, ...) so that drift
of a shared machine hits both. It prints the median throughput and peak memory of each side and
their ratios: throughput ratio (target >= 1.0) and peak-memory ratio (target <= 1.0). Throughput
is also given per CPU-second (user + system time of the process), which other processes on a
shared machine disturb much less than wall time.

    python benchmarks/loop_overhead.py [--repeats 2] [--cases lora full classification]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CASES, machine, measure, median, worker_main  # noqa: E402


def main() -> None:
    """Run the comparison and print one block per case."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each loop per case (alternating)")
    parser.add_argument("--cases", nargs="+", default=["lora", "full", "classification"], choices=list(CASES))
    args = parser.parse_args()
    loops = ["adaptkit", "baseline"]
    print(f"machine: {machine()}")
    for name in args.cases:
        case = CASES[name]
        results = {loop: [] for loop in loops}
        for _ in range(args.repeats):
            for loop in loops:
                results[loop].append(measure(Path(__file__), loop, name))
        a, b = results["adaptkit"], results["baseline"]
        tokens = case.batch * case.seq
        tput = {k: median([r.tokens_per_s for r in v]) for k, v in results.items()}
        per_cpu = {k: median([tokens / r.cpu_seconds_per_step for r in v]) for k, v in results.items()}
        rss = {k: median([r.peak_mib for r in v]) for k, v in results.items()}
        print(
            f"\n[{name}] {case.model}, {case.task}, strategy {case.strategy}, batch {case.batch} x {case.seq} tokens, "
            f"{case.warmup} warm-up + {case.steps} timed steps, {args.repeats} runs each"
        )
        print(
            f"  trainable parameters: adaptkit {a[0].trainable:,} of {a[0].total:,}, baseline {b[0].trainable:,} of {b[0].total:,}"
        )
        for loop, runs in results.items():
            each = ", ".join(f"{r.tokens_per_s:.1f}" for r in runs)
            print(
                f"  {loop:23s} tokens/s {tput[loop]:7.1f} (runs: {each}); tokens per CPU-s {per_cpu[loop]:7.1f}; "
                f"peak RSS {rss[loop]:6.0f} MiB"
            )
        for loop in loops:
            if loop != "baseline":
                print(
                    f"  {loop}/baseline: throughput {tput[loop] / tput['baseline']:.3f} (per CPU-second "
                    f"{per_cpu[loop] / per_cpu['baseline']:.3f}; target >= 1.0), "
                    f"peak memory {rss[loop] / rss['baseline']:.3f} (target <= 1.0)"
                )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
    else:
        main()
