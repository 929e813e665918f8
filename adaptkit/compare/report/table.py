"""The comparison table: which columns there are and how each cell is worded, printed as aligned
plain text for the terminal or as a Markdown table; plus the number formatting the cells use."""

from __future__ import annotations

import math
from typing import Any

from adaptkit.compare.report.aggregate import (
    aggregate,
    greater_is_better,
    has_baseline,
    metric_name,
    throughput_key,
)


def humanize_count(n: float | None) -> str:
    """A count as 950, 12.3K, 1.2M or 3.4B; ``-`` for None."""
    if n is None:
        return "-"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:.0f}"


def humanize_bytes(n: float | None) -> str:
    """A size in bytes as 512 B, 3.0 KiB, 1.0 MiB or 2.5 GiB; ``-`` for None."""
    if n is None:
        return "-"
    for div, suffix in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n:.0f} B"


def _decimals(x: float) -> int:
    """Decimals that show about 4 significant digits, at most 4 and at least 0."""
    if x == 0:
        return 4
    return max(0, min(4, 3 - math.floor(math.log10(abs(x)))))


def _fmt(mean: float | None, std: float | None = None, n: int = 1, signed: bool = False) -> str:
    """A mean, with ``± std`` when it comes from several seeds; ``-`` for None."""
    if mean is None:
        return "-"
    d = _decimals(mean)
    text = f"{mean:+.{d}f}" if signed else f"{mean:.{d}f}"
    if n > 1 and std is not None:
        text += f" ± {std:.{d}f}"
    return text


def _fixed(x: float | None, decimals: int) -> str:
    return "-" if x is None else f"{x:.{decimals}f}"


def first_line(text: str) -> str:
    """The first line of an error message: a traceback would not fit in a table cell or a list item."""
    return text.strip().splitlines()[0] if text.strip() else ""


def _status(v: dict) -> str:
    if not v["n_failed"]:
        return "ok"
    error = v["errors"][0]
    first = first_line(error["error"])
    if not v["n_ok"]:
        return f"FAILED: {first}"
    return f"{v['n_failed']} of {v['n_ok'] + v['n_failed']} failed (seed {error['seed']}): {first}"


def table_cells(variants: list[dict]) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, one list of cells per variant and which columns are numeric (right-aligned)."""
    metric = metric_name(variants)
    arrow = "↑" if greater_is_better(variants) else "↓"
    tp = throughput_key(variants)
    columns: list[tuple[str, bool, Any]] = [
        ("variant", False, lambda v: v["variant"]),
        ("strategies", False, lambda v: "+".join(v["strategies"]) or "-"),
        (
            "seeds",
            True,
            lambda v: str(v["n_ok"]) if not v["n_failed"] else f"{v['n_ok']}/{v['n_ok'] + v['n_failed']}",
        ),
        ("trainable", True, _trainable_cell),
        ("peak MB", True, lambda v: _fixed(v["peak_memory_mb_mean"], 0)),
        ("wall s", True, lambda v: _fixed(v["wall_time_s_mean"], 1)),
        (tp.replace("_per_s", "/s"), True, lambda v: _fixed(v[f"{tp}_mean"], 1)),
        (f"{metric} {arrow}", True, lambda v: _fmt(v["final_metric_mean"], v["final_metric_std"], v["n_ok"])),
        (f"best {metric}", True, lambda v: _fmt(v["best_metric_mean"], v["best_metric_std"], v["n_ok"])),
        ("95% interval", True, _interval_cell),
        ("vs best", True, _vs_best_cell),
    ]
    if has_baseline(variants):
        columns.append(("vs none", True, lambda v: _fmt(v["gain_over_none"], signed=True)))
    columns += [
        ("eval loss", True, lambda v: _fmt(v["eval_loss_mean"])),
        ("overfit gap", True, lambda v: _fmt(v["overfit_gap_mean"], signed=True)),
        ("forgetting", True, lambda v: _fmt(v["forgetting_mean"], signed=True)),
        ("saved", True, lambda v: humanize_bytes(v["saved_bytes_mean"])),
        ("status", False, _status),
    ]
    headers = [c[0] for c in columns]
    cells = [[c[2](v) for c in columns] for v in variants]
    return headers, cells, [c[1] for c in columns]


def _interval_cell(v: dict) -> str:
    """``low – high`` of the variant's 95% interval (seeds and evaluation examples); ``-`` without one."""
    ci = v.get("interval")
    if not ci:
        return "-"
    d = _decimals(ci["mean"])
    return f"{ci['low']:.{d}f} – {ci['high']:.{d}f}"


def _vs_best_cell(v: dict) -> str:
    """``best``, or the paired difference from the best with its interval, ``≈`` when within noise."""
    if v.get("is_best"):
        return "best"
    pair = v.get("vs_best")
    if not pair:
        return "-"
    d = _decimals(pair["difference"])
    text = f"{pair['difference']:+.{d}f} [{pair['low']:+.{d}f}, {pair['high']:+.{d}f}]"
    return text if pair["distinguishable"] else text + " ≈"


def target_cells(variants: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """The time-and-cost table: per variant, the mean steps, tokens and training seconds its runs
    needed to reach 90% of their final score, and their cost when the comparison has a price per
    hour; None when no run recorded a time to target."""
    if all(v.get("steps_to_target_mean") is None for v in variants):
        return None
    columns: list[tuple[str, Any]] = [
        ("variant", lambda v: v["variant"]),
        ("steps to 90%", lambda v: _fixed(v.get("steps_to_target_mean"), 0)),
        ("tokens to 90%", lambda v: humanize_count(v.get("tokens_to_target_mean"))),
        ("seconds to 90%", lambda v: _fixed(v.get("seconds_to_target_mean"), 1)),
    ]
    if any(v.get("cost_mean") is not None for v in variants):
        columns += [
            ("cost per run", lambda v: _fixed(v.get("cost_mean"), 4)),
            ("cost to 90%", lambda v: _fixed(v.get("cost_to_target_mean"), 4)),
        ]
    return [c[0] for c in columns], [[c[1](v) for c in columns] for v in variants if v["n_ok"]]


#: The heading of the balanced-checkpoint table in both report pages.
BALANCED_HEADING = "Balanced checkpoints: the best task gain per unit of forgetting"


def balanced_cells(variants: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """The balanced-checkpoint table: per run that measured forgetting at every evaluation, the
    step with the best gain over the untouched model per unit of forgetting; None without one."""
    rows = [(v, b) for v in variants for b in v.get("balanced") or []]
    if not rows:
        return None
    headers = ["variant", "seed", "step", "score", "gain", "forgetting", "gain per forgetting", "checkpoint"]
    cells = [
        [
            v["variant"],
            str(b["seed"]),
            str(b["step"]),
            _fmt(b["score"]),
            _fmt(b["gain"], signed=True),
            _fmt(b["forgetting"], signed=True),
            "none forgotten" if b["gain_per_forgetting"] is None else _fmt(b["gain_per_forgetting"]),
            "kept" if b["checkpoint_kept"] else "not kept",
        ]
        for v, b in rows
    ]
    return headers, cells


def _trainable_cell(v: dict) -> str:
    count = v["trainable_parameters_mean"]
    percent = v["trainable_percent_mean"]
    if percent is None and count is not None and v["total_parameters_mean"]:
        percent = 100 * count / v["total_parameters_mean"]
    if count is None:
        return "-"
    return humanize_count(count) + ("" if percent is None else f" ({percent:.3g}%)")


def format_table(rows: list[dict]) -> str:
    """The comparison as aligned plain text for the terminal: a header, a rule, one line per variant.

    Final and best metric show ``mean ± std`` when a variant has several finished seeds; the
    metric column is named after the task metric with its direction (``accuracy ↑``); a failed
    variant shows ``-`` for its numbers and the first line of its error in ``status``.
    """
    headers, cells, numeric = table_cells(aggregate(rows))
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        parts = [val.rjust(w) if num else val.ljust(w) for val, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def markdown_table(variants: list[dict]) -> str:
    """The table in Markdown, numeric columns right-aligned; ``|`` and line breaks in cells escaped."""
    headers, cells, numeric = table_cells(variants)
    return markdown_grid(headers, cells, numeric)


def markdown_grid(headers: list[str], cells: list[list[str]], numeric: list[bool]) -> str:
    """Any table in Markdown: numeric columns right-aligned, ``|`` and line breaks in cells escaped."""

    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(esc(h) for h in headers) + " |",
        "|" + "|".join("---:" if num else ":---" for num in numeric) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
    return "\n".join(lines)
