"""Evaluation during and after training: loss, task metrics and metrics by generation."""

from __future__ import annotations

import math
from typing import Any

from adaptkit.train.context import Run


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
