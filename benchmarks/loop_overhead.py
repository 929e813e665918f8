"""adaptkit's training loop against the loop a user would write by hand, measured in one run.

For each case (LoRA and full fine-tuning of SmolLM2-135M as a language model, and a classifier on
all-MiniLM-L6-v2 with its top two blocks trainable) it runs adaptkit and a minimal
transformers + peft + Accelerate loop on the same model, data, batch, sequence length and seed,
each in its own process.

Both sides run with the same policy for freed memory: the one ``adaptkit train`` chooses for the
case on this machine (``_common.adaptkit_allocator``), given to the baseline as the glibc
environment variables a user would set. Where that policy is not glibc's default, the baseline
also runs with glibc's default (``baseline, glibc default``): the two baselines' ratio is the
allocator's part of the difference, the rest is the loop's own.

The protocol is fixed before running: ``--repeats`` runs of each side per case (5 by default), in
rounds of one run each whose order is drawn at random (seeded by ``--order-seed``), so that drift
of a shared machine hits both sides alike. It prints the median with min and max of throughput
and peak memory of each side, and their ratios of medians: throughput ratio (target >= 1.0) and
peak-memory ratio (target <= 1.0). Throughput is also given per CPU-second (user + system time of
the process), which other processes on a shared machine disturb much less than wall time. Every
run's raw result goes, one JSON line each with the machine and library versions, to
``benchmarks/results/loop_overhead-<date and time>.jsonl`` (``--results``).

    python benchmarks/loop_overhead.py [--repeats 5] [--cases lora full classification]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CASES, GLIBC_DEFAULT, adaptkit_allocator, machine, measure, median, worker_main  # noqa: E402

from adaptkit.recipe.identity import library_versions  # noqa: E402

#: The label of the baseline run with glibc's default allocator (where adaptkit sets another).
BASELINE_GLIBC = "baseline, glibc default"


def main() -> None:
    """Run the comparison and print one block per case."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each loop per case")
    parser.add_argument("--cases", nargs="+", default=["lora", "full", "classification"], choices=list(CASES))
    parser.add_argument(
        "--order-seed", type=int, default=0, help="seed of the random order within each round"
    )
    parser.add_argument("--results", type=Path, help="raw results file (default: benchmarks/results/...)")
    args = parser.parse_args()
    order = random.Random(args.order_seed)
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    raw = args.results or Path(__file__).parent / "results" / f"loop_overhead-{stamp}.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    context = {"machine": machine(), "versions": library_versions(), "started": stamp}
    print(f"machine: {context['machine']}\nraw results: {raw}")
    for name in args.cases:
        case, policy = CASES[name], adaptkit_allocator(CASES[name])
        # label: (worker loop, allocator policy)
        runners = {"adaptkit": ("adaptkit", policy), "baseline": ("baseline", policy)}
        if policy != GLIBC_DEFAULT:
            runners[BASELINE_GLIBC] = ("baseline", None)
        loops = list(runners)
        results = {loop: [] for loop in loops}
        for round_ in range(args.repeats):
            for label in order.sample(loops, len(loops)):
                worker, allocator = runners[label]
                result = measure(Path(__file__), worker, name, allocator)
                results[label].append(result)
                with open(raw, "a") as f:
                    f.write(json.dumps({**context, "round": round_, "label": label, **asdict(result)}) + "\n")
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
        print(f"  policy for freed memory of adaptkit and the baseline: {policy}")
        for loop, runs in results.items():
            speeds, peaks = [r.tokens_per_s for r in runs], [r.peak_mib for r in runs]
            print(
                f"  {loop:24s} tokens/s median {tput[loop]:7.1f} (min {min(speeds):.1f}, max {max(speeds):.1f}); "
                f"tokens per CPU-s {per_cpu[loop]:7.1f}; peak RSS median {rss[loop]:6.0f} MiB "
                f"(min {min(peaks):.0f}, max {max(peaks):.0f})"
            )
        pairs = [("adaptkit", "baseline", "; target >= 1.0", " (target <= 1.0)")]
        if BASELINE_GLIBC in results:  # the allocator's part, and adaptkit against glibc's default
            pairs += [("baseline", BASELINE_GLIBC, "", ""), ("adaptkit", BASELINE_GLIBC, "", "")]
        for x, y, faster, smaller in pairs:
            print(
                f"  {x}/{y}: throughput {tput[x] / tput[y]:.3f} (per CPU-second "
                f"{per_cpu[x] / per_cpu[y]:.3f}{faster}), peak memory {rss[x] / rss[y]:.3f}{smaller}"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
    else:
        main()
