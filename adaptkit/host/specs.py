"""Strategy specs as users write them, and the rules a stack of strategies must follow.

Pure functions over the contract's types: the plugin host uses them to turn a recipe's
``strategies:`` list into configured strategy objects (``PluginHost.build_strategies``).
"""

from __future__ import annotations

from adaptkit.contract.strategy import Strategy
from adaptkit.errors import ConfigError, StrategyError

#: A strategy as users write it: ``"lora"``, ``{"name": "lora", "r": 8}`` or ``("lora", {"r": 8})``.
StrategySpec = str | dict | tuple


def describe_error(err: dict) -> str:
    """A pydantic error as one phrase, repeating the value the user gave."""
    msg = err["msg"]
    if err["type"] != "missing" and "input" in err:
        msg += f" (got {err['input']!r})"
    return msg


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


def check_stack(stack: list[Strategy]) -> None:
    """Refuse combinations that cannot work, before anything touches the model."""
    names = [s.name for s in stack]
    if not stack:
        raise StrategyError("no strategy given")
    for name in set(names):
        if names.count(name) > 1:
            raise StrategyError(f"strategy '{name}' appears twice in the stack; configure it once")
    for s in stack:
        if s.exclusive and len(stack) > 1:
            raise StrategyError(
                f"strategy '{s.name}' trains the whole model and cannot be combined with {[n for n in names if n != s.name]}"
            )
    peft_users = [s.name for s in stack if s.wraps_with_peft]
    if len(peft_users) > 1:
        raise StrategyError(f"strategies {peft_users} each wrap the model with peft; use only one of them")
    for i, s in enumerate(stack):
        s.check(stack, i)
