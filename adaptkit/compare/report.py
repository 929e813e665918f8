"""The strategy comparison report: aggregate runs per variant, print a table, write files and plots.

Input is one plain dict per (variant, seed) run, as ``adaptkit compare`` records it (see
``aggregate``). Every number may be missing or None, and a variant may have failed on every seed:
the report then prints ``-`` and leaves the variant out of the plots, but never crashes.

Outputs of ``write_report``: ``results.json``, ``results.csv``, ``report.md``, ``plots/*.png`` and
``report.html``, one self-contained page (inline CSS, plots embedded as data URIs) that opens offline.
matplotlib is imported only while plots are drawn, so importing this module stays cheap.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import statistics
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Numeric columns of a run, averaged over the finished seeds of a variant.
NUMERIC_COLUMNS = (
    "trainable_parameters",
    "total_parameters",
    "trainable_percent",
    "peak_memory_mb",
    "wall_time_s",
    "samples_per_s",
    "tokens_per_s",
    "final_metric",
    "best_metric",
    "eval_loss",
    "train_loss",
    "overfit_gap",
    "forgetting",
    "saved_bytes",
)
# Columns of results.csv, in order; keys a row has beyond these are appended after them.
CSV_COLUMNS = (
    "variant",
    "seed",
    "status",
    "error",
    "strategies",
    *NUMERIC_COLUMNS,
    "metric",
    "greater_is_better",
    "memory_kind",
    "forgetting_measure",
    "run_dir",
)
BASELINE = "none"  # the variant that evaluates the pretrained model untouched
PLOT_NAMES = ("loss_curves", "metric_vs_params", "memory_throughput", "forgetting_vs_gain")
_SKIPPED_FORGETTING = "Forgetting vs gain plot skipped: no finished variant has a forgetting measurement."


def _number(value: Any) -> float | None:
    """A finite int/float as float, anything else (None, bool, str, NaN, inf) as None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _finished(row: dict) -> bool:
    return row.get("status") == "finished"


def _first(rows: Iterable[dict], key: str) -> Any:
    """The first non-None value of ``key`` among ``rows``."""
    return next((r[key] for r in rows if r.get(key) is not None), None)


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` (params, score; both lower-is-better) is at least as good as ``b`` on both and better on one."""
    return a[0] <= b[0] and a[1] <= b[1] and a != b


def _no_error(row: dict) -> str:
    return f"status {row['status']!r}, no error recorded" if row.get("status") else "no status recorded"


def _strategy_names(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(s) for s in value]
    return [] if value is None else [str(value)]


def aggregate(rows: list[dict]) -> list[dict]:
    """Summarise runs per variant, in the order variants first appear.

    Each dict holds ``variant``, ``strategies``, ``seeds`` (every seed, failed ones included),
    ``n_ok`` / ``n_failed``, ``errors`` (``{"seed", "error"}`` per failed seed), the metric's
    ``metric`` name, ``greater_is_better``, ``memory_kind`` and ``forgetting_measure``, and for
    each column of ``NUMERIC_COLUMNS`` its ``<column>_mean`` and ``<column>_std`` over the
    finished seeds that have a value (sample standard deviation; 0.0 for one value; None for none).

    ``gain_over_none`` is the mean ``final_metric`` minus that of the ``none`` variant (the raw
    difference: negative is an improvement when lower is better), None without a ``none`` result.
    ``pareto`` is True for a variant on the Pareto front of mean final metric (in the direction of
    ``greater_is_better``) against mean trainable parameters (fewer is better): no other variant
    is at least as good on both and better on one.
    """
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get("variant") or "?"), []).append(row)

    variants = []
    for name, runs in groups.items():
        ok = [r for r in runs if _finished(r)]
        failed = [r for r in runs if not _finished(r)]
        info_rows = ok or runs  # describe the variant from a finished run where there is one
        agg: dict[str, Any] = {
            "variant": name,
            "strategies": _strategy_names(_first(info_rows, "strategies")),
            "seeds": [r.get("seed") for r in runs],
            "n_ok": len(ok),
            "n_failed": len(failed),
            "errors": [{"seed": r.get("seed"), "error": str(r.get("error") or _no_error(r))} for r in failed],
            "metric": _first(info_rows, "metric"),
            "greater_is_better": _first(info_rows, "greater_is_better"),
            "memory_kind": _first(info_rows, "memory_kind"),
            "forgetting_measure": _first(info_rows, "forgetting_measure"),
        }
        for col in NUMERIC_COLUMNS:
            values = [v for v in (_number(r.get(col)) for r in ok) if v is not None]
            agg[f"{col}_mean"] = statistics.fmean(values) if values else None
            agg[f"{col}_std"] = (statistics.stdev(values) if len(values) > 1 else 0.0) if values else None
        variants.append(agg)

    base = next((v["final_metric_mean"] for v in variants if v["variant"] == BASELINE), None)
    higher = _greater_is_better(variants)
    points = {}
    for v in variants:
        metric = v["final_metric_mean"]
        v["gain_over_none"] = metric - base if metric is not None and base is not None else None
        if metric is not None and v["trainable_parameters_mean"] is not None:
            points[v["variant"]] = (v["trainable_parameters_mean"], -metric if higher else metric)
    for v in variants:
        p = points.get(v["variant"])
        v["pareto"] = p is not None and not any(_dominates(q, p) for q in points.values())
    return variants


def _greater_is_better(variants: list[dict]) -> bool:
    """The metric direction of the comparison (the first variant that states one; higher by default)."""
    value = _first(variants, "greater_is_better")
    return True if value is None else bool(value)


def _has_baseline(variants: list[dict]) -> bool:
    """Whether the untouched model was measured, so that gains over it exist."""
    return any(v["variant"] == BASELINE and v["final_metric_mean"] is not None for v in variants)


def _metric_name(variants: list[dict]) -> str:
    return str(_first(variants, "metric") or "metric")


# ---------------------------------------------------------------- formatting


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


def _throughput_key(variants: list[dict]) -> str:
    """tokens/s when every variant with a throughput measured it (one unit per column), else samples/s.

    Variants that measured no throughput at all (``none`` trains no step) do not decide the unit.
    """
    measured = [
        v for v in variants if v["tokens_per_s_mean"] is not None or v["samples_per_s_mean"] is not None
    ]
    if measured and all(v["tokens_per_s_mean"] is not None for v in measured):
        return "tokens_per_s"
    return "samples_per_s"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _status(v: dict) -> str:
    if not v["n_failed"]:
        return "ok"
    error = v["errors"][0]
    first = _first_line(error["error"])
    if not v["n_ok"]:
        return f"FAILED: {first}"
    return f"{v['n_failed']} of {v['n_ok'] + v['n_failed']} failed (seed {error['seed']}): {first}"


def _table(variants: list[dict]) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, one list of cells per variant and which columns are numeric (right-aligned)."""
    metric = _metric_name(variants)
    arrow = "↑" if _greater_is_better(variants) else "↓"
    tp = _throughput_key(variants)
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
    ]
    if _has_baseline(variants):
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
    headers, cells, numeric = _table(aggregate(rows))
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        parts = [val.rjust(w) if num else val.ljust(w) for val, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _markdown_table(variants: list[dict]) -> str:
    headers, cells, numeric = _table(variants)

    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(esc(h) for h in headers) + " |",
        "|" + "|".join("---:" if num else ":---" for num in numeric) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
    return "\n".join(lines)


_MEMORY_KINDS = {
    "cpu_rss": (
        "CPU RSS",
        "the peak resident set size of the variant's process on the CPU "
        "(includes Python, the libraries and the data)",
    ),
    "gpu_allocated": (
        "GPU allocated",
        "the peak GPU memory torch allocated (torch.cuda.max_memory_allocated; "
        "without the CUDA context and the allocator's cache)",
    ),
}


def _notes(variants: list[dict]) -> list[str]:
    """How each column is measured, worded from what the runs recorded."""
    metric = _metric_name(variants)
    direction = "higher" if _greater_is_better(variants) else "lower"
    kinds = sorted({v["memory_kind"] for v in variants if v["memory_kind"]})
    memory = (
        "; ".join(
            f"{_MEMORY_KINDS[k][0]} runs: {_MEMORY_KINDS[k][1]}" if len(kinds) > 1 else _MEMORY_KINDS[k][1]
            for k in kinds
            if k in _MEMORY_KINDS
        )
        or "peak memory of the variant's process"
    )
    measures = sorted({v["forgetting_measure"] for v in variants if v["forgetting_measure"]})
    unit = "tokens" if _throughput_key(variants) == "tokens_per_s" else "samples"
    return [
        "Each variant ran once per seed; numbers are means over its finished seeds, "
        "with ± the sample standard deviation where there are several.",
        "trainable: parameters that receive gradient updates, and their share of all parameters.",
        f"peak MB: {memory}.",
        f"wall s: wall-clock time of the variant's training loop (evaluations during training included; loading and the final evaluation not); {unit}/s: {unit} trained on per second.",
        f"{metric}: the task metric on the validation split at the end of training ({direction} is better); "
        f"best {metric}: the best value over all evaluations.",
        *(
            [f"vs none: mean final {metric} minus that of the untouched pretrained model (variant 'none')."]
            if _has_baseline(variants)
            else []
        ),
        "eval loss: validation loss at the end; overfit gap: eval loss minus training loss "
        "(positive: the model fits its training data better than unseen data).",
        "forgetting: change of loss on general text against the untouched base model; positive means "
        "the variant forgot some of what the base model knew"
        + (f" (measured as: {'; '.join(measures)})." if measures else "."),
        "saved: size on disk of what the variant saves (an adapter, a head, or all weights).",
    ]


# ---------------------------------------------------------------- plots

_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # no Software tag: keeps the files byte-stable and free of any URL
    fig.savefig(buf, format="png", dpi=150, metadata={"Software": None})
    return buf.getvalue()


def _label_points(ax: Any, points: list[tuple[str, float, float, str]]) -> None:
    """Name each point; alternate above/below so neighbours' labels do not sit on each other,
    on a light backing so a line running under a label does not strike it through."""
    for i, (name, x, y, colour) in enumerate(points):
        ax.annotate(
            name,
            (x, y),
            xytext=(7, 7 if i % 2 == 0 else -13),
            textcoords="offset points",
            fontsize=9,
            color=colour,
            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
        )


def _plot_loss_curves(fig: Any, ok: list[dict], runs: list[dict], colour: dict[str, str]) -> None:
    from matplotlib.lines import Line2D

    ax = fig.add_subplot()
    handles = []
    for v in ok:
        finished = [r for r in runs if str(r.get("variant") or "?") == v["variant"] and _finished(r)]
        run = next((r for r in finished if r.get("seed") == 0), finished[0])
        curves = run.get("curves") if isinstance(run.get("curves"), dict) else {}
        drawn = False
        for split, style in (("train", "-"), ("eval", "--")):
            points = [
                (_number(p[0]), _number(p[1]))
                for p in curves.get(split) or []
                if isinstance(p, (list, tuple)) and len(p) == 2
            ]
            points = [(x, y) for x, y in points if x is not None and y is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(
                    xs,
                    ys,
                    linestyle=style,
                    marker="o" if len(points) == 1 else None,
                    color=colour[v["variant"]],
                )
                drawn = True
        if drawn:
            handles.append(
                Line2D([], [], color=colour[v["variant"]], label=f"{v['variant']} (seed {run.get('seed')})")
            )
    ax.set(title="Loss: training (solid), validation (dashed)", xlabel="optimizer step", ylabel="loss")
    ax.grid(alpha=0.3)
    if handles:
        handles += [
            Line2D([], [], color="black", label="train"),
            Line2D([], [], color="black", linestyle="--", label="eval"),
        ]
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    else:
        ax.text(0.5, 0.5, "no loss curves recorded", ha="center", va="center", transform=ax.transAxes)


def _plot_metric_vs_params(
    fig: Any, ok: list[dict], colour: dict[str, str], metric: str, higher: bool
) -> None:
    ax = fig.add_subplot()
    scored = [
        v for v in ok if v["final_metric_mean"] is not None and v["trainable_parameters_mean"] is not None
    ]
    on_log = sorted(
        (v for v in scored if v["trainable_parameters_mean"] > 0),
        key=lambda v: v["trainable_parameters_mean"],
    )
    for v in on_log:
        ax.errorbar(
            [v["trainable_parameters_mean"]],
            [v["final_metric_mean"]],
            yerr=[v["final_metric_std"] or 0.0],
            fmt="o",
            color=colour[v["variant"]],
            capsize=4,
            markersize=6,
            zorder=3,
        )
    _label_points(
        ax,
        [
            (v["variant"], v["trainable_parameters_mean"], v["final_metric_mean"], colour[v["variant"]])
            for v in on_log
        ],
    )
    front = [v for v in on_log if v["pareto"]]
    if front:
        xs, ys = [v["trainable_parameters_mean"] for v in front], [v["final_metric_mean"] for v in front]
        # a staircase: with at most x trainable parameters, the best metric reached so far
        ax.plot(
            xs,
            ys,
            drawstyle="steps-post",
            color="black",
            alpha=0.6,
            linewidth=1.2,
            zorder=2,
            label="Pareto front",
        )
        ax.scatter(xs, ys, s=150, facecolors="none", edgecolors="black", linewidths=1.2, zorder=4)
    # zero trainable parameters (the untouched model) has no place on a log axis: a reference line instead
    for v in scored:
        if v["trainable_parameters_mean"] <= 0:
            ax.axhline(
                v["final_metric_mean"],
                color=colour[v["variant"]],
                linestyle=":",
                linewidth=1.5,
                label=f"{v['variant']}: 0 trainable" + (", on the front" if v["pareto"] else ""),
            )
    if on_log:
        ax.set_xscale("log")
    ax.set(
        title=f"Final {metric} ({'higher' if higher else 'lower'} is better) vs trainable parameters",
        xlabel="trainable parameters (log scale)",
        ylabel=metric,
    )
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.15, y=0.12)
    if front or len(on_log) < len(scored):
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    if not scored:
        ax.text(
            0.5, 0.5, "no finished variant with a metric", ha="center", va="center", transform=ax.transAxes
        )


def _plot_memory_throughput(fig: Any, ok: list[dict], colour: dict[str, str], tp: str) -> None:
    kinds = sorted(
        {_MEMORY_KINDS.get(v["memory_kind"], (v["memory_kind"],))[0] for v in ok if v["memory_kind"]}
    )
    panels = (
        ("peak_memory_mb", "peak memory, MB" + (f" ({', '.join(kinds)})" if kinds else "")),
        (tp, tp.replace("_per_s", " per second")),
    )
    for ax, (key, label) in zip(fig.subplots(1, 2), panels):
        bars = [v for v in ok if v[f"{key}_mean"] is not None]
        names = [v["variant"] for v in bars]
        drawn = ax.bar(
            names,
            [v[f"{key}_mean"] for v in bars],
            yerr=[v[f"{key}_std"] for v in bars],
            capsize=3,
            color=[colour[n] for n in names],
        )
        ax.bar_label(drawn, fmt="%.0f", fontsize=8, padding=2)
        ax.set_title(label, fontsize=10)
        ax.margins(y=0.15)
        ax.tick_params(axis="x", labelrotation=35 if len(names) > 3 else 0, labelsize=8)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right" if len(names) > 3 else "center")
        ax.grid(axis="y", alpha=0.3)
        if not bars:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def _plot_forgetting(
    fig: Any, pairs: list[dict], colour: dict[str, str], xkey: str, metric: str, higher: bool
) -> None:
    ax = fig.add_subplot()
    ax.axhline(0, color="grey", linewidth=0.8)
    if xkey == "gain_over_none":
        ax.axvline(0, color="grey", linewidth=0.8)
    for v in pairs:
        ax.errorbar(
            [v[xkey]],
            [v["forgetting_mean"]],
            yerr=[v["forgetting_std"] or 0.0],
            fmt="o",
            color=colour[v["variant"]],
            capsize=4,
            markersize=6,
        )
    _label_points(ax, [(v["variant"], v[xkey], v["forgetting_mean"], colour[v["variant"]]) for v in pairs])
    best = "bottom right" if higher else "bottom left"
    xlabel = f"{metric} gain over the untouched model" if xkey == "gain_over_none" else f"final {metric}"
    ax.set(
        title=f"Forgetting vs task gain (best: {best})",
        xlabel=xlabel,
        ylabel="forgetting (loss change, general text)",
    )
    ax.grid(alpha=0.3)
    ax.margins(0.15)


def _draw_plots(variants: list[dict], runs: list[dict]) -> dict[str, bytes]:
    """Render the plots as PNG bytes by name; variants without a finished seed are left out."""
    from matplotlib.figure import Figure  # a bare Figure draws with Agg: no pyplot state, no display

    ok = [v for v in variants if v["n_ok"]]
    colour = {v["variant"]: _PALETTE[i % len(_PALETTE)] for i, v in enumerate(variants)}
    metric, higher = _metric_name(variants), _greater_is_better(variants)
    plots: dict[str, bytes] = {}

    def figure(draw: Any, *args: Any) -> bytes:
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        draw(fig, *args)
        return _png(fig)

    plots["loss_curves"] = figure(_plot_loss_curves, ok, runs, colour)
    plots["metric_vs_params"] = figure(_plot_metric_vs_params, ok, colour, metric, higher)
    plots["memory_throughput"] = figure(_plot_memory_throughput, ok, colour, _throughput_key(variants))
    # without a 'none' result there is no gain: forgetting is then set against the final metric itself
    xkey = "gain_over_none" if any(v["gain_over_none"] is not None for v in ok) else "final_metric_mean"
    pairs = [v for v in ok if v["forgetting_mean"] is not None and v[xkey] is not None]
    if pairs:
        plots["forgetting_vs_gain"] = figure(_plot_forgetting, pairs, colour, xkey, metric, higher)
    return plots


# ---------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same directory and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a report is meant to be read and shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(value: Any) -> Any:
    """Non-finite floats become None so results.json is strict JSON any reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _csv_text(rows: list[dict]) -> str:
    extra = sorted({k for r in rows for k in r if k not in CSV_COLUMNS and k != "curves"})
    columns = [*CSV_COLUMNS, *extra]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col)
            if col == "strategies" and isinstance(value, (list, tuple)):
                value = "+".join(map(str, value))
            elif isinstance(value, (list, tuple, dict)):
                value = json.dumps(_json_safe(value))
            cells.append("" if value is None else value)
        writer.writerow(cells)
    return buf.getvalue()


def _markdown(title: str, meta: dict, variants: list[dict], plots: dict[str, bytes]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()]
    lines += ["", "## Results", "", _markdown_table(variants), ""]
    failures = [(v["variant"], e) for v in variants for e in v["errors"]]
    if failures:
        lines += ["## Failures", ""]
        for name, e in failures:
            lines += [f"- **{name}** (seed {e['seed']}): {_first_line(e['error'])}"]
        lines.append("")
    lines += ["## How the columns are measured", ""] + [f"- {n}" for n in _notes(variants)] + [""]
    lines += ["## Plots", ""]
    for name in PLOT_NAMES:
        if name in plots:
            lines += [f"![{name.replace('_', ' ')}](plots/{name}.png)", ""]
    if "forgetting_vs_gain" not in plots:
        lines += [_SKIPPED_FORGETTING, ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 24px auto; max-width: 1260px; padding: 0 16px; color: #1d2329; line-height: 1.45; }
h1 { font-size: 1.55em; margin: 0 0 6px; }
h2 { font-size: 1.15em; margin-top: 26px; border-bottom: 1px solid #d8dde3; padding-bottom: 4px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 1px 16px; margin: 8px 0; font-size: 14px; }
dl.meta dt { font-weight: 600; color: #4a5561; } dl.meta dd { margin: 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12.5px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 7px; border-bottom: 1px solid #e3e7ec; text-align: left; white-space: nowrap; }
th { background: #f3f5f8; border-bottom: 2px solid #c9d0d8; }
.num { text-align: right; }
.sd { color: #6b7682; font-size: 11.5px; }
tr.baseline td { color: #4a5561; font-style: italic; }
tr.failed td { background: #fdecec; color: #8a1f1f; }
td.error { white-space: normal; font-weight: 600; }
tr.partial td.status { color: #a0522d; font-weight: 600; }
.star { color: #b8860b; }
.legend { font-size: 12px; color: #4a5561; margin-top: 6px; }
ul.notes { font-size: 14px; padding-left: 20px; } ul.notes li { margin: 3px 0; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(540px, 1fr)); gap: 16px; }
figure { margin: 0; border: 1px solid #e3e7ec; border-radius: 6px; padding: 8px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 13px; color: #4a5561; margin-top: 4px; }
p.skipped { color: #4a5561; font-style: italic; }
"""

_CAPTIONS = {
    "loss_curves": "Training (solid) and validation (dashed) loss, one seed per variant.",
    "metric_vs_params": "Final metric against trainable parameters; error bars span ± one standard "
    "deviation over seeds; circled points and the step line are the Pareto front.",
    "memory_throughput": "Peak memory and throughput per variant (± one standard deviation over seeds).",
    "forgetting_vs_gain": "Forgetting on general text against the task gain over the untouched model.",
}


def _html_cell(text: str, numeric: bool) -> str:
    """A table cell, escaped; a ``± std`` part is set smaller so the mean reads first."""
    mean, sep, std = text.partition(" ± ")
    body = html.escape(mean) + (f' <span class="sd">± {html.escape(std)}</span>' if sep else "")
    return f'<td class="num">{body}</td>' if numeric else f"<td>{body}</td>"


def _html_table(variants: list[dict]) -> str:
    headers, cells, numeric = _table(variants)
    out = ["<table><thead><tr>"]
    out += [
        f'<th class="num">{html.escape(h)}</th>' if num else f"<th>{html.escape(h)}</th>"
        for h, num in zip(headers, numeric)
    ]
    out.append("</tr></thead><tbody>")
    first_number = headers.index("trainable")
    for v, row in zip(variants, cells):
        classes = [
            c
            for c, on in (
                ("failed", not v["n_ok"]),
                ("partial", v["n_failed"] and v["n_ok"]),
                ("baseline", v["variant"] == BASELINE),
            )
            if on
        ]
        out.append(f'<tr class="{" ".join(classes)}">' if classes else "<tr>")
        name = html.escape(row[0]) + (
            ' <span class="star" title="Pareto front">&#9733;</span>' if v["pareto"] else ""
        )
        out.append(f"<td>{name}</td>")
        out += [_html_cell(c, num) for c, num in zip(row[1:first_number], numeric[1:first_number])]
        if not v["n_ok"]:  # nothing was measured: one wide cell says why instead of a row of dashes
            out.append(
                f'<td class="error" colspan="{len(headers) - first_number}">{html.escape(row[-1])}</td>'
            )
        else:
            out += [_html_cell(c, num) for c, num in zip(row[first_number:-1], numeric[first_number:-1])]
            status = (
                "ok" if not v["n_failed"] else f"{v['n_failed']} of {v['n_ok'] + v['n_failed']} seeds failed"
            )
            out.append(f'<td class="status">{html.escape(status)}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _html(title: str, meta: dict, variants: list[dict], plots: dict[str, bytes]) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if meta:
        out.append(
            '<dl class="meta">'
            + "".join(f"<dt>{e(str(k))}</dt><dd>{e(str(v))}</dd>" for k, v in meta.items())
            + "</dl>"
        )
    legend = [
        '<span class="star">&#9733;</span> on the Pareto front of final metric vs trainable parameters.'
    ]
    if any(not v["n_ok"] for v in variants):
        legend.append("Red rows failed on every seed.")
    if any(v["variant"] == BASELINE for v in variants):
        legend.append("Italic: the untouched pretrained model.")
    out += [
        '<h2>Results</h2><div class="scroll">',
        _html_table(variants),
        "</div>",
        f'<p class="legend">{" ".join(legend)}</p>',
    ]
    failures = [(v["variant"], err) for v in variants for err in v["errors"]]
    if failures:
        out.append('<h2>Failures</h2><ul class="notes">')
        out += [
            f"<li><b>{e(name)}</b> (seed {e(str(err['seed']))}): {e(_first_line(err['error']))}</li>"
            for name, err in failures
        ]
        out.append("</ul>")
    out.append('<h2>Plots</h2><div class="plots">')
    for name in PLOT_NAMES:
        if name in plots:
            data = base64.b64encode(plots[name]).decode("ascii")
            out.append(
                f'<figure><img alt="{e(name.replace("_", " "))}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(_CAPTIONS[name])}</figcaption></figure>"
            )
    out.append("</div>")
    if "forgetting_vs_gain" not in plots:
        out.append(f'<p class="skipped">{e(_SKIPPED_FORGETTING)}</p>')
    out.append('<h2>How the columns are measured</h2><ul class="notes">')
    out += [f"<li>{e(n)}</li>" for n in _notes(variants)]
    out.append("</ul></body></html>")
    return "\n".join(out) + "\n"


def write_report_files(out_dir: str | Path, rows: list[dict], title: str, meta: dict) -> dict[str, Path]:
    """Write the comparison report into ``out_dir``; return every file written, by relative name.

    Files: ``results.json`` (``title``, ``meta``, ``runs`` as given, ``variants`` from
    ``aggregate``; non-finite numbers written as null), ``results.csv`` (one row per run, curves
    left out, strategies joined with ``+``), ``plots/<name>.png``, ``report.md`` and the
    self-contained ``report.html``. ``plots/forgetting_vs_gain.png`` is only drawn when some
    variant measured forgetting; a stale one from an earlier report is removed. Each file is
    written atomically, so a reader never sees half of one.
    """
    out_dir = Path(out_dir)
    variants = aggregate(rows)
    plots = _draw_plots(variants, rows)
    written: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        _atomic_write(out_dir / name, data)
        written[name] = out_dir / name

    doc = {"title": title, "meta": meta, "runs": rows, "variants": variants}
    put("results.json", (json.dumps(_json_safe(doc), indent=2, allow_nan=False, default=str) + "\n").encode())
    put("results.csv", _csv_text(rows).encode())
    for name in PLOT_NAMES:
        if name in plots:
            put(f"plots/{name}.png", plots[name])
        else:
            (out_dir / "plots" / f"{name}.png").unlink(missing_ok=True)
    put("report.md", _markdown(title, meta, variants, plots).encode())
    put("report.html", _html(title, meta, variants, plots).encode())
    return written
