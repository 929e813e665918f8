"""Evaluation during and after training: loss, task metrics and metrics by generation."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from adaptkit.files import atomic_write_bytes
from adaptkit.train.context import Run

#: Beside ``metrics.jsonl``: the per-example scores of the run's latest (at the end: final) evaluation.
EXAMPLES_FILE = "eval_examples.json"


def selection_metric(spec: Any, task: Any) -> tuple[str, bool]:
    """The metric that decides the best evaluation (``train.metric`` or the task's), and whether larger is better."""
    key = spec.metric or task.metric
    return (
        key,
        task.greater_is_better
        if key == task.metric
        else key != "eval_loss" and "loss" not in key and "perplexity" not in key,
    )


def evaluate(run: Run, model: Any, loader: Any) -> dict[str, float]:
    """Loss and task metrics over the evaluation set (gathered across processes)."""
    import torch

    from adaptkit.contract.task import Task
    from adaptkit.kernels.lm_loss import training_loss

    acc, task = run.accelerator, run.task
    # a loss-only task gets training's loss (for a causal LM, no logits-sized tensor: the
    # evaluation would otherwise be the run's peak); a task that predicts gets the model's output
    predicts = type(task).predictions is not Task.predictions
    loss_fn = training_loss(acc.unwrap_model(model), task, acc.distributed_type.value, acc.autocast)
    was_training = model.training
    model.eval()
    total_loss, total_n = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    preds, refs = [], []
    with torch.no_grad():
        for batch in loader:
            out = model(**batch) if predicts else None
            loss = out.loss if predicts else loss_fn(model, batch)
            n = batch["labels"].shape[0]
            total_loss += loss.double().cpu() * n
            total_n += n
            pr = task.predictions(out, batch) if predicts else None
            if pr is not None:
                p, r = acc.gather_for_metrics(pr)
                preds.append(p.cpu())
                refs.append(r.cpu())
    model.train(was_training)
    loss_sum = acc.reduce(total_loss.to(acc.device), "sum").item()
    count = acc.reduce(total_n.to(acc.device), "sum").item()
    metrics = {"eval_loss": loss_sum / max(count, 1)}
    metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    if preds:
        metrics.update(task.metrics(torch.cat(preds), torch.cat(refs)))
    if run.eval_rows is not None and run.host is not None:
        # Generation runs on the plain model (DDP's wrapper has no generate; peft's does). Every
        # process answers all rows with the same greedy decoding, so all get the same metrics
        # without a gather; FSDP-sharded weights are not supported here.
        registered = {name: reg.obj for name, reg in run.host.registries["metrics"].items()}
        metrics.update(
            task.generation_metrics(acc.unwrap_model(model), run.processor, run.eval_rows, registered)
        )
    return metrics


def split_examples(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Plain float metrics, and the per-example scores of those that carry them (``MeanScore``)."""
    examples = {k: list(v.examples) for k, v in metrics.items() if getattr(v, "examples", None)}
    return {k: float(v) for k, v in metrics.items()}, examples


def example_keys(rows: Any) -> list[str] | None:
    """A short digest of each validation row, so that reports can tell whether two runs scored the
    same examples (a held-out split depends on the seed); None without the rows."""
    if rows is None:
        return None
    return [
        hashlib.sha1(json.dumps(row, sort_keys=True, default=_content).encode()).hexdigest()[:12]
        for row in rows
    ]


def _content(value: Any) -> str:
    """What a row's value that JSON cannot write is, by content: a decoded image's or an array's
    pixels (their ``repr`` names a memory address, or elides the middle), bytes as themselves."""
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha1(value).hexdigest()
    if hasattr(value, "tobytes"):  # numpy arrays, PIL images
        shape = getattr(value, "shape", None) or (getattr(value, "mode", ""), getattr(value, "size", ""))
        return f"{type(value).__name__}{shape}:{hashlib.sha1(value.tobytes()).hexdigest()}"
    return repr(value)


def write_examples(
    run_dir: Path, step: int, examples: dict[str, list[float]], keys: list[str] | None
) -> None:
    """Write one evaluation's per-example scores atomically (``EXAMPLES_FILE``), replacing the last.

    Only the latest evaluation is kept, so at the end of a run the file holds the final one: what
    the report's intervals and paired tests need, at a few bytes per example. ``index`` is each
    score's row in the validation split; ``keys`` are the rows' digests when they match in number.
    """
    n = len(next(iter(examples.values())))
    doc = {
        "step": step,
        "index": list(range(n)),
        "keys": keys if keys is not None and len(keys) == n else None,
        "scores": examples,
    }
    # compact: one line, a few bytes per example (indentation would put each score on a line)
    atomic_write_bytes(Path(run_dir) / EXAMPLES_FILE, json.dumps(doc, separators=(",", ":")).encode())
