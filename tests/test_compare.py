"""Comparisons: the recipe matrix, runs in child processes, skipping and resuming, tuning, the report."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adaptkit.compare import plan
from adaptkit.testing import save_tiny_pretrained, write_sentiment

ENV = {**os.environ, "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    save_tiny_pretrained(d / "bert", "bert")
    write_sentiment(d / "train.jsonl", 160, seed=0)
    return d


def comparison(
    workdir: Path, name: str, compare: str, train: str = "epochs: 2, lr: 1.0e-2, micro_batch_size: 16"
) -> Path:
    path = workdir / f"{name}.yaml"
    path.write_text(
        f"model: {{source: {workdir / 'bert'}, task: classification}}\n"
        f"data: {{source: {workdir / 'train.jsonl'}, max_length: 16}}\n"
        f"strategies: [full]\n"
        f"train: {{{train}}}\n"
        f"output: {workdir / 'out'}/{{name}}\n"
        f"compare:\n{compare}"
    )
    return path


def compare_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adaptkit", *args], capture_output=True, text=True, env=ENV, timeout=900
    )


# -- the recipe matrix (no training) ---------------------------------------------------------


def test_variants_grid_seeds_and_budget_expand_into_runs(workdir, host):
    path = comparison(
        workdir,
        "matrix",
        """
  seeds: [0, 1]
  budget: {steps: 5}
  grid: {train.weight_decay: [0.0, 0.1]}
  variants:
    - {name: probe, strategies: [{name: freeze, trainable_top_blocks: 0}]}
    - name: lora
      strategies: [{name: lora, r: 4}]
      overrides: {train.lr: 1.0e-3}
      grid: {strategies.0.r: [2, 8]}
""",
    )
    p = plan(path, host=host)
    assert list(p.variants) == [
        "probe[weight_decay=0.0]",
        "probe[weight_decay=0.1]",
        "lora[weight_decay=0.0,r=2]",
        "lora[weight_decay=0.0,r=8]",
        "lora[weight_decay=0.1,r=2]",
        "lora[weight_decay=0.1,r=8]",
    ]
    job = p.variants["lora[weight_decay=0.1,r=8]"][1]
    assert job.seed == 1 and job.raw["train"]["seed"] == 1
    assert job.raw["strategies"] == [{"name": "lora", "r": 8}]
    assert (
        job.raw["train"]["weight_decay"] == 0.1
        and job.raw["train"]["lr"] == 1e-3
        and job.raw["train"]["max_steps"] == 5
    )
    assert job.raw["forgetting"]["source"] == "pydoc"
    assert not job.tunes_lr and p.variants["probe[weight_decay=0.0]"][0].tunes_lr
    # every run has its own directory; the data and the validation split are the base's for all
    dirs = {j.raw["output"] for jobs in p.variants.values() for j in jobs}
    assert len(dirs) == 12
    assert {j.raw["data"]["source"] for jobs in p.variants.values() for j in jobs} == {
        str(workdir / "train.jsonl")
    }


def test_the_none_baseline_trains_nothing_and_is_not_tuned(workdir, host):
    path = comparison(
        workdir,
        "baseline",
        """
  lr_sweep: [1.0e-3, 1.0e-2]
  variants:
    - {name: none, strategies: [none]}
    - {name: scratch, strategies: [scratch]}
""",
    )
    p = plan(path, host=host)
    assert not p.variants["none"][0].trains and p.variants["scratch"][0].trains


@pytest.mark.parametrize(
    "compare, words",
    [
        (
            "  variants:\n    - {name: a, strategies: [{name: lora, r: -1}]}\n",
            ["compare.variants[0] (a)", "strategies[0].r"],
        ),
        ("  variants:\n    - {name: a, strategies: [nosuch]}\n", ["compare.variants[0] (a)", "nosuch"]),
        ("  variants:\n    - {name: a}\n  colour: red\n", ["compare.colour", "unknown key"]),
        ("  variants:\n    - {name: a}\n    - {name: a}\n", ["unique"]),
        ("  variants: []\n", ["compare.variants"]),
        (
            "  variants:\n    - {name: a}\n  lr_sweep: [0.1]\n  search: {space: {train.lr: {low: 0.1, high: 1}}}\n",
            ["lr_sweep or search"],
        ),
        (
            "  variants:\n    - {name: a}\n  budget: {steps: 3, seconds: 4}\n",
            ["compare.budget", "exactly one"],
        ),
        ("  variants:\n    - {name: a, overrides: {train.lr: -1}}\n", ["train.lr", "greater than 0"]),
        ("  variants:\n    - {name: 'a b'}\n", ["compare.variants[0].name"]),
    ],
)
def test_bad_comparisons_are_reported_with_their_path(workdir, compare, words):
    proc = compare_cli("validate", str(comparison(workdir, "bad", compare)))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)


def test_validate_lists_variants_and_train_refuses_a_comparison(workdir):
    path = comparison(
        workdir, "listed", "  variants:\n    - {name: none, strategies: [none]}\n    - {name: full}\n"
    )
    proc = compare_cli("validate", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "none: strategies ['none']" in proc.stdout and "full: strategies ['full']" in proc.stdout
    proc = compare_cli("train", str(path))
    assert proc.returncode == 2 and "adaptkit compare" in proc.stderr and "Traceback" not in proc.stderr


def test_report_of_a_directory_that_is_no_comparison(tmp_path):
    proc = compare_cli("report", str(tmp_path))
    assert proc.returncode == 2 and "not a comparison directory" in proc.stderr


# -- running ---------------------------------------------------------------------------------


def results(root: Path) -> dict:
    return json.loads((root / "results.json").read_text())


@pytest.mark.slow
def test_compare_end_to_end_numbers_match_the_runs(workdir):
    """none, freeze, lora, adapters and gradual_unfreeze on one tiny model; the report repeats each run's own figures."""
    path = comparison(
        workdir,
        "e2e",
        """
  variants:
    - {name: none, strategies: [none]}
    - {name: probe, strategies: [{name: freeze, trainable_top_blocks: 0}]}
    - {name: lora, strategies: [{name: lora, r: 4}], overrides: {train.lr: 5.0e-3}}
    - {name: adapters, strategies: [{name: adapters, reduction_factor: 4}], overrides: {train.lr: 5.0e-3}}
    - {name: gradual, strategies: [{name: gradual_unfreeze, every: 2, unit: step}], overrides: {train.lr: 1.0e-3}}
""",
        train="epochs: 3, lr: 1.0e-2, micro_batch_size: 16",
    )
    proc = compare_cli("compare", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = workdir / "out" / "e2e"
    for name in ("none", "probe", "lora", "adapters", "gradual"):
        assert name in proc.stdout  # the table in the terminal
    runs = results(root)["runs"]
    assert [r["variant"] for r in runs] == ["none", "probe", "lora", "adapters", "gradual"]
    for r in runs:
        assert r["status"] == "finished", r
        s = json.loads((root / r["run_dir"] / "summary.json").read_text())
        assert r["trainable_parameters"] == s["trainable_parameters"]
        assert r["final_metric"] == s["final_metrics"]["accuracy"] and r["metric"] == "accuracy"
        assert r["eval_loss"] == s["final_metrics"]["eval_loss"]
        assert r["peak_memory_mb"] == s["peak_memory_mb"] > 0
        assert r["saved_bytes"] == sum(
            f.stat().st_size for f in (root / r["run_dir"] / "final").rglob("*") if f.is_file()
        )
    by = {r["variant"]: r for r in runs}
    # the baselines: nothing trains in none; a head-only probe leaves the backbone, and so the
    # general-text features, exactly as they were; adapters do move them
    assert (
        by["none"]["trainable_parameters"] == 0
        and by["none"]["steps"] == 0
        and by["none"]["forgetting"] == 0.0
    )
    assert by["probe"]["forgetting"] == pytest.approx(0.0, abs=1e-6)
    assert by["adapters"]["forgetting"] > 1e-6
    assert (
        by["probe"]["trainable_parameters"] == 32 * 2 + 2
    )  # the classifier head of a hidden-32 BERT, 2 labels
    # every variant saw the same validation set: the none baseline's untrained head is scored on it too
    variants = {v["variant"]: v for v in results(root)["variants"]}
    assert variants["probe"]["gain_over_none"] == pytest.approx(
        by["probe"]["final_metric"] - by["none"]["final_metric"]
    )
    with open(root / "results.csv") as f:
        assert [row["variant"] for row in csv.DictReader(f)] == [
            "none",
            "probe",
            "lora",
            "adapters",
            "gradual",
        ]
    md = (root / "report.md").read_text()
    assert all(f"| {n} " in md for n in ("none", "probe", "lora", "adapters", "gradual"))
    html = (root / "report.html").read_text()
    plots = {p.name for p in (root / "plots").glob("*.png")}
    assert "differences_vs_best.png" in plots  # each variant's paired difference from the best
    # the variants name no rate of their own: each was range-tested (compare.lr: auto), and the curves are drawn
    assert "lr_range_tests.png" in plots and "range test: 40 steps" in md
    assert html.count("data:image/png;base64,") == len(plots) == 6


@pytest.mark.slow
def test_a_crashing_variant_fails_alone_and_finished_runs_are_skipped(workdir):
    path = comparison(
        workdir,
        "crash",
        """
  parallel: 2
  variants:
    - {name: probe, strategies: [{name: freeze, trainable_top_blocks: 0}]}
    - {name: broken, strategies: [full], overrides: {data.text: no_such_column}}
    - {name: lora, strategies: [{name: lora, r: 2}], overrides: {train.lr: 5.0e-3}}
""",
        train="max_steps: 6, lr: 1.0e-2, micro_batch_size: 16, save_every: 3",
    )
    proc = compare_cli("compare", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = workdir / "out" / "crash"
    runs = {r["variant"]: r for r in results(root)["runs"]}
    assert runs["probe"]["status"] == runs["lora"]["status"] == "finished"
    assert runs["broken"]["status"] == "failed" and "no_such_column" in runs["broken"]["error"]
    assert "no_such_column" in (root / "report.html").read_text()

    # a second invocation runs nothing that finished; an interrupted run resumes from its checkpoint
    lora = root / "runs" / "lora-s0"
    digest = json.loads((lora / "summary.json").read_text())["param_digest"]
    (lora / "summary.json").unlink()
    shutil.rmtree(lora / "checkpoints" / "step-00000006")
    stamp = (root / "runs" / "probe-s0" / "summary.json").stat().st_mtime_ns
    proc = compare_cli("compare", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "probe-s0: finished earlier, skipped" in proc.stderr
    assert (root / "runs" / "probe-s0" / "summary.json").stat().st_mtime_ns == stamp
    assert "resuming from" in (root / "logs" / "lora-s0.log").read_text()
    resumed = json.loads((lora / "summary.json").read_text())
    assert resumed["steps"] == 6
    assert resumed["param_digest"] == digest  # the same weights as the uninterrupted run, bit for bit

    # the report is rebuilt from the directories alone
    (root / "report.md").unlink()
    proc = compare_cli("report", str(root))
    assert proc.returncode == 0 and (root / "report.md").is_file() and "broken" in proc.stdout


@pytest.mark.slow
def test_lr_sweep_keeps_the_best_rate_for_every_seed(workdir):
    path = comparison(
        workdir,
        "sweep",
        """
  seeds: [0, 1]
  lr_sweep: [1.0e-6, 3.0e-2]
  variants:
    - {name: probe, strategies: [{name: freeze, trainable_top_blocks: 0}]}
""",
        train="epochs: 1, micro_batch_size: 16",
    )
    proc = compare_cli("compare", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = workdir / "out" / "sweep"
    meta = json.loads((root / "comparison.json").read_text())
    tried = meta["tuning"]["probe"]["tried"]
    best = max(tried, key=tried.get)
    assert meta["tuning"]["probe"]["chosen"] == {"train.lr": float(best)}
    # with two rates the best is always at an edge: the report says the best may lie beyond it
    side = "largest" if float(best) == 3.0e-2 else "smallest"
    assert f"is the {side} tried" in meta["tuning"]["probe"]["edge"]
    assert f"is the {side} tried; the best may lie beyond it" in (root / "report.md").read_text()
    runs = results(root)["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert runs[0]["run_dir"] == f"runs/probe-s0-lr{best}"
    import yaml

    seed1 = yaml.safe_load((root / runs[1]["run_dir"] / "recipe.yaml").read_text())
    assert seed1["train"]["lr"] == float(best) and seed1["train"]["seed"] == 1


@pytest.mark.slow
def test_optuna_search_reports_evaluations_and_resumes(workdir):
    import optuna

    path = comparison(
        workdir,
        "search",
        """
  search:
    trials: 3
    space: {train.lr: {low: 1.0e-4, high: 1.0e-1, log: true}}
  variants:
    - {name: probe, strategies: [{name: freeze, trainable_top_blocks: 0}]}
""",
        train="max_steps: 6, eval_every: 2, micro_batch_size: 16",
    )
    proc = compare_cli("compare", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = workdir / "out" / "search"
    study = optuna.load_study(study_name="probe-s0", storage=f"sqlite:///{root / 'search.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # accuracy
    assert len(study.trials) == 3
    for t in study.trials:  # the evaluations of the running trial reached the pruner
        assert t.intermediate_values, t
        if t.state == optuna.trial.TrialState.PRUNED:
            assert max(t.intermediate_values) < 6
    meta = json.loads((root / "comparison.json").read_text())
    assert meta["tuning"]["probe"]["chosen"] == study.best_trial.params
    # run again: the study is complete, nothing is trained
    proc = compare_cli("compare", str(path))
    assert proc.returncode == 0 and "[1/" not in proc.stderr
    assert (
        len(optuna.load_study(study_name="probe-s0", storage=f"sqlite:///{root / 'search.db'}").trials) == 3
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_launch_settings_apply_to_every_run(workdir):
    """compare.launch passes accelerate launch arguments to each run: here 2 CPU processes on gloo."""
    path = comparison(
        workdir,
        "launched",
        """
  launch: [--multi_gpu, --num_processes, "2", --num_machines, "1", --mixed_precision, "no", --dynamo_backend, "no"]
  variants:
    - {name: lora, strategies: [{name: lora, r: 2}], overrides: {train.lr: 5.0e-3}}
""",
        train="max_steps: 3, micro_batch_size: 8",
    )
    proc = compare_cli("compare", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = results(workdir / "out" / "launched")["runs"][0]
    summary = json.loads((workdir / "out" / "launched" / run["run_dir"] / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["ranks_in_sync"] and summary["steps"] == 3


@pytest.mark.slow
def test_report_has_intervals_paired_results_verdict_and_costs(workdir):
    """Two variants on two seeds: every run keeps its final per-example scores, and the report
    (rebuilt offline by ``adaptkit report`` too) has intervals, the paired result, the verdict,
    the time to target and the cost per run."""
    path = comparison(
        workdir,
        "stats",
        """
  seeds: [0, 1]
  cost_per_hour: 3.6
  parallel: 2  # two runs at a time: the report is the same as one at a time (test_compare_executors.py)
  variants:
    - {name: none, strategies: [none]}
    - {name: probe, strategies: [{name: freeze, trainable_top_blocks: 0}]}
""",
        train="max_steps: 6, eval_every: 2, lr: 1.0e-2, micro_batch_size: 16",
    )
    proc = compare_cli("compare", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = workdir / "out" / "stats"
    doc = results(root)
    for r in doc["runs"]:
        run_dir = root / r["run_dir"]
        kept = json.loads((run_dir / "eval_examples.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        scores = kept["scores"]["accuracy"]
        assert kept["step"] == summary["steps"] and kept["index"] == list(range(len(scores)))
        assert len(scores) == 16 and set(scores) <= {0.0, 1.0}  # 10% of 160 rows held out
        assert sum(scores) / len(scores) == pytest.approx(summary["final_metrics"]["accuracy"])
        assert "examples" not in r  # the scores stay in the run directory
        assert r["cost"] == pytest.approx(3.6 * r["wall_time_s"] / 3600)
        evals = [
            h
            for h in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "eval_loss" in h
        ]
        assert all("tokens" in h and "train_seconds" in h for h in evals)
        assert r["steps_to_target"] in [h["step"] for h in evals]
    variants = {v["variant"]: v for v in doc["variants"]}
    for v in variants.values():
        ci = v["interval"]
        assert ci["method"] == "examples and seeds" and ci["low"] <= v["final_metric_mean"] <= ci["high"]
    best = next(v for v in variants.values() if v["is_best"])
    other = next(v for v in variants.values() if not v["is_best"])
    pair = other["vs_best"]
    assert pair["best"] == best["variant"] and pair["low"] <= pair["difference"] <= pair["high"]
    assert pair["difference"] == pytest.approx(other["final_metric_mean"] - best["final_metric_mean"])
    md, html = (root / "report.md").read_text(), (root / "report.html").read_text()
    assert md.index("## Verdict") < md.index("## Results") and " ".join(doc["verdict"]) in md
    assert best["variant"] in doc["verdict"][0]
    assert "95% interval" in md and "Time and cost to 90%" in md and "cost per run" in md
    assert 'class="verdict"' in html and (root / "plots" / "differences_vs_best.png").is_file()
    with open(root / "variants.csv") as f:
        lines = {row["variant"]: row for row in csv.DictReader(f)}
    assert float(lines[other["variant"]]["difference"]) == pytest.approx(pair["difference"])

    # offline: the same report from the run directories alone
    (root / "results.json").unlink()
    proc = compare_cli("report", str(root))
    assert proc.returncode == 0, proc.stderr
    again = results(root)
    assert again["verdict"] == doc["verdict"] and again["variants"] == doc["variants"]
