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
interrupted ones. The report is written by ``adaptkit.compare.report``.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adaptkit.compare.spec import CompareSpec, Job, Plan, Variant
from adaptkit.errors import ConfigError
from adaptkit.host.specs import unpacking_strategies
from adaptkit.recipe.schema import _describe, apply_overrides, read_raw, validate


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
    _settle_packing(result)
    return result


def _settle_packing(p: Plan) -> None:
    """Pack the training rows of every variant left to ``data.packing: auto``, or of none.

    A packed step holds more sequences than a padded one, so a budget in steps means the same for
    every variant only if all pack alike: where one stack cannot train on packed rows (prompt
    tuning), the others do not pack either. Packing a variant sets itself is the variant's choice.
    """
    if p.host is None:
        return
    auto = [
        j
        for jobs in p.variants.values()
        for j in jobs
        if j.raw.get("data", {}).get("packing", "auto") == "auto"
    ]
    blocked = {
        j.variant: names
        for j in auto
        if (names := unpacking_strategies(p.host.build_strategies(j.raw["strategies"])))
    }
    if not blocked:
        return
    for job in auto:
        job.raw.setdefault("data", {})["packing"] = False
    which = "; ".join(f"{variant}: {names}" for variant, names in blocked.items())
    p.notes.append(f"no variant packs its training rows, because some strategies cannot ({which})")


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


def count_runs(p: Plan) -> int:
    """How many child runs the plan may start (sweeps and trials included)."""
    s, n = p.spec, 0
    for jobs in p.variants.values():
        first = jobs[0]
        tuned = first.trains and ((s.lr_sweep and first.tunes_lr) or s.search)
        extra = (len(s.lr_sweep) if s.lr_sweep else s.search.trials if s.search else 0) if tuned else 0
        range_test = first.trains and first.tunes_lr and s.lr_mode == "auto"
        n += len(jobs) + (extra - 1 if extra else 0) + int(range_test)
    return n
