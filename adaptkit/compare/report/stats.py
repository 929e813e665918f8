"""The statistics behind the report's verdict: intervals, paired tests, sample sizes, time to target.

Plain Python and numpy (no torch, no scipy), every random draw from a seeded generator, so the
same runs always give the same report. The inputs are what runs write: per seed, the final
evaluation's per-example scores (1.0 or 0.0 for a classification's correct or wrong answer), the
final metric, and the metrics of every evaluation.

Two sources of noise make a score uncertain, and an interval here covers both:

- **the evaluation sample**: another draw of evaluation examples from the same distribution would
  score differently;
- **the seed**: training again with another seed (data order, initialisation, dropout) would too.

So the bootstrap resamples seeds, then examples within each drawn seed. When every seed scored
the *same* examples (a fixed validation split), one draw of example indices is shared by all the
seeds of a replicate: the examples' difficulty is common to every seed, and drawing each seed's
examples independently would average that part away and give too narrow an interval. When the
seeds scored different examples (a held-out split depends on the seed), each seed's are drawn
independently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist
from typing import Any

import numpy as np

LEVEL = 0.95  # the confidence level of every interval in the report
RESAMPLES = 2000  # bootstrap replicates: the interval's ends move by well under its width's 5% between seeds
POWER = 0.8  # the power the sample-size estimates aim for
TARGET_FRACTION = 0.9  # time-to-target: the first evaluation within 10% of the final score
_CELLS = 4_000_000  # numbers one chunk of replicates may hold (32 MB of float64)

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval; ``method`` says what the interval covers."""

    mean: float
    low: float
    high: float
    method: str  # "examples and seeds", "examples" (one seed) or "seeds" (no per-example scores)

    @property
    def excludes_zero(self) -> bool:
        """Whether zero lies outside the interval: for a difference, the two are distinguishable."""
        return self.low > 0 or self.high < 0


def _as_groups(groups: Sequence[Sequence[float]]) -> list[np.ndarray]:
    """Per-seed score arrays as float64, empty seeds dropped."""
    return [np.asarray(g, dtype=np.float64) for g in groups if len(g)]


def shares_examples(groups: Sequence[Sequence[float]], keys: Sequence[Sequence[str] | None]) -> bool:
    """Whether every seed scored the same examples: equal lengths and, where known, equal row digests.

    Without digests equal lengths are taken as the same rows (a fixed validation split keeps its order).
    """
    if len({len(g) for g in groups}) != 1:
        return False
    known = [tuple(k) for k in keys if k is not None]
    return len(set(known)) <= 1


def _resampled_means(groups: list[np.ndarray], shared: bool, rng: np.random.Generator) -> np.ndarray:
    """RESAMPLES bootstrap replicates of the mean over seeds of the mean over examples."""
    n_seeds = len(groups)
    out = np.empty(RESAMPLES)
    # replicates drawn a chunk at a time: memory stays near _CELLS numbers whatever the sizes
    chunk = max(1, min(RESAMPLES, _CELLS // (n_seeds * max(len(g) for g in groups))))
    for start in range(0, RESAMPLES, chunk):
        size = min(chunk, RESAMPLES - start)
        seeds = rng.integers(0, n_seeds, size=(size, n_seeds))  # seeds drawn with replacement
        if shared:
            scores = np.stack(groups)  # seeds x examples, the same examples in every row
            picks = rng.integers(0, scores.shape[1], size=(size, scores.shape[1]))
            # per replicate: every seed's mean over the one shared draw of examples
            per_seed = scores[:, picks].mean(axis=2).T  # replicates x seeds
        else:
            # every seed its own draw of its own examples (drawn once per replicate even when the
            # seed is drawn twice: a negligible simplification for this many examples)
            per_seed = np.stack(
                [g[rng.integers(0, len(g), size=(size, len(g)))].mean(axis=1) for g in groups], axis=1
            )
        out[start : start + size] = np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)
    return out


def _shrink_seed_means(groups: list[np.ndarray], shared: bool) -> list[np.ndarray]:
    """Each seed's scores shifted so that the seed means spread only as much as the seeds do.

    A seed's mean already carries its examples' noise; drawing seeds and then examples would
    count that noise twice and give too wide an interval (about 98% coverage instead of 95% in
    tests/test_report_stats.py's simulation). So, as in Davison and Hinkley's two-stage bootstrap
    (Bootstrap Methods, 1997, section 3.8), the seed means are pulled towards their grand mean by
    the factor that leaves their variance at its seed part: the observed variance less what the
    example noise alone would give (the residual of seeds x examples for shared examples, the
    pooled within-seed variance otherwise).
    """
    if len(groups) < 2:
        return groups
    means = np.array([g.mean() for g in groups])
    grand, spread = means.mean(), means.var(ddof=1)
    if shared:
        x = np.stack(groups)
        resid = x - x.mean(axis=1, keepdims=True) - x.mean(axis=0, keepdims=True) + x.mean()
        dof = (x.shape[0] - 1) * (x.shape[1] - 1)
        noise = float((resid**2).sum() / dof / x.shape[1]) if dof else 0.0
    else:
        noise = float(np.mean([g.var(ddof=1) / len(g) if len(g) > 1 else 0.0 for g in groups]))
    keep = math.sqrt(max(0.0, 1.0 - noise / spread)) if spread > 0 else 0.0
    return [g - m + grand + keep * (m - grand) for g, m in zip(groups, means)]


def bootstrap_interval(groups: Sequence[Sequence[float]], shared: bool, seed: int = 0) -> Interval | None:
    """The mean over seeds of each seed's mean score, with a percentile bootstrap interval.

    ``groups`` holds one array of per-example scores per seed (for a paired comparison: per-example
    differences). Seeds are resampled, then examples within each drawn seed, shared across the
    seeds when ``shared`` (see the module's docstring). With one seed only the examples vary.
    None without any score.
    """
    arrays = _as_groups(groups)
    if not arrays:
        return None
    if shared and len({len(a) for a in arrays}) != 1:
        raise ValueError("shared examples need the same number of scores for every seed")
    means = _resampled_means(_shrink_seed_means(arrays, shared), shared, np.random.default_rng(seed))
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    method = "examples and seeds" if len(arrays) > 1 else "examples"
    return Interval(float(np.mean([a.mean() for a in arrays])), float(low), float(high), method)


def t_quantile(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    return _T975[df - 1] if df <= len(_T975) else NormalDist().inv_cdf(0.975)


def seed_interval(values: Sequence[float]) -> Interval | None:
    """A t interval over seeds alone (for runs without per-example scores); None under two seeds."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return None
    half = t_quantile(len(x) - 1) * float(np.std(x, ddof=1)) / math.sqrt(len(x))
    return Interval(float(x.mean()), float(x.mean() - half), float(x.mean() + half), "seeds")


def paired_differences(
    a: dict[int, Sequence[float]], b: dict[int, Sequence[float]]
) -> dict[int, np.ndarray] | None:
    """Per seed that both ran, ``a``'s per-example scores minus ``b``'s on the same examples.

    None when no seed is common or a common seed's scores differ in number (not the same examples).
    """
    common = sorted(set(a) & set(b))
    if not common or any(len(a[s]) != len(b[s]) for s in common):
        return None
    return {s: np.asarray(a[s], dtype=np.float64) - np.asarray(b[s], dtype=np.float64) for s in common}


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float | None:
    """McNemar's exact two-sided p-value for two classifiers scored on the same examples.

    ``a`` and ``b`` are 1.0/0.0 (right/wrong) per example; only the discordant examples (one right,
    the other wrong) carry information, and under no difference each is equally likely to favour
    either, so their split is Binomial(discordant, 1/2). None when a score is not 0 or 1.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) != len(y) or not np.isin(x, (0.0, 1.0)).all() or not np.isin(y, (0.0, 1.0)).all():
        return None
    only_a = int(np.sum((x == 1) & (y == 0)))
    only_b = int(np.sum((x == 0) & (y == 1)))
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    # exact integers: binomial coefficients and 2**n overflow a float past about a thousand examples
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)
    return min(1.0, float(2 * tail))


def _z_sum(power: float = POWER) -> float:
    """z of the two-sided 5% level plus z of the power: the 1.96 + 0.84 of a power calculation."""
    normal = NormalDist()
    return normal.inv_cdf(1 - (1 - LEVEL) / 2) + normal.inv_cdf(power)


def seeds_needed(difference: float, sd_a: float, sd_b: float, power: float = POWER) -> int | None:
    """Seeds per variant for a two-sample test at the 5% level to detect ``difference`` with ``power``.

    The textbook normal-approximation formula ``n = (z_0.975 + z_power)^2 (sd_a^2 + sd_b^2) / d^2``
    with the seed-to-seed standard deviations measured. None when the difference is zero (no
    number of seeds separates equal means) or no spread was measured.
    """
    variance = sd_a**2 + sd_b**2
    if difference == 0 or variance <= 0:
        return None
    return math.ceil(_z_sum(power) ** 2 * variance / difference**2)


def examples_needed(difference: float, sd_paired: float, power: float = POWER) -> int | None:
    """Evaluation examples for a paired test at the 5% level to detect ``difference`` with ``power``.

    ``n = (z_0.975 + z_power)^2 sd^2 / d^2`` with ``sd`` the standard deviation of the per-example
    differences between the two variants (one seed's evaluation). None as for ``seeds_needed``.
    """
    if difference == 0 or sd_paired <= 0:
        return None
    return math.ceil(_z_sum(power) ** 2 * sd_paired**2 / difference**2)


def target_value(final: float, greater_is_better: bool, fraction: float = TARGET_FRACTION) -> float:
    """The score that counts as reaching ``fraction`` of ``final``: 90% of an accuracy of 0.8 is
    0.72; for a metric where lower is better, within 10% above it (a loss of 0.5 gives 0.55)."""
    slack = (1 - fraction) * abs(final)
    return final - slack if greater_is_better else final + slack


def time_to_target(
    evaluations: Sequence[dict[str, Any]],
    metric: str,
    greater_is_better: bool,
    fraction: float = TARGET_FRACTION,
) -> dict[str, Any] | None:
    """Step, tokens and training seconds of the first evaluation that reached ``fraction`` of the final score.

    ``evaluations`` are a run's evaluations in order (``metrics.jsonl`` entries with ``step`` and,
    where recorded, ``tokens`` and ``train_seconds``); the last one holding ``metric`` is the final
    score. None when no evaluation holds the metric.
    """
    scored = [e for e in evaluations if number(e.get(metric)) is not None]
    if not scored:
        return None
    target = target_value(float(scored[-1][metric]), greater_is_better, fraction)
    first = next(
        e for e in scored if (e[metric] >= target if greater_is_better else e[metric] <= target)
    )  # the final evaluation itself always qualifies
    return {
        "target": target,
        "step": first.get("step"),
        "tokens": first.get("tokens"),
        "seconds": first.get("train_seconds"),
    }


def run_cost(seconds: float | None, cost_per_hour: float | None) -> float | None:
    """What ``seconds`` of the machine cost at ``cost_per_hour``; None when either is unknown."""
    if seconds is None or cost_per_hour is None:
        return None
    return cost_per_hour * seconds / 3600.0


def number(value: Any) -> float | None:
    """A finite int/float as float, anything else (None, bool, str, NaN, inf) as None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
