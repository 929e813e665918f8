"""Setting a run up for the loop: data, model and strategies through the pipeline, then the
optimizer, schedule and loaders, all prepared by Accelerate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from adaptkit.adapt.packing import decide_packing
from adaptkit.adapt.pipeline import encode_for_training, load_base
from adaptkit.adapt.stack import Adapted, apply
from adaptkit.adapt.trainable import Trainables
from adaptkit.kernels.attention import use_cpu_dropout_attention
from adaptkit.train.context import Run
from adaptkit.train.feature_cache import FeatureCache, check_cacheable
from adaptkit.train.forgetting import general_texts, measure_run_texts
from adaptkit.train.measure import reset_peak_memory
from adaptkit.train.memory import confirm_micro_batch
from adaptkit.train.optim import build_optimizer, build_scheduler
from adaptkit.train.sampling import EpochSampler, make_sampler
from adaptkit.train.setup import make_loaders, upcast_trainables


@dataclass
class Prepared:
    """What the loop trains with, each piece prepared by Accelerate where that applies."""

    run: Run
    spec: Any  # the recipe's train section, with the micro-batch memory planning chose
    memory: dict[str, Any]
    adapted: Adapted
    model: Any  # prepared by Accelerate (DDP-wrapped under several processes)
    optimizer: Any
    scheduler: Any
    train_dl: Any
    eval_dl: Any
    sampler: EpochSampler
    loss_fn: Any
    cache: FeatureCache | None
    steps_per_epoch: int
    total_steps: int
    trainables: Trainables  # what trains now, kept in step with the optimizer (and DDP)


def prepare_model_and_data(run: Run, loaded_model: Any = None) -> tuple[Adapted, Any, Any]:
    """Load data and model, apply the strategies; returns (adapted, encoded train, encoded eval)."""
    recipe, host = run.recipe, run.host
    base = load_base(recipe, host, loaded_model)
    model, processor = base.loaded.model, base.loaded.processor
    use_cpu_dropout_attention(model)
    if recipe.forgetting:  # the reference: the pretrained model before any strategy touches it
        run.forgetting_texts = general_texts(recipe.forgetting.source, recipe.forgetting.max_texts)
        run.forgetting_base = measure_run_texts(run, model, processor, base.task)
    adapted = apply(model, recipe.strategies, host=host)
    distributed = run.accelerator.distributed_type.value if run.accelerator else "NO"
    base.task.packing, why_not = decide_packing(recipe, base.task, adapted, distributed)
    if why_not and recipe.data.packing == "auto":
        run.log(f"adaptkit: training rows are not packed: {why_not}")
    train_ds, eval_ds = encode_for_training(base, recipe, host, pack=base.task.packing)
    run.task, run.processor, run.adapted = base.task, processor, adapted
    run.eval_rows = base.splits["validation"]
    return adapted, train_ds, eval_ds


def prepare(run: Run, spec: Any, memory: dict[str, Any], loaded_model: Any = None) -> Prepared:
    """Everything the loop needs, prepared by Accelerate: model, optimizer, schedule and loaders."""
    from adaptkit.kernels.lm_loss import training_loss

    acc = run.accelerator
    adapted, train_ds, eval_ds = prepare_model_and_data(run, loaded_model)
    model = adapted.model
    if run.recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    upcast_trainables(model, acc, run.log)
    # head-only training: the frozen backbone runs once per example, not once per epoch
    cache = (
        FeatureCache(check_cacheable(model, adapted.pending_parameters())) if spec.cache_features else None
    )
    sampler = make_sampler(train_ds, spec, acc.num_processes)
    collate = run.task.collate(run.processor)
    groups = adapted.param_groups(spec.lr, spec.weight_decay)
    trainables = Trainables(adapted, [p for g in groups for p in g["params"]], ddp=acc.num_processes > 1)
    # Parameters a strategy unfreezes later must be known to DDP when it wraps the model: they
    # require grad from the start, and their gradients are dropped until they are unfrozen.
    trainables.mark_pending()
    # Nothing trains (the `none` baseline): the run evaluates the model as it is, in zero steps.
    trains = any(g["params"] for g in groups)
    optimizer = build_optimizer(groups, spec) if trains else None
    loaders = make_loaders(train_ds, eval_ds, sampler, collate, spec.micro_batch_size, spec.seed)
    wrapped, optimizer, train_dl, eval_dl = acc.prepare(model, optimizer, *loaders)
    loss_fn = training_loss(model, run.task, acc.distributed_type.value, acc.autocast)
    if memory.get("micro_batch_size_auto") and not memory.get("chosen_before") and trains:
        pending = adapted.pending_parameters()
        chosen = confirm_micro_batch(
            run, spec, memory, wrapped, optimizer, train_ds, collate, pending, loss_fn
        )
        if chosen != spec:
            spec = chosen
            sampler = make_sampler(train_ds, spec, acc.num_processes)  # by_length steps span micro-batches
            loaders = make_loaders(train_ds, eval_ds, sampler, collate, spec.micro_batch_size, spec.seed)
            train_dl, eval_dl = acc.prepare(*loaders)
        reset_peak_memory(acc.device)  # the run's peak is its training's, not the trials'
    steps_per_epoch = max(1, math.ceil(len(train_dl) / spec.gradient_accumulation))
    total_steps = (spec.max_steps or max(1, math.ceil(spec.epochs * steps_per_epoch))) if trains else 0
    # Not passed to prepare(): accelerate would step it once per process.
    scheduler = build_scheduler(optimizer, spec, total_steps) if trains else None
    return Prepared(
        run, spec, memory, adapted, wrapped, optimizer, scheduler, train_dl, eval_dl, sampler, loss_fn,
        cache, steps_per_epoch, total_steps, trainables,
    )  # fmt: skip
