"""Memory planning for a run: before the weights load, resolve ``micro_batch_size: auto`` from the
estimate and refuse a run that will not fit; after ``prepare``, confirm the choice with trial steps.

The chosen micro-batch is written to the run directory so that a resumed run reuses it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.errors import DoesNotFitError, StrategyError
from adaptkit.estimate.estimator import Estimator
from adaptkit.estimate.machine import free_memory
from adaptkit.estimate.render import does_not_fit_message
from adaptkit.estimate.suggest import (
    divisors,
    effective_batch,
    largest_fitting_micro_batch,
    suggest,
    with_micro_batch,
)
from adaptkit.estimate.units import MiB, format_bytes
from adaptkit.train.allocator import choose_policy, set_cpu_allocator

if TYPE_CHECKING:
    from adaptkit.estimate.result import Estimate
    from adaptkit.recipe.schema import Recipe

BATCH_FILE = "batch_size.json"


def plan_memory(run: Any, fresh_dir: bool, loaded: bool) -> tuple[Any, dict[str, Any]]:
    """Before the weights load: resolve ``micro_batch_size: auto`` and refuse a run that will not fit.

    Returns the train section with a concrete micro-batch and accumulation, and what was found
    (for summary.json). The budget is what the run may add to this process: the device's free
    memory (psutil's available RAM on a CPU, shared by the processes of this machine; CUDA's
    free memory), capped by ``train.memory_limit_mb``; the estimate is taken without the process
    baseline, which is already resident. A ``batch_size.json`` that ``write_memory_plan`` left in
    the run directory is read back on resume (unless ``fresh_dir``), so a resumed run uses the
    micro-batch it started with. With ``loaded`` (weights already in memory) only ``auto`` is resolved.
    The micro-batch chosen here is the estimate's; ``confirm_micro_batch`` then tries it for real.
    """
    spec = run.recipe.train
    auto = not isinstance(spec.micro_batch_size, int)
    info: dict[str, Any] = {"preflight": spec.preflight, "micro_batch_size_auto": auto}
    if not auto and not spec.preflight:
        return spec, info
    device = run.accelerator.device
    budget = _budget(spec, device)
    info["budget_mb"] = None if budget is None else budget / MiB
    estimator = _estimator(run, device, info)
    if auto:
        spec = _resolve_auto(run, spec, estimator, budget, fresh_dir, info)
    if spec.preflight and not loaded and estimator is not None and budget is not None:
        _preflight(run, spec, estimator, budget, device, info)
    return spec, info


def _budget(spec: Any, device: Any) -> int | None:
    """The bytes this run may add: its share of the device's free memory, capped by
    ``train.memory_limit_mb``; None when neither is known."""
    free = free_memory(device)
    share = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    budget = None if free is None else free // share
    if spec.memory_limit_mb is not None:
        limit = int(spec.memory_limit_mb * MiB)
        budget = limit if budget is None else min(budget, limit)
    return budget


def _estimator(run: Any, device: Any, info: dict[str, Any]) -> Estimator | None:
    """An estimator for the run's device, without the process baseline (already resident) or a
    time estimate; None, recorded, when it cannot be made: an estimate never blocks training."""
    from adaptkit.estimate.launch import launch_of

    try:
        return Estimator(
            run.host,
            device="cuda" if device.type == "cuda" else "cpu",
            overhead_bytes=0,
            peak_tflops=0,
            launch=launch_of(run.accelerator),
        )
    except Exception as exc:
        skipped(run, info, exc)
        return None


def skipped(run: Any, info: dict[str, Any], exc: Exception, what: str = "memory estimate skipped") -> None:
    """Say that the estimate was skipped, and why: on stderr and in the plan ``summary.json``
    keeps (``estimate_skipped``), which compare's report shows for the variant.

    A ``StrategyError`` is re-raised instead: a strategy refusing the recipe refuses it on real
    weights too, and the run stops now, before any weight loads, with that one message (rather
    than once as a skipped estimate and again when the strategy applies).
    """
    if isinstance(exc, StrategyError):
        raise exc
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    info["estimate_skipped"] = reason
    run.log(f"adaptkit: {what}: {reason}")


def _resolve_auto(
    run: Any,
    spec: Any,
    estimator: Estimator | None,
    budget: int | None,
    fresh_dir: bool,
    info: dict[str, Any],
) -> Any:
    """The train section with ``auto`` replaced by a micro-batch: the one chosen before (resume),
    else the largest the estimate fits; what was chosen goes into ``info``."""
    from adaptkit.recipe.identity import recipe_id

    recipe, acc = run.recipe, run.accelerator
    total = effective_batch(spec)
    saved = None if fresh_dir else _read_batch_file(run.run_dir / BATCH_FILE, recipe_id(recipe), total)
    if saved:
        micro = saved
        info["chosen_before"] = True
        run.log(
            f"adaptkit: micro_batch_size auto: using {micro}, as chosen before ({run.run_dir / BATCH_FILE})"
        )
    else:
        micro = _choose(run, estimator, recipe, budget, total, info)
        if acc.num_processes > 1:  # every rank must accumulate alike: the smallest choice wins
            micro = smallest_across_processes(acc, micro)
        run.log(
            f"adaptkit: micro_batch_size auto: {micro} x {total // micro} accumulation steps "
            f"({total} examples per step{'' if budget is None else ', within ' + format_bytes(budget)})"
        )
    spec = spec.model_copy(update={"micro_batch_size": micro, "gradient_accumulation": total // micro})
    acc.gradient_accumulation_steps = spec.gradient_accumulation
    info.update(
        micro_batch_size=micro,
        gradient_accumulation=total // micro,
        effective_batch_size=total,
        run_id=recipe_id(recipe),
    )
    return spec


def _preflight(
    run: Any, spec: Any, estimator: Estimator, budget: int, device: Any, info: dict[str, Any]
) -> None:
    """Refuse a run whose estimate exceeds ``budget`` (``DoesNotFitError``, with the changes that
    would fit); on a CPU, choose glibc's policy for freed memory from the estimate."""
    resolved = run.recipe.model_copy(update={"train": spec})
    try:
        est = estimator.estimate(resolved)
    except Exception as exc:
        # a model or strategy the estimator cannot build: training reports its own errors
        skipped(run, info, exc)
        return
    info["estimate_mb"] = est.total / MiB
    if est.launch is not None:  # the figures are one process's of several
        info["estimate_launch"] = est.launch
    if est.total > budget:
        raise DoesNotFitError(
            does_not_fit_message(est, budget, suggest(estimator, resolved, budget), device.type)
        )
    if device.type == "cpu":
        _choose_allocator(run, est, budget, info)


def _choose_allocator(run: Any, est: Estimate, budget: int, info: dict[str, Any]) -> None:
    """Keep freed memory for reuse, or return it at once (see ``set_cpu_allocator``).

    Keeping it makes CPU steps faster but holds more than the live peak: worth it only where
    glibc would unmap a step's blocks. A run that would not fit otherwise pays for returning
    freed memory at once.
    """
    policy = choose_policy(est.total, est.largest_block, budget)
    if policy and set_cpu_allocator(policy):
        info["allocator"] = policy
    if info.get("allocator") == "release":
        run.log(
            f"adaptkit: memory is tight (about {format_bytes(est.total)} of {format_bytes(budget)}): "
            "freed memory goes back to the system at once, which makes steps slower"
        )


def smallest_across_processes(acc: Any, value: int) -> int:
    """The smallest ``value`` of all processes (Accelerate's reduce has max and sum, not min)."""
    import torch

    return -int(acc.reduce(torch.tensor(-value, device=acc.device), "max").item())


def confirm_micro_batch(
    run: Any,
    spec: Any,
    info: dict[str, Any],
    model: Any,
    optimizer: Any,
    dataset: Any,
    collate: Any,
    pending: list[Any],
    loss_fn: Any,
) -> Any:
    """After ``plan_memory``, with model and optimizer prepared: trial steps confirm ``auto``'s micro-batch.

    Steps down through the divisors of the effective batch while a trial step runs out of memory
    (``adaptkit.train.batch_probe``); returns the train section to use and records the sizes tried in
    ``info``. With several processes the smallest micro-batch any of them could run wins.
    """
    from adaptkit.kernels.lm_loss import UNSHARDED
    from adaptkit.train.batch_probe import probe_micro_batch

    acc = run.accelerator
    if acc.distributed_type.value not in UNSHARDED:
        run.log(
            f"adaptkit: micro_batch_size auto: no trial step under {acc.distributed_type.value} "
            f"(one process holds only a shard); the estimate's {spec.micro_batch_size} stands"
        )
        return spec
    total = info["effective_batch_size"]
    candidates = [d for d in divisors(total) if d <= spec.micro_batch_size]
    failure = None
    try:
        micro, info["tried"] = probe_micro_batch(
            acc, model, optimizer, dataset, collate, candidates, pending, run.log, loss_fn
        )
    except DoesNotFitError as exc:
        if acc.num_processes == 1:
            raise
        micro, failure = 0, exc  # the other processes wait in the reduction below: all stop together
    if acc.num_processes > 1:
        micro = smallest_across_processes(acc, micro)
        if micro == 0:
            raise failure or DoesNotFitError(
                "train.micro_batch_size auto: another process ran out of memory in a trial "
                "step even with a micro-batch of 1; see its message"
            )
    if micro == spec.micro_batch_size:
        return spec
    run.log(
        f"adaptkit: micro_batch_size auto: {micro} x {total // micro} accumulation steps, "
        "as trial steps showed"
    )
    acc.gradient_accumulation_steps = total // micro
    info.update(micro_batch_size=micro, gradient_accumulation=total // micro)
    return spec.model_copy(update={"micro_batch_size": micro, "gradient_accumulation": total // micro})


def _choose(
    run: Any,
    estimator: Estimator | None,
    recipe: Recipe,
    budget: int | None,
    total: int,
    info: dict[str, Any],
) -> int:
    """The largest micro-batch that fits; without an estimate or a budget, the largest divisor up to 8."""
    fallback = max(d for d in divisors(total) if d <= 8)
    if estimator is None or budget is None:
        run.log(f"adaptkit: micro_batch_size auto: no estimate or budget, using {fallback}")
        return fallback
    try:
        found = largest_fitting_micro_batch(estimator, recipe, budget)
    except Exception as exc:  # the estimator cannot build this model: fall back rather than refuse
        skipped(run, info, exc, f"micro_batch_size auto: no estimate, using {fallback}")
        return fallback
    if found is None:
        one = with_micro_batch(recipe, 1)
        est = estimator.estimate(one)
        raise DoesNotFitError(
            "train.micro_batch_size auto: not even a micro-batch of 1 fits; "
            + does_not_fit_message(est, budget, suggest(estimator, one, budget), estimator.device)
        )
    return found[0]


def write_memory_plan(run_dir: Path, info: dict[str, Any]) -> None:
    """Record the micro-batch ``auto`` chose in ``<run dir>/batch_size.json`` (atomically);
    nothing without auto."""
    from adaptkit.files import write_json

    if info.get("micro_batch_size_auto") and not info.get("chosen_before"):
        keys = (
            "run_id",
            "micro_batch_size",
            "gradient_accumulation",
            "effective_batch_size",
            "budget_mb",
            "tried",
        )
        write_json(Path(run_dir) / BATCH_FILE, {k: info.get(k) for k in keys})


def _read_batch_file(path: Path, run_id: str, total: int) -> int | None:
    """The micro-batch a ``batch_size.json`` records for this run and effective batch, if valid."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if saved.get("run_id") != run_id or saved.get("effective_batch_size") != total:
        return None
    micro = saved.get("micro_batch_size")
    return micro if isinstance(micro, int) and micro >= 1 and total % micro == 0 else None
