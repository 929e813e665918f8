"""A comparison directory read back: its rows and metadata, and the report rebuilt from them (``adaptkit report``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from adaptkit.compare.child import row_from_run
from adaptkit.compare.report.stats import run_cost
from adaptkit.errors import AdaptkitError


def collect(root: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and metadata of a finished (or interrupted) comparison, read back from its directories."""
    root = Path(root)
    index = root / "comparison.json"
    if not index.is_file():
        raise AdaptkitError(
            f"{root}: not a comparison directory (no comparison.json); run `adaptkit compare RECIPE` first"
        )
    meta = json.loads(index.read_text())
    rows = [
        row_from_run(root / e["run_dir"], e["variant"], e["seed"], root, error=e.get("error"))
        for e in meta["runs"]
    ]
    rate = meta.get("cost_per_hour")
    if rate is not None:  # compare.cost_per_hour: what each run's training loop cost on the machine
        for row in rows:
            if row.get("status") == "finished":
                row["cost"] = run_cost(row.get("wall_time_s"), rate)
                row["cost_to_target"] = run_cost(row.get("seconds_to_target"), rate)
    return rows, meta


def report_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """What the report's header says about the comparison: model, task, data, budget, tuning."""
    base = meta.get("base", {})
    model, data = base.get("model", {}), base.get("data", {})
    out = {
        "model": model.get("source"),
        "task": model.get("task", "classification"),
        "data": data.get("source"),
    }
    if data.get("options"):
        out["data options"] = json.dumps(data["options"])
    for label, t in (meta.get("tuning") or {}).items():
        out[f"tuning {label}"] = f"{t['method']}: {json.dumps(t['chosen'])}"
        if t["method"] == "range_test":  # its cost counts: say what it took
            seconds = f", {t['seconds']:.0f} s" if t.get("seconds") is not None else ""
            low, high = t["tried"]
            out[f"tuning {label}"] += (
                f" (range test: {t['steps']} steps over [{low:g}, {high:g}]{seconds}; {t['rule']})"
            )
        if t.get("edge"):  # the best may lie beyond what was tried: the reader must know
            out[f"tuning {label}"] += f" (note: {t['edge']})"
    if meta.get("cost_per_hour") is not None:
        out["cost per hour"] = f"{meta['cost_per_hour']:g}"
    out["date"] = time.strftime("%Y-%m-%d %H:%M")
    return out


def write_report(root: str | Path) -> tuple[dict[str, Path], str]:
    """Rebuild the report files from the comparison directory; returns (files, terminal table)."""
    from adaptkit.compare.report.table import format_table
    from adaptkit.compare.report.write import write_report_files

    rows, meta = collect(root)
    files = write_report_files(
        Path(root),
        rows,
        title=f"adaptkit comparison: {meta['name']}",
        meta=report_meta(meta),
        tuning=meta.get("tuning"),
    )
    return files, format_table(rows)
