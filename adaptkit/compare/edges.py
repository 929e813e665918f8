"""Telling when tuning stopped at the edge of what it tried: the best value may lie beyond it."""

from __future__ import annotations

import math
from typing import Any

#: Within this share of a search range's width (log width for a log range) counts as its edge.
EDGE_SHARE = 0.1


def sweep_edge(tried: list[float], best: float) -> str | None:
    """A note when the best rate of a sweep is the smallest or largest tried, naming the next rates."""
    rates = sorted(tried)
    if len(rates) < 2 or best not in (rates[0], rates[-1]):
        return None
    if best == rates[-1]:
        ratio = rates[-1] / rates[-2]
        side, following = "largest", [best * ratio, best * ratio**2]
    else:
        ratio = rates[1] / rates[0]
        side, following = "smallest", [best / ratio**2, best / ratio]
    suggestion = ", ".join(f"{r:.3g}" for r in sorted([best, *following]))
    return (
        f"the best learning rate {best:g} is the {side} tried; the best may lie beyond it: try [{suggestion}]"
    )


def search_edge(space: dict[str, Any], best: dict[str, Any]) -> str | None:
    """A note for each searched number whose best value sits at the edge of its range."""
    notes = []
    for key, p in space.items():
        if p.choices is not None or key not in best:
            continue
        scale = math.log if p.log else float
        share = (scale(best[key]) - scale(p.low)) / (scale(p.high) - scale(p.low))
        if share <= EDGE_SHARE or share >= 1 - EDGE_SHARE:
            side = "lower" if share <= EDGE_SHARE else "upper"
            notes.append(
                f"the best {key} {best[key]:.3g} is at the {side} edge of the range searched "
                f"[{p.low:g}, {p.high:g}]; widen the range past it"
            )
    return "; ".join(notes) or None
