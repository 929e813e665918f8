"""``report.md``: the comparison as a Markdown document (header, table, failures, notes, plots)."""

from __future__ import annotations

from adaptkit.compare.report.notes import column_notes, estimate_notes
from adaptkit.compare.report.plots import PLOT_NAMES, SKIPPED_FORGETTING
from adaptkit.compare.report.table import (
    BALANCED_HEADING,
    balanced_cells,
    first_line,
    markdown_grid,
    markdown_table,
    target_cells,
)
from adaptkit.compare.report.verdict import verdict


def markdown_page(title: str, meta: dict, variants: list[dict], plots: dict[str, bytes]) -> str:
    """The Markdown report; plots are linked as ``plots/<name>.png`` beside it, not embedded."""
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()]
    lines += ["", "## Verdict", "", " ".join(verdict(variants)), ""]
    lines += ["## Results", "", markdown_table(variants), ""]
    targets = target_cells(variants)
    if targets:
        headers, cells = targets
        numeric = [False] + [True] * (len(headers) - 1)
        lines += [
            "## Time and cost to 90% of the final score",
            "",
            markdown_grid(headers, cells, numeric),
            "",
        ]
    balanced = balanced_cells(variants)
    if balanced:
        headers, cells = balanced
        numeric = [False] + [True] * (len(headers) - 1)
        lines += [f"## {BALANCED_HEADING}", "", markdown_grid(headers, cells, numeric), ""]
    failures = [(v["variant"], e) for v in variants for e in v["errors"]]
    if failures:
        lines += ["## Failures", ""]
        for name, e in failures:
            lines += [f"- **{name}** (seed {e['seed']}): {first_line(e['error'])}"]
        lines.append("")
    if estimate_notes(variants):
        lines += ["## Memory estimates skipped", ""] + [f"- {n}" for n in estimate_notes(variants)] + [""]
    lines += ["## How the columns are measured", ""] + [f"- {n}" for n in column_notes(variants)] + [""]
    lines += ["## Plots", ""]
    for name in PLOT_NAMES:
        if name in plots:
            lines += [f"![{name.replace('_', ' ')}](plots/{name}.png)", ""]
    if "forgetting_vs_gain" not in plots:
        lines += [SKIPPED_FORGETTING, ""]
    return "\n".join(lines)
