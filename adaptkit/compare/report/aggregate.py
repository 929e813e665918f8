"""Runs summarised per variant: means and standard deviations over seeds, failures, gain over the
untouched model and the Pareto front; plus the few facts about a comparison that every part of the
report reads from those summaries (metric name and direction, throughput unit, baseline present).

Input is one plain dict per (variant, seed) run, as ``adaptkit compare`` records it. Every number
may be missing or None, and a variant may have failed on every seed: the summary then holds None
for its numbers rather than raising.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

from adaptkit.compare.report.balanced import add_balanced
from adaptkit.compare.report.confidence import add_confidence
from adaptkit.compare.report.stats import number

# Numeric columns of a run, averaged over the finished seeds of a variant.
NUMERIC_COLUMNS = (
    "trainable_parameters",
    "total_parameters",
    "trainable_percent",
    "peak_memory_mb",
    "wall_time_s",
    "samples_per_s",
    "tokens_per_s",
    "final_metric",
    "best_metric",
    "eval_loss",
    "train_loss",
    "overfit_gap",
    "forgetting",
    "saved_bytes",
    "steps_to_target",
    "tokens_to_target",
    "seconds_to_target",
    "cost",
    "cost_to_target",
)
BASELINE = "none"  # the variant that evaluates the pretrained model untouched


def is_finished(row: dict) -> bool:
    """Whether the run finished; only finished runs contribute numbers to a variant."""
    return row.get("status") == "finished"


def _first(rows: Iterable[dict], key: str) -> Any:
    """The first non-None value of ``key`` among ``rows``."""
    return next((r[key] for r in rows if r.get(key) is not None), None)


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` (params, score; both lower-is-better) is at least as good as ``b`` on both and better on one."""
    return a[0] <= b[0] and a[1] <= b[1] and a != b


def _no_error(row: dict) -> str:
    return f"status {row['status']!r}, no error recorded" if row.get("status") else "no status recorded"


def _strategy_names(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(s) for s in value]
    return [] if value is None else [str(value)]


def aggregate(rows: list[dict]) -> list[dict]:
    """Summarise runs per variant, in the order variants first appear.

        Each dict holds ``variant``, ``strategies``, ``seeds`` (every seed, failed ones included),
        ``n_ok`` / ``n_failed``, ``errors`` (``{"seed", "error"}`` per failed seed), the metric's
        ``metric`` name, ``greater_is_better``, ``memory_kind`` and ``forgetting_measure``, and for
        each column of ``NUMERIC_COLUMNS`` its ``<column>_mean`` and ``<column>_std`` over the
        finished seeds that have a value (sample standard deviation; 0.0 for one value; None for none).

        ``gain_over_none`` is the mean ``final_metric`` minus that of the ``none`` variant (the raw
        difference: negative is an improvement when lower is better), None without a ``none`` result.
        ``pareto`` is True for a variant on the Pareto front of mean final metric (in the direction of
        ``greater_is_better``) against mean trainable parameters (fewer is better): no other variant
        is at least as good on both and better on one.

        ``interval``, ``is_best`` and ``vs_best`` (the confidence interval, and the paired comparison
        with the best variant) are set by ``confidence.add_confidence``, ``within_noise_of_front`` (the
    front variant it cannot be told apart from) too; ``balanced`` (each run's
        evaluation with the best gain per unit of forgetting) by ``balanced.add_balanced``.
    """
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get("variant") or "?"), []).append(row)
    variants = [_summarise(name, runs) for name, runs in groups.items()]
    _add_gain_and_pareto(variants)
    add_confidence(variants, groups, greater_is_better(variants))
    add_balanced(variants, groups, _baseline_metric(variants))
    return variants


def _summarise(name: str, runs: list[dict]) -> dict[str, Any]:
    """One variant's summary from its runs (every seed, failed ones included)."""
    ok = [r for r in runs if is_finished(r)]
    failed = [r for r in runs if not is_finished(r)]
    info_rows = ok or runs  # describe the variant from a finished run where there is one
    agg: dict[str, Any] = {
        "variant": name,
        "strategies": _strategy_names(_first(info_rows, "strategies")),
        "seeds": [r.get("seed") for r in runs],
        "n_ok": len(ok),
        "n_failed": len(failed),
        "errors": [{"seed": r.get("seed"), "error": str(r.get("error") or _no_error(r))} for r in failed],
        # runs whose memory estimate (pre-flight check, micro_batch_size auto) could not be made
        "estimate_skipped": [
            {"seed": r.get("seed"), "reason": r["estimate_skipped"]}
            for r in runs
            if r.get("estimate_skipped")
        ],
        "metric": _first(info_rows, "metric"),
        "greater_is_better": _first(info_rows, "greater_is_better"),
        "memory_kind": _first(info_rows, "memory_kind"),
        "forgetting_measure": _first(info_rows, "forgetting_measure"),
    }
    for col in NUMERIC_COLUMNS:
        values = [v for v in (number(r.get(col)) for r in ok) if v is not None]
        agg[f"{col}_mean"] = statistics.fmean(values) if values else None
        agg[f"{col}_std"] = (statistics.stdev(values) if len(values) > 1 else 0.0) if values else None
    return agg


def _add_gain_and_pareto(variants: list[dict]) -> None:
    """Set ``gain_over_none`` and ``pareto`` on every summary; both need all variants at once."""
    base = _baseline_metric(variants)
    higher = greater_is_better(variants)
    points = {}
    for v in variants:
        metric = v["final_metric_mean"]
        v["gain_over_none"] = metric - base if metric is not None and base is not None else None
        if metric is not None and v["trainable_parameters_mean"] is not None:
            points[v["variant"]] = (v["trainable_parameters_mean"], -metric if higher else metric)
    for v in variants:
        p = points.get(v["variant"])
        v["pareto"] = p is not None and not any(_dominates(q, p) for q in points.values())


def _baseline_metric(variants: list[dict]) -> float | None:
    """The untouched model's mean final metric, None without a ``none`` result."""
    return next((v["final_metric_mean"] for v in variants if v["variant"] == BASELINE), None)


def greater_is_better(variants: list[dict]) -> bool:
    """The metric direction of the comparison (the first variant that states one; higher by default)."""
    value = _first(variants, "greater_is_better")
    return True if value is None else bool(value)


def has_baseline(variants: list[dict]) -> bool:
    """Whether the untouched model was measured, so that gains over it exist."""
    return any(v["variant"] == BASELINE and v["final_metric_mean"] is not None for v in variants)


def metric_name(variants: list[dict]) -> str:
    """The task metric's name as the runs recorded it, ``metric`` when none did."""
    return str(_first(variants, "metric") or "metric")


def throughput_key(variants: list[dict]) -> str:
    """tokens/s when every variant with a throughput measured it (one unit per column), else samples/s.

    Variants that measured no throughput at all (``none`` trains no step) do not decide the unit.
    """
    measured = [
        v for v in variants if v["tokens_per_s_mean"] is not None or v["samples_per_s_mean"] is not None
    ]
    if measured and all(v["tokens_per_s_mean"] is not None for v in measured):
        return "tokens_per_s"
    return "samples_per_s"
