"""Start-up time: ``adaptkit strategies`` against ``python -c pass``, measured in one run.

Each command runs ``--repeats`` times, alternating, each in a fresh process; the script prints the
median wall time of each and their ratio. ``python -c "import torch"`` is timed too, for scale:
``adaptkit strategies`` imports every plugin but never torch.

    python benchmarks/startup.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def wall_time(cmd: list[str]) -> float:
    """Seconds one run of ``cmd`` takes, output discarded; a failing command stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    """Time the commands alternately and print medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="runs of each command")
    args = parser.parse_args()
    exe = Path(sys.executable).with_name("adaptkit")
    torch_cmd = 'python -c "import torch"'
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "adaptkit strategies": [str(exe), "strategies"],
        torch_cmd: [sys.executable, "-c", "import torch"],
    }
    for cmd in commands.values():  # warm the file cache once, untimed
        wall_time(cmd)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            times[name].append(wall_time(cmd))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(
            f"{name:26s} median {med[name] * 1000:7.1f} ms  (min {min(t) * 1000:.1f}, max {max(t) * 1000:.1f}, {len(t)} runs)"
        )
    print(
        f"ratio adaptkit strategies / python -c pass: {med['adaptkit strategies'] / med['python -c pass']:.2f}"
    )
    print(f"ratio adaptkit strategies / {torch_cmd}: {med['adaptkit strategies'] / med[torch_cmd]:.2f}")


if __name__ == "__main__":
    main()
