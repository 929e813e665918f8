"""Executing a plan: every variant and seed, learning-rate sweeps and searches, with the comparison index
written after every run so that an interrupted comparison can still report."""

from __future__ import annotations

from typing import Any

from adaptkit.compare.edges import search_edge, sweep_edge
from adaptkit.compare.plan import count_runs
from adaptkit.compare.runner import Runner, score
from adaptkit.compare.spec import Plan


def execute(p: Plan, plugins: list[str] = (), echo: bool = True) -> dict[str, Any]:
    """Run every variant of the plan and return ``{"rows": [...], "tuning": {...}}``."""
    runner = Runner(p, plugins, echo)
    runner.total = count_runs(p)
    p.root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    tuning: dict[str, Any] = {}
    for label, jobs in p.variants.items():
        first, chosen = jobs[0], {}
        if first.trains and p.spec.lr_mode == "sweep" and first.tunes_lr:
            tried = {lr: runner.run(first, f"-lr{lr:g}", {"train.lr": lr}) for lr in p.spec.lr_sweep}
            best_lr = max(tried, key=lambda lr: score(tried[lr]))
            chosen, first_row = {"train.lr": best_lr}, tried[best_lr]
            tuning[label] = {
                "method": "lr_sweep",
                "chosen": chosen,
                "tried": {f"{lr:g}": tried[lr].get("best_metric") for lr in tried},
                "edge": sweep_edge(list(tried), best_lr),
            }
            runner.log(f"{label}: learning rate {best_lr:g} chosen from {p.spec.lr_sweep}")
        elif first.trains and p.spec.lr_mode == "auto" and first.tunes_lr:
            from adaptkit.compare.lr_range import auto_rate

            chosen, first_row, tuning[label] = auto_rate(runner, first)
        elif first.trains and p.spec.search:
            from adaptkit.compare.search import optimise

            chosen, first_row, trials = optimise(runner, first, p.spec.search)
            edge = search_edge(p.spec.search.space, chosen)
            tuning[label] = {"method": "optuna", "chosen": chosen, "trials": trials, "edge": edge}
            runner.log(f"{label}: search chose {chosen}")
        else:
            first_row = runner.run(first)
        if tuning.get(label, {}).get("edge"):
            runner.log(f"{label}: note: {tuning[label]['edge']}")
        rows.append(first_row)
        write_plan(p, rows, tuning)  # after every run: an interrupted comparison can still report
        for job in jobs[1:]:
            rows.append(runner.run(job, "", chosen) if chosen else runner.run(job))
            write_plan(p, rows, tuning)
    return {"rows": rows, "tuning": tuning}


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
