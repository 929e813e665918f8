"""Executing a plan: every variant and seed, learning-rate sweeps and searches, with the comparison index
written after every run so that an interrupted comparison can still report.

A variant's first job may tune the learning rate (a sweep, a range test, a search); the rate it
chooses applies to the variant's other seeds. One run at a time, the variants run in order, each
first job then the rest. With an executor that takes several runs at once the same work runs in
two phases: every variant's first job (its tuning sequential within the variant) at once, then
all the remaining jobs at once. Either way the rows come back in the same order.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from adaptkit.compare.edges import search_edge, sweep_edge
from adaptkit.compare.executors import Executor, LocalExecutor
from adaptkit.compare.plan import count_runs
from adaptkit.compare.runner import Runner, score
from adaptkit.compare.spec import CompareSpec, Job, Plan


def execute(p: Plan, plugins: list[str] = (), echo: bool = True) -> dict[str, Any]:
    """Run every variant of the plan and return ``{"rows": [...], "tuning": {...}}``."""
    p.root.mkdir(parents=True, exist_ok=True)
    index = Index(p)
    with open_executor(p.spec, echo) as executor:
        runner = Runner(p, executor, plugins)
        runner.total = count_runs(p)
        if executor.width == 1:
            for label, jobs in p.variants.items():
                chosen = run_first(runner, index, label)
                for i in range(1, len(jobs)):
                    run_rest(runner, index, label, i, chosen)
        else:
            labels = list(p.variants)
            firsts = executor.run_all(
                [lambda label=label: run_first(runner, index, label) for label in labels]
            )
            chosen = dict(zip(labels, firsts))
            rest = [(label, i) for label in labels for i in range(1, len(p.variants[label]))]
            executor.run_all([lambda li=li: run_rest(runner, index, *li, chosen[li[0]]) for li in rest])
    return {"rows": index.rows(), "tuning": index.ordered_tuning()}


@contextlib.contextmanager
def open_executor(spec: CompareSpec, echo: bool = True) -> Iterator[Executor]:
    """The executor the spec names, closed (a Ray instance it started, stopped) at the end."""
    if spec.executor == "ray":
        from adaptkit.compare.ray_executor import RayExecutor

        executor: Executor = RayExecutor(spec)
    else:
        executor = LocalExecutor(spec, echo)
    try:
        yield executor
    finally:
        executor.close()


class Index:
    """The rows in plan order, whichever order the runs finish in; ``comparison.json`` after each."""

    def __init__(self, p: Plan):
        self.plan, self.lock = p, threading.Lock()
        self.slots: dict[str, list[dict[str, Any] | None]] = {
            label: [None] * len(jobs) for label, jobs in p.variants.items()
        }
        self.tuning: dict[str, Any] = {}

    def put(self, label: str, i: int, row: dict[str, Any], tuning: dict[str, Any] | None = None) -> None:
        """Record the row of job ``i`` of a variant (and its tuning), then rewrite the index file."""
        with self.lock:
            self.slots[label][i] = row
            if tuning:
                self.tuning[label] = tuning
            write_plan(self.plan, self.rows(), self.ordered_tuning())  # an interrupted comparison can report

    def rows(self) -> list[dict[str, Any]]:
        """The rows recorded so far, in plan order."""
        return [row for rows in self.slots.values() for row in rows if row is not None]

    def ordered_tuning(self) -> dict[str, Any]:
        """The tuning entries in plan order."""
        return {label: self.tuning[label] for label in self.slots if label in self.tuning}


def run_first(runner: Runner, index: Index, label: str) -> dict[str, Any]:
    """Run a variant's first job, tuning its rate where the spec asks; return the overrides chosen."""
    chosen, row, tuning = tune(runner, label, runner.plan.variants[label][0])
    if tuning and tuning.get("edge"):
        runner.log(f"{label}: note: {tuning['edge']}")
    index.put(label, 0, row, tuning)
    return chosen


def run_rest(runner: Runner, index: Index, label: str, i: int, chosen: dict[str, Any]) -> None:
    """Run job ``i`` (a later seed) of a variant with the overrides its first job chose."""
    job = runner.plan.variants[label][i]
    index.put(label, i, runner.run(job, "", chosen) if chosen else runner.run(job))


def tune(
    runner: Runner, label: str, first: Job
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(chosen overrides, the first job's row, the tuning entry or None) of a variant's first job."""
    spec = runner.plan.spec
    if first.trains and spec.lr_mode == "sweep" and first.tunes_lr:
        tried = {lr: runner.run(first, f"-lr{lr:g}", {"train.lr": lr}) for lr in spec.lr_sweep}
        best_lr = max(tried, key=lambda lr: score(tried[lr]))
        runner.log(f"{label}: learning rate {best_lr:g} chosen from {spec.lr_sweep}")
        tuning = {
            "method": "lr_sweep",
            "chosen": {"train.lr": best_lr},
            "tried": {f"{lr:g}": tried[lr].get("best_metric") for lr in tried},
            "edge": sweep_edge(list(tried), best_lr),
        }
        return {"train.lr": best_lr}, tried[best_lr], tuning
    if first.trains and spec.lr_mode == "auto" and first.tunes_lr:
        from adaptkit.compare.lr_range import auto_rate

        return auto_rate(runner, first)
    if first.trains and spec.search:
        from adaptkit.compare.search import optimise

        chosen, row, trials = optimise(runner, first, spec.search)
        edge = search_edge(spec.search.space, chosen)
        runner.log(f"{label}: search chose {chosen}")
        return chosen, row, {"method": "optuna", "chosen": chosen, "trials": trials, "edge": edge}
    return {}, runner.run(first), None


def write_plan(p: Plan, rows: list[dict[str, Any]], tuning: dict[str, Any]) -> None:
    """Record which run directory holds each row, so ``adaptkit report`` can rebuild the report."""
    from adaptkit.files import write_json

    entries = [
        {"variant": r["variant"], "seed": r["seed"], "run_dir": r["run_dir"], "error": r.get("error")}
        for r in rows
    ]
    index = {"name": p.name, "runs": entries, "tuning": tuning, "base": p.base}
    index["cost_per_hour"] = p.spec.cost_per_hour  # the report prices runs offline from it
    write_json(p.root / "comparison.json", index)
