"""Balanced checkpoints: the evaluation of each run with the best task gain per unit of forgetting.

A run that measured forgetting at every evaluation (``forgetting.every_evaluation``) records, per
evaluation, its task score and how far it moved from the base model on general text. The final
weights are not always the best trade: as the PEFT-Arena study does by rewinding to earlier
checkpoints, the report names for each run the evaluation whose gain over the untouched model
(the ``none`` variant) is largest per unit of forgetting, and whether a checkpoint of that step
was kept to rewind to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adaptkit.compare.report.stats import number


def balanced_step(
    history: Sequence[dict[str, Any]], reference: float, greater_is_better: bool
) -> dict[str, Any] | None:
    """The evaluation of ``history`` (entries with ``step``, ``score`` and ``forgetting``) with the
    best gain over ``reference`` per unit of forgetting; None when none gained.

    An evaluation that forgot nothing (forgetting at or below zero) beats any that forgot
    something, the larger gain first among them: a ratio would divide by zero there.
    """
    best, best_key = None, None
    for entry in history:
        score, forgot = entry.get("score"), entry.get("forgetting")
        if number(score) is None or number(forgot) is None:
            continue
        gain = score - reference if greater_is_better else reference - score
        if gain <= 0:
            continue
        key = (1, gain) if forgot <= 0 else (0, gain / forgot)
        if best_key is None or key > best_key:
            best_key = key
            best = {
                "step": entry["step"],
                "score": score,
                "forgetting": forgot,
                "gain": gain,
                "gain_per_forgetting": None if forgot <= 0 else gain / forgot,
            }
    return best


def add_balanced(variants: list[dict], groups: dict[str, list[dict]], reference: float | None) -> None:
    """Set ``balanced`` on every variant: per finished run that recorded forgetting at its
    evaluations, its balanced evaluation (``balanced_step``), the seed, and whether a checkpoint
    of that step was kept; empty without ``reference``, the untouched model's score to gain over."""
    for v in variants:
        v["balanced"] = []
        if reference is None:
            continue
        for run in groups.get(v["variant"], []):
            higher = v["greater_is_better"] is not False
            found = balanced_step(run.get("forgetting_history") or [], reference, higher)
            if found:
                kept = found["step"] in (run.get("checkpoint_steps") or [])
                v["balanced"].append({"seed": run.get("seed"), **found, "checkpoint_kept": kept})
