"""Linear probing with and without cached backbone features (``train.cache_features``).

all-MiniLM-L6-v2 (packaged model) with a frozen backbone and a new classification head, trained
for several epochs on the first N examples of SST-2 (``../shared/data/sst2``) and evaluated after
each epoch. The plain run sends every batch through the backbone in every epoch; the cached run
computes each example's features once. Both runs have dropout off (the cache needs a
deterministic backbone), so they should train the same head: the script prints the speed-up of
the training loop, and how far apart the two heads and their metrics ended.

    python benchmarks/feature_cache.py [--epochs 5] [--examples 2000] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, model_path  # noqa: E402

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def recipe(out: Path, epochs: int, examples: int, cache: bool) -> dict:
    return {
        "name": "cached" if cache else "plain",
        "model": {"source": "all-minilm-l6-v2", "task": "classification", "dropout": 0.0},
        "data": {
            "source": str(SST2),
            "text": "sentence",
            "label": "label",
            "max_length": 48,
            "max_train_examples": examples,
            "max_eval_examples": 400,
        },
        "strategies": ["freeze"],
        "train": {"epochs": epochs, "lr": 2.0e-3, "micro_batch_size": 32, "seed": 0, "cache_features": cache},
        "output": str(out / "{name}"),
    }


def run(out: Path, epochs: int, examples: int, cache: bool) -> dict:
    """One ``adaptkit train`` in its own process; returns its summary."""
    path = out / f"{'cached' if cache else 'plain'}.yaml"
    path.write_text(json.dumps(recipe(out, epochs, examples, cache)))
    subprocess.run(
        [sys.executable, "-m", "adaptkit", "train", str(path), "--fresh"],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    return json.loads((out / path.stem / "summary.json").read_text())


def head(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {
        k: v for f in sorted((run_dir / "final").rglob("*.safetensors")) for k, v in load_file(str(f)).items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--examples", type=int, default=2000, help="training examples (the first N of SST-2's train split)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (alternating)")
    args = parser.parse_args()
    if not SST2.is_dir():
        sys.exit(f"needs SST-2 in {SST2}")
    print(f"machine: {machine()}")
    model_path("all-minilm-l6-v2")  # fetched once, outside the timed runs
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="adaptkit-bench-") as tmp:
        out = Path(tmp)
        for _ in range(args.repeats):
            for cache in (False, True):
                summary = run(out, args.epochs, args.examples, cache)
                times[cache].append(summary["wall_time_s"])
                if cache:
                    cached = summary
                else:
                    plain = summary
        a, b = head(out / "plain"), head(out / "cached")
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
    fc = cached["feature_cache"]
    print(
        f"\nall-MiniLM-L6-v2 linear probe on SST-2: {args.examples} training examples, 400 validation, "
        f"{args.epochs} epochs, batch 32, max 48 tokens; {cached['trainable_parameters']:,} trainable parameters"
    )
    print(
        f"  plain:  training loop {median(times[False]):7.1f} s (runs: {', '.join(f'{t:.1f}' for t in times[False])}); "
        f"accuracy {plain['final_metrics']['accuracy']:.4f}, eval loss {plain['final_metrics']['eval_loss']:.6f}"
    )
    print(
        f"  cached: training loop {median(times[True]):7.1f} s (runs: {', '.join(f'{t:.1f}' for t in times[True])}); "
        f"accuracy {cached['final_metrics']['accuracy']:.4f}, eval loss {cached['final_metrics']['eval_loss']:.6f}"
    )
    print(
        f"  cache: {fc['examples']} examples, {fc['bytes'] / 2**20:.1f} MiB; {fc['computed']} computed, {fc['cached']} from the cache"
    )
    print(
        f"  speed-up plain/cached: {median(times[False]) / median(times[True]):.2f}x; "
        f"largest difference between the two heads' weights: {diff:.2e}"
    )


if __name__ == "__main__":
    main()
