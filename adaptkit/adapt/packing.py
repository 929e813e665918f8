"""Whether a run packs its training rows (``data.packing``), decided once the strategies are applied.

``true`` packs or refuses; ``false`` never packs; ``auto`` (the default) packs wherever it is
safe: the task packs, rows are neither batched by length nor cached as features, every strategy
trains on packed rows, the task's head can read packed rows (``Task.packing_refusal``), and the
model, as the strategies left it, keeps packed sequences apart (the probe of
``adaptkit.kernels.lm_loss.check_packing``). Where ``auto`` does not pack, the run says why.

Only the adapted model can answer the last question: a strategy that adds tokens to each
sequence, or a wrapper that drops position ids, changes what the model does with a packed row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptkit.errors import ConfigError

if TYPE_CHECKING:
    from adaptkit.adapt.stack import Adapted
    from adaptkit.contract.task import Task
    from adaptkit.recipe.schema import Recipe


def static_reason(recipe: Recipe, task: Task, strategies: list[Any]) -> str | None:
    """Why ``auto`` cannot pack, known before any weight loads; None when only the probe can tell."""
    from adaptkit.host.specs import packing_rules

    if recipe.data.packing is False:
        return "data.packing is false"
    broken = packing_rules(recipe.model.task, task.packs, recipe.train.model_dump(), strategies)
    return "; ".join(why if field == "data.packing" else f"{field}: {why}" for field, why in broken) or None


def decide_packing(recipe: Recipe, task: Task, adapted: Adapted, distributed_type: str) -> tuple[bool, str]:
    """Whether this run packs its training rows, and why not when it does not.

    ``data.packing: true`` on a model that lets packed sequences see each other raises the
    probe's ConfigError (the recipe's validation already refused the static cases).
    """
    from adaptkit.kernels.lm_loss import check_packing

    reason = static_reason(recipe, task, adapted.strategies)
    if (
        reason is not None and recipe.data.packing is True
    ):  # validation refuses these; a script may not validate
        raise ConfigError([("data.packing", f"cannot pack: {reason}")])
    if reason is not None:
        return False, reason
    refusal = task.packing_refusal(adapted.model)
    if refusal and recipe.data.packing is True:
        raise ConfigError(refusal)
    if refusal:
        return False, "; ".join(message for _, message in refusal)
    try:
        check_packing(adapted.model, distributed_type)
    except ConfigError as exc:
        if recipe.data.packing is True:
            raise
        return False, str(exc)
    return True, ""
