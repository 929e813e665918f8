"""The conformance kit as a pytest test and as a two-process run.

``conformance_test`` turns the checks of ``adaptkit.testing.conformance`` into one parametrized
pytest test (one item per family, config and check). ``check_two_processes`` trains a tiny
model with the strategy under ``accelerate launch`` on two CPU processes (gloo), as users run
DDP; it is slow (two real launches), so the pytest item carries the ``distributed`` marker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from adaptkit.host.manager import PluginHost, default_host, get_plugin_host
from adaptkit.testing.conformance import CHECKS, FAMILY_TASKS, Case, CheckFailed, run_case

#: Steps of the two-process run: enough for a strategy that changes what trains every few steps.
DDP_STEPS = 8


def conformance_test(
    strategy: str,
    configs: list[dict[str, Any]] | None = None,
    families: tuple[str, ...] = tuple(FAMILY_TASKS),
    plugins: tuple[str, ...] = (),
    two_processes: bool = True,
):
    """A pytest test function that runs every conformance check on ``strategy``::

        test_bitfit = conformance_test("bitfit")

    ``plugins`` are ``-p`` style modules to load besides the installed ones (a plugin under
    development). A check the strategy refuses with a ``StrategyError`` is reported as skipped,
    with the refusal. With ``two_processes``, one more item (marked ``distributed``) runs the
    two-process check on the first family.
    """
    import pytest

    configs = configs or [{}]
    params = [
        pytest.param(config, family, check, id=f"{family}-{_label(config)}-{check.replace(' ', '_')}")
        for config in configs
        for family in families
        for check in CHECKS
    ]
    if two_processes:
        params += [
            pytest.param(config, families[0], "two processes", marks=pytest.mark.distributed,
                         id=f"{families[0]}-{_label(config)}-two_processes")
            for config in configs
        ]  # fmt: skip

    @pytest.mark.parametrize("config, family, check", params)
    def test_conformance(config: dict[str, Any], family: str, check: str) -> None:
        host = _host(plugins)
        if check == "two processes":
            try:
                check_two_processes(strategy, config, family, plugins)
            except CheckFailed as exc:
                pytest.fail(str(exc), pytrace=False)
            return
        (result,) = run_case(Case(strategy, dict(config), family, host), [check])
        if result.outcome == "failed":
            pytest.fail(f"{strategy} on {family}: {check}: {result.message}", pytrace=False)
        if result.outcome in ("refused", "skipped"):
            pytest.skip(f"{result.outcome}: {result.message}")

    test_conformance.__name__ = f"test_conformance_{strategy}"
    return test_conformance


def _label(config: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(config.items())) or "defaults"


def _host(plugins: tuple[str, ...]) -> PluginHost:
    return get_plugin_host(list(plugins)) if plugins else default_host()


def check_two_processes(
    strategy: str, config: dict[str, Any], family: str = "bert", plugins: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Train with the strategy on one process and on two (DDP over gloo) and compare: the ranks end
    with identical weights, and both runs train the same number of parameters.

    Returns the two-process run's ``summary.json``. Raises ``CheckFailed`` otherwise.
    """
    from adaptkit.testing.models import save_tiny_pretrained, write_sentiment

    task = FAMILY_TASKS[family][1]
    if task != "classification":
        raise CheckFailed(f"the two-process check runs on a text classification family, not {family}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_tiny_pretrained(work / "model", family)
        (work / "data").mkdir()
        write_sentiment(work / "data" / "train.jsonl", 64, seed=0)
        write_sentiment(work / "data" / "validation.jsonl", 16, seed=1)
        spec = json.dumps([{"name": strategy, **config}])
        recipe = work / "recipe.yaml"
        recipe.write_text(
            f"model: {{source: {work / 'model'}, task: classification}}\n"
            f"data: {{source: {work / 'data'}, max_length: 16}}\n"
            f"strategies: {spec}\n"
            f"train: {{max_steps: {DDP_STEPS}, micro_batch_size: 4, lr: 1.0e-2, seed: 0}}\n"
            f"output: {work / 'runs'}/{{name}}\n"
        )
        one = _train(work, recipe, "one", 1, plugins)
        two = _train(work, recipe, "two", 2, plugins)
    if not two.get("ranks_in_sync"):
        raise CheckFailed(f"'{strategy}' under two processes: the ranks ended with different weights")
    if one["trainable_parameters"] != two["trainable_parameters"]:
        raise CheckFailed(
            f"'{strategy}' trains {two['trainable_parameters']} parameters under two processes and "
            f"{one['trainable_parameters']} under one"
        )
    return two


def adaptkit_command(args: list[str], processes: int = 1) -> list[str]:
    """The command line of ``adaptkit ARGS`` in a child process, under ``accelerate launch`` on
    ``processes`` CPU processes (gloo) when there are several."""
    from adaptkit.compare.child import adaptkit_command as command

    launch = [
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
    ]  # fmt: skip
    return command(args, launch if processes > 1 else [])


def _train(work: Path, recipe: Path, name: str, processes: int, plugins: tuple[str, ...]) -> dict[str, Any]:
    """One real ``adaptkit train`` in a child process (under ``accelerate launch`` for several)."""
    flags = [arg for p in plugins for arg in ("-p", p)]
    args = [*flags, "train", str(recipe), f"name={name}", "--fresh"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run(
        adaptkit_command(args, processes), capture_output=True, text=True, timeout=900, env=env
    )
    if res.returncode != 0:
        raise CheckFailed(f"the {processes}-process run failed: {res.stderr.strip()[-1500:]}")
    return json.loads((work / "runs" / name / "summary.json").read_text())


def format_table(results: list[Any]) -> str:
    """The results as a table (a row per check, a column per family), then every message."""
    families = list(dict.fromkeys(r.family for r in results))
    checks = list(dict.fromkeys(r.check for r in results))
    cell = {(r.check, r.family): r.outcome for r in results}
    width = max(len(c) for c in checks)
    lines = [f"{'check':<{width}}  " + "  ".join(f"{f:<8}" for f in families)]
    for check in checks:
        lines.append(f"{check:<{width}}  " + "  ".join(f"{cell.get((check, f), '-'):<8}" for f in families))
    notes = [r for r in results if r.outcome != "passed"]
    if notes:
        lines.append("")
    for r in notes:
        lines.append(f"{r.outcome} [{r.family}] {r.check}: {r.message}")
    return "\n".join(lines)


def check_from_cli(
    strategy: str, config: dict[str, Any], families: tuple[str, ...], two_processes: bool, host: PluginHost
) -> int:
    """``adaptkit check-plugin``: print the table; 1 when a check failed, else 0."""
    from adaptkit.testing.conformance import Result, check_strategy, stack_for

    entry = host.strategy(strategy)  # unknown: a StrategyError listing what exists (exit 2)
    # a bad option: one message naming it, before any model is built
    host.build_strategies(stack_for(host, strategy, config), path="--config")
    results = check_strategy(strategy, [config], families or tuple(FAMILY_TASKS), host)
    if two_processes:
        family = families[0] if families else "bert"
        outcome = Result("two processes", family, config, "passed")
        try:
            check_two_processes(strategy, config, family, _plugin_flags(host))
        except CheckFailed as exc:
            outcome.outcome, outcome.message = "failed", str(exc)
        results.append(outcome)
    print(f"{strategy} [{entry.plugin.origin}] {config or ''}".rstrip())
    print(format_table(results))
    failed = sum(r.outcome == "failed" for r in results)
    print(f"\n{failed} failed, {sum(r.outcome == 'passed' for r in results)} passed of {len(results)}")
    return 1 if failed else 0


def _plugin_flags(host: PluginHost) -> tuple[str, ...]:
    """The ``-p`` modules the host loaded, for the child processes of the two-process check."""
    return tuple(p.module for p in host.plugins if p.source == "-p" and not p.error)
