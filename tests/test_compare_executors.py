"""Comparisons on several runs at once: ``parallel: N`` on this machine and ``executor: ray``.

One 2-variant x 2-seed comparison of a tiny BERT runs one run at a time, then on a local Ray
instance with 2 CPUs (started and stopped here), then two at a time locally: the rows agree run
for run, metrics and trained weights bit for bit. Every run has one CPU thread in all three
(``threads_per_run: 1``; Ray's ``cpus_per_run: 1``; two runs at once on two cores): the results
depend on the thread count.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from test_compare import compare_cli, comparison

from adaptkit.compare import execute, plan
from adaptkit.errors import AdaptkitError, ConfigError
from adaptkit.testing import save_tiny_pretrained, write_sentiment

TRAIN = "max_steps: 3, lr: 1.0e-2, micro_batch_size: 16"
HEAD = "  seeds: [0, 1]\n  lr: fixed\n  forgetting: null\n  variants:\n    - {name: full}\n"
LORA = "    - {name: lora, strategies: [{name: lora, r: 2}], overrides: {train.lr: 5.0e-3}}\n"
BROKEN = "    - {name: broken, overrides: {data.text: no_such_column}}\n"
VARIANTS = HEAD + LORA
# what differs from one execution of the same run to the next: clocks and memory
TIMINGS = {"wall_time_s", "samples_per_s", "tokens_per_s", "peak_memory_mb", "seconds_to_target"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("executors")
    save_tiny_pretrained(d / "bert", "bert")
    write_sentiment(d / "train.jsonl", 64, seed=0)
    return d


@pytest.fixture(scope="module", autouse=True)
def _no_plugin_autoload():
    """The children (and Ray's workers, which inherit this process's environment) load built-ins only."""
    before = os.environ.get("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD")
    os.environ["ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    yield
    if before is None:
        del os.environ["ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD"]


def run(workdir: Path, name: str, compare: str) -> tuple[Path, list[dict]]:
    from adaptkit.testing import plugin_host

    p = plan(comparison(workdir, name, compare, train=TRAIN), host=plugin_host())
    return p.root, execute(p)["rows"]


def same_runs(rows: list[dict], expected: list[dict], roots: tuple[Path, Path]) -> None:
    """Equal rows, run for run, timings aside; the trained weights are equal too."""
    assert [(r["variant"], r["seed"]) for r in rows] == [(r["variant"], r["seed"]) for r in expected]
    for row, want in zip(rows, expected):
        assert row["status"] == want["status"] == "finished", row.get("error")
        assert {k: v for k, v in row.items() if k not in TIMINGS} == {
            k: v for k, v in want.items() if k not in TIMINGS
        }
        digests = [json.loads((root / row["run_dir"] / "summary.json").read_text()) for root in roots]
        assert digests[0]["param_digest"] == digests[1]["param_digest"]


@pytest.fixture(scope="module")
def sequential(workdir):
    """The reference: one run at a time, one thread each."""
    return run(workdir, "sequential", VARIANTS + "  threads_per_run: 1\n")


@pytest.fixture(scope="module")
def on_ray(workdir):
    """The comparison, a crashing variant between the two, on a 2-CPU Ray instance of the test's own."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        result = run(workdir, "ray", HEAD + BROKEN + LORA + "  executor: ray\n")
        assert ray.is_initialized()  # adaptkit used the instance it found and left it running
        return result
    finally:  # stopped before the next test, which starts Ray of its own from the command line
        ray.shutdown()


@pytest.mark.slow
def test_ray_runs_equal_the_sequential_runs_and_a_crash_is_a_failed_row(sequential, on_ray):
    (root, rows), (ref_root, ref_rows) = on_ray, sequential
    same_runs([r for r in rows if r["variant"] != "broken"], ref_rows, (root, ref_root))
    broken = [r for r in rows if r["variant"] == "broken"]
    assert [r["status"] for r in broken] == ["failed", "failed"]
    assert all("no_such_column" in r["error"] for r in broken)
    assert "no_such_column" in (root / "logs" / "broken-s0.log").read_text()  # the task wrote the log
    index = json.loads((root / "comparison.json").read_text())
    assert [(r["variant"], r["seed"]) for r in index["runs"]] == [(r["variant"], r["seed"]) for r in rows]


@pytest.mark.slow
def test_a_second_invocation_on_ray_skips_the_finished_runs(workdir, on_ray):
    """From the command line, with no Ray running: adaptkit starts a local instance and stops it."""
    root, _ = on_ray
    stamp = (root / "runs" / "lora-s1" / "summary.json").stat().st_mtime_ns
    path = comparison(workdir, "ray", VARIANTS + "  executor: ray\n", train=TRAIN)  # broken left out
    proc = compare_cli("compare", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("full-s0", "full-s1", "lora-s0", "lora-s1"):
        assert f"{key}: finished earlier, skipped" in proc.stderr
    assert "/4] " not in proc.stderr  # no run started
    assert (root / "runs" / "lora-s1" / "summary.json").stat().st_mtime_ns == stamp
    assert "lora" in proc.stdout and (root / "report.html").is_file()


@pytest.mark.slow
def test_a_local_ray_instance_without_the_resources_of_a_run_is_refused(workdir, host):
    import ray

    compare = VARIANTS + "  executor: ray\n  ray: {gpus_per_run: 64}\n"
    p = plan(comparison(workdir, "nogpu", compare, train=TRAIN), host=host)
    with pytest.raises(AdaptkitError, match="a run claims 1 CPU and 64 GPU"):
        execute(p)
    assert not ray.is_initialized()  # the instance adaptkit started is stopped
    assert not (p.root / "runs").exists()


@pytest.mark.slow
def test_parallel_runs_equal_the_sequential_runs_and_keep_their_output_in_the_logs(
    workdir, sequential, capfd
):
    root, rows = run(workdir, "parallel", VARIANTS + "  parallel: 2\n")
    ref_root, ref_rows = sequential
    same_runs(rows, ref_rows, (root, ref_root))
    err = capfd.readouterr().err
    assert "[4/4] " in err  # the progress lines are printed
    assert "; run directory" not in err  # the children's own lines are not
    assert "; run directory" in (root / "logs" / "lora-s1.log").read_text()


@pytest.mark.slow
def test_a_search_runs_trials_at_once_on_the_storage_named(workdir, tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    search = (
        "  parallel: 2\n  forgetting: null\n  search:\n    trials: 2\n    workers: 2\n    pruning: false\n"
        f"    storage: {storage}\n    space: {{train.lr: {{low: 1.0e-4, high: 1.0e-1, log: true}}}}\n"
        "  variants:\n    - {name: probe, strategies: [{name: freeze, trainable_top_blocks: 0}]}\n"
    )
    root, rows = run(workdir, "search", search)
    study = optuna.load_study(study_name="probe-s0", storage=storage)
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    # both trials ran at once: each started before the other completed
    assert max(t.datetime_start for t in trials) < min(t.datetime_complete for t in trials)
    assert not (root / "search.db").exists()
    assert rows[0]["status"] == "finished"


@pytest.mark.parametrize(
    "settings, words",
    [
        ("  executor: ray\n  parallel: 2\n", ["compare.parallel", "executor: ray", "got 2"]),
        ("  ray: {cpus_per_run: 2}\n", ["compare.ray", "for executor: ray"]),
        (
            "  executor: ray\n  ray: {gpus_per_run: -1}\n",
            ["compare.ray.gpus_per_run", "greater than or equal"],
        ),
        ("  executor: dask\n", ["compare.executor", "'local' or 'ray'"]),
        ("  parallel: 0\n", ["compare.parallel", "greater than or equal to 1"]),
        (
            "  search: {workers: 2, space: {train.lr: {low: 0.1, high: 1}}}\n",
            ["compare.parallel", "search.workers: 2", "parallel: 2 or more"],
        ),
        ("  parallel: 2\n  launch: [--num_processes, '2']\n", ["compare.parallel", "launch:"]),
        ("  parallel: 2\n  launch: [--multi_gpu]\n", ["compare.parallel", "launch:"]),
    ],
)
def test_bad_executor_settings_name_the_field(workdir, host, settings, words):
    path = comparison(workdir, "bad", "  variants:\n    - {name: a}\n" + settings)
    with pytest.raises(ConfigError) as exc:
        plan(path, host=host)
    for w in words:
        assert w in str(exc.value), (w, str(exc.value))


def test_a_bad_setting_exits_with_status_2(workdir):
    path = comparison(workdir, "bad_cli", "  variants:\n    - {name: a}\n  ray: {cpus_per_run: 2}\n")
    proc = compare_cli("compare", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "compare.ray: Value error, these settings are for executor: ray" in proc.stderr


def test_without_ray_installed_one_message_says_how_to_get_it(workdir, host, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is not installed
    p = plan(comparison(workdir, "noray", VARIANTS + "  executor: ray\n", train=TRAIN), host=host)
    with pytest.raises(AdaptkitError) as exc:
        execute(p)
    assert "pip install 'adaptkit[ray]'" in str(exc.value) and exc.value.exit_code == 2
    assert not (p.root / "runs").exists()  # it said so before any run
