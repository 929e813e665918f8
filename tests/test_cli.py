"""The ``adaptkit`` command line, run as a real subprocess with the venv's ``adaptkit`` executable."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_dists import BROKEN, GOOD, FakeSite

from adaptkit.host.manager import DEFAULT_PLUGINS

ADAPTKIT = Path(sys.executable).with_name("adaptkit")
EXAMPLE_DIST = "adaptkit-example-plugin"
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD"}
    env.update(extra)
    return env


def adaptkit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    assert ADAPTKIT.exists(), f"{ADAPTKIT} is missing: run scripts/setup.sh"
    return subprocess.run(
        [str(ADAPTKIT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else clean_env(),
    )


def strategies_json(*args: str, env=None) -> dict[str, dict]:
    result = adaptkit(*args, "strategies", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


@pytest.fixture
def site(tmp_path, monkeypatch):
    s = FakeSite(tmp_path / "site", monkeypatch)
    yield s
    s.cleanup()


# -- listing strategies and plugins -------------------------------------------------------------


def test_strategies_lists_the_example_plugin_with_its_distribution_and_fields():
    version = importlib.metadata.version(EXAMPLE_DIST)
    result = adaptkit("strategies")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    i = lines.index(f"bitfit  [plugin bitfit, {EXAMPLE_DIST} {version}]")
    assert (
        lines[i + 1].strip()
        == "BitFit: train only the bias terms, plus the task head (Ben Zaken et al., 2021)."
    )
    assert lines[i + 2].strip().startswith("mergeable; saves its weights; combines with others")
    assert (
        lines[i + 3].strip()
        == "train_head: bool = True  also train the task head (everything outside the backbone)"
    )
    assert any(line.startswith("freeze  [plugin freeze, adaptkit ") for line in lines)
    assert "Traceback" not in result.stderr

    rows = strategies_json()
    assert rows["bitfit"]["plugin"] == "bitfit"
    assert (rows["bitfit"]["distribution"], rows["bitfit"]["version"]) == (EXAMPLE_DIST, version)
    assert rows["bitfit"]["fields"] == [
        {
            "name": "train_head",
            "type": "bool",
            "default": "True",
            "description": "also train the task head (everything outside the backbone)",
        }
    ]
    assert {f["name"]: f["type"] for f in rows["freeze"]["fields"]}["trainable_modules"] == "list[str]"
    assert rows["full"]["fields"] == []


def test_plugins_lists_where_each_plugin_comes_from():
    result = adaptkit("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["bitfit"] == {
        "name": "bitfit",
        "module": "adaptkit_example_plugin",
        "source": "entry point",
        "distribution": EXAMPLE_DIST,
        "version": importlib.metadata.version(EXAMPLE_DIST),
        "hooks": ["adaptkit_register_strategies"],
        "status": "ok",
        "error": None,
        "imports_torch": False,
    }
    assert rows["freeze"]["source"] == "builtin" and rows["freeze"]["status"] == "ok"
    text = adaptkit("plugins")
    assert text.returncode == 0 and f"bitfit  [entry point, {EXAMPLE_DIST} " in text.stdout


def test_autoload_switch_and_p_flags():
    off = clean_env(ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD="1")
    assert "bitfit" not in strategies_json(env=off)
    back = strategies_json("-p", "adaptkit_example_plugin", env=off)
    assert back["bitfit"]["plugin"] == "adaptkit_example_plugin"
    assert "bitfit" not in strategies_json("-p", "no:bitfit")

    result = adaptkit("-p", "no:freeze", "-p", "no:lora", "plugins", "--json")
    assert result.returncode == 0
    names = [row["name"] for row in json.loads(result.stdout)]
    assert "freeze" not in names and "lora" not in names and {"full", "bitfit"} <= set(names)
    assert "'freeze'" not in result.stderr and "'lora'" not in result.stderr
    rows = strategies_json("-p", "no:freeze")
    assert "freeze" not in rows and {"full", "bitfit"} <= set(rows)


def test_python_m_adaptkit_runs_the_same_cli():
    result = subprocess.run(
        [sys.executable, "-m", "adaptkit", "strategies"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 0 and "bitfit  [plugin bitfit" in result.stdout


# -- broken plugins ----------------------------------------------------------------------------


def test_broken_plugins_get_one_line_each_and_the_cli_keeps_working(site):
    for kind, (source, _) in BROKEN.items():
        site.add(
            f"fake-{kind.replace('_', '-')}",
            {f"fake_{kind}": f"adaptkit_fake_{kind}"},
            {f"adaptkit_fake_{kind}": source},
        )
    site.add(
        "fake-good",
        {"fake_good": "adaptkit_fake_good"},
        {"adaptkit_fake_good": GOOD.format(name="fake_good")},
    )
    env = site.env()

    result = adaptkit("strategies", env=env)
    assert result.returncode == 0, result.stderr
    assert "fake_good  [plugin fake_good, fake-good 1.0]" in result.stdout
    assert "bitfit  [plugin bitfit" in result.stdout and "freeze  [plugin freeze, adaptkit " in result.stdout
    assert "Traceback" not in result.stderr
    for kind, (_, fragment) in BROKEN.items():
        lines = [line for line in result.stderr.splitlines() if f"plugin 'fake_{kind}'" in line]
        assert len(lines) == 1, (kind, result.stderr)
        assert lines[0].startswith(
            f"adaptkit: warning: plugin 'fake_{kind}' (fake-{kind.replace('_', '-')} 1.0) failed to load: "
        )
        assert fragment in lines[0], lines[0]

    result = adaptkit("plugins", "--json", env=env)
    assert result.returncode == 0
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    for kind, (_, fragment) in BROKEN.items():
        row = rows[f"fake_{kind}"]
        assert row["status"] == "broken" and fragment in row["error"], row
        assert row["distribution"] == f"fake-{kind.replace('_', '-')}" and row["version"] == "1.0"
    assert rows["fake_good"]["status"] == "ok" and rows["bitfit"]["status"] == "ok"

    text = adaptkit("plugins", env=env).stdout
    assert "fake_import_error  [entry point, fake-import-error 1.0]  broken" in text
    assert (
        "    error: import failed: ModuleNotFoundError: No module named 'adaptkit_no_such_module_xyz'" in text
    )


# -- light start --------------------------------------------------------------------------------

LIGHT = f"""
import sys, adaptkit.cli
for argv in (['strategies'], ['strategies', '--json'], ['plugins'], ['plugins', '--json'], ['models'], ['models', '--json'],
             ['--help'], []):
    try:
        adaptkit.cli.main(argv)
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
assert not heavy, heavy
"""


def import_chain(importtime: str, module: str) -> str:
    """From ``python -X importtime`` output, the chain of imports that pulled ``module`` in."""
    rows = []
    for line in importtime.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1]
            rows.append((len(name) - len(name.lstrip()), name.strip()))
    for i, (depth, name) in enumerate(rows):
        if name == module:
            chain = [name]
            for d, n in rows[i + 1 :]:  # importtime prints a module before the one importing it
                if d < depth:
                    chain.append(n)
                    depth = d
            return " <- ".join(chain)
    return ""


def test_light_commands_do_not_import_torch(site):
    # with a third-party plugin too: the example plugin and a fake one are imported, torch is not
    site.add(
        "fake-good",
        {"fake_good": "adaptkit_fake_good"},
        {"adaptkit_fake_good": GOOD.format(name="fake_good")},
    )
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", LIGHT],
        capture_output=True,
        text=True,
        env=site.env(),
        timeout=60,
    )
    chain = import_chain(result.stderr, "torch")
    assert result.returncode == 0 and not chain, f"torch imported via {chain or '?'}\n{result.stderr[-2000:]}"


def builtin_plugin_modules() -> list[str]:
    import pkgutil

    import adaptkit_plugins

    public = {
        f"adaptkit_plugins.{m.name}"
        for m in pkgutil.iter_modules(adaptkit_plugins.__path__)
        if not m.name.startswith("_")
    }
    listed = {module for _, module in DEFAULT_PLUGINS if importlib.util.find_spec(module) is not None}
    return sorted(public | listed)


def test_builtin_plugin_modules_import_without_torch():
    modules = builtin_plugin_modules()
    assert {"adaptkit_plugins.strategies.freeze", "adaptkit_plugins.strategies.full"} <= set(modules)
    for module in modules:
        code = f"import sys, {module}; assert 'torch' not in sys.modules"
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
        assert result.returncode == 0, (
            f"{module}: torch imported via {import_chain(result.stderr, 'torch') or '?'}\n{result.stderr[-1500:]}"
        )


def test_import_chain_finds_the_culprit():
    sample = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       10 |         10 |     torch._C\n"
        "import time:       10 |         20 |   torch\n"
        "import time:       10 |         30 | adaptkit_plugins.strategies.lora\n"
    )
    assert import_chain(sample, "torch") == "torch <- adaptkit_plugins.strategies.lora"


# -- usage errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["strategies", "--bogus"], "unrecognized arguments: --bogus"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["-p"], "argument -p: expected one argument"),
    ],
)
def test_usage_errors_exit_2_without_a_traceback(argv, fragment):
    result = adaptkit(*argv)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: adaptkit")
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_no_command_prints_help():
    result = adaptkit()
    assert result.returncode == 0
    assert "strategies" in result.stdout and "plugins" in result.stdout and "-p NAME" in result.stdout


def test_a_plugin_that_imports_torch_when_it_loads_is_named(tmp_path):
    """Such a plugin makes every command start seconds later: ``adaptkit plugins`` says which."""
    (tmp_path / "heavy_plugin.py").write_text(
        "import torch  # at module level: what the note is about\n"
        "from adaptkit import hookimpl\n\n\n"
        "@hookimpl\n"
        "def adaptkit_register_metrics(register):\n"
        "    register('always_zero', lambda predictions, references: 0.0)\n"
    )
    env = clean_env(PYTHONPATH=str(tmp_path))
    result = adaptkit("-p", "heavy_plugin", "plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["heavy_plugin"]["imports_torch"] is True
    assert not [name for name, row in rows.items() if row["imports_torch"] and name != "heavy_plugin"]
    text = adaptkit("-p", "heavy_plugin", "plugins", env=env).stdout
    assert "imports torch when it loads" in text
