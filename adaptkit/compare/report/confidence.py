"""Intervals and paired comparisons for the variants of a comparison, from their runs' rows.

``add_confidence`` reads each finished run's final per-example scores (``row["examples"]``, kept by
the training loop) or, for runs without them, its final metric alone, and sets on every variant
summary its interval, its paired comparison with the best variant, and, for the runner-up, how
many seeds or evaluation examples would separate the top two; it also marks the variants off
the Pareto front that cannot be told apart from a front variant that beats them.
The statistics are in ``stats``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from adaptkit.compare.report.stats import (
    Interval,
    bootstrap_interval,
    examples_needed,
    mcnemar_exact,
    number,
    paired_differences,
    seed_interval,
    seeds_needed,
    shares_examples,
)


def _finished(runs: list[dict]) -> list[dict]:
    """The runs that finished with a finite final metric, in seed order."""
    ok = [r for r in runs if r.get("status") == "finished" and number(r.get("final_metric")) is not None]
    return sorted(ok, key=lambda r: (r.get("seed") is None, r.get("seed") or 0))


def _per_example(runs: list[dict]) -> tuple[dict[int, list[float]], dict[int, Any]] | None:
    """Per seed, the final per-example scores and the rows' digests; None unless every run kept them."""
    scores, keys = {}, {}
    for r in runs:
        ex = r.get("examples")
        if not isinstance(ex, dict) or not isinstance(ex.get("scores"), list) or not ex["scores"]:
            return None
        scores[r.get("seed")], keys[r.get("seed")] = ex["scores"], ex.get("keys")
    return scores, keys


def _interval(runs: list[dict]) -> Interval | None:
    """A variant's interval: bootstrap over seeds and examples, else a t interval over seeds."""
    found = _per_example(runs)
    if found is None:
        return seed_interval([r["final_metric"] for r in runs])
    scores, keys = found
    shared = shares_examples(list(scores.values()), list(keys.values()))
    return bootstrap_interval(list(scores.values()), shared)


def _same_examples(keys_a: dict[int, Any], keys_b: dict[int, Any], seeds: list[int]) -> bool:
    """Whether, on each common seed, both variants scored the same rows (where digests are known)."""
    return all(keys_a[s] is None or keys_b[s] is None or keys_a[s] == keys_b[s] for s in seeds)


def compare_pair(runs: list[dict], best_runs: list[dict]) -> dict[str, Any] | None:
    """``runs``' variant minus the best one, paired on the seeds and examples both scored.

    Returns ``difference``, its interval (``low``, ``high``), ``method``, ``distinguishable``
    (the interval excludes zero), ``mcnemar_p`` (exact McNemar over the pooled (seed, example)
    pairs when every score is 0 or 1, else None) and ``sd_paired`` (the standard deviation of the
    per-example differences). None when the two share no seed to compare on.
    """
    mine, theirs = _per_example(runs), _per_example(best_runs)
    diffs = None
    if mine and theirs:
        diffs = paired_differences(mine[0], theirs[0])
        if diffs and not _same_examples(mine[1], theirs[1], list(diffs)):
            diffs = None
    p_value, sd_paired = None, None
    if diffs:
        keys = [mine[1][s] for s in diffs]
        interval = bootstrap_interval(list(diffs.values()), shares_examples(list(diffs.values()), keys))
        p_value = mcnemar_exact(
            [x for s in diffs for x in mine[0][s]], [x for s in diffs for x in theirs[0][s]]
        )
        pooled = np.concatenate(list(diffs.values()))
        sd_paired = float(np.std(pooled, ddof=1)) if len(pooled) > 1 else None
    else:  # no per-example scores: the final metrics, paired by seed
        finals = {r.get("seed"): r["final_metric"] for r in best_runs}
        interval = seed_interval(
            [r["final_metric"] - finals[r.get("seed")] for r in runs if r.get("seed") in finals]
        )
    if interval is None:
        return None
    return {
        "difference": interval.mean,
        "low": interval.low,
        "high": interval.high,
        "method": interval.method,
        "distinguishable": interval.excludes_zero,
        "mcnemar_p": p_value,
        "sd_paired": sd_paired,
    }


def add_confidence(variants: list[dict], groups: dict[str, list[dict]], higher: bool) -> None:
    """Set ``interval``, ``is_best``, ``vs_best`` and ``within_noise_of_front`` on every variant
    summary (see the module docstring; the last needs ``pareto`` set already).

    ``interval`` is ``{"mean", "low", "high", "method"}`` or None (one seed and no per-example
    scores); ``vs_best`` is ``compare_pair``'s result with ``best`` (the best variant's name) or
    None for the best itself and for variants that cannot be compared. The runner-up's ``vs_best``
    adds ``seeds_needed`` and ``examples_needed``: the sample sizes at which a test at the 5% level
    would detect the measured difference with 80% power.
    """
    finished = {name: _finished(runs) for name, runs in groups.items()}
    for v in variants:
        found = _interval(finished[v["variant"]]) if finished[v["variant"]] else None
        v["interval"] = (
            None if found is None else {k: getattr(found, k) for k in ("mean", "low", "high", "method")}
        )
        v["is_best"], v["vs_best"] = False, None
    _mark_front_noise(variants, finished, higher)
    scored = [v for v in variants if finished[v["variant"]] and v["final_metric_mean"] is not None]
    if not scored:
        return
    ranked = sorted(scored, key=lambda v: v["final_metric_mean"], reverse=higher)
    best = ranked[0]
    best["is_best"] = True
    for v in ranked[1:]:
        pair = compare_pair(finished[v["variant"]], finished[best["variant"]])
        v["vs_best"] = None if pair is None else {"best": best["variant"], **pair}
    if len(ranked) > 1 and ranked[1]["vs_best"] is not None:
        _add_sample_sizes(ranked[1], best)


def _mark_front_noise(variants: list[dict], finished: dict[str, list[dict]], higher: bool) -> None:
    """Set ``within_noise_of_front`` on every variant: for one off the Pareto front, the first
    front variant that dominates it (no more trainable parameters, a score at least as good) and
    that a paired comparison cannot tell apart from it; else None. Such a variant is beaten on
    the plot's two axes, but not by a margin the runs can show."""
    front = [v for v in variants if v["pareto"]]
    for v in variants:
        v["within_noise_of_front"] = None
        params, metric = v["trainable_parameters_mean"], v["final_metric_mean"]
        if v["pareto"] or params is None or metric is None or not finished[v["variant"]]:
            continue
        for f in front:
            at_least_as_good = (
                f["final_metric_mean"] >= metric if higher else f["final_metric_mean"] <= metric
            )
            if f["trainable_parameters_mean"] > params or not at_least_as_good:
                continue
            pair = compare_pair(finished[v["variant"]], finished[f["variant"]])
            if pair is not None and not pair["distinguishable"]:
                v["within_noise_of_front"] = f["variant"]
                break


def _add_sample_sizes(runner_up: dict, best: dict) -> None:
    """The seeds (from the seed-to-seed spreads) and examples (from the paired per-example spread)
    that would separate the runner-up from the best, if the measured difference is real."""
    pair = runner_up["vs_best"]
    diff = runner_up["final_metric_mean"] - best["final_metric_mean"]
    both_spread = runner_up["n_ok"] > 1 and best["n_ok"] > 1
    pair["seeds_needed"] = (
        seeds_needed(diff, runner_up["final_metric_std"] or 0.0, best["final_metric_std"] or 0.0)
        if both_spread
        else None
    )
    pair["examples_needed"] = examples_needed(diff, pair["sd_paired"]) if pair["sd_paired"] else None
