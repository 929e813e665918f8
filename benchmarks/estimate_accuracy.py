"""How accurate is `adaptkit estimate`? Its estimate against the measured peak of real training runs.

For every first-party strategy, a short training run of SmolLM2-135M-Instruct (a packaged model,
fetched once from PyPI) on the CPU, each in its own process, with sequences of 128 tokens in
micro-batches of 4. The estimate comes from the model's config alone; the measurement is the
run's own ``peak_memory_mb`` in summary.json (the process' peak resident set on a CPU). Prints a
table with estimate / measured for each, the process baseline as its own column, and exits 1 when
one falls short by more than ``--under`` (5%) or exceeds by more than ``--over`` (15%): falling
short is the dangerous error, since the estimate exists to stop a run that would not fit. The
bound on what a process holds when freed memory is kept for reuse (``resident_with_reuse``) is
shown against the measurement too: it must never fall short.

Each run trains under the policy for freed memory that ``adaptkit train`` chooses itself (its
``memory_plan.allocator`` in summary.json, shown per row). ``--allocator live`` gives each run
``MALLOC_MMAP_THRESHOLD_=131072`` instead (glibc's setting for what adaptkit does when memory is
tight: freed tensors leave the process at once, so its peak is the live peak).

    python benchmarks/estimate_accuracy.py                 # all strategies (about 20 minutes on 2 cores)
    python benchmarks/estimate_accuracy.py --only lora,full --steps 3 --json results.json
    python benchmarks/estimate_accuracy.py --only lora --allocator live

On a GPU (``--device cuda``) the measurement is ``torch.cuda.max_memory_allocated`` (what
summary.json records there) and the estimate is the CUDA one without its context term, which
allocated memory leaves out too (the context is shown in the process baseline column);
``--mixed-precision`` (bf16, fp16) and ``--model`` (a model directory, such as a SmolLM2 with
random weights on a machine without the packaged weights) go with it:

    python benchmarks/estimate_accuracy.py --device cuda --mixed-precision fp16 --batch 16 --seq 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import model_path  # noqa: E402

MODEL = "smollm2-135m-instruct"
#: Each first-party strategy as a recipe would use it on a causal LM with tied embeddings (label:
#: strategies, extra model options); LoRA also with gradient checkpointing.
STRATEGIES = {
    "full": (["full"], {}),
    "freeze": ([{"name": "freeze", "trainable_top_blocks": 4, "tied_head": "untie"}], {}),
    # with dropout: the estimate's dropout term is measured too
    "lora": ([{"name": "lora", "dropout": 0.05}], {}),
    "lora+checkpointing": ([{"name": "lora", "dropout": 0.05}], {"gradient_checkpointing": True}),
    "lora-4bit": ([{"name": "lora", "dropout": 0.05, "quantize": "4bit"}], {}),
    "adapters": ([{"name": "adapters", "train_head": False}], {}),
    "gradual_unfreeze": (
        [{"name": "gradual_unfreeze", "unit": "step", "every": 1, "tied_head": "untie"}],
        {},
    ),
    "peft-ia3": ([{"name": "peft", "method": "ia3"}], {}),
}
WORDS = (
    "the a river mountain quietly runs over stone while birds sing and clouds move slowly across the wide "
    "blue sky near old towns"
).split()


def write_data(path: Path, rows: int = 40) -> None:
    """Prompt/response rows whose responses fill any sequence length up to a few hundred tokens."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(rows):
            response = " ".join(rng.choice(WORDS) for _ in range(300))
            f.write(json.dumps({"prompt": f"Tell me story {i}.", "response": response}) + "\n")


def machine() -> str:
    """CPU model, cores, RAM and library versions, for the record."""
    import psutil

    from adaptkit.recipe.identity import library_versions

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    return f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM; {versions}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument("--seq", type=int, default=128, help="data.max_length")
    parser.add_argument("--batch", type=int, default=4, help="train.micro_batch_size")
    parser.add_argument("--only", help="comma-separated strategy labels to run (default: all)")
    parser.add_argument(
        "--under", type=float, default=0.05, help="allowed shortfall (estimate under measured)"
    )
    parser.add_argument("--over", type=float, default=0.15, help="allowed excess (estimate over measured)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the runs train")
    parser.add_argument(
        "--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="train.mixed_precision"
    )
    parser.add_argument("--model", default=MODEL, help="packaged model name or model directory")
    parser.add_argument(
        "--allocator",
        choices=["adaptkit", "live"],
        default="adaptkit",
        help="adaptkit: the policy adaptkit train chooses; live: freed memory returned at once",
    )
    args = parser.parse_args(argv)
    from adaptkit.train.allocator import ALLOCATOR_ENV

    env = dict(os.environ)
    if args.allocator == "live":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    else:
        for key in ALLOCATOR_ENV:
            env.pop(key, None)

    from adaptkit.estimate.estimator import Estimator
    from adaptkit.estimate.units import format_bytes
    from adaptkit.host.manager import get_plugin_host
    from adaptkit.recipe.schema import load_recipe

    chosen = {k: v for k, v in STRATEGIES.items() if not args.only or k in args.only.split(",")}
    model_path(args.model)  # a packaged model is fetched once, before any run is timed
    if args.device == "cpu":  # a run trains on the GPU whenever one is visible
        env["CUDA_VISIBLE_DEVICES"] = ""
    host = get_plugin_host()
    estimator = Estimator(host, device=args.device)
    print(f"machine: {machine()}", flush=True)
    print(f"process baseline (measured): {format_bytes(estimator.overhead_bytes())}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="adaptkit-estimate-") as tmp:
        work = Path(tmp)
        write_data(work / "data.jsonl")
        for label, (strategies, model_options) in chosen.items():
            name = label.replace("+", "-")
            recipe_path = work / f"{name}.yaml"
            recipe_path.write_text(
                yaml.safe_dump(
                    {
                        "name": name,
                        "model": {"source": args.model, "task": "causal_lm", **model_options},
                        "data": {"source": str(work / "data.jsonl"), "max_length": args.seq},
                        "strategies": strategies,
                        "train": {
                            "max_steps": args.steps,
                            "micro_batch_size": args.batch,
                            "log_every": 1,
                            "mixed_precision": args.mixed_precision,
                        },
                        "output": str(work / "runs" / "{name}"),
                    },
                    sort_keys=False,
                )
            )
            est = estimator.estimate(load_recipe(recipe_path, host=host))
            start = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "-m", "adaptkit", "train", str(recipe_path), "--fresh"],
                capture_output=True,
                text=True,
                env=env,
            )
            if run.returncode != 0:
                print(f"{label}: training failed:\n{run.stderr[-2000:]}", file=sys.stderr)
                results.append({"strategy": label, "error": run.stderr[-500:]})
                continue
            summary = json.loads((work / "runs" / name / "summary.json").read_text())
            measured = summary["peak_memory_mb"] * 2**20
            # one measure on both sides: on a GPU, allocated memory, which leaves out the CUDA
            # context, so the estimate is compared without its context term (its own column)
            compared = est.total - (est.overhead if args.device == "cuda" else 0)
            row = {
                "strategy": label,
                "trainable_parameters": est.trainable_parameters,
                "estimate_mib": compared / 2**20,
                "measured_mib": measured / 2**20,
                "ratio": compared / measured,
                "with_reuse_mib": est.resident_with_reuse / 2**20,
                "dominant": est.dominant,
                "peak_phase": est.peak_phase,
                "estimated_s_per_step": est.time_per_step_s,
                "measured_s_per_step": summary["wall_time_s"] / max(summary["steps"], 1),
                "process_s": time.perf_counter() - start,
                "final_train_loss": summary["final_train_loss"],
                "allocator": (summary.get("memory_plan") or {}).get("allocator")
                or ("live" if args.allocator == "live" else "glibc default"),
                "overhead_mib": est.overhead / 2**20,
                "terms_mib": {k: v / 2**20 for k, v in est.terms().items()},
            }
            results.append(row)
            print(
                f"{label}: estimate {format_bytes(est.total)}, measured {format_bytes(measured)}, "
                f"ratio {row['ratio']:.3f}; final training loss {row['final_train_loss']:.4f}",
                flush=True,
            )

    print()
    measured_as = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak resident set"
    print(
        f"{args.model}, {args.device}, micro-batch {args.batch} x {args.seq} tokens, {args.steps} steps, AdamW, "
        f"mixed precision {args.mixed_precision}; measured = summary.json peak_memory_mb ({measured_as})"
    )
    print()
    print(
        "| strategy | trainable | allocator | process baseline (MiB) | estimate (MiB) | measured (MiB) "
        "| estimate / measured | bound with reuse / measured | dominant term | est. s/step (at peak) | measured s/step |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|")
    ok = True
    for r in results:
        if "error" in r:
            print(f"| {r['strategy']} | failed | | | | | | | | | |")
            ok = False
            continue
        miss = "under" if r["ratio"] < 1 - args.under else "over" if r["ratio"] > 1 + args.over else ""
        ok &= not miss
        print(
            f"| {r['strategy']} | {r['trainable_parameters']:,} | {r['allocator']} | {r['overhead_mib']:.0f} | "
            f"{r['estimate_mib']:.0f} | {r['measured_mib']:.0f} | {r['ratio']:.3f}{f' ({miss})' if miss else ''} | "
            f"{r['with_reuse_mib'] / r['measured_mib']:.3f} | "
            f"{r['dominant'].replace('_', ' ')} | {r['estimated_s_per_step']:.2f} | {r['measured_s_per_step']:.1f} |"
        )
    print()
    print(
        f"all within {args.under:.0%} under and {args.over:.0%} over the measured peak: {'yes' if ok else 'NO'}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
