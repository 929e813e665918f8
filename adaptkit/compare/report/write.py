"""Writing a comparison report to disk: ``results.json``, ``results.csv``, the plots, ``report.md``
and ``report.html``, each file replaced atomically so that a reader never sees half of one."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from adaptkit.compare.report.aggregate import NUMERIC_COLUMNS, aggregate
from adaptkit.compare.report.html_page import html_page
from adaptkit.compare.report.markdown_page import markdown_page
from adaptkit.compare.report.plots import PLOT_NAMES, draw_plots
from adaptkit.compare.report.verdict import verdict

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
# Keys of a run left out of results.json and results.csv: the per-example scores stay in the run
# directories (eval_examples.json), where the report reads them; here they would dwarf the rest.
BULKY = ("curves", "examples")
# Columns of variants.csv: one row per variant, its interval and its paired comparison with the best.
VARIANT_COLUMNS = (
    "variant",
    "n_ok",
    "n_failed",
    "metric",
    "final_metric_mean",
    "final_metric_std",
    "ci_low",
    "ci_high",
    "ci_method",
    "is_best",
    "vs_best",
    "difference",
    "difference_low",
    "difference_high",
    "distinguishable",
    "mcnemar_p",
    "seeds_needed",
    "examples_needed",
    "steps_to_target_mean",
    "tokens_to_target_mean",
    "seconds_to_target_mean",
    "cost_mean",
    "cost_to_target_mean",
)


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
    """One line per run; lists and mappings (other than the strategies) as JSON text in their cell."""
    extra = sorted({k for r in rows for k in r if k not in CSV_COLUMNS and k not in BULKY})
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


def _variant_record(v: dict) -> dict[str, Any]:
    """One line of variants.csv: the summary's interval and paired comparison, flattened."""
    ci, pair = v.get("interval") or {}, v.get("vs_best") or {}
    record = {k: v.get(k) for k in VARIANT_COLUMNS}
    record.update(
        ci_low=ci.get("low"),
        ci_high=ci.get("high"),
        ci_method=ci.get("method"),
        vs_best=pair.get("best"),
        difference=pair.get("difference"),
        difference_low=pair.get("low"),
        difference_high=pair.get("high"),
        distinguishable=pair.get("distinguishable"),
        mcnemar_p=pair.get("mcnemar_p"),
        seeds_needed=pair.get("seeds_needed"),
        examples_needed=pair.get("examples_needed"),
    )
    return record


def _variants_csv(variants: list[dict]) -> str:
    """One line per variant (VARIANT_COLUMNS); empty cells for what is unknown."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(VARIANT_COLUMNS)
    for v in variants:
        record = _json_safe(_variant_record(v))
        writer.writerow(["" if record[c] is None else record[c] for c in VARIANT_COLUMNS])
    return buf.getvalue()


def write_report_files(
    out_dir: str | Path, rows: list[dict], title: str, meta: dict, tuning: dict | None = None
) -> dict[str, Path]:
    """Write the comparison report into ``out_dir``; return every file written, by relative name.

    Files: ``results.json`` (``title``, ``meta``, the ``verdict`` sentences, ``runs`` as given but
    for their per-example scores, ``variants`` from ``aggregate``; non-finite numbers written as
    null), ``results.csv`` (one row per run, curves and per-example scores left out, strategies
    joined with ``+``), ``variants.csv`` (one row per variant: interval, paired comparison with the
    best, time and cost to target), ``plots/<name>.png``, ``report.md`` and the
    self-contained ``report.html``. ``plots/forgetting_vs_gain.png`` is only drawn when some
    variant measured forgetting; a stale one from an earlier report is removed. Each file is
    written atomically, so a reader never sees half of one.
    """
    out_dir = Path(out_dir)
    variants = aggregate(rows)
    plots = draw_plots(variants, rows, tuning)
    written: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        _atomic_write(out_dir / name, data)
        written[name] = out_dir / name

    runs = [{k: v for k, v in r.items() if k != "examples"} for r in rows]
    doc = {"title": title, "meta": meta, "verdict": verdict(variants), "runs": runs, "variants": variants}
    put("results.json", (json.dumps(_json_safe(doc), indent=2, allow_nan=False, default=str) + "\n").encode())
    put("results.csv", _csv_text(rows).encode())
    put("variants.csv", _variants_csv(variants).encode())
    for name in PLOT_NAMES:
        if name in plots:
            put(f"plots/{name}.png", plots[name])
        else:
            (out_dir / "plots" / f"{name}.png").unlink(missing_ok=True)
    put("report.md", markdown_page(title, meta, variants, plots).encode())
    put("report.html", html_page(title, meta, variants, plots).encode())
    return written
