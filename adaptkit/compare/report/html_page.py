"""``report.html``: one self-contained page (inline CSS, plots embedded as data URIs) that opens
offline and can be sent as a single file; failed and partly failed variants stand out in the table."""

from __future__ import annotations

import base64
import html

from adaptkit.compare.report.aggregate import BASELINE
from adaptkit.compare.report.notes import column_notes, estimate_notes
from adaptkit.compare.report.plots import PLOT_NAMES, SKIPPED_FORGETTING
from adaptkit.compare.report.table import (
    BALANCED_HEADING,
    balanced_cells,
    first_line,
    table_cells,
    target_cells,
)
from adaptkit.compare.report.verdict import verdict

# Inline rather than linked, so the page needs no other file.
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
p.verdict { font-size: 15px; background: #f3f7fb; border-left: 4px solid #3b6ea5; padding: 8px 12px; }
td.tied { color: #6b7682; }
"""

# One caption per plot, saying how to read it.
_CAPTIONS = {
    "loss_curves": "Training (solid) and validation (dashed) loss, one seed per variant.",
    "metric_vs_params": "Final metric against trainable parameters; error bars are 95% intervals "
    "(± one standard deviation over seeds where there is none); circled points and the step line "
    "are the Pareto front; open squares: off the front, but within noise of a front variant that beats them.",
    "differences_vs_best": "Each variant minus the best one, paired on the same seeds and evaluation "
    "examples, with 95% intervals: a bar that crosses zero is within noise.",
    "memory_throughput": "Peak memory and throughput per variant (± one standard deviation over seeds).",
    "forgetting_vs_gain": "Forgetting on general text against the task gain over the untouched model.",
    "lr_range_tests": "Training loss of each variant's learning-rate range test against the rate it "
    "trained at that step (faint: per step; solid: smoothed, as the rule sees it); the dashed line is "
    "the rate chosen (the smoothed loss's minimum over 3).",
}


def _html_cell(text: str, numeric: bool) -> str:
    """A table cell, escaped; a ``± std`` part is set smaller so the mean reads first."""
    mean, sep, std = text.partition(" ± ")
    body = html.escape(mean) + (f' <span class="sd">± {html.escape(std)}</span>' if sep else "")
    return f'<td class="num">{body}</td>' if numeric else f"<td>{body}</td>"


def _html_table(variants: list[dict]) -> str:
    """The table as HTML.

    Row classes mark failed, partly failed and baseline rows; a star marks the Pareto front.
    """
    headers, cells, numeric = table_cells(variants)
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
            out += [
                _html_cell(c, num).replace('<td class="num">', '<td class="num tied">', 1)
                if c.endswith(" ≈")
                else _html_cell(c, num)
                for c, num in zip(row[first_number:-1], numeric[first_number:-1])
            ]
            status = (
                "ok" if not v["n_failed"] else f"{v['n_failed']} of {v['n_ok'] + v['n_failed']} seeds failed"
            )
            out.append(f'<td class="status">{html.escape(status)}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _grid(heading: str, found: tuple[list[str], list[list[str]]] | None) -> list[str]:
    """A table of text cells (the first column a name, the rest numeric) under ``heading``;
    nothing when there is no table."""
    if not found:
        return []
    headers, cells = found
    head = "".join(f'<th class="num">{html.escape(h)}</th>' for h in headers[1:])
    body = "".join(
        f"<tr><td>{html.escape(row[0])}</td>" + "".join(_html_cell(c, True) for c in row[1:]) + "</tr>"
        for row in cells
    )
    return [
        f'<h2>{html.escape(heading)}</h2><div class="scroll"><table><thead><tr>'
        f"<th>{html.escape(headers[0])}</th>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    ]


def html_page(title: str, meta: dict, variants: list[dict], plots: dict[str, bytes]) -> str:
    """The whole page: header, table with its legend, failures, the plots inline and the notes."""
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
        '<span class="star">&#9733;</span> on the Pareto front of final metric vs trainable parameters.',
        "≈ in vs best: within noise of the best variant (the 95% interval of the difference contains zero).",
    ]
    if any(not v["n_ok"] for v in variants):
        legend.append("Red rows failed on every seed.")
    if any(v["variant"] == BASELINE for v in variants):
        legend.append("Italic: the untouched pretrained model.")
    out.append(f'<p class="verdict">{e(" ".join(verdict(variants)))}</p>')
    out += [
        '<h2>Results</h2><div class="scroll">',
        _html_table(variants),
        "</div>",
        f'<p class="legend">{" ".join(legend)}</p>',
    ]
    out += _grid("Time and cost to 90% of the final score", target_cells(variants))
    out += _grid(BALANCED_HEADING, balanced_cells(variants))
    failures = [(v["variant"], err) for v in variants for err in v["errors"]]
    if failures:
        out.append('<h2>Failures</h2><ul class="notes">')
        out += [
            f"<li><b>{e(name)}</b> (seed {e(str(err['seed']))}): {e(first_line(err['error']))}</li>"
            for name, err in failures
        ]
        out.append("</ul>")
    if estimate_notes(variants):
        out.append('<h2>Memory estimates skipped</h2><ul class="notes">')
        out += [f"<li>{e(n)}</li>" for n in estimate_notes(variants)]
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
        out.append(f'<p class="skipped">{e(SKIPPED_FORGETTING)}</p>')
    out.append('<h2>How the columns are measured</h2><ul class="notes">')
    out += [f"<li>{e(n)}</li>" for n in column_notes(variants)]
    out.append("</ul></body></html>")
    return "\n".join(out) + "\n"
