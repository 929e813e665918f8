"""Throwaway installed distributions for plugin tests.

``FakeSite`` writes modules and ``<name>-<version>.dist-info`` folders (METADATA and
entry_points.txt) into a folder that is put on ``sys.path``, so ``importlib.metadata`` finds
them exactly as it finds pip-installed plugins. ``site.env()`` gives a subprocess the same view.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from pathlib import Path

#: A well-behaved plugin registering one strategy; format with name=.
GOOD = '''
from adaptkit import Strategy, StrategyConfig, hookimpl

class Config(StrategyConfig):
    """No options."""

class Fake(Strategy):
    """A fake strategy from a throwaway distribution."""

    def apply(self, model):
        return model

@hookimpl
def adaptkit_register_strategies(register):
    register("{name}", Fake, Config)
'''

#: Broken plugins: (module source, a fragment the one-line reason must contain).
BROKEN = {
    "import_error": ("import adaptkit_no_such_module_xyz\n", "No module named 'adaptkit_no_such_module_xyz'"),
    "bad_argument": (
        "from adaptkit import hookimpl\n\n@hookimpl\ndef adaptkit_register_strategies(register, nonsense):\n    pass\n",
        "nonsense",
    ),
    "unknown_hook": (
        GOOD.format(name="typo_owner") + "\n@hookimpl\ndef adaptkit_on_sav(run):\n    pass\n",
        "'adaptkit_on_sav' is not an adaptkit hook",
    ),
    "missing_marker": (
        "def adaptkit_register_strategies(register):\n    register('unmarked', object, object)\n",
        "not decorated with @adaptkit.hookimpl",
    ),
    "newer_api": (
        "ADAPTKIT_API = 99\n" + GOOD.format(name="from_the_future"),
        "needs adaptkit plugin API 99",
    ),
    "register_raises": (
        "from adaptkit import hookimpl\n\n@hookimpl\ndef adaptkit_register_strategies(register):\n"
        "    raise RuntimeError('boom in register')\n",
        "adaptkit_register_strategies raised RuntimeError: boom in register",
    ),
    "not_a_strategy": (
        "from adaptkit import StrategyConfig, hookimpl\n\n@hookimpl\ndef adaptkit_register_strategies(register):\n"
        "    register('notstrat', dict, StrategyConfig)\n",
        "is not a subclass of adaptkit.Strategy",
    ),
    "shadows_builtin": (
        GOOD.format(name="freeze"),
        "strategy 'freeze' is registered by both plugin 'freeze' (adaptkit",
    ),
}


class FakeSite:
    """A folder of fake installed distributions, prepended to ``sys.path``."""

    def __init__(self, root: Path, monkeypatch) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.modules: list[str] = []
        monkeypatch.syspath_prepend(str(root))

    def add(
        self,
        dist: str,
        entry_points: dict[str, str],
        modules: dict[str, str] | None = None,
        version: str = "1.0",
    ) -> None:
        """Install ``dist`` with ``entry_points`` (plugin name -> module) in the ``adaptkit`` group."""
        for module, source in (modules or {}).items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source))
            self.modules.append(module)
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
        (info / "entry_points.txt").write_text(f"[adaptkit]\n{lines}")
        importlib.invalidate_caches()

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that sees these distributions (autoload on)."""
        env = {k: v for k, v in os.environ.items() if k != "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD"}
        env["PYTHONPATH"] = os.pathsep.join([str(self.root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.update(extra)
        return env

    def cleanup(self) -> None:
        for module in self.modules:
            sys.modules.pop(module, None)
        importlib.invalidate_caches()
