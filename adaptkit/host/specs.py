"""Strategy specs as users write them, and the rules a stack of strategies must follow.

Pure functions over the contract's types: the plugin host uses them to turn a recipe's
``strategies:`` list into configured strategy objects (``PluginHost.build_strategies``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from adaptkit.contract.strategy import Strategy
from adaptkit.errors import AdaptkitError, ConfigError, PluginError, StrategyError

#: A strategy as users write it: ``"lora"``, ``{"name": "lora", "r": 8}`` or ``("lora", {"r": 8})``.
StrategySpec = str | dict | tuple


def describe_error(err: dict) -> str:
    """A pydantic error as one phrase, repeating the value the user gave."""
    msg = err["msg"]
    if err["type"] != "missing" and "input" in err:
        msg += f" (got {err['input']!r})"
    return msg


def option_problems(exc: Any, where: str, name: str, config_class: Any) -> list[tuple[str, str]]:
    """A strategy config's validation errors, each with its dotted path in the recipe."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        message = describe_error(err)
        if err["type"] == "extra_forbidden":
            message = f"unknown option of '{name}'; its options are {', '.join(config_class.model_fields)}"
        problems.append((f"{where}.{loc}" if loc else where, message))
    return problems


def split_spec(spec: StrategySpec) -> tuple[str, dict]:
    """A strategy spec as (name, options)."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, tuple) and len(spec) == 2:
        return spec[0], dict(spec[1])
    if isinstance(spec, dict) and "name" in spec:
        options = dict(spec)
        return options.pop("name"), options
    raise ConfigError(f"a strategy is a name, a (name, options) pair or a mapping with 'name'; got {spec!r}")


@dataclass(frozen=True)
class Setting:
    """Where a stack will run, as far as is known before anything loads: the recipe's task, and the
    launch (``single``, ``ddp`` or ``sharded``). None where unknown (``adaptkit.apply`` in a script)."""

    task: str | None = None
    launch: str | None = None

    @classmethod
    def from_environment(cls, task: str | None) -> Setting:
        """The setting of a run about to start in this process, with ``task``: the launch is read
        from what ``accelerate launch`` exported."""
        sharded = any(
            os.environ.get(v, "").lower() in ("1", "true", "yes")
            for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
        )
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
        return cls(task=task, launch="sharded" if sharded else "ddp" if several else "single")


@contextmanager
def strategy_code(strategy: Strategy, what: str) -> Iterator[None]:
    """Run a strategy's own code (``what``: ``apply``, ``on_event``, ``save``, ...): an exception that
    is not one of adaptkit's becomes one ``PluginError`` naming the strategy and the plugin that
    registered it, instead of a traceback that names neither."""
    try:
        yield
    except AdaptkitError:
        raise
    except Exception as exc:
        origin = f" of {strategy.origin}" if strategy.origin else ""
        raise PluginError(
            f"strategy '{strategy.name}'{origin} failed in {what}: {type(exc).__name__}: {exc}"
        ) from exc


def check_stack(stack: list[Strategy], setting: Setting | None = None) -> None:
    """Refuse combinations that cannot work, before anything touches the model."""
    names = [s.name for s in stack]
    if not stack:
        raise StrategyError("no strategy given")
    for name in set(names):
        if names.count(name) > 1:
            raise StrategyError(f"strategy '{name}' appears twice in the stack; configure it once")
    for s in stack:
        others = [o.name for o in stack if o is not s and not o.training_only]
        if s.exclusive and others:
            raise StrategyError(
                f"strategy '{s.name}' trains the whole model and cannot be combined with {others}"
            )
    if all(s.training_only for s in stack):
        raise StrategyError(
            f"{names} only change how training runs and train nothing themselves; add a strategy that "
            "chooses what trains (freeze, lora, full, ...)"
        )
    peft_users = [s.name for s in stack if s.wraps_with_peft]
    if len(peft_users) > 1:
        raise StrategyError(f"strategies {peft_users} each wrap the model with peft; use only one of them")
    check_capabilities(stack, setting or Setting())
    for i, s in enumerate(stack):
        with strategy_code(s, "check"):
            s.check(stack, i)


def check_capabilities(stack: list[Strategy], setting: Setting) -> None:
    """Refuse a stack whose strategies do not declare the setting they would run in."""
    for i, s in enumerate(stack):
        quantizer = next((q.name for q in stack[:i] if q.quantizes_base), None)
        if quantizer and not s.quantized_base:
            raise StrategyError(
                f"strategy '{s.name}' does not work on a quantized base, and '{quantizer}' before it "
                "quantizes the base; drop the quantization or this strategy"
            )
        if setting.task is not None and s.tasks is not None and setting.task not in s.tasks:
            raise StrategyError(
                f"strategy '{s.name}' supports the tasks {list(s.tasks)}, not '{setting.task}'"
            )
        if setting.launch is not None and setting.launch not in s.launches:
            raise StrategyError(
                f"strategy '{s.name}' does not run under a {setting.launch} launch; it declares "
                f"{sorted(s.launches)}" + (f" ({s.launches_note})" if s.launches_note else "")
            )


def unpacking_strategies(strategies: list[Any]) -> list[str]:
    """Names of the strategies in a stack that cannot train on packed rows (``packs`` is False)."""
    return [s.name for s in strategies if not getattr(s, "packs", True)]


def packing_rules(task: str, task_packs: bool, train: dict, stack: list[Any]) -> list[tuple[str, str]]:
    """The rules known before any weight loads that keep a run's rows unpacked, each broken one as
    (field, why): the one table that refuses ``data.packing: true`` and that ``auto`` decides by."""
    broken = []
    if not task_packs:
        broken.append(("data.packing", f"task '{task}' does not pack sequences"))
    if train.get("batching") == "by_length":
        broken.append(
            ("train.batching", "by_length needs unpacked rows (packed rows have no padding to save)")
        )
    if train.get("cache_features") is True:
        broken.append(
            ("train.cache_features", "keeps one feature row per example, so it needs unpacked rows")
        )
    if blockers := unpacking_strategies(stack):
        why = f"strategies {blockers} cannot train on packed rows (they add tokens to every sequence)"
        broken.append(("data.packing", why))
    return broken


def packing_problems(
    raw: dict, task: str, task_cls: Any, tasks: dict[str, Any], stack: list[Strategy] | None = None
) -> list[tuple[str, str]]:
    """``data.packing: true`` where a rule of ``packing_rules`` keeps the rows unpacked (``tasks``:
    the task registry, named where the task does not pack); each problem is (dotted path, message)."""
    data, train = raw.get("data"), raw.get("train")
    if not (isinstance(data, dict) and data.get("packing") is True):
        return []
    packs = bool(getattr(task_cls, "packs", False))
    broken = packing_rules(task, packs, train if isinstance(train, dict) else {}, stack or [])
    problems = [(field, f"{why}; set data.packing: false or auto") for field, why in broken]
    if not packs:  # the task's rule comes first; it names the tasks that do pack instead
        packing = ", ".join(
            sorted(name for name, entry in tasks.items() if getattr(entry.obj, "packs", False))
        )
        problems[0] = ("data.packing", f"{broken[0][1]}; tasks that do: {packing}")
    return problems
