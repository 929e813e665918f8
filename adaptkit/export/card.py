"""The model card (``README.md``) of an export, generated from the run that produced it.

What a reader of a model hub page expects: the base model, what was trained and how (strategies
with their settings, data, training settings), how well it did (final and best metrics,
forgetting), the library versions, and how to load the files beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adaptkit.recipe.yaml import dump_yaml


def model_card(run: Any, base: dict[str, Any], kind: str, how_to_load: str) -> str:
    """The card of ``run`` exported as ``kind`` (``peft``, ``transformers`` or ``gguf``).

    ``base`` is the export's base record (``public_id``, ``source``); ``how_to_load`` the
    Markdown section that shows the loading code for this kind of export.
    """
    recipe = run.recipe
    summary = _read_json(run.run_dir / "summary.json") if run.run_dir else {}
    versions = _read_json(run.run_dir / "versions.json") if run.run_dir else {}
    strategies = [s.name for s in run.adapted.strategies]
    name = recipe.name or (run.run_dir.name if run.run_dir else "model")
    base_name = base.get("public_id") or base["source"]
    front = {
        "base_model": base_name,
        "library_name": {"peft": "peft", "gguf": "gguf"}.get(kind, "transformers"),
        "tags": ["adaptkit", recipe.model.task, *strategies],
    }
    parts = [
        f"---\n{dump_yaml(front)}---\n",
        f"# {name}\n",
        f"`{base_name}` fine-tuned for `{recipe.model.task}` with adaptkit ({', '.join(strategies)}).\n",
        _training(run, summary),
        _results(summary),
        how_to_load,
        _versions(versions),
    ]
    return "\n".join(p for p in parts if p)


def _training(run: Any, summary: dict[str, Any]) -> str:
    recipe, spec = run.recipe, run.recipe.train
    stack = [{"name": s.name, **s.config.model_dump(mode="json")} for s in run.adapted.strategies]
    sizes = ", ".join(f"{split} {len(rows)}" for split, rows in run.splits.items())
    data = recipe.data
    columns = (
        [c for c in (data.text, data.text_pair, data.label) if c]
        if recipe.model.task == "classification"
        else []
    )
    budget = f"{spec.max_steps} steps" if spec.max_steps else f"{spec.epochs} epochs"
    batch = summary.get("micro_batch_size", spec.micro_batch_size)
    lines = [
        "## Training\n",
        f"- Strategies:\n\n```yaml\n{dump_yaml(stack)}```\n",
        f"- Data: `{data.source}` ({sizes} rows{'; columns ' + ', '.join(columns) if columns else ''}; "
        f"at most {data.max_length} tokens per example)",
        f"- Settings: {budget}, learning rate {spec.lr}, optimizer {spec.optimizer}, micro-batch {batch} x "
        f"{spec.gradient_accumulation} accumulation x {summary.get('num_processes', 1)} processes, "
        f"{spec.mixed_precision} mixed precision, seed {spec.seed}",
    ]
    if summary.get("trainable_parameters") is not None:
        lines.append(
            f"- Trainable parameters: {summary['trainable_parameters']:,} of {summary['total_parameters']:,}"
        )
    return "\n".join(lines) + "\n"


def _results(summary: dict[str, Any]) -> str:
    final = {k: v for k, v in summary.get("final_metrics", {}).items() if k not in ("step", "epoch")}
    if not final:
        return ""
    lines = ["## Results (validation split)\n", "| metric | final | best |", "|---|---|---|"]
    best = summary.get("best_metrics") or {}
    for key, value in final.items():
        lines.append(f"| {key} | {_number(value)} | {_number(best.get(key, ''))} |")
    if summary.get("best_step") is not None:
        lines.append(
            f"\nBest `{summary.get('metric')}` at step {summary['best_step']} of {summary.get('steps')}."
        )
    forgetting = summary.get("forgetting")
    if forgetting:
        lines.append(f"\nForgetting: {_number(forgetting.get('value'))} ({forgetting.get('measure', '')}).")
    return "\n".join(lines) + "\n"


def _versions(versions: dict[str, str]) -> str:
    if not versions:
        return ""
    return "## Versions\n\nTrained with " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".\n"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
