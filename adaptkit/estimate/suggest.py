"""Making a run fit: the micro-batches an effective batch allows, the largest one that fits a
budget, and the chain of recipe changes that lower the estimate, cheapest first."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from adaptkit.estimate.result import Estimate, Suggestion

if TYPE_CHECKING:
    from adaptkit.estimate.estimator import Estimator
    from adaptkit.recipe.schema import Recipe


def with_overrides(recipe: Recipe, overrides: list[str], host: Any) -> Recipe:
    """``recipe`` with ``key=value`` overrides applied, validated again as a recipe."""
    from adaptkit.recipe.schema import apply_overrides, validate

    return validate(apply_overrides(recipe.model_dump(mode="json"), overrides), host=host)


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, largest first."""
    return sorted({d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}, reverse=True)


def effective_batch(spec: Any) -> int:
    """Examples per optimizer step: ``effective_batch_size`` with an ``auto`` micro-batch, else
    micro-batch x accumulation."""
    if isinstance(spec.micro_batch_size, int):
        return spec.micro_batch_size * spec.gradient_accumulation
    return spec.effective_batch_size or 8 * spec.gradient_accumulation


def largest_fitting_micro_batch(
    estimator: Estimator, recipe: Recipe, budget: int, candidates: list[int] | None = None
) -> tuple[int, Estimate] | None:
    """The largest micro-batch (a divisor of the effective batch, or of ``candidates``) whose
    estimate fits ``budget``.

    The estimate grows with the micro-batch, so the divisors are searched by bisection. None
    when even the smallest does not fit.
    """
    sizes = sorted(candidates or divisors(effective_batch(recipe.train)))
    lo, hi, found = 0, len(sizes) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        est = estimator.estimate(with_micro_batch(recipe, sizes[mid]))
        if est.total <= budget:
            found, lo = (sizes[mid], est), mid + 1
        else:
            hi = mid - 1
    return found


def with_micro_batch(recipe: Recipe, micro: int) -> Recipe:
    """``recipe`` with micro-batch ``micro`` and the accumulation that keeps its effective batch."""
    total = effective_batch(recipe.train)
    train = recipe.train.model_copy(
        update={
            "micro_batch_size": micro,
            "gradient_accumulation": max(1, total // micro),
            "effective_batch_size": None,
        }
    )
    return recipe.model_copy(update={"train": train})


class _Chain:
    """Suggestions applied one on top of another: the recipe so far and its estimate."""

    def __init__(self, estimator: Estimator, recipe: Recipe, budget: int):
        self.estimator, self.budget = estimator, budget
        self.current, self.base = recipe, estimator.estimate(recipe)
        self.suggestions: list[Suggestion] = []

    def fits(self) -> bool:
        """Whether the recipe so far fits the budget."""
        return self.base.total <= self.budget

    def candidate(self, overrides: list[str]) -> Recipe:
        """The recipe so far with ``overrides`` applied."""
        return with_overrides(self.current, overrides, self.estimator.host)

    def add(self, change: str, overrides: list[str], recipe: Recipe, est: Estimate | None = None) -> bool:
        """Take the change when it lowers the estimate; True when the run fits with it."""
        if est is None:
            est = self.estimator.estimate(recipe)
        if est.total >= self.base.total:
            return False
        self.suggestions.append(Suggestion(change, overrides, est, est.total <= self.budget))
        self.current, self.base = recipe, est
        return est.total <= self.budget


def _gradient_checkpointing(chain: _Chain) -> bool:
    if chain.current.model.gradient_checkpointing:
        return False
    overrides = ["model.gradient_checkpointing=true"]
    return chain.add(
        "gradient checkpointing (recompute each block's activations in the backward pass; "
        "about a third more compute)",
        overrides,
        chain.candidate(overrides),
    )


def _smaller_micro_batch(chain: _Chain) -> bool:
    spec = chain.current.train
    if not (isinstance(spec.micro_batch_size, int) and spec.micro_batch_size > 1):
        return False
    total = effective_batch(spec)
    smaller = [d for d in divisors(total) if d < spec.micro_batch_size]
    found = largest_fitting_micro_batch(chain.estimator, chain.current, chain.budget, smaller)
    micro = found[0] if found else min(smaller, default=1)
    overrides = [f"train.micro_batch_size={micro}", f"train.gradient_accumulation={total // micro}"]
    return chain.add(
        f"micro-batch {micro} with {total // micro} accumulation steps (the same {total} examples per step)",
        overrides,
        chain.candidate(overrides),
    )


def _eight_bit_optimizer(chain: _Chain) -> bool:
    eight_bit = {"adamw": "adamw_8bit", "paged_adamw": "paged_adamw_8bit"}.get(chain.current.train.optimizer)
    if not eight_bit:
        return False
    overrides = [f"train.optimizer={eight_bit}"]
    return chain.add(
        f"8-bit optimizer states ({eight_bit}, bitsandbytes)", overrides, chain.candidate(overrides)
    )


def _four_bit_base(chain: _Chain) -> bool:
    """The first strategy with a ``quantize`` option (LoRA) over a 4-bit base, if it is not already."""
    for i, s in enumerate(chain.current.strategies):
        options = {"name": s} if isinstance(s, str) else s
        config_class = chain.estimator.host.strategy(options["name"]).extra["config_class"]
        if "quantize" in config_class.model_fields and options.get("quantize") != "4bit":
            overrides = [f"strategies.{i}.quantize=4bit"]
            change = f"4-bit base (QLoRA: {options['name']} over NF4 weights)"
            return chain.add(change, overrides, chain.candidate(overrides))
    return False


def _shorter_sequences(chain: _Chain) -> bool:
    """The longest of a half, a quarter, an eighth of ``data.max_length`` that fits, else the shortest."""
    length = chain.current.data.max_length
    tried = [length // 2**k for k in (1, 2, 3) if length // 2**k >= 8]
    for new_length in tried:
        overrides = [f"data.max_length={new_length}"]
        recipe = chain.candidate(overrides)
        est = chain.estimator.estimate(recipe)
        if est.total <= chain.budget or new_length == tried[-1]:
            change = (
                f"shorter sequences (data.max_length {new_length} instead of {length}; "
                "longer examples are truncated)"
            )
            return chain.add(change, overrides, recipe, est)
    return False


#: The changes ``suggest`` tries, cheapest first.
_CHANGES = (
    _gradient_checkpointing,
    _smaller_micro_batch,
    _eight_bit_optimizer,
    _four_bit_base,
    _shorter_sequences,
)


def suggest(estimator: Estimator, recipe: Recipe, budget: int) -> list[Suggestion]:
    """Changes that lower the estimate towards ``budget``, cheapest first, each applied on top of
    the earlier ones.

    In order: gradient checkpointing; a smaller micro-batch with more accumulation (the same
    effective batch); an 8-bit optimizer; a 4-bit base (for strategies with a ``quantize``
    option, LoRA); shorter sequences. It stops at the first change after which the run fits;
    a change that would not lower the estimate is left out.
    """
    chain = _Chain(estimator, recipe, budget)
    if chain.fits():
        return []
    for change in _CHANGES:
        if change(chain):
            break
    return chain.suggestions
