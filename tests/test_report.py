"""The comparison report: aggregation, the terminal table, and the files write_report leaves behind."""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adaptkit.compare.report.aggregate import aggregate
from adaptkit.compare.report.table import format_table, humanize_bytes, humanize_count
from adaptkit.compare.report.write import CSV_COLUMNS, write_report_files

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOTAL = 22_000_000
META = {
    "model": "all-minilm-l6-v2",
    "task": "classification",
    "data": "sst2 (2,000 / 300)",
    "date": "2025-06-01",
}


def run(variant: str, seed: int, **numbers) -> dict:
    """One finished run as the comparison runner records it; ``numbers`` override the defaults."""
    row = {
        "variant": variant,
        "seed": seed,
        "status": "finished",
        "error": None,
        "strategies": ["freeze", "lora"],
        "trainable_parameters": 12345,
        "total_parameters": TOTAL,
        "trainable_percent": 100 * 12345 / TOTAL,
        "peak_memory_mb": 800.0,
        "memory_kind": "cpu_rss",
        "wall_time_s": 40.0,
        "samples_per_s": 88.0,
        "tokens_per_s": 2300.0,
        "metric": "accuracy",
        "greater_is_better": True,
        "final_metric": 0.75,
        "best_metric": 0.8125,
        "eval_loss": 0.5,
        "train_loss": 0.25,
        "overfit_gap": 0.25,
        "forgetting": 0.02,
        "forgetting_measure": "loss on <pydoc_data> topics",
        "saved_bytes": 1_048_576,
        "run_dir": f"variants/{variant}-s{seed}",
        "curves": {"train": [[10, 0.7], [20, 0.5], [30, 0.3]], "eval": [[15, 0.65], [30, 0.5]]},
    }
    row.update(numbers)
    return row


def failed(variant: str, seed: int, error: str) -> dict:
    """A run that crashed before measuring anything."""
    row = run(variant, seed, status="failed", error=error, strategies=["lora"])
    for key in (
        "trainable_parameters",
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
    ):
        row[key] = None
    row["curves"] = {"train": [], "eval": []}
    return row


ERROR = "RuntimeError: bitsandbytes <module> has no CPU 4-bit kernel\nTraceback (most recent call last): ..."


def make_rows() -> list[dict]:
    """The untouched model, LoRA on two seeds, and QLoRA that failed."""
    return [
        run(
            "none",
            0,
            strategies=[],
            trainable_parameters=0,
            trainable_percent=0.0,
            peak_memory_mb=600.0,
            final_metric=0.5,
            best_metric=0.5,
            eval_loss=0.69,
            train_loss=None,
            overfit_gap=None,
            forgetting=0.0,
            saved_bytes=0,
            samples_per_s=None,
            tokens_per_s=None,
            curves={"train": [], "eval": [[0, 0.69]]},
        ),
        run("lora", 0),
        failed("qlora", 0, ERROR),
        run(
            "lora",
            1,
            peak_memory_mb=900.0,
            wall_time_s=44.0,
            final_metric=0.875,
            best_metric=0.875,
            eval_loss=0.375,
            overfit_gap=0.125,
            forgetting=0.03,
            tokens_per_s=2400.0,
        ),
    ]


@pytest.fixture
def rows() -> list[dict]:
    return make_rows()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """One report written for the read-only checks (drawing the plots is the slow part)."""
    out = tmp_path_factory.mktemp("report") / "cmp"
    return out, write_report_files(out, make_rows(), "LoRA & QLoRA", META)


def test_aggregate_means_stds_and_failures(rows):
    by = {v["variant"]: v for v in aggregate(rows)}
    assert list(by) == ["none", "lora", "qlora"]  # first appearance, not sorted
    lora = by["lora"]
    assert (lora["seeds"], lora["n_ok"], lora["n_failed"], lora["errors"]) == ([0, 1], 2, 0, [])
    assert lora["strategies"] == ["freeze", "lora"]
    assert lora["final_metric_mean"] == 0.8125  # (0.75 + 0.875) / 2, exact in binary
    assert lora["final_metric_std"] == pytest.approx(0.125 / math.sqrt(2), rel=1e-12)  # sample std
    assert lora["peak_memory_mb_mean"] == 850.0
    assert lora["peak_memory_mb_std"] == pytest.approx(100 / math.sqrt(2), rel=1e-12)
    assert lora["eval_loss_mean"] == 0.4375 and lora["forgetting_mean"] == pytest.approx(0.025)
    assert lora["trainable_parameters_std"] == 0.0
    # one seed: std 0.0; a column with no value: None
    assert by["none"]["final_metric_std"] == 0.0
    assert by["none"]["train_loss_mean"] is None and by["none"]["train_loss_std"] is None
    qlora = by["qlora"]
    assert (qlora["n_ok"], qlora["n_failed"]) == (0, 1)
    assert qlora["errors"] == [{"seed": 0, "error": ERROR}]
    assert qlora["final_metric_mean"] is None and qlora["pareto"] is False


def test_gain_over_none(rows):
    by = {v["variant"]: v for v in aggregate(rows)}
    assert by["lora"]["gain_over_none"] == 0.8125 - 0.5
    assert by["none"]["gain_over_none"] == 0.0
    assert by["qlora"]["gain_over_none"] is None
    without = aggregate([r for r in rows if r["variant"] != "none"])
    assert [v["gain_over_none"] for v in without] == [None, None]


def point(variant: str, params: int, metric: float, higher: bool = True) -> dict:
    """A bare row with only what the Pareto front needs: missing keys must not matter."""
    return {
        "variant": variant,
        "status": "finished",
        "trainable_parameters": params,
        "final_metric": metric,
        "greater_is_better": higher,
    }


def test_pareto_front_hand_made():
    cases = [
        ("tiny", 50, 0.6),
        ("small", 100, 0.7),
        ("mid", 1000, 0.8),
        ("mid-twin", 1000, 0.8),
        ("mid-worse", 1000, 0.75),
        ("big-worse", 10_000, 0.79),
        ("big", 10_000, 0.9),
    ]
    front = {v["variant"] for v in aggregate([point(*c) for c in cases]) if v["pareto"]}
    # mid-worse loses to mid at equal size; big-worse is bigger and worse than mid; twins both stay
    assert front == {"tiny", "small", "mid", "mid-twin", "big"}
    # lower is better (e.g. perplexity): only the smallest model with the lowest value remains
    lower = {v["variant"] for v in aggregate([point(*c, higher=False) for c in cases]) if v["pareto"]}
    assert lower == {"tiny"}
    # a variant without a metric is never on the front and does not displace others
    with_broken = aggregate(
        [point(*c) for c in cases] + [{"variant": "broken", "status": "failed", "error": "x"}]
    )
    assert {v["variant"] for v in with_broken if v["pareto"]} == front


def test_humanize():
    assert [humanize_count(n) for n in (0, 950, 12_345, 1_234_567, 3.4e9, None)] == [
        "0",
        "950",
        "12.3K",
        "1.2M",
        "3.4B",
        "-",
    ]
    assert [humanize_bytes(n) for n in (512, 3072, 1_048_576, 2.5 * 1024**3, None)] == [
        "512 B",
        "3.0 KiB",
        "1.0 MiB",
        "2.5 GiB",
        "-",
    ]


def test_format_table(rows):
    lines = format_table(rows).splitlines()
    assert len(lines) == 2 + 3  # header, rule, one line per variant
    header = lines[0]
    assert "accuracy" in header and "tokens/s" in header
    body = {line.split()[0]: line for line in lines[2:]}
    assert set(body) == {"none", "lora", "qlora"}
    lora = body["lora"]
    for text in (
        "freeze+lora",
        "12.3K (0.0561%)",
        "850",
        "42.0",
        "2350.0",
        "0.8125 ± 0.0884",
        "0.8438 ± 0.0442",
        "+0.3125",
        "0.4375",
        "+0.1875",
        "+0.0250",
        "1.0 MiB",
    ):
        assert text in lora, text
    assert "0.5000" in body["none"] and "0 (0%)" in body["none"]
    # the failed variant: dashes for numbers and only the first line of its error
    assert "FAILED: RuntimeError: bitsandbytes <module> has no CPU 4-bit kernel" in body["qlora"]
    assert "Traceback" not in body["qlora"]
    # columns are aligned: right-aligned numbers end where their header ends
    end = header.index("peak MB") + len("peak MB")
    assert body["lora"][:end].endswith(" 850") and body["none"][:end].endswith(" 600")
    assert body["qlora"][:end].endswith(" -")


def test_write_report_files(report, rows):
    out, written = report
    plots = {
        f"plots/{n}.png"
        for n in ("loss_curves", "metric_vs_params", "memory_throughput", "forgetting_vs_gain")
    }
    assert set(written) == {"results.json", "results.csv", "variants.csv", "report.md", "report.html"} | plots
    for name, path in written.items():
        assert path == out / name and path.stat().st_size > 0
    for name in plots:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)


def test_results_json_and_csv_parse_back(report, rows):
    out, _ = report
    doc = json.loads((out / "results.json").read_text())
    assert doc["title"] == "LoRA & QLoRA" and doc["meta"] == META
    assert doc["runs"] == rows  # every run as given, curves included
    assert doc["variants"] == aggregate(rows)

    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        csv_rows = list(reader)
    assert reader.fieldnames == list(CSV_COLUMNS) and "curves" not in reader.fieldnames
    assert len(csv_rows) == len(rows)
    for got, want in zip(csv_rows, rows):
        assert got["variant"] == want["variant"] and int(got["seed"]) == want["seed"]
        assert got["strategies"] == "+".join(want["strategies"])
        for col in ("final_metric", "peak_memory_mb", "forgetting", "trainable_parameters"):
            assert (float(got[col]) if got[col] else None) == want[col]
    assert csv_rows[2]["error"] == ERROR  # the whole error, newline included, survives quoting


def test_report_md(report, rows):
    out, written = report
    md = (out / "report.md").read_text()
    assert md.startswith("# LoRA & QLoRA\n")
    for key, value in META.items():
        assert f"**{key}**: {value}" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 and re.fullmatch(r"\|(:?-+:?\|)+", table[1])
    for variant in ("none", "lora", "qlora"):
        assert sum(line.startswith(f"| {variant} |") for line in table) == 1
    assert "0.8125 ± 0.0884" in md and "FAILED: RuntimeError" in md
    assert "resident set size" in md and "general text" in md  # the column notes
    for name in written:
        if name.startswith("plots/"):
            assert f"]({name})" in md


def test_report_html_is_self_contained(report):
    out, written = report
    text = (out / "report.html").read_text()
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?!data:)[a-z]*:?//""", text, re.I)
    assert "<script" not in text.lower() and "url(" not in text and "@import" not in text
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    pngs = [p for name, p in written.items() if name.startswith("plots/")]
    assert len(images) == len(pngs) == text.count("data:image/png;base64") == 4
    decoded = [base64.b64decode(data, validate=True) for data in images]
    assert all(d.startswith(PNG_MAGIC) for d in decoded)
    assert sorted(decoded) == sorted(p.read_bytes() for p in pngs)  # the very files written
    # text is escaped, and the failed row is marked
    assert (
        "&lt;module&gt;" in text
        and "&lt;pydoc_data&gt;" in text
        and "<title>LoRA &amp; QLoRA</title>" in text
    )
    assert "<module>" not in text and "<pydoc_data>" not in text
    assert re.search(r'<tr class="failed">.*?qlora.*?FAILED: RuntimeError', text)
    assert "resident set size" in text and "all-minilm-l6-v2" in text


def test_no_forgetting_means_three_plots_and_a_note(rows, tmp_path):
    out = tmp_path / "cmp"
    write_report_files(out, rows, "with", META)
    assert (out / "plots" / "forgetting_vs_gain.png").exists()
    for row in rows:
        row["forgetting"] = None
    written = write_report_files(out, rows, "without", META)  # into the same directory again
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert pngs == ["loss_curves.png", "memory_throughput.png", "metric_vs_params.png"]  # stale one removed
    assert sum(name.startswith("plots/") for name in written) == 3
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") == 3
    assert "skipped" in (out / "report.md").read_text() and "skipped" in html


def test_missing_values_and_failed_only_do_not_crash(rows, tmp_path):
    sparse = [
        {"variant": "bare", "status": "finished"},  # every number missing
        {
            "variant": "nan",
            "status": "finished",
            "final_metric": float("nan"),
            "eval_loss": float("inf"),
            "curves": {"train": [[1, None], [2, float("nan")], "junk"], "eval": None},
        },
        {"seed": 3},
    ]  # no variant, no status
    for case in (sparse, [failed("qlora", 0, ERROR), failed("qlora", 1, "")]):
        table = format_table(case)
        assert len(table.splitlines()) == 2 + len({r.get("variant") for r in case})
        out = tmp_path / str(len(case))
        written = write_report_files(out, case, "edge", {})
        assert all(p.stat().st_size > 0 for p in written.values())
        json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert "no status recorded" in format_table(sparse)
    assert {v["variant"]: v["final_metric_mean"] for v in aggregate(sparse)} == {
        "bare": None,
        "nan": None,
        "?": None,
    }
    only_failed = aggregate([failed("qlora", 0, ERROR), failed("qlora", 1, "")])
    assert (
        only_failed[0]["n_failed"] == 2
        and only_failed[0]["errors"][1]["error"] == "status 'failed', no error recorded"
    )


def test_atomic_writes_leave_no_temp_files(rows, tmp_path):
    out = tmp_path / "cmp"
    written = write_report_files(out, rows, "first", META)
    before = {name: os.stat(path).st_ino for name, path in written.items()}
    again = write_report_files(out, rows, "again", META)
    files = {p for p in out.rglob("*") if p.is_file()}
    assert files == set(again.values())  # nothing else: no .tmp leftovers
    # every file was replaced by a rename, not rewritten in place
    assert all(os.stat(path).st_ino != before[name] for name, path in again.items())
    assert json.loads((out / "results.json").read_text())["title"] == "again"


def test_import_does_not_load_matplotlib():
    code = (
        "import sys, adaptkit.compare.report; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
