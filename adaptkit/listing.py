"""What is installed, as ``adaptkit strategies`` and ``adaptkit plugins`` print it (without torch)."""

from __future__ import annotations

import json
import typing
from typing import Any


def _field_rows(config_cls: Any) -> list[dict[str, str]]:
    rows = []
    for name, field in config_cls.model_fields.items():
        annotation = field.annotation
        plain = isinstance(annotation, type) and not typing.get_args(annotation)
        # list[str] and Literal[...] keep their parameters: "list" alone would hide what is allowed
        type_name = annotation.__name__ if plain else str(annotation).replace("typing.", "")
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append(
            {"name": name, "type": type_name, "default": default, "description": field.description or ""}
        )
    return rows


def print_strategies(host: Any, as_json: bool) -> int:
    """Print every registered strategy with its plugin, description, capabilities and config fields."""
    entries = [host.registries["strategies"][n] for n in sorted(host.registries["strategies"])]
    rows = [
        {
            "name": e.name,
            "plugin": e.plugin.name,
            "distribution": e.plugin.distribution,
            "version": e.plugin.version,
            "description": e.description,
            "capabilities": e.obj.capabilities(),
            "fields": _field_rows(e.extra["config_class"]),
        }
        for e in entries
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        dist = f"{row['distribution']} {row['version']}" if row["distribution"] else row["plugin"]
        print(f"{row['name']}  [plugin {row['plugin']}, {dist}]")
        print(f"    {row['description']}")
        print(f"    {_describe_capabilities(row['capabilities'])}")
        for f in row["fields"]:
            desc = f"  {f['description']}" if f["description"] else ""
            print(f"      {f['name']}: {f['type']} = {f['default']}{desc}")
    return 0


def _describe_capabilities(caps: dict[str, Any]) -> str:
    tasks = caps["tasks"] if caps["tasks"] == "all" else ", ".join(caps["tasks"])
    return (
        f"{'mergeable' if caps['mergeable'] else 'not mergeable'}; saves {caps['saves']}; combines "
        f"{caps['combines']}; {'works' if caps['quantized_base'] else 'does not work'} on a quantized base; "
        f"launches: {', '.join(caps['launches'])}; tasks: {tasks}"
        + ("" if caps.get("packs", True) else "; cannot train on packed rows")
        + (
            f"; learning rates {caps['learning_rates'][0]:g} to {caps['learning_rates'][1]:g}"
            if caps["learning_rates"]
            else ""
        )
    )


def print_plugins(host: Any, as_json: bool) -> int:
    """Print every plugin, where it came from, its hooks, and why it failed if it did."""
    rows = [
        {
            "name": p.name,
            "module": p.module,
            "source": p.source,
            "distribution": p.distribution,
            "version": p.version,
            "hooks": p.hooks,
            "status": "broken" if p.error else "ok",
            "error": p.error,
            "imports_torch": p.imports_torch,
        }
        for p in host.plugins
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        dist = f"{row['distribution']} {row['version']}" if row["distribution"] else row["module"]
        print(f"{row['name']}  [{row['source']}, {dist}]  {row['status']}")
        if row["error"]:
            print(f"    error: {row['error']}")
        else:
            print(f"    hooks: {', '.join(row['hooks']) or 'none'}")
        if row["imports_torch"]:
            print("    note: imports torch when it loads, which slows every adaptkit command's start")
    return 0
