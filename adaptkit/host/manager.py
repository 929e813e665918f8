"""The plugin host: finds plugins, registers them with pluggy, and collects what they register.

Three sources, loaded in this fixed order (so the outcome never depends on the filesystem):

1. built-in plugins (``DEFAULT_PLUGINS``): everything in ``adaptkit_plugins`` (the ``plugins/``
   folder): loaders, tasks, metrics, transforms, data sources and the first-party strategies;
   they use the same ``hookimpl`` marker as everyone else;
2. installed distributions advertising the entry-point group ``adaptkit``, sorted by
   distribution and entry-point name; skipped when ``ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD`` is set;
3. modules named explicitly (``adaptkit -p package.module``).

``-p no:NAME`` blocks a plugin by name, except the ``ESSENTIAL`` ones no recipe can run
without (as pytest refuses ``-p no:main``). A plugin that fails (import error, bad hook, unknown hook,
too new an API, duplicate registration) is recorded as broken with a one-line reason naming it
and its distribution; every other plugin keeps working.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from adaptkit.contract import hookspecs
from adaptkit.errors import AdaptkitError, ConfigError, PluginError, StrategyError
from adaptkit.host import specs
from adaptkit.host.specs import Setting, StrategySpec, check_stack, option_problems, split_spec
from adaptkit.version import __version__

ENTRY_POINT_GROUP = "adaptkit"
DISABLE_AUTOLOAD_ENV = "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD"

#: Built-in plugins as (name, module). They can be blocked with ``-p no:NAME`` like any other.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("loaders", "adaptkit_plugins.loaders.transformers"),
    ("packaged", "adaptkit_plugins.loaders.packaged"),
    ("tasks", "adaptkit_plugins.tasks"),
    ("metrics", "adaptkit_plugins.metrics"),
    ("transforms", "adaptkit_plugins.transforms"),
    ("full", "adaptkit_plugins.strategies.full"),
    ("freeze", "adaptkit_plugins.strategies.freeze"),
    ("lora", "adaptkit_plugins.strategies.lora"),
    ("adapters", "adaptkit_plugins.strategies.adapters"),
    ("gradual_unfreeze", "adaptkit_plugins.strategies.gradual_unfreeze"),
    ("peft", "adaptkit_plugins.strategies.peft_methods"),
    ("neftune", "adaptkit_plugins.strategies.neftune"),
    ("lisa", "adaptkit_plugins.strategies.lisa"),
    ("reasoning_gym", "adaptkit_plugins.data_sources.reasoning_gym"),
    ("image_sets", "adaptkit_plugins.data_sources.image_sets"),
    ("spoken_keywords", "adaptkit_plugins.data_sources.spoken_keywords"),
    ("baselines", "adaptkit_plugins.strategies.baselines"),
)

#: Built-in plugins no recipe can run without: blocking one is refused.
ESSENTIAL = ("loaders", "tasks")

#: The registries filled by ``adaptkit_register_*`` hooks: hook suffix -> what one entry is.
REGISTRIES = ("strategies", "tasks", "data_sources", "metrics", "transforms", "models")
#: How messages name one entry of each registry.
SINGULAR = {
    "strategies": "strategy",
    "tasks": "task",
    "data_sources": "data source",
    "metrics": "metric",
    "transforms": "transform",
    "models": "model",
}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: Model names follow their upstream names (``all-minilm-l6-v2``, ``smollm2-135m-instruct``).
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


@dataclass
class PluginInfo:
    """One plugin as ``adaptkit plugins`` shows it."""

    name: str
    module: str
    source: str  # "builtin", "entry point" or "-p"
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    error: str | None = None
    #: True when loading the plugin imported torch (heavy modules belong inside the functions
    #: that need them: ``adaptkit strategies`` and ``plugins`` start without torch)
    imports_torch: bool = False

    @property
    def origin(self) -> str:
        """``name (distribution version)``: how error messages name this plugin."""
        if self.distribution:
            return f"plugin '{self.name}' ({self.distribution} {self.version})"
        return f"plugin '{self.name}' ({self.module})"


@dataclass
class Registration:
    """One registered object (a strategy, task, data source, metric or transform)."""

    name: str
    obj: Any
    plugin: PluginInfo
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def description(self) -> str:
        """The first line of the registered object's docstring."""
        doc = inspect.getdoc(self.obj) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


class PluginHost:
    """A loaded set of plugins and everything they registered.

    Build one with ``get_plugin_host()``; there is no global host, so tests and embedding
    applications can hold several with different plugins.
    """

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("adaptkit")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.registries: dict[str, dict[str, Registration]] = {kind: {} for kind in REGISTRIES}

    # -- loading ---------------------------------------------------------------------------

    def add(self, plugin: Any, info: PluginInfo) -> bool:
        """Register ``plugin`` under ``info.name`` and collect its registrations.

        Returns False (and records the reason in ``info.error``) when the plugin is refused;
        nothing of a refused plugin stays registered.
        """
        if self.pm.is_registered(plugin):
            # the same module named twice (an entry point and ``-p``): it is loaded already
            return True
        self.plugins.append(info)
        taken = self.name_taken(info.name)
        if taken:
            return self._refuse(info, None, taken)
        problem = _check_api_version(plugin) or _check_hook_names(plugin, self.pm)
        if problem:
            return self._refuse(info, None, problem)
        try:
            self.pm.register(plugin, name=info.name)
        except pluggy.PluginValidationError as exc:
            return self._refuse(info, plugin, f"invalid hook implementation: {exc}")
        callers = self.pm.get_hookcallers(plugin) or []
        unknown = sorted(c.name for c in callers if not c.has_spec())
        if unknown:  # a hookimpl under another name, or with specname=, that is no hook
            return self._refuse(
                info,
                plugin,
                f"{unknown} {'is not an adaptkit hook' if len(unknown) == 1 else 'are not adaptkit hooks'} (known hooks: see adaptkit.contract.hookspecs)",
            )
        wrappers = sorted(
            c.name
            for c in callers
            for impl in c.get_hookimpls()
            if impl.plugin is plugin and (impl.hookwrapper or getattr(impl, "wrapper", False))
        )
        if wrappers:  # notifications call each plugin on its own: a wrapper would silently never run
            return self._refuse(
                info,
                plugin,
                f"{wrappers} declared with wrapper=True or hookwrapper=True; adaptkit calls each plugin's "
                "hooks on their own, so a wrapper would never run: use a plain @hookimpl",
            )
        info.hooks = sorted(c.name for c in callers)
        staged, problem = self._collect(plugin, info)
        if problem:
            return self._refuse(info, plugin, problem)
        for kind, entries in staged.items():
            self.registries[kind].update(entries)
        return True

    def name_taken(self, name: str) -> str | None:
        """Why ``name`` cannot be used for a new plugin, or None if it is free."""
        if self.pm.is_blocked(name):
            return f"the plugin name '{name}' is blocked"
        if self.pm.get_plugin(name) is not None:
            owner = next((p for p in self.plugins if p.name == name and not p.error), None)
            by = f" by {owner.origin}" if owner else ""
            return f"the plugin name '{name}' is already taken{by}"
        return None

    def _refuse(self, info: PluginInfo, plugin: Any, reason: str) -> bool:
        info.error = one_line(reason)
        # pluggy keeps a plugin's name even when its validation fails; undo all of it.
        if plugin is not None and self.pm.is_registered(plugin):
            self.pm.unregister(plugin)
        if self.pm.get_plugin(info.name) is plugin and plugin is not None:
            self.pm.unregister(name=info.name)
        return False

    def _collect(
        self, plugin: Any, info: PluginInfo
    ) -> tuple[dict[str, dict[str, Registration]], str | None]:
        """Run the plugin's ``adaptkit_register_*`` hooks, checking names against earlier plugins."""
        staged: dict[str, dict[str, Registration]] = {kind: {} for kind in REGISTRIES}
        for kind in REGISTRIES:
            hook = getattr(self.pm.hook, f"adaptkit_register_{kind}")
            for impl in hook.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                args = {"register": _registrar(kind, staged[kind], self.registries[kind], info)}
                try:
                    impl.function(**{arg: args[arg] for arg in impl.argnames})
                except _DuplicateName as exc:
                    return staged, str(exc)
                except Exception as exc:  # a bug in the plugin: name it, keep the host alive
                    return staged, f"adaptkit_register_{kind} raised {type(exc).__name__}: {exc}"
        return staged, None

    # -- looking things up -----------------------------------------------------------------

    @property
    def broken(self) -> list[PluginInfo]:
        """Plugins that were refused, each with its one-line reason."""
        return [p for p in self.plugins if p.error]

    def strategy(self, name: str) -> Registration:
        """The registered strategy called ``name``, or a StrategyError listing what exists."""
        return self.lookup("strategies", name)

    def lookup(self, kind: str, name: str) -> Registration:
        """Find ``name`` in one registry; the error lists every name that is registered."""
        registry = self.registries[kind]
        if name not in registry:
            known = ", ".join(sorted(registry)) or "none"
            what = SINGULAR[kind]
            hint = ""
            for info in self.broken:
                hint += f"\n  note: {info.origin} failed to load: {info.error}"
            raise StrategyError(f"unknown {what} '{name}'; available: {known}{hint}")
        return registry[name]

    def notify(self, hook_name: str, **kwargs: Any) -> list[PluginError]:
        """Call a notification hook on every plugin, each in isolation.

        One plugin raising does not stop the others; the errors come back, each naming its plugin.
        """
        errors = []
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception as exc:
                info = next((p for p in self.plugins if p.name == impl.plugin_name and not p.error), None)
                who = info.origin if info else f"plugin '{impl.plugin_name}'"
                errors.append(
                    PluginError(f"{who} failed in {hook_name}: {type(exc).__name__}: {one_line(str(exc))}")
                )
        return errors

    def call_strict(self, hook_name: str, **kwargs: Any) -> None:
        """Call a hook whose failure must stop the run; the error names the plugin."""
        errors = self.notify(hook_name, **kwargs)
        if errors:
            raise errors[0]

    # -- recipes against what is installed -----------------------------------------------------

    def build_strategies(
        self, specs: Iterable[StrategySpec], path: str = "strategies", setting: Setting | None = None
    ) -> list[Any]:
        """Validate each spec with its plugin's config class and check the stack as a whole
        (against ``setting``, the task and launch it will run in, where known).

        Returns the configured strategy objects in the recipe's order. Every problem is collected
        into one ConfigError, each with its dotted path (``strategies[1].r``).
        """
        from pydantic import ValidationError

        problems: list[tuple[str, str]] = []
        stack = []
        for i, spec in enumerate(specs):
            where = f"{path}[{i}]"
            try:
                name, options = split_spec(spec)
            except ConfigError as exc:  # name the item, and go on to collect the other items' problems
                problems.extend((where, msg) for _, msg in exc.problems)
                continue
            try:
                entry = self.strategy(name)
            except StrategyError as exc:
                problems.append((f"{where}.name", str(exc)))
                continue
            config_class = entry.extra["config_class"]
            try:
                config = config_class(**options)
            except ValidationError as exc:
                problems.extend(option_problems(exc, where, name, config_class))
                continue
            strategy = entry.obj(config, name=name)
            strategy.origin = entry.plugin.origin  # errors from its code name its plugin
            stack.append(strategy)
        if problems:
            raise ConfigError(problems)
        check_stack(stack, setting)
        return stack

    def recipe_problems(self, raw: dict) -> list[tuple[str, str]]:
        """What a raw recipe asks that the installed plugins cannot do: unknown or misconfigured
        strategies, an impossible stack, an unknown task. Each problem is (dotted path, message)."""
        problems: list[tuple[str, str]] = []
        stack: list[Any] = []
        task = (
            raw.get("model", {}).get("task", "classification") if isinstance(raw.get("model"), dict) else None
        )
        if isinstance(raw.get("strategies"), list) and raw["strategies"]:  # [] is the schema's problem
            try:
                setting = Setting.from_environment(task if isinstance(task, str) else None)
                stack = self.build_strategies(raw["strategies"], setting=setting)
            except ConfigError as exc:
                problems.extend(exc.problems)
            except AdaptkitError as exc:
                problems.append(("strategies", str(exc)))
        if isinstance(task, str):
            try:
                task_cls = self.lookup("tasks", task).obj
            except AdaptkitError as exc:
                problems.append(("model.task", str(exc)))
            else:
                problems.extend(specs.packing_problems(raw, task, task_cls, self.registries["tasks"], stack))
        return problems


class _DuplicateName(Exception):
    pass


def one_line(text: str) -> str:
    """Collapse a multi-line message (pluggy's validation errors) into one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _registrar(kind: str, staged: dict, existing: dict, info: PluginInfo) -> Callable[..., None]:
    def register(name: str, obj: Any, *extra: Any) -> None:
        pattern = _MODEL_NAME if kind == "models" else _NAME
        if not isinstance(name, str) or not pattern.match(name):
            raise ValueError(f"{kind} name {name!r} must match {pattern.pattern.strip('^$')}")
        if name in existing or name in staged:
            other = (existing.get(name) or staged[name]).plugin
            what = SINGULAR[kind]
            raise _DuplicateName(f"{what} '{name}' is registered by both {other.origin} and {info.origin}")
        details: dict[str, Any] = {}
        if kind == "strategies":
            details = _check_strategy(name, obj, *extra)
        elif extra:
            raise TypeError(f"register() for {kind} takes (name, object), got {len(extra) + 2} arguments")
        staged[name] = Registration(name=name, obj=obj, plugin=info, extra=details)

    return register


def _check_strategy(name: str, strategy_cls: Any, config_cls: Any = None) -> dict[str, Any]:
    from adaptkit.contract.strategy import Strategy, StrategyConfig

    if not (inspect.isclass(strategy_cls) and issubclass(strategy_cls, Strategy)):
        raise TypeError(f"strategy '{name}': {strategy_cls!r} is not a subclass of adaptkit.Strategy")
    if not (inspect.isclass(config_cls) and issubclass(config_cls, StrategyConfig)):
        raise TypeError(
            f"strategy '{name}': config class {config_cls!r} is not a subclass of adaptkit.StrategyConfig"
        )
    return {"config_class": config_cls}


def _check_api_version(plugin: Any) -> str | None:
    needed = getattr(plugin, "ADAPTKIT_API", None)
    if needed is not None and (not isinstance(needed, int) or needed > hookspecs.PLUGIN_API_VERSION):
        return (
            f"needs adaptkit plugin API {needed}, but adaptkit {__version__} provides "
            f"API {hookspecs.PLUGIN_API_VERSION}; upgrade adaptkit"
        )
    return None


def _check_hook_names(plugin: Any, pm: pluggy.PluginManager) -> str | None:
    """Refuse ``adaptkit_*`` functions that are not hooks, or hooks missing the marker."""
    for attr in dir(plugin):
        if not attr.startswith("adaptkit_"):
            continue
        value = getattr(plugin, attr, None)
        if not callable(value):
            continue
        if not hasattr(hookspecs, attr):
            return f"'{attr}' is not an adaptkit hook (known hooks: see adaptkit.contract.hookspecs)"
        if pm.parse_hookimpl_opts(plugin, attr) is None:
            return f"'{attr}' is not decorated with @adaptkit.hookimpl"
    return None


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = (ep.name, ep.value)
        if key not in seen:  # the same distribution can appear twice on sys.path
            seen.add(key)
            unique.append(ep)
    return sorted(unique, key=lambda ep: ((ep.dist.name if ep.dist else "").lower(), ep.name))


def get_plugin_host(
    plugins: Iterable[str] = (),
    autoload: bool | None = None,
    builtins: bool = True,
) -> PluginHost:
    """Build a plugin host.

    ``plugins`` takes pytest-style arguments: ``package.module`` loads that module as a plugin,
    ``no:NAME`` blocks the plugin called NAME (built-in or entry point). ``autoload=None`` follows
    the ``ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD`` environment variable.
    """
    args = list(plugins)
    blocked = {arg[3:] for arg in args if arg.startswith("no:")}
    essential = sorted(blocked & set(ESSENTIAL)) if builtins else []
    if essential:
        raise PluginError(
            f"plugin '{essential[0]}' is essential and cannot be blocked (-p no:{essential[0]})"
        )
    explicit = [arg for arg in args if not arg.startswith("no:")]
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    entry_points = _entry_points()  # scanned once: for the names -p no: may block, and to load
    _refuse_unknown_blocks(blocked, explicit, entry_points)

    host = PluginHost()
    for name in sorted(blocked):
        host.pm.set_blocked(name)

    def load(info: PluginInfo, loader: Callable[[], Any]) -> None:
        if info.name in blocked:
            return
        taken = host.name_taken(info.name)
        if taken and info.source == "entry point":  # refuse a shadowing plugin before running its code
            host.plugins.append(info)
            info.error = taken
            return
        torch_before = "torch" in sys.modules
        try:
            plugin = loader()
        except Exception as exc:
            host.plugins.append(info)
            info.error = one_line(f"import failed: {type(exc).__name__}: {exc}")
            return
        # a plugin that imports torch when it loads makes every command start seconds later
        info.imports_torch = not torch_before and "torch" in sys.modules
        host.add(plugin, info)

    if builtins:
        for name, module in DEFAULT_PLUGINS:
            load(
                PluginInfo(name, module, "builtin", "adaptkit", __version__),
                lambda m=module: importlib.import_module(m),
            )
    if autoload:
        for ep in entry_points:
            dist = ep.dist.name if ep.dist else None
            version = ep.dist.version if ep.dist else None
            load(PluginInfo(ep.name, ep.value, "entry point", dist, version), ep.load)
    for module in explicit:
        load(PluginInfo(module, module, "-p"), lambda m=module: importlib.import_module(m))
    for info in host.broken:
        print(f"adaptkit: warning: {info.origin} failed to load: {info.error}", file=sys.stderr)
    return host


def _refuse_unknown_blocks(
    blocked: set[str], explicit: list[str], entry_points: list[importlib.metadata.EntryPoint]
) -> None:
    """``-p no:NAME`` for a name no plugin has (a typo) is refused, naming the plugins there are,
    rather than silently blocking nothing."""
    known = {name for name, _ in DEFAULT_PLUGINS} | {ep.name for ep in entry_points} | set(explicit)
    unknown = sorted(blocked - known)
    if unknown:
        raise PluginError(
            f"-p no:{unknown[0]}: no plugin is called '{unknown[0]}' (plugins: {', '.join(sorted(known))})"
        )


_DEFAULT: PluginHost | None = None


def default_host() -> PluginHost:
    """The host of the installed plugins, built once per process: what ``adaptkit.apply`` and the
    estimator use when no host is given."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = get_plugin_host()
    return _DEFAULT
