"""Running one job of a plan as a child process, with progress and an estimate of the time left."""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from adaptkit.compare.child import command, row_from_run
from adaptkit.compare.spec import Job, Plan
from adaptkit.recipe.schema import apply_overrides


class Runner:
    """Runs a plan's jobs as child processes through an executor, skipping finished ones, and builds the rows.

    ``run`` may be called from several threads at once (parallel executors, search workers): the
    counters behind the progress lines are kept under a lock.
    """

    def __init__(self, plan: Plan, executor: Any, plugins: list[str] = ()):
        self.plan, self.plugins, self.executor = plan, list(plugins), executor
        self.done, self.total, self.executed, self.spent = 0, 0, 0, 0.0
        self.lock = threading.Lock()

    def log(self, message: str) -> None:
        """Print a progress line to stderr, where the children's output goes too."""
        print(f"adaptkit: {message}", file=sys.stderr, flush=True)

    def run(
        self, job: Job, tag: str = "", overrides: dict[str, Any] | None = None, poll: Any = None
    ) -> dict[str, Any]:
        """Train one job (unless its identical recipe already finished) and return its row."""
        raw = copy.deepcopy(job.raw)
        key = job.key + tag
        if overrides:
            raw = apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
        raw["name"], raw["output"] = f"{self.plan.root.name}/{key}", str(self.plan.root / "runs" / key)
        run_dir, recipe_file = Path(raw["output"]), self.plan.root / "recipes" / f"{key}.yaml"
        text = yaml.safe_dump(raw, sort_keys=False)
        same = recipe_file.is_file() and recipe_file.read_text() == text
        with self.lock:
            self.done += 1
            number, left = self.done, self._left()
        if same and (run_dir / "summary.json").is_file():
            self.log(f"{key}: finished earlier, skipped")
            return row_from_run(run_dir, job.variant, job.seed, self.plan.root)
        if not same and run_dir.exists():  # the recipe changed: its old checkpoints must not be resumed
            shutil.rmtree(run_dir)
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe_file.write_text(text)
        self.log(f"[{number}/{self.total}] {key}{left}")
        t0 = time.monotonic()
        rc, error = self.executor.launch(
            command(recipe_file, self.plugins, self.plan.spec.launch),
            self.plan.root / "logs" / f"{key}.log",
            poll,
        )
        with self.lock:
            self.spent += time.monotonic() - t0
            self.executed += 1
        row = row_from_run(run_dir, job.variant, job.seed, self.plan.root, error=error if rc else None)
        if rc and row["status"] == "finished":  # a summary from before, but this attempt failed
            row.update(status="failed", error=error)
        if row["status"] == "failed":
            self.log(f"{key} failed: {row['error']}")
        return row

    def _left(self) -> str:
        """``, about T left`` from the mean time of the runs so far, shared over the runs at once."""
        if not self.executed:
            return ""
        runs_left = self.total - self.done + 1
        seconds = self.spent / self.executed * runs_left / max(self.executor.width, 1)
        return f", about {_duration(seconds)} left"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def score(row: dict[str, Any]) -> float:
    """A finished row's selection value, larger is better; failed rows rank last."""
    if row.get("status") != "finished" or row.get("best_metric") is None:
        return -math.inf
    return row["best_metric"] if row["greater_is_better"] else -row["best_metric"]
