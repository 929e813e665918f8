"""The report's plots, drawn with matplotlib into PNG bytes: loss curves, final metric against
trainable parameters (with the Pareto front), peak memory and throughput, and forgetting against
the task gain. Variants without a finished seed are left out of every plot.

matplotlib is imported only while plots are drawn, so that importing the report (for the terminal
table alone, say) stays cheap.
"""

from __future__ import annotations

import io
from typing import Any

from adaptkit.compare.report.aggregate import (
    greater_is_better,
    is_finished,
    metric_name,
    throughput_key,
)
from adaptkit.compare.report.notes import MEMORY_KINDS
from adaptkit.compare.report.stats import number

# The plots in the order the report shows them; each is written as plots/<name>.png.
PLOT_NAMES = (
    "loss_curves",
    "metric_vs_params",
    "differences_vs_best",
    "memory_throughput",
    "forgetting_vs_gain",
    "lr_range_tests",
)
SKIPPED_FORGETTING = "Forgetting vs gain plot skipped: no finished variant has a forgetting measurement."
# matplotlib's default colour cycle: one colour per variant, the same in every plot.
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
    """The figure as PNG bytes."""
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
    """Training and validation loss against the step, for one seed of each variant (seed 0 if it finished)."""
    from matplotlib.lines import Line2D

    ax = fig.add_subplot()
    handles = []
    for v in ok:
        finished = [r for r in runs if str(r.get("variant") or "?") == v["variant"] and is_finished(r)]
        run = next((r for r in finished if r.get("seed") == 0), finished[0])
        curves = run.get("curves") if isinstance(run.get("curves"), dict) else {}
        drawn = False
        for split, style in (("train", "-"), ("eval", "--")):
            points = [
                (number(p[0]), number(p[1]))
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
    """Final metric against trainable parameters on a log axis, with the Pareto front as a staircase."""
    ax = fig.add_subplot()
    scored = [
        v for v in ok if v["final_metric_mean"] is not None and v["trainable_parameters_mean"] is not None
    ]
    on_log = sorted(
        (v for v in scored if v["trainable_parameters_mean"] > 0),
        key=lambda v: v["trainable_parameters_mean"],
    )
    _plot_points(ax, on_log, colour)
    _label_points(
        ax,
        [
            (v["variant"], v["trainable_parameters_mean"], v["final_metric_mean"], colour[v["variant"]])
            for v in on_log
        ],
    )
    front = _plot_front(ax, on_log)
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


def _plot_points(ax: Any, on_log: list[dict], colour: dict[str, str]) -> None:
    """Each variant's mean with its interval; a dashed square marks one off the Pareto front that a
    paired comparison cannot tell apart from a front variant beating it."""
    for v in on_log:
        ax.errorbar(
            [v["trainable_parameters_mean"]],
            [v["final_metric_mean"]],
            yerr=_metric_error(v),
            fmt="o",
            color=colour[v["variant"]],
            capsize=4,
            markersize=6,
            zorder=3,
        )
        if v.get("within_noise_of_front"):
            ax.scatter(
                [v["trainable_parameters_mean"]],
                [v["final_metric_mean"]],
                s=220,
                marker="s",
                facecolors="none",
                edgecolors=colour[v["variant"]],
                linestyles="--",
                zorder=4,
            )


def _plot_front(ax: Any, on_log: list[dict]) -> list[dict]:
    """The Pareto front as a staircase with its points circled; returns the variants on it."""
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
    return front


def _metric_error(v: dict) -> list[list[float]]:
    """Error bar lengths below and above the mean: the 95% interval, else ± one standard deviation."""
    ci, mean = v.get("interval"), v["final_metric_mean"]
    if ci:
        return [[max(mean - ci["low"], 0.0)], [max(ci["high"] - mean, 0.0)]]
    std = v["final_metric_std"] or 0.0
    return [[std], [std]]


def _plot_differences(fig: Any, compared: list[dict], colour: dict[str, str], metric: str) -> None:
    """Each variant minus the best, with its paired 95% interval, one row per variant; zero marked."""
    ax = fig.add_subplot()
    best = compared[0]["vs_best"]["best"]
    for y, v in enumerate(compared):
        pair = v["vs_best"]
        ax.errorbar(
            [pair["difference"]],
            [y],
            xerr=[
                [max(pair["difference"] - pair["low"], 0.0)],
                [max(pair["high"] - pair["difference"], 0.0)],
            ],
            fmt="o" if pair["distinguishable"] else "s",
            mfc=colour[v["variant"]] if pair["distinguishable"] else "white",
            color=colour[v["variant"]],
            capsize=4,
            markersize=6,
        )
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(range(len(compared)), [v["variant"] for v in compared])
    ax.invert_yaxis()
    ax.set(
        title=f"{metric} minus {best}'s\n(95% intervals; open markers: within noise)",
        xlabel=f"{metric} minus {best}'s",
    )
    ax.grid(axis="x", alpha=0.3)
    ax.margins(y=0.2)


def _plot_memory_throughput(fig: Any, ok: list[dict], colour: dict[str, str], tp: str) -> None:
    """Two bar panels side by side: peak memory and throughput per variant."""
    kinds = sorted(
        {MEMORY_KINDS.get(v["memory_kind"], (v["memory_kind"],))[0] for v in ok if v["memory_kind"]}
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
    """Forgetting against the task gain over the untouched model (or the final metric without one)."""
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


def _plot_lr_range_tests(fig: Any, tests: dict[str, dict], colour: dict[str, str]) -> None:
    """Training loss against the rate of each variant's range test, the chosen rate marked."""
    from adaptkit.compare.lr_range import smoothed

    ax = fig.subplots()
    for name, test in tests.items():
        rates, losses = zip(*test["curve"])
        ax.plot(rates, losses, color=colour.get(name, "#333333"), lw=0.8, alpha=0.3)
        ax.plot(rates, smoothed(test["curve"]), color=colour.get(name, "#333333"), label=name, lw=1.6)
        chosen = test.get("chosen", {}).get("train.lr")
        if chosen:
            ax.axvline(chosen, color=colour.get(name, "#333333"), ls="--", lw=0.8)
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="Learning-rate range tests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def draw_plots(variants: list[dict], runs: list[dict], tuning: dict | None = None) -> dict[str, bytes]:
    """Render the plots as PNG bytes by name; variants without a finished seed are left out.
    ``tuning`` (the comparison's, by variant) adds the learning-rate range tests' curves."""
    from matplotlib.figure import Figure  # a bare Figure draws with Agg: no pyplot state, no display

    ok = [v for v in variants if v["n_ok"]]
    colour = {v["variant"]: _PALETTE[i % len(_PALETTE)] for i, v in enumerate(variants)}
    metric, higher = metric_name(variants), greater_is_better(variants)
    plots: dict[str, bytes] = {}

    def figure(draw: Any, *args: Any) -> bytes:
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        draw(fig, *args)
        return _png(fig)

    plots["loss_curves"] = figure(_plot_loss_curves, ok, runs, colour)
    plots["metric_vs_params"] = figure(_plot_metric_vs_params, ok, colour, metric, higher)
    compared = [v for v in ok if v.get("vs_best")]
    if compared:
        plots["differences_vs_best"] = figure(_plot_differences, compared, colour, metric)
    plots["memory_throughput"] = figure(_plot_memory_throughput, ok, colour, throughput_key(variants))
    # without a 'none' result there is no gain: forgetting is then set against the final metric itself
    xkey = "gain_over_none" if any(v["gain_over_none"] is not None for v in ok) else "final_metric_mean"
    pairs = [v for v in ok if v["forgetting_mean"] is not None and v[xkey] is not None]
    if pairs:
        plots["forgetting_vs_gain"] = figure(_plot_forgetting, pairs, colour, xkey, metric, higher)
    tests = {k: t for k, t in (tuning or {}).items() if t.get("method") == "range_test" and t.get("curve")}
    if tests:
        plots["lr_range_tests"] = figure(_plot_lr_range_tests, tests, colour)
    return plots
