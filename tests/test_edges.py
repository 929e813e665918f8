"""Tuning that stops at the edge of what it tried says so, and names the next range."""

from adaptkit.compare.edges import search_edge, sweep_edge
from adaptkit.compare.spec import SearchParam


def test_a_sweep_whose_best_rate_is_at_either_end_names_the_next_rates():
    assert sweep_edge([1e-4, 1e-3, 1e-2], 1e-3) is None
    high = sweep_edge([1e-4, 1e-3, 1e-2], 1e-2)
    assert "the best learning rate 0.01 is the largest tried" in high and "try [0.01, 0.1, 1]" in high
    low = sweep_edge([3e-4, 1e-3, 3e-3], 3e-4)
    assert "is the smallest tried" in low and "try [2.7e-05, 9e-05, 0.0003]" in low  # steps of 3.33 down
    assert sweep_edge([1e-3], 1e-3) is None  # one rate: no edge to speak of


def test_a_search_whose_best_value_is_near_a_bound_says_which_and_where():
    space = {
        "train.lr": SearchParam(low=1e-5, high=1e-1, log=True),
        "train.weight_decay": SearchParam(low=0.0, high=0.1),
        "strategies.0.r": SearchParam(choices=[4, 8]),
    }
    assert search_edge(space, {"train.lr": 1e-3, "train.weight_decay": 0.05, "strategies.0.r": 4}) is None
    note = search_edge(space, {"train.lr": 0.08, "train.weight_decay": 0.005})
    assert "the best train.lr 0.08 is at the upper edge of the range searched [1e-05, 0.1]" in note
    assert "the best train.weight_decay 0.005 is at the lower edge" in note
