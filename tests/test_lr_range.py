"""The learning-rate range test: its schedule, its rule on curves whose best rate is known, and a
comparison that picks each variant's rate by itself."""

from __future__ import annotations

import json
import math

import pytest

# reuse the comparison fixtures: a tiny BERT and a separable data set
from test_compare import compare_cli, comparison, workdir  # noqa: F401

from adaptkit.compare.lr_range import choose, edge_note, range_to_test, rate_at


def u_curve(best: float, low: float = 1e-6, high: float = 1.0, steps: int = 40) -> list[tuple[float, float]]:
    """A loss against the rate that falls until ``best`` and blows up past it, as real tests do."""
    points = []
    for i in range(steps):
        lr = low * (high / low) ** (i / (steps - 1))
        x = math.log10(lr / best)
        points.append((lr, 1.0 + 0.1 * x * x if x <= 0 else 1.0 + 10 * x**3))
    return points


@pytest.mark.parametrize("best", [1e-4, 3e-3, 1e-1])
def test_the_rule_takes_a_third_of_the_rate_where_the_loss_bottoms_out(best):
    chosen = choose(u_curve(best))
    # the smoothing lags a step or two behind the raw curve (each step multiplies the rate by 1.42)
    assert best / 3 / 1.5 <= chosen <= best / 3 * 2
    assert chosen < best  # on the descending side
    assert edge_note(u_curve(best)) is None


def test_the_rule_stops_at_divergence_and_at_the_first_non_finite_loss():
    points = u_curve(1e-3)
    spiked = points[:30] + [(points[30][0], math.nan)] + [(lr, 0.0) for lr, _ in points[31:]]
    assert choose(spiked) == choose(points)  # nothing after the NaN counts, not even a loss of 0
    assert choose([(1e-3, math.inf)]) is None


def test_a_test_whose_loss_never_turned_says_where_to_look_next():
    falling = [(lr, 2.0 - i / 40) for i, (lr, _) in enumerate(u_curve(1.0))]
    assert "the loss still fell at the highest rate tried (1)" in edge_note(falling)
    rising = [(lr, 1.0 + i) for i, (lr, _) in enumerate(u_curve(1.0))]
    assert "the loss rose from the lowest rate tried (1e-06)" in edge_note(rising)


def test_the_range_tried_widens_the_declared_one_and_the_schedule_is_geometric():
    import torch

    from adaptkit.recipe.schema import TrainSpec
    from adaptkit.train.optim import build_scheduler

    assert range_to_test((1e-4, 3e-3)) == (1e-5, 3e-2)
    weight, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [weight], "lr": 1e-2}, {"params": [head], "lr": 1e-1}])
    spec = TrainSpec(scheduler="range_test", lr=1e-1, lr_low=1e-5)
    scheduler = build_scheduler(optimizer, spec, total_steps=5)
    seen = []
    for _ in range(5):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for step, (w, h) in enumerate(seen, start=1):
        assert h == pytest.approx(rate_at(step, 1e-5, 1e-1, 5))  # 1e-5, 1e-4, ..., 1e-1
        assert w == pytest.approx(h / 10)  # every group scaled alike: discriminative rates survive
    with pytest.raises(ValueError, match="lr_low"):
        TrainSpec(scheduler="range_test", lr=1e-3, lr_low=1e-2)


@pytest.mark.slow
def test_a_comparison_picks_a_rate_per_variant_that_names_none(workdir):  # noqa: F811
    path = comparison(
        workdir,
        "auto",
        """
  variants:
    - {name: probe, strategies: [{name: freeze}]}
    - {name: lora, strategies: [{name: lora, r: 4}]}
    - {name: own, strategies: [{name: freeze}], overrides: {train.lr: 1.0e-2}}
""",
        train="max_steps: 8, lr: 1.0e-5, micro_batch_size: 16",
    )
    proc = compare_cli("compare", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = workdir / "out" / "auto"
    tuning = json.loads((root / "comparison.json").read_text())["tuning"]
    assert set(tuning) == {"probe", "lora"}  # 'own' names its rate: no test
    for name, declared in (("probe", (1e-3, 1e-1)), ("lora", (1e-4, 3e-3))):
        t = tuning[name]
        assert (
            t["method"] == "range_test" and t["steps"] == 40 and t["tried"] == list(range_to_test(declared))
        )
        lr = t["chosen"]["train.lr"]
        assert t["tried"][0] <= lr <= t["tried"][1] and lr != 1.0e-5  # not the base recipe's rate
        used = (root / "runs" / f"{name}-s0" / "recipe.yaml").read_text()
        assert f"lr: {lr}" in used
        rates = [r for r, _ in t["curve"]]
        assert all(b > a for a, b in zip(rates, rates[1:]))
    report = (root / "report.md").read_text()
    assert (
        "range test: 40 steps over [0.0001, 1]" in report
        and (root / "plots" / "lr_range_tests.png").is_file()
    )
    again = compare_cli("compare", str(path))  # the tests and choices are reused, nothing trains
    assert again.returncode == 0 and "[1/" not in again.stderr
