"""The training run: one loop on Hugging Face Accelerate, shaped like accelerate's nlp_example.

``train(recipe)`` loads model and data, applies the strategy stack, trains with mixed precision,
gradient accumulation, clipping and evaluation, writes checkpoints it can resume from, and
leaves a run directory with the final strategy state, metrics and a summary. It runs unchanged
under ``accelerate launch`` on several processes.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptkit.adapt.stack import Adapted, apply
from adaptkit.contract.strategy import TrainState
from adaptkit.data.load import apply_transforms, load_data
from adaptkit.errors import AdaptkitError, ConfigError
from adaptkit.files import atomic_write_bytes, write_json
from adaptkit.host.manager import PluginHost
from adaptkit.recipe.identity import library_versions, recipe_id
from adaptkit.recipe.schema import Recipe
from adaptkit.recipe.yaml import dump_yaml
from adaptkit.train.checkpoint import (
    finalize,
    latest_valid,
    load_optimizer_state,
    optimizer_state,
    read_json,
    read_part,
    rng_state,
    rotate,
    save_parts,
    set_rng_state,
    write_failures_reported,
)
from adaptkit.train.feature_cache import FeatureCache, check_cacheable
from adaptkit.train.forgetting import compare as compare_forgetting
from adaptkit.train.forgetting import general_texts, measure
from adaptkit.train.memory import confirm_micro_batch, plan_memory, write_memory_plan


class TrainingError(AdaptkitError):
    """Training cannot go on (a NaN loss, say); the last good checkpoint is kept."""


@dataclass
class Run:
    """Everything about a run that hooks and helpers need."""

    recipe: Recipe
    host: PluginHost
    run_dir: Path
    accelerator: Any = None
    adapted: Adapted | None = None
    task: Any = None
    processor: Any = None
    eval_rows: Any = None  # the raw validation split, for evaluation by generation
    history: list[dict[str, Any]] = field(default_factory=list)
    forgetting_texts: list[str] = field(default_factory=list)
    forgetting_base: dict[str, Any] | None = None

    def log(self, message: str) -> None:
        """Print a message once (on the main process)."""
        if self.accelerator is None or self.accelerator.is_main_process:
            print(message, file=sys.stderr, flush=True)


class EpochSampler:
    """A fresh permutation each epoch, drawn from ``seed + epoch`` alone.

    The order therefore depends only on the epoch number, so a resumed run sees exactly the
    batches an uninterrupted run would have seen.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def selection_metric(spec: Any, task: Any) -> tuple[str, bool]:
    """The metric that decides the best evaluation (``train.metric`` or the task's), and whether larger is better."""
    key = spec.metric or task.metric
    return (
        key,
        task.greater_is_better
        if key == task.metric
        else key != "eval_loss" and "loss" not in key and "perplexity" not in key,
    )


def scale_gradients(params: Any, factor: float) -> None:
    """Multiply every gradient by ``factor`` in one foreach call.

    The list of gradients lives only inside this call: a list kept in the training loop held
    every gradient through the next step (a full fine-tune of SmolLM2-135M peaked 23% higher).
    """
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)


def build_optimizer(groups: list[dict], spec: Any):
    """AdamW (torch), bitsandbytes 8-bit or paged AdamW, or SGD, over the strategy's groups."""
    import torch

    if spec.optimizer == "adamw":
        # torch's fused AdamW: one kernel per dtype and device, no temporaries. On a 2-core CPU its
        # step took 134 ms against 558 ms for torch's default loop over SmolLM2-135M's tensors (full
        # fine-tuning) and 12 ms against 27 ms over LoRA's 420, and it held 224 MiB less at the step
        try:
            return torch.optim.AdamW(groups, lr=spec.lr, fused=True)
        except RuntimeError:  # parameters on a device without the fused kernel
            return torch.optim.AdamW(groups, lr=spec.lr)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=0.9)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }
    return cls[spec.optimizer](groups, lr=spec.lr)


def trackers(spec: Any) -> list[str]:
    """The Accelerate trackers ``train.report_to`` names; a ConfigError when one is not installed."""
    from accelerate.utils import is_tensorboard_available

    installed = {"tensorboard": is_tensorboard_available}
    for name in spec.report_to:
        if not installed[name]():
            raise ConfigError(
                [("train.report_to", f"'{name}' is not installed; pip install {name}, or leave it out")]
            )
    return list(spec.report_to)


def build_scheduler(optimizer: Any, spec: Any, total_steps: int):
    """Linear, cosine or constant schedule with warmup, stepped once per optimizer step."""
    from transformers import get_scheduler

    warmup = int(spec.warmup_ratio * total_steps)
    name = "constant_with_warmup" if spec.scheduler == "constant" else spec.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def prepare_model_and_data(run: Run, loaded_model: Any = None):
    """Load data and model, apply the strategies; returns (adapted, encoded train, encoded eval)."""
    from adaptkit.kernels.attention import use_cpu_dropout_attention

    recipe, host = run.recipe, run.host
    splits, files = load_data(recipe.data, host, recipe.train.seed)
    task = host.lookup("tasks", recipe.model.task).obj(recipe.data)
    task.setup(splits, files)
    loaded = loaded_model or host.pm.hook.adaptkit_load_model(spec=recipe.model, task=task)
    if loaded is None:
        raise ConfigError(f"model.source: no loader recognised '{recipe.model.source}'")
    task.prepare_model(loaded.model, loaded.processor)
    use_cpu_dropout_attention(loaded.model)
    if recipe.forgetting:  # the reference: the pretrained model before any strategy touches it
        run.forgetting_texts = general_texts(recipe.forgetting.source, recipe.forgetting.max_texts)
        run.forgetting_base = measure(
            loaded.model,
            loaded.processor,
            run.forgetting_texts,
            recipe.forgetting.max_length,
            causal=task.auto_model == "AutoModelForCausalLM",
        )
    adapted = apply(loaded.model, recipe.strategies, host=host)
    train_ds = task.encode(
        apply_transforms(splits["train"], recipe.data, host), loaded.processor, files["train"]
    )
    eval_ds = task.encode(splits["validation"], loaded.processor, files["validation"])
    run.task, run.processor, run.adapted = task, loaded.processor, adapted
    run.eval_rows = splits["validation"]
    return adapted, train_ds, eval_ds


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


def peak_memory_mb(device: Any) -> float:
    """Peak memory of this process since it started or ``reset_peak_memory``: GPU max allocated, or
    the CPU's peak resident set (Linux's VmHWM; elsewhere ``ru_maxrss``, which cannot be reset)."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: Any) -> None:
    """Start ``peak_memory_mb`` over from what the process holds now (after the auto micro-batch's trial steps)."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set (Linux 4.0+)
            f.write("5")
    except OSError:
        pass


def param_digest(model: Any) -> str:
    """sha256 of every parameter, in name order: equal digests mean identical weights."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def quiet_libraries() -> None:
    """Silence progress bars and load reports of datasets and transformers: adaptkit reports progress itself."""
    import logging

    import datasets
    import transformers

    # bitsandbytes warns on every CPU import that an optional hub-downloaded kernel is missing;
    # its own fallback kernel is used, so the warning only alarms users.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def train(recipe: Recipe, host: PluginHost, fresh: bool = False, loaded_model: Any = None) -> dict[str, Any]:
    """Run (or resume) the training a recipe describes and return its summary."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from adaptkit.kernels.lm_loss import training_loss

    quiet_libraries()
    spec = recipe.train
    run = Run(recipe=recipe, host=host, run_dir=recipe.run_dir)
    # cpu=True on machines without an accelerator: only then does Accelerate treat a launch of
    # several processes (accelerate launch --multi_gpu, torchrun) as MULTI_CPU on gloo.
    report_to = trackers(spec)  # checked before anything is loaded
    if spec.mixed_precision == "fp16" and not torch.accelerator.is_available():
        # Accelerate runs no fp16 autocast on the CPU: the run would train in float32 while its
        # summary said fp16
        raise ConfigError(
            [
                (
                    "train.mixed_precision",
                    "fp16 needs a GPU (Accelerate has no fp16 autocast on the CPU); "
                    "on the CPU use bf16 or no",
                )
            ]
        )
    acc = Accelerator(
        mixed_precision=spec.mixed_precision,
        gradient_accumulation_steps=spec.gradient_accumulation,
        cpu=not torch.accelerator.is_available(),
        log_with=report_to or None,
        project_dir=str(run.run_dir / "tracking") if report_to else None,
    )
    run.accelerator = acc
    set_seed(spec.seed)
    # before any weight loads: micro_batch_size auto is resolved, and a run that will not fit stops here
    spec, memory = plan_memory(run, fresh, loaded=loaded_model is not None)

    adapted, train_ds, eval_ds = prepare_model_and_data(run, loaded_model)
    model = adapted.model
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    upcast = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if upcast:  # GradScaler and optimizers need float32 master weights: never train fp16 weights
        run.log(f"adaptkit: upcasting {len(upcast)} trainable tensors to float32 (e.g. {upcast[0]})")
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        half = next(
            (p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32), None
        )
        if half is not None and not acc.native_amp:
            # float32 layers between frozen half-precision ones: a matmul mixing the two dtypes fails
            # unless autocast (which Accelerate only runs for a mixed_precision it supports here) casts
            model.forward = torch.autocast(acc.device.type, dtype=half)(model.forward)
            run.log(
                f"adaptkit: the frozen weights stay {str(half).removeprefix('torch.')}; the forward pass runs under autocast"
            )

    # head-only training: the frozen backbone runs once per example, not once per epoch
    cache = (
        FeatureCache(check_cacheable(model, adapted.pending_parameters())) if spec.cache_features else None
    )

    sampler = EpochSampler(len(train_ds), spec.seed)
    collate = run.task.collate(run.processor)

    def loaders(batch_size: int) -> tuple[Any, Any]:
        # Own generators: a DataLoader without one draws a seed from the global RNG each time it is
        # iterated, which would shift dropout masks between a resumed and an uninterrupted run.
        return (
            torch.utils.data.DataLoader(
                train_ds,
                batch_size=batch_size,
                sampler=sampler,
                collate_fn=collate,
                generator=torch.Generator().manual_seed(spec.seed),
            ),
            torch.utils.data.DataLoader(
                eval_ds,
                batch_size=batch_size,
                collate_fn=collate,
                generator=torch.Generator().manual_seed(spec.seed),
            ),
        )

    # Parameters a strategy unfreezes later must be known to DDP when it wraps the model: they
    # require grad from the start, and their gradients are dropped until they are unfrozen.
    distributed = acc.num_processes > 1
    if distributed:
        for p in adapted.pending_parameters():
            p.requires_grad_(True)
    groups = adapted.param_groups(spec.lr, spec.weight_decay)
    # Nothing trains (the `none` baseline): the run evaluates the model as it is, in zero steps.
    trains = any(g["params"] for g in groups)
    optimizer = build_optimizer(groups, spec) if trains else None
    wrapped, optimizer, train_dl, eval_dl = acc.prepare(model, optimizer, *loaders(spec.micro_batch_size))
    loss_fn = training_loss(model, run.task, acc.distributed_type.value, acc.autocast)
    if memory.get("micro_batch_size_auto") and not memory.get("chosen_before") and trains:
        chosen = confirm_micro_batch(
            run, spec, memory, wrapped, optimizer, train_ds, collate, adapted.pending_parameters(), loss_fn
        )
        if chosen != spec:
            spec = chosen
            train_dl, eval_dl = acc.prepare(*loaders(spec.micro_batch_size))
        reset_peak_memory(acc.device)  # the run's peak is its training's, not the trials'

    steps_per_epoch = max(1, math.ceil(len(train_dl) / spec.gradient_accumulation))
    total_steps = (spec.max_steps or max(1, math.ceil(spec.epochs * steps_per_epoch))) if trains else 0
    # Not passed to prepare(): accelerate would step it once per process (C16).
    scheduler = build_scheduler(optimizer, spec, total_steps) if trains else None

    state = {
        "step": 0,
        "epoch": 0,
        "batch_in_epoch": 0,
        "best": None,
        "bad_evals": 0,
        "samples": 0,
        "tokens": 0,
    }
    ckpt_root = run.run_dir / "checkpoints"
    rid = recipe_id(recipe)
    # --fresh deletes the old run only now that data, model and strategies loaded: a recipe that
    # fails on any of them leaves what was already written untouched
    if fresh and acc.is_main_process and run.run_dir.exists():
        shutil.rmtree(run.run_dir)
    acc.wait_for_everyone()
    found = latest_valid(ckpt_root, rid, log=run.log)
    if found:
        path, _ = found
        adapted.load_state(path / "model")
        load_optimizer_state(optimizer.optimizer, read_part(path, "optimizer"), read_json(path, "optimizer"))
        scheduler.load_state_dict(read_json(path, "scheduler"))
        state.update(read_json(path, "trainer_state"))
        set_rng_state(
            read_part(path, f"rng-{acc.process_index}"), read_json(path, f"rng-{acc.process_index}")
        )
        run.history = read_json(path, "history")
        run.log(f"adaptkit: resuming from {path} (step {state['step']})")
    elif acc.is_main_process:  # an earlier attempt that left no checkpoint: its curves start over
        (run.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run.run_dir / "tracking", ignore_errors=True)

    if acc.is_main_process:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.run_dir / "versions.json", library_versions())
        write_memory_plan(run.run_dir, memory)  # a resumed run reads back the micro-batch auto chose
        atomic_write_bytes(run.run_dir / "recipe.yaml", dump_yaml(recipe.model_dump(mode="json")).encode())
    metrics_file = run.run_dir / "metrics.jsonl"
    if report_to:  # TensorBoard writes to <run dir>/tracking/<run name>
        acc.init_trackers(recipe.name or "run")

    def log_metrics(entry: dict[str, Any]) -> None:
        run.history.append(entry)
        if acc.is_main_process:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(entry) + "\n")
        # trackers take numbers only; accelerate.log writes on the main process and is a no-op without trackers
        acc.log(
            {
                k: v
                for k, v in entry.items()
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)
            },
            step=entry["step"],
        )

    def train_state() -> TrainState:
        return TrainState(
            step=state["step"],
            epoch=state["epoch"],
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            num_processes=acc.num_processes,
        )

    def save_checkpoint() -> None:
        step = state["step"]
        state["train_time"] = train_time()
        tmp = ckpt_root / f".tmp-step-{step:08d}"
        with write_failures_reported(ckpt_root / f"step-{step:08d}", ckpt_root, partial=tmp):
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            rng_t, rng_j = rng_state()
            save_parts(tmp, {f"rng-{acc.process_index}": rng_t}, {f"rng-{acc.process_index}": rng_j})
            if acc.is_main_process:
                adapted.save(tmp / "model")
                opt_t, opt_j = optimizer_state(optimizer.optimizer)
                save_parts(
                    tmp,
                    {"optimizer": opt_t},
                    {
                        "optimizer": opt_j,
                        "scheduler": scheduler.state_dict(),
                        "trainer_state": state,
                        "history": run.history,
                    },
                )
            acc.wait_for_everyone()
            if acc.is_main_process:
                final = finalize(tmp, ckpt_root / f"step-{step:08d}", {"run_id": rid, "step": step})
                rotate(ckpt_root, spec.keep_checkpoints)
        if acc.is_main_process:
            for err in host.notify("adaptkit_on_checkpoint", run=run, step=step, path=str(final)):
                run.log(f"adaptkit: {err}")
        acc.wait_for_everyone()

    def run_eval() -> bool:
        """Evaluate, log, track the best; True when early stopping says stop."""
        metrics = evaluate(run, wrapped, eval_dl)
        log_metrics({"step": state["step"], "epoch": state["epoch"], **metrics})
        for err in host.notify("adaptkit_on_evaluate", run=run, step=state["step"], metrics=metrics):
            run.log(f"adaptkit: {err}")
        key, better = selection_metric(spec, run.task)
        if key not in metrics:
            key, better = "eval_loss", False
        value = metrics[key]
        if state["best"] is None or (value > state["best"] if better else value < state["best"]):
            state.update(best=value, best_step=state["step"], best_metrics=metrics, bad_evals=0)
        else:
            state["bad_evals"] += 1
        return spec.early_stopping_patience is not None and state["bad_evals"] >= spec.early_stopping_patience

    def fire(event: str) -> set[int]:
        """Pass an event to the strategies; return the ids of parameters whose gradients to drop."""
        adapted.on_event(event, train_state())
        pending = adapted.pending_parameters()
        if distributed:  # strategies may have frozen them again; DDP expects every wrapped grad
            for p in pending:
                p.requires_grad_(True)
        return {id(p) for p in pending}

    def train_time() -> float:
        """Seconds spent training, including those before a resume."""
        return time_before + time.perf_counter() - start

    def over_budget() -> bool:
        """A token or wall-time budget is spent (the same on every rank: the count is global, the clock is rank 0's)."""
        spent = spec.max_time is not None and train_time() >= spec.max_time
        if distributed and spec.max_time is not None:
            spent = bool(acc.reduce(torch.tensor(float(spent), device=acc.device), "max").item())
        return spent or (spec.max_tokens is not None and state["tokens"] >= spec.max_tokens)

    host.call_strict("adaptkit_on_train_start", run=run)
    gated = fire("train_start")
    wrapped.train()
    if cache:
        cache.install()
    try:
        start, time_before = time.perf_counter(), state.get("train_time", 0.0)
        stop = state["step"] >= total_steps
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_steps,
            initial=state["step"],
            desc=recipe.name or "train",
            disable=not acc.is_main_process
            or not (sys.stderr.isatty() or os.environ.get("ADAPTKIT_PROGRESS")),
            leave=False,
        )
        while not stop:
            sampler.set_epoch(state["epoch"])
            gated = fire("epoch_start")
            skip = state["batch_in_epoch"]
            loader = acc.skip_first_batches(train_dl, skip) if skip else train_dl
            for batch in loader:
                # C18: a model's loss is a mean over its micro-batch's items (examples, or supervised
                # tokens for LMs), and a mean of such means is not the mean over the accumulated batch
                # when counts differ (variable lengths, a short tail window). Each micro-batch's loss is
                # weighted by its item count `n` (over `ref`, the first micro-batch's mean count across
                # ranks, to keep magnitudes as usual for fp16); at the step the gradients are rescaled
                # to exactly sum(item losses) / items in the window on all ranks, undoing accelerate's
                # division by the accumulation steps and DDP's mean over ranks.
                n = torch.as_tensor(run.task.loss_items(batch), dtype=torch.float32, device=acc.device)
                if state["batch_in_epoch"] % spec.gradient_accumulation == 0:
                    gated = fire("step_start")
                    ref = acc.reduce(n.clone(), "mean").clamp(min=1)
                    window = torch.zeros(
                        3, dtype=torch.float32, device=acc.device
                    )  # sum of loss x n, items, tokens
                with acc.accumulate(wrapped):
                    # only the loss is kept: holding the whole output would keep this step's logits (for
                    # a 49k-token vocabulary, batch x seq x 49k floats) alive through the next forward
                    loss = loss_fn(wrapped, batch)
                    acc.backward(loss * n / ref)
                    tokens = (
                        batch["attention_mask"].sum()
                        if "attention_mask" in batch
                        else torch.zeros((), device=acc.device)
                    )
                    window += torch.stack([loss.detach().float() * n, n, tokens.float()])
                    if acc.sync_gradients:
                        totals = acc.reduce(
                            window.clone(), "sum"
                        )  # over the ranks: every rank logs and stops alike
                        # The step's one wait for the device (each .item() is one; they cost a GPU its
                        # queued work). It comes before the optimizer, so a non-finite loss changes no weight.
                        loss_sum, items, window_tokens, first = torch.cat([totals, ref.view(1)]).tolist()
                        if not math.isfinite(loss_sum):
                            raise TrainingError(
                                f"the loss is {loss_sum / max(items, 1)} at step {state['step'] + 1} (epoch {state['epoch']}); "
                                f"training stopped, the last good checkpoint is kept in {ckpt_root}"
                            )
                        rescale = first * spec.gradient_accumulation * acc.num_processes / max(items, 1)
                        if gated:
                            for p in wrapped.parameters():
                                if id(p) in gated:
                                    p.grad = None
                        if rescale != 1.0:  # exactly 1 for one micro-batch on one process
                            scale_gradients(wrapped.parameters(), rescale)
                        if spec.max_grad_norm:
                            acc.clip_grad_norm_(
                                [p for p in wrapped.parameters() if p.grad is not None], spec.max_grad_norm
                            )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state["batch_in_epoch"] += 1
                state["samples"] += batch["labels"].shape[0] * acc.num_processes
                if not acc.sync_gradients:
                    continue
                scheduler.step()
                state["step"] += 1
                state["tokens"] += int(window_tokens)
                bar.update(1)
                logs = {
                    "loss": loss_sum / max(items, 1),
                    "lr": scheduler.get_last_lr()[0],
                }  # a mean over items, as the loss
                if state["step"] % spec.log_every == 0 or state["step"] == total_steps:
                    log_metrics({"step": state["step"], "epoch": state["epoch"], **logs})
                for err in host.notify("adaptkit_on_step_end", run=run, step=state["step"], logs=logs):
                    run.log(f"adaptkit: {err}")
                if spec.eval_every and state["step"] % spec.eval_every == 0 and run_eval():
                    stop = True
                if state["step"] >= total_steps or over_budget():
                    stop = True
                if spec.save_every and (state["step"] % spec.save_every == 0 or stop):
                    save_checkpoint()
                if stop:
                    break
            else:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                if not spec.eval_every and run_eval():
                    stop = True
        bar.close()
        wall = time.perf_counter() - start

        if not run.history or "eval_loss" not in run.history[-1]:
            run_eval()
    finally:
        if cache:
            cache.remove()
            run.log(
                f"adaptkit: feature cache: {len(cache.rows)} examples, {cache.nbytes / 2**20:.1f} MiB; "
                f"{cache.misses} computed, {cache.hits} from the cache"
            )
    final_metrics = next(h for h in reversed(run.history) if "eval_loss" in h)
    forgetting = None
    if run.forgetting_base is not None:
        after = measure(
            acc.unwrap_model(wrapped),
            run.processor,
            run.forgetting_texts,
            recipe.forgetting.max_length,
            causal=run.task.auto_model == "AutoModelForCausalLM",
        )
        forgetting = compare_forgetting(run.forgetting_base, after, recipe.forgetting.source)
    digest = param_digest(acc.unwrap_model(wrapped))
    digests = acc.gather_for_metrics([digest], use_gather_object=True) if distributed else [digest]
    train_losses = [h["loss"] for h in run.history if "loss" in h]
    summary = {
        "name": recipe.name,
        "steps": state["step"],
        "epochs_completed": state["epoch"],
        "total_steps": total_steps,
        "strategies": [s.name for s in adapted.strategies],
        # in multi-process runs, pending parameters require grad only for DDP's sake
        "trainable_parameters": adapted.num_trainable()
        - sum(p.numel() for p in adapted.pending_parameters() if p.requires_grad),
        "total_parameters": adapted.num_total(),
        "final_metrics": final_metrics,
        "best_metric": state["best"],
        "best_step": state.get("best_step"),
        "best_metrics": state.get("best_metrics"),
        "final_train_loss": train_losses[-1] if train_losses else None,
        "wall_time_s": wall,
        "samples_per_s": state["samples"] / wall if wall > 0 else None,
        "tokens_per_s": state["tokens"] / wall if wall > 0 else None,
        "peak_memory_mb": peak_memory_mb(acc.device),
        "num_processes": acc.num_processes,
        "mixed_precision": spec.mixed_precision,
        "micro_batch_size": spec.micro_batch_size,
        "gradient_accumulation": spec.gradient_accumulation,
        "param_digest": digest,
        "ranks_in_sync": len(set(digests)) == 1,
        "run_id": rid,
        "metric": selection_metric(spec, run.task)[0],
        "greater_is_better": selection_metric(spec, run.task)[1],
        "memory_kind": "gpu_allocated" if acc.device.type == "cuda" else "cpu_rss",
        "memory_plan": memory,
        "forgetting": forgetting,
        "feature_cache": {
            "examples": len(cache.rows),
            "bytes": cache.nbytes,
            "computed": cache.misses,
            "cached": cache.hits,
        }
        if cache
        else None,
    }
    if acc.is_main_process:
        with write_failures_reported(run.run_dir / "final", ckpt_root):
            saved = adapted.save(run.run_dir / "final")
            summary["saved_bytes"] = sum(f.stat().st_size for f in Path(saved).rglob("*") if f.is_file())
            write_json(run.run_dir / "summary.json", summary)
    acc.wait_for_everyone()
    for err in host.notify("adaptkit_on_train_end", run=run, summary=summary):
        run.log(f"adaptkit: {err}")
    acc.end_training()
    return summary
