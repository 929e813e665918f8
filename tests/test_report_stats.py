"""The statistics behind the comparison report, on synthetic per-example results with known answers:
interval coverage and paired-test error rates in simulation, hand-worked sample sizes and McNemar
p-values, time to target on a hand-made history, and the verdict worded from them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from adaptkit.compare.report.aggregate import aggregate
from adaptkit.compare.report.stats import (
    bootstrap_interval,
    examples_needed,
    mcnemar_exact,
    paired_differences,
    run_cost,
    seed_interval,
    seeds_needed,
    time_to_target,
)
from adaptkit.compare.report.verdict import verdict
from adaptkit.compare.spec import CompareSpec

TRUE_MEAN = 0.6  # the mean of the example difficulties drawn below: uniform on [0.2, 1.0]


def simulate(rng: np.random.Generator, seeds: int, n: int, seed_sd: float, shift: float = 0.0) -> list:
    """One comparison's per-example results: 1.0/0.0 per example per seed.

    Each example has its own chance of being right (uniform on [0.2, 1.0], shared by every seed:
    the same validation split), each seed moves every chance by its own normal offset (the seed
    effect), and ``shift`` moves them all (a planted difference).
    """
    p = rng.uniform(0.2, 1.0, n)
    return [
        (rng.random(n) < np.clip(p + shift + d, 0, 1)).astype(float) for d in rng.normal(0, seed_sd, seeds)
    ]


def paired_pair(rng: np.random.Generator, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Two variants on the same examples (one seed): ``b``'s chances are ``a``'s plus ``shift``."""
    p = rng.uniform(0.2, 0.8, n)
    a = (rng.random(n) < p).astype(float)
    b = (rng.random(n) < p + shift).astype(float)
    return a, b


# -- the interval ----------------------------------------------------------------------------


@pytest.mark.parametrize("seeds, seed_sd", [(1, 0.0), (5, 0.03)])
def test_bootstrap_interval_covers_the_true_mean_about_95_percent(seeds, seed_sd):
    """200 simulated comparisons: the 95% interval should hold the true mean in about 95% of them.

    Tolerance: with 200 datasets the observed coverage has a standard error of
    sqrt(0.95 * 0.05 / 200) = 0.015. The method itself, run on 2,000 datasets of this kind when
    this test was written, covered 95-97% (a two-stage bootstrap leans conservative: the
    shrinkage of the seed means is truncated at zero). [0.91, 0.995] is that band widened by
    about 2.5 standard errors each side. An interval that ignored the examples (one seed: zero
    width) fails it outright; one that ignored the seeds is caught by the next test, where the
    seed effect is large enough to matter.
    """
    rng = np.random.default_rng(1234 + seeds)
    covered, widths = 0, []
    for k in range(200):
        groups = simulate(rng, seeds, 200, seed_sd)
        ci = bootstrap_interval(groups, shared=True, seed=k)
        assert ci.low <= ci.mean <= ci.high
        covered += ci.low <= TRUE_MEAN <= ci.high
        widths.append(ci.high - ci.low)
    assert 0.91 <= covered / 200 <= 0.995, covered / 200
    # and not by being uselessly wide: one seed of 200 binary examples gives about 2 x 1.96 x 0.035
    assert np.mean(widths) < (0.16 if seeds == 1 else 0.12)


def test_interval_ignoring_the_seed_spread_would_undercover():
    """A large seed effect (sd 0.06 over 10 seeds): pooling every seed's examples as if they were
    one evaluation misses most of the uncertainty (expected coverage about 55%), while resampling
    the seeds too keeps it near the nominal level (about 92%: ten seeds' spread is itself noisy)."""
    rng = np.random.default_rng(7)
    naive = full = 0
    for k in range(200):
        groups = simulate(rng, 10, 200, 0.06)
        pooled = bootstrap_interval([np.concatenate(groups)], shared=True, seed=k)
        naive += pooled.low <= TRUE_MEAN <= pooled.high
        ci = bootstrap_interval(groups, shared=True, seed=k)
        full += ci.low <= TRUE_MEAN <= ci.high
    assert naive / 200 < 0.7 and full / 200 > 0.86, (naive, full)


def test_bootstrap_is_seeded_and_handles_one_seed_and_different_example_sets():
    groups = [np.array([1.0, 0.0, 1.0, 1.0]), np.array([1.0, 1.0, 0.0, 1.0, 1.0])]
    a = bootstrap_interval(groups, shared=False, seed=3)
    assert a == bootstrap_interval(groups, shared=False, seed=3)  # same seed, same interval
    assert a.mean == pytest.approx((0.75 + 0.8) / 2) and a.method == "examples and seeds"
    one = bootstrap_interval([[1.0] * 10], shared=True)
    assert (one.low, one.high, one.method) == (1.0, 1.0, "examples")
    assert bootstrap_interval([], shared=True) is None
    with pytest.raises(ValueError):
        bootstrap_interval(groups, shared=True)


def test_seed_interval_is_a_hand_worked_t_interval():
    ci = seed_interval([0.8, 0.9])  # mean 0.85, sd 0.0707, t(1) = 12.706
    half = 12.706 * math.sqrt(0.005) / math.sqrt(2)
    assert (ci.mean, ci.low, ci.high) == pytest.approx((0.85, 0.85 - half, 0.85 + half))
    assert seed_interval([0.8]) is None


# -- paired comparisons ----------------------------------------------------------------------


def test_paired_test_finds_a_planted_difference():
    rng = np.random.default_rng(5)
    a, b = paired_pair(rng, 1000, 0.08)
    diff = paired_differences({0: b}, {0: a})
    ci = bootstrap_interval(list(diff.values()), shared=True)
    assert ci.excludes_zero and ci.low > 0
    assert ci.low < 0.08 < ci.high  # and the interval holds the planted difference
    assert mcnemar_exact(b, a) < 0.05  # the exact test agrees at the same 5% level


def test_paired_tests_false_positive_rate_is_near_five_percent():
    """No difference planted: the paired bootstrap and McNemar call about 5% of 200 pairs different.

    Tolerance: the count of false alarms is Binomial(200, 0.05), mean 10, sd 3.1; [2, 20] is about
    +-3 sd, and a test that ignored the pairing would be far below (too wide) and one that
    ignored the example noise far above.
    """
    rng = np.random.default_rng(11)
    boot = mcnemar = 0
    for k in range(200):
        a, b = paired_pair(rng, 300, 0.0)
        ci = bootstrap_interval([b - a], shared=True, seed=k)
        boot += ci.excludes_zero
        mcnemar += mcnemar_exact(b, a) < 0.05
    assert 2 <= boot <= 20, boot
    assert 1 <= mcnemar <= 20, mcnemar  # exact: at most 5%, a little under on average


def test_mcnemar_exact_hand_worked():
    # 1 example only a got right, 9 only b: p = 2 (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    a = [1.0] * 1 + [0.0] * 9 + [1.0] * 20 + [0.0] * 5
    b = [0.0] * 1 + [1.0] * 9 + [1.0] * 20 + [0.0] * 5
    assert mcnemar_exact(a, b) == pytest.approx(22 / 1024)
    assert mcnemar_exact(a, a) == 1.0  # no discordant example
    assert mcnemar_exact([0.5, 1.0], [1.0, 1.0]) is None  # not right/wrong scores


def test_mcnemar_exact_on_thousands_of_discordant_examples():
    """Two seeds of SST-2's 872 validation sentences pooled: the binomial counts outgrow a float."""
    a = [1.0] * 900 + [0.0] * 1100
    b = [0.0] * 900 + [1.0] * 1100
    p = mcnemar_exact(a, b)  # 900 of 2000 discordant examples favour a: z = 4.5
    assert 0 < p < 1e-4
    even_a, even_b = [1.0] * 1000 + [0.0] * 1000, [0.0] * 1000 + [1.0] * 1000
    assert mcnemar_exact(even_a, even_b) == pytest.approx(1.0)  # 1000 against 1000: no sign of a difference


def test_paired_differences_need_the_same_examples():
    assert paired_differences({0: [1, 0], 1: [1, 1]}, {1: [0, 1], 2: [1, 1]})[1].tolist() == [1.0, 0.0]
    assert paired_differences({0: [1, 0]}, {0: [1, 0, 1]}) is None
    assert paired_differences({0: [1.0]}, {1: [1.0]}) is None


# -- sample sizes, time and cost -------------------------------------------------------------


def test_seeds_and_examples_needed_hand_worked():
    # (z_0.975 + z_0.8)^2 = (1.959964 + 0.841621)^2 = 7.848879
    # seeds: 7.848879 * (0.01^2 + 0.01^2) / 0.01^2 = 15.70 -> 16 seeds per variant
    assert seeds_needed(0.01, 0.01, 0.01) == 16
    assert seeds_needed(-0.01, 0.01, 0.01) == 16  # the sign of the difference does not matter
    # examples: 7.848879 * 0.3^2 / 0.01^2 = 7063.99 -> 7064
    assert examples_needed(0.01, 0.3) == 7064
    # a difference of zero, or no spread, has no answer
    assert seeds_needed(0.0, 0.01, 0.01) is None and examples_needed(0.01, 0.0) is None


def test_time_to_target_on_a_hand_made_history():
    history = [
        {"step": 0, "tokens": 0, "train_seconds": 0.0, "eval_loss": 1.0, "accuracy": 0.5},
        {"step": 10, "loss": 0.9},  # a training log line: no metric
        {"step": 10, "tokens": 640, "train_seconds": 2.5, "eval_loss": 0.6, "accuracy": 0.7},
        {"step": 20, "tokens": 1280, "train_seconds": 5.0, "eval_loss": 0.52, "accuracy": 0.75},
        {"step": 30, "tokens": 1920, "train_seconds": 7.5, "eval_loss": 0.45, "accuracy": 0.85},
        {"step": 40, "tokens": 2560, "train_seconds": 10.0, "eval_loss": 0.5, "accuracy": 0.8},
    ]
    # final accuracy 0.8: the target is 0.72; 0.7 at step 10 falls short, 0.75 at step 20 reaches it
    got = time_to_target(history, "accuracy", True)
    assert got == {"target": pytest.approx(0.72), "step": 20, "tokens": 1280, "seconds": 5.0}
    # lower is better: final loss 0.5, target 0.55: 0.52 at step 20 is the first within it
    assert time_to_target(history, "eval_loss", False)["step"] == 20
    assert time_to_target(history, "macro_f1", True) is None
    assert run_cost(5400.0, 2.0) == 3.0 and run_cost(None, 2.0) is None and run_cost(10.0, None) is None


def test_cost_per_hour_is_validated():
    assert CompareSpec(variants=[{"name": "a"}], cost_per_hour=2.5).cost_per_hour == 2.5
    assert CompareSpec(variants=[{"name": "a"}]).cost_per_hour is None
    for bad in (-1, float("inf"), "cheap"):
        with pytest.raises(ValidationError):
            CompareSpec(variants=[{"name": "a"}], cost_per_hour=bad)


# -- the verdict -----------------------------------------------------------------------------


def row(variant: str, seed: int, scores: np.ndarray) -> dict:
    """A finished run whose final accuracy is the mean of its per-example scores."""
    return {
        "variant": variant,
        "seed": seed,
        "status": "finished",
        "metric": "accuracy",
        "greater_is_better": True,
        "trainable_parameters": 1000,
        "final_metric": float(scores.mean()),
        "examples": {"scores": scores.tolist(), "keys": None},
    }


def test_verdict_and_intervals_on_runs_with_known_differences():
    """lora and adapters share the same chances; freeze is 0.25 behind: two tied, one clearly behind."""
    rng = np.random.default_rng(3)
    p = rng.uniform(0.3, 0.7, 400)
    rows = []
    for seed in (0, 1, 2):
        for name, shift in (("lora", 0.0), ("adapters", 0.0), ("freeze", -0.25)):
            rows.append(row(name, seed, (rng.random(400) < p + shift).astype(float)))
    variants = {v["variant"]: v for v in aggregate(rows)}
    for v in variants.values():
        ci = v["interval"]
        assert ci["method"] == "examples and seeds"
        assert ci["low"] < v["final_metric_mean"] < ci["high"]
        assert ci["mean"] == pytest.approx(v["final_metric_mean"])
    best = next(v for v in variants.values() if v["is_best"])
    tied = variants["adapters" if best["variant"] == "lora" else "lora"]
    assert not tied["vs_best"]["distinguishable"] and tied["vs_best"]["low"] < 0 < tied["vs_best"]["high"]
    freeze = variants["freeze"]["vs_best"]
    assert freeze["distinguishable"] and freeze["high"] < -0.15 and freeze["mcnemar_p"] < 1e-6
    assert freeze["difference"] == pytest.approx(
        variants["freeze"]["final_metric_mean"] - best["final_metric_mean"]
    )
    # the runner-up carries the sample sizes that would separate it from the best
    assert tied["vs_best"]["examples_needed"] > 400 and tied["vs_best"]["seeds_needed"] >= 1
    words = verdict(list(variants.values()))
    assert words[0].startswith(f"{best['variant']} and {tied['variant']} are indistinguishable here")
    assert words[1] == f"freeze is clearly behind {best['variant']}."
    assert "seeds per variant" in words[2] and "evaluation examples" in words[2]


def test_verdict_without_per_example_scores_or_with_one_variant():
    one = [{"variant": "a", "seed": 0, "status": "finished", "final_metric": 0.5, "metric": "accuracy"}]
    assert verdict(aggregate(one)) == ["Only a finished (accuracy 0.5000): nothing to compare it with."]
    two = [*one, {**one[0], "variant": "b", "final_metric": 0.7}]
    words = verdict(aggregate(two))  # one seed each, no per-example scores: no interval at all
    assert words[0] == "b is best (accuracy 0.7000)." and "cannot be told apart" in words[1]
    # two seeds each without per-example scores: a t interval over the paired seeds
    seeds = [
        {**one[0], "variant": v, "seed": s, "final_metric": m}
        for v, s, m in (("a", 0, 0.5), ("a", 1, 0.52), ("b", 0, 0.8), ("b", 1, 0.81))
    ]
    by = {v["variant"]: v for v in aggregate(seeds)}
    assert by["a"]["interval"]["method"] == "seeds" and by["a"]["vs_best"]["method"] == "seeds"
    # differences 0.3 and 0.29: mean 0.295, sd 0.00707, t(1) half-width 12.706 x 0.005 = 0.0635
    assert by["a"]["vs_best"]["difference"] == pytest.approx(-0.295)
    assert by["a"]["vs_best"]["high"] == pytest.approx(-0.295 + 12.706 * 0.005, rel=1e-3)
    assert verdict(list(by.values()))[1] == "a is clearly behind b."
    assert verdict(aggregate([])) == ["No variant finished, so there is nothing to compare."]


# -- balanced checkpoints ----------------------------------------------------------------------


def test_balanced_checkpoint_is_the_best_gain_per_unit_of_forgetting():
    from adaptkit.compare.report.balanced import balanced_step

    history = [
        {"step": 10, "score": 0.55, "forgetting": 0.10},  # gain 0.05: 0.5 per unit
        {"step": 20, "score": 0.70, "forgetting": 0.05},  # gain 0.20: 4.0 per unit (the best)
        {"step": 30, "score": 0.80, "forgetting": 0.30},  # gain 0.30: 1.0 per unit (the final)
        {"step": 40, "score": 0.45, "forgetting": 0.00},  # no gain: never chosen
    ]
    found = balanced_step(history, reference=0.5, greater_is_better=True)
    assert found["step"] == 20 and found["gain"] == pytest.approx(0.2)
    assert found["gain_per_forgetting"] == pytest.approx(4.0)
    # an evaluation that forgot nothing and gained beats every ratio
    calm = [*history, {"step": 50, "score": 0.52, "forgetting": -0.01}]
    assert balanced_step(calm, 0.5, True)["step"] == 50
    assert balanced_step(calm, 0.5, True)["gain_per_forgetting"] is None
    # a loss: lower is better, gain is the reference minus the score
    losses = [{"step": 1, "score": 1.8, "forgetting": 0.2}, {"step": 2, "score": 1.2, "forgetting": 0.2}]
    assert balanced_step(losses, 2.0, greater_is_better=False)["step"] == 2
    assert balanced_step(history[3:], 0.5, True) is None  # nothing gained


def test_the_report_names_each_runs_balanced_checkpoint(tmp_path):
    from adaptkit.compare.report.write import write_report_files

    def row(variant, seed, final, history, kept):
        return {
            "variant": variant,
            "seed": seed,
            "status": "finished",
            "strategies": [variant],
            "trainable_parameters": 10,
            "total_parameters": 100,
            "metric": "accuracy",
            "greater_is_better": True,
            "final_metric": final,
            "run_dir": f"runs/{variant}-s{seed}",
            "forgetting_history": history,
            "checkpoint_steps": kept,
        }

    lora = [{"step": 10, "score": 0.7, "forgetting": 0.02}, {"step": 20, "score": 0.8, "forgetting": 0.2}]
    rows = [row("none", 0, 0.5, [], []), row("lora", 0, 0.8, lora, [10, 20]), row("full", 0, 0.8, lora, [20])]
    variants = aggregate(rows)
    by_name = {v["variant"]: v for v in variants}
    assert [b["step"] for b in by_name["lora"]["balanced"]] == [10]  # 10 per unit against 1.5
    assert (
        by_name["lora"]["balanced"][0]["checkpoint_kept"]
        and not by_name["full"]["balanced"][0]["checkpoint_kept"]
    )
    assert by_name["none"]["balanced"] == []
    write_report_files(tmp_path, rows, "t", {})
    md = (tmp_path / "report.md").read_text()
    assert "## Balanced checkpoints" in md
    assert "| lora | 0 | 10 |" in md and "| kept |" in md and "| not kept |" in md
    assert "Balanced checkpoints" in (tmp_path / "report.html").read_text()


def test_variants_off_the_front_within_noise_of_a_front_variant_are_marked():
    """B has ten times A's parameters and one answer fewer right on the same 200 examples: beaten
    on both axes, but not by a margin the runs can show; C is clearly behind. A is on the front."""
    rng = np.random.default_rng(0)
    a = (rng.random(200) < 0.8).astype(float)
    b = a.copy()
    b[np.flatnonzero(a)[0]] = 0.0  # one answer fewer right
    c = (rng.random(200) < 0.3).astype(float)

    def row(variant, params, scores):
        return {
            "variant": variant,
            "seed": 0,
            "status": "finished",
            "strategies": [variant],
            "trainable_parameters": params,
            "total_parameters": 1000,
            "metric": "accuracy",
            "greater_is_better": True,
            "final_metric": float(scores.mean()),
            "examples": {"scores": scores.tolist(), "index": list(range(200)), "keys": None},
        }

    variants = {v["variant"]: v for v in aggregate([row("A", 10, a), row("B", 100, b), row("C", 100, c)])}
    assert variants["A"]["pareto"] and not variants["B"]["pareto"] and not variants["C"]["pareto"]
    assert variants["B"]["within_noise_of_front"] == "A"
    assert variants["C"]["within_noise_of_front"] is None
    assert variants["A"]["within_noise_of_front"] is None
