"""The ``adaptkit`` command line.

Each command's module is imported only when that command runs, so ``adaptkit --help``,
``adaptkit strategies`` and ``adaptkit plugins`` start without importing torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from adaptkit.errors import AdaptkitError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, help: str):
    """Declare a sub-command: the decorated function adds its arguments to the parser."""

    def decorate(fn):
        COMMANDS[name] = (help, fn)
        return fn

    return decorate


@command("strategies", "list the strategies installed plugins provide, with their config fields")
def _strategies_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=cmd_strategies)


@command("plugins", "list loaded plugins, where they come from and the hooks they implement")
def _plugins_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=cmd_plugins)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="adaptkit",
        description="Adapt pretrained models to new tasks with pluggable fine-tuning strategies.",
    )
    parser.add_argument(
        "-p", dest="plugins", action="append", default=[], metavar="NAME",
        help="load the plugin module NAME (package.module), or block a plugin with no:NAME; repeatable",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _field_rows(config_cls: Any) -> list[dict[str, str]]:
    rows = []
    for name, field in config_cls.model_fields.items():
        annotation = field.annotation
        type_name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append({"name": name, "type": type_name, "default": default, "description": field.description or ""})
    return rows


def cmd_strategies(args: argparse.Namespace) -> int:
    """Print every registered strategy with its plugin, description and config fields."""
    host = _host(args)
    entries = [host.registries["strategies"][n] for n in sorted(host.registries["strategies"])]
    rows = [
        {
            "name": e.name,
            "plugin": e.plugin.name,
            "distribution": e.plugin.distribution,
            "version": e.plugin.version,
            "description": e.description,
            "fields": _field_rows(e.extra["config_class"]),
        }
        for e in entries
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        dist = f"{row['distribution']} {row['version']}" if row["distribution"] else row["plugin"]
        print(f"{row['name']}  [plugin {row['plugin']}, {dist}]")
        print(f"    {row['description']}")
        for f in row["fields"]:
            desc = f"  {f['description']}" if f["description"] else ""
            print(f"      {f['name']}: {f['type']} = {f['default']}{desc}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """Print every plugin, where it came from, its hooks, and why it failed if it did."""
    host = _host(args)
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
        }
        for p in host.plugins
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        dist = f"{row['distribution']} {row['version']}" if row["distribution"] else row["module"]
        print(f"{row['name']}  [{row['source']}, {dist}]  {row['status']}")
        if row["error"]:
            print(f"    error: {row['error']}")
        else:
            print(f"    hooks: {', '.join(row['hooks']) or 'none'}")
    return 0


def _host(args: argparse.Namespace):
    from adaptkit.plugins import get_plugin_host

    return get_plugin_host(args.plugins)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one message and return 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except AdaptkitError as exc:
        print(f"adaptkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("adaptkit: interrupted", file=sys.stderr)
        return 130
