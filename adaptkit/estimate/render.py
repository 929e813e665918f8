"""What a person reads: the estimate as a table (``adaptkit estimate``), the message of a run
that will not fit (training's pre-flight check), and the report ``adaptkit estimate`` prints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptkit.estimate.estimator import Estimator
from adaptkit.estimate.machine import free_memory
from adaptkit.estimate.result import Estimate, Suggestion
from adaptkit.estimate.suggest import largest_fitting_micro_batch, suggest, with_micro_batch
from adaptkit.estimate.units import format_bytes, parse_memory

if TYPE_CHECKING:
    from adaptkit.estimate.launch import Launch
    from adaptkit.host.manager import PluginHost
    from adaptkit.recipe.schema import Recipe


def does_not_fit_message(est: Estimate, budget: int, suggestions: list[Suggestion], device: str) -> str:
    """One message: the estimate against the budget, its largest terms, and the changes that would fit."""
    terms = sorted(est.terms().items(), key=lambda kv: -kv[1])[:3]
    per = (
        f" per process ({est.launch['num_processes']} processes, {est.launch['kind']})" if est.launch else ""
    )
    lines = [
        f"this run needs about {format_bytes(est.total)}{per} at its peak ({est.peak_phase}) "
        f"but {format_bytes(budget)} is available on the {device}; largest terms: "
        + ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in terms)
    ]
    if suggestions:
        lines.append("changes that lower it, cheapest first (each on top of the previous):")
        for s in suggestions:
            lines.append(
                f"  {' '.join(s.overrides)}  -> {format_bytes(s.estimate.total)}"
                f"{' (fits)' if s.fits else ''}  # {s.change}"
            )
    if not any(s.fits for s in suggestions):
        lines.append(
            "nothing listed here makes it fit; use a smaller model or a device with more memory "
            "(or set train.preflight: false to try anyway)"
        )
    return "\n".join(lines)


def _header(est: Estimate, auto: bool) -> list[str]:
    """The table's first lines: the model, its parameters, and the step's shape."""
    chosen = " (auto: the largest that fits)" if auto else ""
    share = 100 * est.trainable_parameters / max(est.total_parameters, 1)
    return [
        f"{est.model_type}, strategies {'+'.join(est.strategies)}: {est.total_parameters:,} parameters, "
        f"{est.trainable_parameters:,} trainable ({share:.2f}%)",
        f"micro-batch {est.micro_batch_size}{chosen} x {est.inputs}, "
        f"accumulation {est.gradient_accumulation}, "
        f"optimizer {est.optimizer}, mixed precision {est.mixed_precision}, "
        f"gradient checkpointing {'on' if est.gradient_checkpointing else 'off'}, device {est.device}",
        *_launch_lines(est),
        "",
    ]


def _launch_lines(est: Estimate) -> list[str]:
    """The header's line for a launch on several processes: what the figures are, and against what."""
    if est.launch is None:
        return []
    launch = est.launch
    lines = [
        f"{launch['description']}, from {launch['source']}; "
        f"one process alone would need {format_bytes(launch['one_process_total'])}"
    ]
    if "rounding" in launch:
        lines.append(
            f"sharded: weights, gradients and optimizer states, {launch['rounding']}; "
            "4-bit and 8-bit layers are not sharded"
        )
    return lines


#: What the table says next to the terms a launch adds.
LAUNCH_NOTES = {
    "gathered_parameters": "  (the {units} FSDP units gathered whole, and the root and tail groups all step)",
    "unsharded_gradients": "  (the largest unit's and the root and tail's, whole until reduce-scattered)",
    "ddp_buckets": "  (DDP's gradient buckets: a second copy of the trainable gradients)",
}


def _term_note(est: Estimate, name: str) -> str:
    """What the table says next to a term: frozen weights by dtype, activations per block."""
    if name == "frozen_weights" and est.frozen_by_dtype:
        by_size = sorted(est.frozen_by_dtype.items(), key=lambda kv: -kv[1])
        return "  (" + ", ".join(f"{k} {format_bytes(v)}" for k, v in by_size if v) + ")"
    if name == "activations":
        return f"  ({format_bytes(est.activations_per_block)} per block)"
    if name in LAUNCH_NOTES and est.launch is not None:
        units = est.launch.get("gathered_units")
        return LAUNCH_NOTES[name].format(units="two largest" if units == 2 else units)
    return ""


def _suggestion_lines(suggestions: list[Suggestion]) -> list[str]:
    """The table's closing lines: the changes that make it fit, cheapest first."""
    if not suggestions:
        return []
    lines = ["", "to make it fit (cheapest first, each on top of the previous):"]
    for s in suggestions:
        lines.append(
            f"  {' '.join(s.overrides):<60} -> {format_bytes(s.estimate.total):>12}"
            f"{'  fits' if s.fits else ''}"
        )
        lines.append(f"      {s.change}")
    if not any(s.fits for s in suggestions):
        lines.append("  none of these is enough: a smaller model or more memory is needed")
    return lines


def render(
    est: Estimate,
    budget: int | None,
    suggestions: list[Suggestion],
    budget_label: str = "",
    auto: bool = False,
) -> str:
    """The estimate as a readable table, with the device, the dominant term, the time and the suggestions."""
    lines = _header(est, auto)
    width = max(len(t) for t in est.terms()) + 2
    for name, value in est.terms().items():
        lines.append(f"  {name.replace('_', ' '):<{width}}{format_bytes(value):>12}{_term_note(est, name)}")
    lines.append(
        f"  {'peak':<{width}}{format_bytes(est.total):>12}  "
        f"({est.peak_phase}; terms are not all live at once)"
    )
    if est.resident_with_reuse > est.total:
        lines.append(
            f"  {'kept for reuse':<{width}}{format_bytes(est.resident_with_reuse):>12}  "
            "(at most, with freed memory kept for faster steps: training does so only where this fits)"
        )
    if budget is not None:
        verdict = "fits" if est.total <= budget else "does NOT fit"
        lines.append(f"  {'device':<{width}}{format_bytes(budget):>12}  {budget_label}-> {verdict}")
    lines.append(f"dominant term: {est.dominant.replace('_', ' ')}")
    if est.time_per_step_s is not None:
        lines.append(
            f"time per optimizer step: {est.time_per_step_s:.3g} s at {est.peak_tflops:.3g} TFLOP/s "
            f"({est.flops_per_step / 1e12:.3g} TFLOP per step; a lower bound, at the device's matmul peak)"
        )
    return "\n".join(lines + _suggestion_lines(suggestions))


def estimate_report(
    recipe: Recipe,
    host: PluginHost,
    device_memory: str | None = None,
    device: str | None = None,
    peak_tflops: float | None = None,
    launch: Launch | None = None,
) -> tuple[Estimate, int, list[Suggestion], dict[str, Any]]:
    """What ``adaptkit estimate`` shows: the estimate against the device, and suggestions when it
    does not fit.

    ``device_memory`` is a size (``24GB``); without it, what the device has free now. A
    ``micro_batch_size: auto`` is resolved as training would, against that memory. Returns the
    estimate, the budget in bytes, the suggestions and a JSON-ready report. With ``launch`` the
    estimate is per process, and so is the budget: ``device_memory`` is one process's device,
    and a CPU's free memory is shared by the processes.
    """
    budget = parse_memory(device_memory) if device_memory is not None else None
    estimator = Estimator(host, device=device, peak_tflops=peak_tflops, launch=launch)
    if budget is None:
        import torch

        budget = free_memory(
            torch.device(estimator.device, 0) if estimator.device == "cuda" else torch.device("cpu")
        )
        label = f"free on this {estimator.device} now "
        if estimator.launch is not None and estimator.device == "cpu":
            n = estimator.launch.num_processes
            budget //= n  # as training's pre-flight check shares a machine's memory
            label = f"free on this cpu now / {n} processes "
    else:
        label = f"--device-memory {device_memory} "
    auto = not isinstance(recipe.train.micro_batch_size, int)
    if auto:
        found = largest_fitting_micro_batch(estimator, recipe, budget)
        recipe = with_micro_batch(recipe, found[0] if found else 1)
    est = estimator.estimate(recipe)
    suggestions = suggest(estimator, recipe, budget) if est.total > budget else []
    report = {
        "estimate": est.to_dict(),
        "device_memory": budget,
        "fits": est.total <= budget,
        "micro_batch_size_auto": auto,
        "suggestions": [s.to_dict() for s in suggestions],
    }
    return est, budget, suggestions, {"label": label, **report}
