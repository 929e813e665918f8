"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks";
fastai's ``lr_find``) that a comparison runs for each variant naming no rate of its own.

One short run on the variant's own data, its first seed, from its own starting weights: the rate
grows geometrically from a low to a high value, one step each, and the training loss is logged
at every step. The rule: smooth the losses (an exponential moving average, debiased), stop at the
first step where the smoothed loss exceeds four times its minimum (divergence), and take the rate
at the minimum divided by three: Smith's advice for the largest rate of a schedule is "a factor
of 3 or 4" below where the loss stops falling. (fastai's ``lr_min``, the minimum over ten, proved
too timid for the short budgets comparisons run: see docs/comparing.md.)
The range tried is the stack's declared ``lr_range`` widened tenfold on each side, or 1e-6 to 1
where the stack declares none.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

#: Steps of a range test: each tries one rate.
STEPS = 40
#: Weight of the past in the smoothed loss.
SMOOTHING = 0.9
#: The smoothed loss this many times above its minimum is divergence: the rest is ignored.
DIVERGENCE = 4.0
#: Where the stack declares no range.
DEFAULT_RANGE = (1e-6, 1.0)
#: The chosen rate is the rate at the smoothed loss's minimum divided by this.
BELOW_MINIMUM = 3.0
RULE = (
    "rate at the minimum of the smoothed training loss (EMA 0.9, stopped where it diverges past 4x "
    "its minimum) divided by 3"
)


def range_to_test(declared: tuple[float, float] | None) -> tuple[float, float]:
    """The rates a range test sweeps: the declared range widened tenfold each way."""
    if declared is None:
        return DEFAULT_RANGE
    return declared[0] / 10, declared[1] * 10


def stack_lr_range(stack: list[Any]) -> tuple[float, float] | None:
    """The declared range of a stack: that of its last strategy that declares one (the outermost
    of what trains: ``[freeze, lora]`` trains at LoRA's rates)."""
    ranges = [s.lr_range for s in stack if getattr(s, "lr_range", None)]
    return ranges[-1] if ranges else None


def overrides(low: float, high: float, steps: int = STEPS) -> dict[str, Any]:
    """The recipe overrides that turn a variant's first run into its range test."""
    return {
        "train.scheduler": "range_test",
        "train.lr_low": low,
        "train.lr": high,
        "train.max_steps": steps,
        "train.max_tokens": None,
        "train.max_time": None,
        "train.warmup_ratio": 0.0,
        "train.log_every": 1,
        "train.eval_every": None,
        "train.early_stopping_patience": None,
        "train.save_every": None,
        "forgetting": None,
    }


def rate_at(step: int, low: float, high: float, steps: int = STEPS) -> float:
    """The rate of optimizer step ``step`` (1-based) of a range test: geometric from low to high."""
    return low * (high / low) ** ((step - 1) / max(steps - 1, 1))


def curve(run_dir: Path, low: float, high: float, steps: int = STEPS) -> list[tuple[float, float]]:
    """(rate, training loss) of every step of a range test run, in order; the loss of a step is the
    one its rate was applied to."""
    from adaptkit.compare.child import read_metrics

    return [(rate_at(e["step"], low, high, steps), e["loss"]) for e in read_metrics(run_dir) if "loss" in e]


def smoothed(points: list[tuple[float, float]]) -> list[float]:
    """The losses as the rule sees them: an exponential moving average, debiased."""
    average, out = 0.0, []
    for i, (_, loss) in enumerate(points):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        out.append(average / (1 - SMOOTHING ** (i + 1)))
    return out


def smoothed_minimum(points: list[tuple[float, float]]) -> tuple[int | None, int]:
    """(index of the smoothed loss's minimum, index where the curve ends: divergence or its end)."""
    best, at = math.inf, None
    for i, ((_, loss), value) in enumerate(zip(points, smoothed(points))):
        if not math.isfinite(loss):
            return at, i
        if value > DIVERGENCE * best:
            return at, i
        if value < best:
            best, at = value, i
    return at, len(points)


def choose(points: list[tuple[float, float]]) -> float | None:
    """The rate the rule picks from a range test's (rate, loss) points; None without finite losses."""
    at, _ = smoothed_minimum(points)
    return None if at is None else points[at][0] / BELOW_MINIMUM


def edge_note(points: list[tuple[float, float]]) -> str | None:
    """A note when the test's minimum sits at an end of the rates it tried, naming the next range."""
    at, end = smoothed_minimum(points)
    if at is None:
        return None
    if at == len(points) - 1 and end == len(points):
        high = points[-1][0]
        return f"the loss still fell at the highest rate tried ({high:.3g}); test up to {high * 100:.3g}"
    if at == 0:
        low = points[0][0]
        return f"the loss rose from the lowest rate tried ({low:.3g}); test from {low / 100:.3g}"
    return None


def auto_rate(runner: Any, job: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Range-test a job's variant, then train the job at the chosen rate.

    Returns (the chosen overrides, the job's row, the tuning entry for the report). A test whose
    loss never decreased leaves the base recipe's rate, and says so.
    """
    stack = runner.plan.host.build_strategies(job.raw["strategies"])
    low, high = range_to_test(stack_lr_range(stack))
    test = runner.run(job, "-lrtest", overrides(low, high))
    points = curve(runner.plan.root / "runs" / f"{job.key}-lrtest", low, high)
    lr = choose(points)
    entry = {
        "method": "range_test",
        "tried": [low, high],
        "steps": len(points),
        "seconds": test.get("wall_time_s"),
        "curve": [[r, loss] for r, loss in points],
        "rule": RULE,
        "edge": edge_note(points),
    }
    if lr is None:
        runner.log(f"{job.variant}: the range test found no rate; the recipe's rate is kept")
        entry.update(
            chosen={}, edge="the range test found no rate (no finite loss); the recipe's rate was kept"
        )
        return {}, runner.run(job), entry
    chosen = {"train.lr": float(f"{lr:.3g}")}
    entry["chosen"] = chosen
    runner.log(
        f"{job.variant}: learning rate {chosen['train.lr']:g} from a range test over [{low:g}, {high:g}]"
    )
    return chosen, runner.run(job, "", chosen), entry
