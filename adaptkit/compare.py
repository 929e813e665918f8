"""Comparisons: one recipe, several strategy stacks, one fair table.

A comparison recipe is an ordinary recipe (the base every variant starts from) with a
``compare:`` section::

    compare:
      variants:
        - {name: none, strategies: [none]}
        - {name: lora, strategies: [{name: lora, r: 8}], overrides: {train.lr: 1.0e-3}}
      seeds: [0, 1]
      budget: {steps: 200}                 # or tokens / seconds, the same for every variant
      lr_sweep: [1.0e-4, 1.0e-3]           # per variant without its own train.lr: keep the best
      grid: {train.weight_decay: [0.0, 0.01]}
      search: {method: optuna, trials: 8, space: {train.lr: {low: 1.0e-5, high: 1.0e-2, log: true}}}

Fairness comes from the base: every variant sees the same data, the same validation split and,
for each seed, the same data order. Each run is a child process (``adaptkit train``) with its
own directory under ``<output>/runs/``; re-running a comparison skips finished runs and resumes
interrupted ones. The report is written by ``adaptkit.report``.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from adaptkit.errors import AdaptkitError, ConfigError
from adaptkit.recipe import ForgettingSpec, Section, _describe, apply_overrides, read_raw, validate
from adaptkit.variant_process import command, row_from_run, run_child

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Variant(Section):
    """One entry of ``compare.variants``: a strategy stack and recipe overrides."""

    name: str = Field(pattern=_NAME, description="variant name (letters, digits, _ . -)")
    strategies: list[str | dict[str, Any]] | None = Field(
        None, min_length=1, description="the stack (default: the base recipe's)"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="recipe overrides {dotted.key: value}"
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="{dotted.key: [values]}: one variant per combination"
    )


class Budget(Section):
    """``compare.budget``: the same training budget for every variant (exactly one kind)."""

    steps: int | None = Field(None, ge=1, description="optimizer steps")
    tokens: int | None = Field(None, ge=1, description="training tokens")
    seconds: float | None = Field(None, gt=0, description="seconds of training")

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if sum(v is not None for v in (self.steps, self.tokens, self.seconds)) != 1:
            raise ValueError("give exactly one of steps, tokens or seconds")
        return self


class SearchParam(Section):
    """A search dimension: a range (``low``/``high``, ``log``, ``integer``) or ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchParam:
        if self.choices is None and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError("give choices, or low < high")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class Search(Section):
    """``compare.search``: Bayesian optimisation with Optuna (TPE), per variant, with pruning."""

    method: Literal["optuna"] = "optuna"
    trials: int = Field(8, ge=1, description="trials per variant")
    space: dict[str, SearchParam] = Field(
        min_length=1, description="{dotted.key: {low, high, log} | {choices}}"
    )
    metric: str | None = Field(None, description="metric to optimise (default: the one the runs select on)")
    direction: Literal["maximize", "minimize"] | None = Field(None, description="default: from the metric")
    pruning: bool = Field(
        True, description="stop trials whose intermediate evaluations are poor (median rule)"
    )


class CompareSpec(Section):
    """The ``compare:`` section of a comparison recipe."""

    variants: list[Variant] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="applied to every variant")
    budget: Budget | None = None
    lr_sweep: list[float] = Field(
        default_factory=list, description="learning rates tried per variant (on the first seed)"
    )
    search: Search | None = None
    forgetting: ForgettingSpec | None = Field(
        default_factory=ForgettingSpec, description="null turns the measure off"
    )
    launch: list[str] = Field(
        default_factory=list, description="arguments for `accelerate launch` used for every run"
    )

    @model_validator(mode="after")
    def _consistent(self) -> CompareSpec:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique (got {names})")
        if self.lr_sweep and self.search:
            raise ValueError("use either lr_sweep or search, not both")
        return self


@dataclass
class Job:
    """One run of the comparison: a resolved recipe, its seed and its directory name."""

    variant: str
    seed: int
    key: str
    raw: dict[str, Any]
    trains: bool = True
    tunes_lr: bool = True


@dataclass
class Plan:
    """A comparison resolved into variants (each a list of jobs, one per seed)."""

    name: str
    root: Path
    spec: CompareSpec
    base: dict[str, Any]
    host: Any = None
    variants: dict[str, list[Job]] = field(default_factory=dict)


def is_comparison(raw: dict) -> bool:
    """True for a recipe mapping with a ``compare:`` section."""
    return isinstance(raw, dict) and "compare" in raw


def _tag(key: str, value: Any) -> str:
    return f"{key.split('.')[-1]}={value}"


def plan(path: str | Path, overrides: list[str] = (), host: Any = None) -> Plan:
    """Read a comparison recipe and resolve every run, validating all of them at once."""
    raw = apply_overrides(read_raw(path), list(overrides))
    if not is_comparison(raw):
        raise ConfigError(
            "compare: missing; a comparison recipe is a recipe with a compare: section listing variants",
            source=str(path),
        )
    try:
        spec = CompareSpec(**(raw.pop("compare") or {}))
    except ValidationError as exc:
        where = lambda loc: "compare" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)  # noqa: E731
        raise ConfigError([(where(e["loc"]), _describe(e)) for e in exc.errors()], source=str(path)) from None
    name = raw.get("name") or Path(path).stem
    root = Path(raw.get("output", "runs/{name}").format(name=name))
    result = Plan(name=name, root=root, spec=spec, base=raw, host=host)
    problems: list[tuple[str, str]] = []
    for i, variant in enumerate(spec.variants):
        grid = {**spec.grid, **variant.grid}
        for combo in itertools.product(*grid.values()) if grid else [()]:
            settings = dict(zip(grid, combo))
            label = variant.name + (
                f"[{','.join(_tag(k, v) for k, v in settings.items())}]" if settings else ""
            )
            jobs = []
            for seed in spec.seeds:
                try:
                    job = _job(raw, variant, settings, label, seed, spec, root, host, path)
                except ConfigError as exc:
                    problems.extend(
                        (f"compare.variants[{i}] ({label}): {where}", msg) for where, msg in exc.problems
                    )
                    break
                jobs.append(job)
            result.variants[label] = jobs
    if problems:
        raise ConfigError(problems, source=str(path))
    return result


def _job(
    base: dict,
    variant: Variant,
    settings: dict,
    label: str,
    seed: int,
    spec: CompareSpec,
    root: Path,
    host: Any,
    path: Any,
) -> Job:
    raw = copy.deepcopy(base)
    if variant.strategies is not None:
        raw["strategies"] = copy.deepcopy(variant.strategies)
    items = {**variant.overrides, **settings}
    raw = apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in items.items()])
    train = raw.setdefault("train", {})
    train["seed"] = seed
    if spec.budget:
        b = spec.budget
        train.update(
            {
                k: v
                for k, v in (("max_steps", b.steps), ("max_tokens", b.tokens), ("max_time", b.seconds))
                if v is not None
            }
        )
    raw["forgetting"] = spec.forgetting.model_dump() if spec.forgetting else None
    key = re.sub(r"[^A-Za-z0-9_.=,-]+", "_", label) + f"-s{seed}"
    raw["name"] = f"{root.name}/{key}"
    raw["output"] = str(root / "runs" / key)
    recipe = validate(raw, host=host, source=str(path))
    names = [s if isinstance(s, str) else s.get("name") for s in recipe.strategies]
    return Job(
        variant=label, seed=seed, key=key, raw=raw, trains=names != ["none"], tunes_lr="train.lr" not in items
    )


# -- running ---------------------------------------------------------------------------------


class Runner:
    """Runs a plan's jobs one child process at a time, skipping finished ones, and builds the rows."""

    def __init__(self, plan: Plan, plugins: list[str] = (), echo: bool = True):
        self.plan, self.plugins, self.echo = plan, list(plugins), echo
        self.done, self.total, self.executed, self.spent = 0, 0, 0, 0.0

    def log(self, message: str) -> None:
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
        self.done += 1
        if same and (run_dir / "summary.json").is_file():
            self.log(f"{key}: finished earlier, skipped")
            return row_from_run(run_dir, job.variant, job.seed, self.plan.root)
        if not same and run_dir.exists():  # the recipe changed: its old checkpoints must not be resumed
            shutil.rmtree(run_dir)
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe_file.write_text(text)
        left = (
            f", about {_duration(self.spent / self.executed * (self.total - self.done + 1))} left"
            if self.executed
            else ""
        )
        self.log(f"[{self.done}/{self.total}] {key}{left}")
        t0 = time.monotonic()
        rc, error = run_child(
            command(recipe_file, self.plugins, self.plan.spec.launch),
            self.plan.root / "logs" / f"{key}.log",
            poll,
            self.echo,
        )
        self.spent += time.monotonic() - t0
        self.executed += 1
        row = row_from_run(run_dir, job.variant, job.seed, self.plan.root, error=error if rc else None)
        if rc and row["status"] == "finished":  # a summary from before, but this attempt failed
            row.update(status="failed", error=error)
        if row["status"] == "failed":
            self.log(f"{key} failed: {row['error']}")
        return row


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _score(row: dict[str, Any]) -> float:
    """A finished row's selection value, larger is better; failed rows rank last."""
    if row.get("status") != "finished" or row.get("best_metric") is None:
        return -math.inf
    return row["best_metric"] if row["greater_is_better"] else -row["best_metric"]


def count_runs(p: Plan) -> int:
    """How many child runs the plan may start (sweeps and trials included)."""
    s, n = p.spec, 0
    for jobs in p.variants.values():
        tuned = jobs[0].trains and ((s.lr_sweep and jobs[0].tunes_lr) or s.search)
        extra = (len(s.lr_sweep) if s.lr_sweep else s.search.trials if s.search else 0) if tuned else 0
        n += len(jobs) + (extra - 1 if extra else 0)
    return n


def execute(p: Plan, plugins: list[str] = (), echo: bool = True) -> dict[str, Any]:
    """Run every variant of the plan and return ``{"rows": [...], "tuning": {...}}``."""
    runner = Runner(p, plugins, echo)
    runner.total = count_runs(p)
    p.root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    tuning: dict[str, Any] = {}
    for label, jobs in p.variants.items():
        first, chosen = jobs[0], {}
        if first.trains and p.spec.lr_sweep and first.tunes_lr:
            tried = {lr: runner.run(first, f"-lr{lr:g}", {"train.lr": lr}) for lr in p.spec.lr_sweep}
            best_lr = max(tried, key=lambda lr: _score(tried[lr]))
            chosen, first_row = {"train.lr": best_lr}, tried[best_lr]
            tuning[label] = {
                "method": "lr_sweep",
                "chosen": chosen,
                "tried": {f"{lr:g}": tried[lr].get("best_metric") for lr in tried},
            }
            runner.log(f"{label}: learning rate {best_lr:g} chosen from {p.spec.lr_sweep}")
        elif first.trains and p.spec.search:
            from adaptkit.search import optimise

            chosen, first_row, trials = optimise(runner, first, p.spec.search)
            tuning[label] = {"method": "optuna", "chosen": chosen, "trials": trials}
            runner.log(f"{label}: search chose {chosen}")
        else:
            first_row = runner.run(first)
        rows.append(first_row)
        write_plan(p, rows, tuning)  # after every run: an interrupted comparison can still report
        for job in jobs[1:]:
            rows.append(runner.run(job, "", chosen) if chosen else runner.run(job))
            write_plan(p, rows, tuning)
    return {"rows": rows, "tuning": tuning}


def write_plan(p: Plan, rows: list[dict[str, Any]], tuning: dict[str, Any]) -> None:
    """Record which run directory holds each row, so ``adaptkit report`` can rebuild the report."""
    from adaptkit.checkpoint import write_json

    entries = [
        {"variant": r["variant"], "seed": r["seed"], "run_dir": r["run_dir"], "error": r.get("error")}
        for r in rows
    ]
    write_json(
        p.root / "comparison.json", {"name": p.name, "runs": entries, "tuning": tuning, "base": p.base}
    )


def collect(root: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and metadata of a finished (or interrupted) comparison, read back from its directories."""
    root = Path(root)
    index = root / "comparison.json"
    if not index.is_file():
        raise AdaptkitError(
            f"{root}: not a comparison directory (no comparison.json); run `adaptkit compare RECIPE` first"
        )
    meta = json.loads(index.read_text())
    rows = [
        row_from_run(root / e["run_dir"], e["variant"], e["seed"], root, error=e.get("error"))
        for e in meta["runs"]
    ]
    return rows, meta


def report_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """What the report's header says about the comparison: model, task, data, budget, tuning."""
    base = meta.get("base", {})
    model, data = base.get("model", {}), base.get("data", {})
    out = {
        "model": model.get("source"),
        "task": model.get("task", "classification"),
        "data": data.get("source"),
    }
    if data.get("options"):
        out["data options"] = json.dumps(data["options"])
    for label, t in (meta.get("tuning") or {}).items():
        out[f"tuning {label}"] = f"{t['method']}: {json.dumps(t['chosen'])}"
    out["date"] = time.strftime("%Y-%m-%d %H:%M")
    return out


def write_report(root: str | Path) -> tuple[dict[str, Path], str]:
    """Rebuild the report files from the comparison directory; returns (files, terminal table)."""
    from adaptkit import report

    rows, meta = collect(root)
    files = report.write_report(
        Path(root), rows, title=f"adaptkit comparison: {meta['name']}", meta=report_meta(meta)
    )
    return files, report.format_table(rows)
