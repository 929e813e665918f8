"""The training run: one loop on Hugging Face Accelerate, shaped like accelerate's nlp_example.

``train(recipe)`` reads top to bottom: set up (plan memory, load data and model, apply the
strategies, prepare for Accelerate), resume from the latest valid checkpoint, train epoch by
epoch with mixed precision, gradient accumulation, clipping and evaluation, and finish with the
final strategy state, metrics and a summary in the run directory. It runs unchanged under
``accelerate launch`` on several processes.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptkit.contract.anatomy import parameter_count
from adaptkit.contract.strategy import TrainState
from adaptkit.errors import TrainingError
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
from adaptkit.train.context import Run
from adaptkit.train.evaluate import (
    evaluate,
    example_keys,
    selection_metric,
    split_examples,
    write_examples,
)
from adaptkit.train.forgetting import compare as compare_forgetting
from adaptkit.train.forgetting import measure_run_texts
from adaptkit.train.measure import param_digest, peak_memory_mb
from adaptkit.train.memory import plan_memory, write_memory_plan
from adaptkit.train.optim import scale_gradients
from adaptkit.train.prepare import Prepared, prepare
from adaptkit.train.setup import (
    check_launch,
    make_accelerator,
    quiet_libraries,
    trackers,
)
from adaptkit.train.state import LoopState, RunSummary

#: The key of an evaluation's training seconds so far in ``metrics.jsonl``.
PROGRESS_SECONDS = "train_seconds"


def train(recipe: Recipe, host: PluginHost, fresh: bool = False, loaded_model: Any = None) -> dict[str, Any]:
    """Run (or resume) the training a recipe describes and return its summary."""
    from accelerate.utils import set_seed

    check_launch()  # before anything is loaded or written
    quiet_libraries()
    run = Run(recipe=recipe, host=host, run_dir=recipe.run_dir)
    report_to = trackers(recipe.train)  # checked before anything is loaded
    run.accelerator = make_accelerator(recipe.train, run.run_dir, report_to)
    set_seed(recipe.train.seed)
    # before any weight loads: micro_batch_size auto is resolved, and a run that will not fit stops here
    spec, memory = plan_memory(run, fresh, loaded=loaded_model is not None)
    loop = Loop(**vars(prepare(run, spec, memory, loaded_model)))
    loop.resume(fresh)
    loop.write_run_files()
    if report_to:  # TensorBoard writes to <run dir>/tracking/<run name>
        run.accelerator.init_trackers(recipe.name or "run")
    run.notify_plugins("adaptkit_on_train_start", strict=True)
    wall = loop.train()
    return loop.finish(wall).to_dict()


@dataclass
class Window:
    """What one optimizer step accumulates over its micro-batches.

    A model's loss is a mean over its micro-batch's items (examples, or supervised tokens for
    LMs), and a mean of such means is not the mean over the accumulated batch when counts differ
    (variable lengths, a short last window). So each micro-batch's loss is weighted by its item
    count over ``ref``, the first micro-batch's mean count across ranks (which keeps magnitudes
    as usual for fp16); at the step the gradients are rescaled to exactly the sum of item losses
    over the items in the window on all ranks, undoing accelerate's division by the accumulation
    steps and DDP's mean over ranks.
    """

    ref: Any  # the first micro-batch's mean item count across ranks
    sums: Any  # sum of loss x items, items, tokens


@dataclass
class Loop(Prepared):
    """The prepared run and the loop's state: resume, step, evaluate, checkpoint, finish."""

    state: LoopState = field(default_factory=LoopState)
    window: Window | None = None
    row_keys: list[str] | None = None  # digests of the validation rows, computed once
    clock: tuple[float, float] = (0.0, 0.0)  # (perf_counter at start, training seconds before it)

    @property
    def acc(self) -> Any:
        """The run's Accelerator."""
        return self.run.accelerator

    @property
    def checkpoints(self) -> Path:
        """The directory the run's checkpoints live in."""
        return self.run.run_dir / "checkpoints"

    # -- resume and run files ----------------------------------------------------------------

    def resume(self, fresh: bool) -> None:
        """Restore weights, optimizer, schedule, RNG and history from the latest valid checkpoint."""
        run, acc = self.run, self.acc
        # --fresh deletes the old run only now that data, model and strategies loaded: a recipe that
        # fails on any of them leaves what was already written untouched
        if fresh and acc.is_main_process and run.run_dir.exists():
            shutil.rmtree(run.run_dir)
        acc.wait_for_everyone()
        found = latest_valid(self.checkpoints, recipe_id(run.recipe), log=run.log)
        if found:
            path, _ = found
            self.adapted.load_state(path / "model")
            opt_tensors, opt_json = read_part(path, "optimizer"), read_json(path, "optimizer")
            load_optimizer_state(self.optimizer.optimizer, opt_tensors, opt_json)
            self.scheduler.load_state_dict(read_json(path, "scheduler"))
            self.state = LoopState.from_dict(read_json(path, "trainer_state"))
            rank = f"rng-{acc.process_index}"
            set_rng_state(read_part(path, rank), read_json(path, rank))
            run.history = read_json(path, "history")
            run.log(f"adaptkit: resuming from {path} (step {self.state.step})")
        elif acc.is_main_process:  # an earlier attempt that left no checkpoint: its curves start over
            (run.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(run.run_dir / "tracking", ignore_errors=True)

    def write_run_files(self) -> None:
        """Versions, the memory plan and the recipe as run, beside the checkpoints."""
        run = self.run
        if run.is_main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run.run_dir / "versions.json", library_versions())
            write_memory_plan(run.run_dir, self.memory)  # a resumed run reads back the micro-batch auto chose
            recipe_yaml = dump_yaml(run.recipe.model_dump(mode="json")).encode()
            atomic_write_bytes(run.run_dir / "recipe.yaml", recipe_yaml)

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> float:
        """Train until the step budget, a time or token budget, or early stopping; returns seconds."""
        from tqdm.auto import tqdm

        state, run = self.state, self.run
        self.fire("train_start")
        self.model.train()
        if self.cache:
            self.cache.install()
        try:
            self.clock = (time.perf_counter(), state.train_time)
            stop = state.step >= self.total_steps
            show = sys.stderr.isatty() or os.environ.get("ADAPTKIT_PROGRESS")
            bar = tqdm(
                total=self.total_steps,
                initial=state.step,
                desc=run.recipe.name or "train",
                disable=not self.acc.is_main_process or not show,
                leave=False,
            )
            while not stop:
                stop = self.train_epoch(bar)
            bar.close()
            wall = time.perf_counter() - self.clock[0]
            if not run.history or "eval_loss" not in run.history[-1]:
                self.evaluate()
        finally:
            if self.cache:
                self.cache.remove()
                run.log(self.cache.report())
        return wall

    def train_epoch(self, bar: Any) -> bool:
        """One epoch, or what a resumed run has left of it; True when training should stop."""
        state, acc = self.state, self.acc
        # The prepared loader sets its sampler's epoch from its own count of passes on every
        # iteration; a resumed process starts that count at 0, so it is set from the loop's state.
        self.train_dl.set_epoch(state.epoch)
        self.fire("epoch_start")
        skip = state.batch_in_epoch
        loader = acc.skip_first_batches(self.train_dl, skip) if skip else self.train_dl
        for batch in loader:
            logs = self.micro_step(batch)
            if logs is None:  # mid-accumulation: no optimizer step yet
                continue
            bar.update(1)
            if self.after_step(logs):
                return True
        state.epoch += 1
        state.batch_in_epoch = 0
        return not self.spec.eval_every and self.evaluate()

    def micro_step(self, batch: dict[str, Any]) -> dict[str, float] | None:
        """Forward and backward on one micro-batch; at a window's end, the optimizer step.

        Returns the step's logs (loss, learning rate) after an optimizer step, else None.
        """
        import torch

        state, spec, acc = self.state, self.spec, self.acc
        n = torch.as_tensor(self.run.task.loss_items(batch), dtype=torch.float32, device=acc.device)
        if state.batch_in_epoch % spec.gradient_accumulation == 0:
            self.fire("step_start")
            ref = acc.reduce(n.clone(), "mean").clamp(min=1)
            self.window = Window(ref, torch.zeros(3, dtype=torch.float32, device=acc.device))
        window = self.window
        with acc.accumulate(self.model):
            # only the loss is kept: holding the whole output would keep this step's logits alive
            # through the next forward pass
            loss = self.loss_fn(self.model, batch)
            acc.backward(loss * n / window.ref)
            mask = batch.get("attention_mask")
            tokens = mask.sum() if mask is not None else torch.zeros((), device=acc.device)
            window.sums += torch.stack([loss.detach().float() * n, n, tokens.float()])
            if acc.sync_gradients:
                loss_sum, items, window_tokens = self.finish_gradients(window)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        state.batch_in_epoch += 1
        state.samples += batch["labels"].shape[0] * acc.num_processes
        if not acc.sync_gradients:
            return None
        self.scheduler.step()
        state.step += 1
        state.tokens += int(window_tokens)
        return {"loss": loss_sum / max(items, 1), "lr": self.scheduler.get_last_lr()[0]}

    def finish_gradients(self, window: Window) -> tuple[float, float, float]:
        """Before the optimizer step: check the loss, drop gated gradients, rescale and clip.

        Returns the window's loss sum, items and tokens over all ranks.
        """
        import torch

        acc, spec, state = self.acc, self.spec, self.state
        totals = acc.reduce(window.sums.clone(), "sum")  # over the ranks: every rank logs and stops alike
        # The step's one wait for the device (each .item() is one; they cost a GPU its queued
        # work). It comes before the optimizer, so a non-finite loss changes no weight.
        loss_sum, items, tokens, first = torch.cat([totals, window.ref.view(1)]).tolist()
        if not math.isfinite(loss_sum):
            raise TrainingError(
                f"the loss is {loss_sum / max(items, 1)} at step {state.step + 1} (epoch {state.epoch}); "
                f"training stopped, the last good checkpoint is kept in {self.checkpoints}"
            )
        rescale = first * spec.gradient_accumulation * acc.num_processes / max(items, 1)
        gated = self.trainables.gated
        if gated:
            for p in self.model.parameters():
                if id(p) in gated:
                    p.grad = None
        if rescale != 1.0:  # exactly 1 for one micro-batch on one process
            scale_gradients(self.model.parameters(), rescale)
        if spec.max_grad_norm:
            with_grads = [p for p in self.model.parameters() if p.grad is not None]
            acc.clip_grad_norm_(with_grads, spec.max_grad_norm)
        return loss_sum, items, tokens

    def after_step(self, logs: dict[str, float]) -> bool:
        """Log, notify, evaluate and checkpoint as the recipe asks; True when training should stop."""
        state, spec, run = self.state, self.spec, self.run
        if state.step % spec.log_every == 0 or state.step == self.total_steps:
            run.log_metrics({"step": state.step, "epoch": state.epoch, **logs})
        run.notify_plugins("adaptkit_on_step_end", step=state.step, logs=logs)
        stop = bool(spec.eval_every and state.step % spec.eval_every == 0 and self.evaluate())
        if state.step >= self.total_steps or self.over_budget():
            stop = True
        if spec.save_every and (state.step % spec.save_every == 0 or stop):
            self.save_checkpoint()
        return stop

    def fire(self, event: str) -> None:
        """Pass an event to the strategies (``Trainables`` keeps DDP and the optimizer in step)."""
        state = self.state
        train_state = TrainState(
            step=state.step,
            epoch=state.epoch,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            num_processes=self.acc.num_processes,
            seed=self.spec.seed,
        )
        self.trainables.fire(event, train_state, self.optimizer)

    def train_time(self) -> float:
        """Seconds spent training, including those before a resume."""
        started, before = self.clock
        return before + time.perf_counter() - started

    def over_budget(self) -> bool:
        """A token or wall-time budget is spent (the same on every rank: the count is global, the clock is rank 0's)."""
        import torch

        spec, acc = self.spec, self.acc
        spent = spec.max_time is not None and self.train_time() >= spec.max_time
        if acc.num_processes > 1 and spec.max_time is not None:
            spent = bool(acc.reduce(torch.tensor(float(spent), device=acc.device), "max").item())
        return spent or (spec.max_tokens is not None and self.state.tokens >= spec.max_tokens)

    # -- evaluation and checkpoints ----------------------------------------------------------------

    def evaluate(self) -> bool:
        """Evaluate, log, track the best; True when early stopping says stop."""
        state, spec, run = self.state, self.spec, self.run
        metrics, examples = split_examples(evaluate(run, self.model, self.eval_dl))
        if examples and run.is_main:  # replaced at every evaluation: the final one is what stays
            if self.row_keys is None:
                self.row_keys = example_keys(run.eval_rows) or []
            write_examples(run.run_dir, state.step, examples, self.row_keys or None)
        # tokens and training seconds so far: the report's time-to-target reads them back
        progress = {"tokens": state.tokens, PROGRESS_SECONDS: round(self.train_time(), 3)}
        progress |= self.forgetting_now()
        run.log_metrics({"step": state.step, "epoch": state.epoch, **progress, **metrics})
        run.notify_plugins("adaptkit_on_evaluate", step=state.step, metrics=metrics)
        key, better = selection_metric(spec, run.task)
        if key not in metrics:
            key, better = "eval_loss", False
        state.track(metrics[key], better, metrics)
        return spec.early_stopping_patience is not None and state.bad_evals >= spec.early_stopping_patience

    def forgetting_now(self) -> dict[str, float]:
        """``{"forgetting": value}`` of the model as it is now (on every rank, as at the end of a
        run) where the recipe asks for it at every evaluation; else empty."""
        run = self.run
        if run.forgetting_base is None or not run.recipe.forgetting.every_evaluation:
            return {}
        after = measure_run_texts(run, self.acc.unwrap_model(self.model), run.processor, run.task)
        return {
            "forgetting": compare_forgetting(run.forgetting_base, after, run.recipe.forgetting.source)[
                "value"
            ]
        }

    def save_checkpoint(self) -> None:
        """Write a checkpoint atomically (every rank its RNG, the main process the rest); rotate old ones."""
        acc, run, step = self.acc, self.run, self.state.step
        self.state.train_time = self.train_time()
        root = self.checkpoints
        tmp, final = root / f".tmp-step-{step:08d}", root / f"step-{step:08d}"
        with write_failures_reported(final, root, partial=tmp):
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            rng_t, rng_j = rng_state()
            save_parts(tmp, {f"rng-{acc.process_index}": rng_t}, {f"rng-{acc.process_index}": rng_j})
            if acc.is_main_process:
                self.adapted.save(tmp / "model")
                opt_t, opt_j = optimizer_state(self.optimizer.optimizer)
                jsons = {
                    "optimizer": opt_j,
                    "scheduler": self.scheduler.state_dict(),
                    "trainer_state": self.state.to_dict(),
                    "history": run.history,
                }
                save_parts(tmp, {"optimizer": opt_t}, jsons)
            acc.wait_for_everyone()
            if acc.is_main_process:
                finalize(tmp, final, {"run_id": recipe_id(run.recipe), "step": step})
                rotate(root, self.spec.keep_checkpoints)
        if acc.is_main_process:
            run.notify_plugins("adaptkit_on_checkpoint", step=step, path=str(final))
        acc.wait_for_everyone()

    # -- finishing -----------------------------------------------------------------------------

    def finish(self, wall: float) -> RunSummary:
        """Save the final strategy state and ``summary.json``; tell the plugins; end the trackers."""
        run, acc = self.run, self.acc
        summary = self.summarise(wall)
        if acc.is_main_process:
            with write_failures_reported(run.run_dir / "final", self.checkpoints):
                saved = self.adapted.save(run.run_dir / "final")
                summary.saved_bytes = sum(f.stat().st_size for f in Path(saved).rglob("*") if f.is_file())
                write_json(run.run_dir / "summary.json", summary.to_dict())
        acc.wait_for_everyone()
        run.notify_plugins("adaptkit_on_train_end", summary=summary.to_dict())
        acc.end_training()
        return summary

    def summarise(self, wall: float) -> RunSummary:
        """What the run achieved and what it cost, agreed across ranks where that matters."""
        from accelerate.utils import gather_object

        run, acc, state, spec, adapted = self.run, self.acc, self.state, self.spec, self.adapted
        model = acc.unwrap_model(self.model)
        forgetting = None
        if run.forgetting_base is not None:
            after = measure_run_texts(run, model, run.processor, run.task)
            forgetting = compare_forgetting(run.forgetting_base, after, run.recipe.forgetting.source)
        digest = param_digest(model)
        # every rank's digest: gather_for_metrics would trim to the data's remainder after the loop
        # broke on an epoch's last batch, dropping the very ranks to compare
        digests = gather_object([digest]) if acc.num_processes > 1 else [digest]
        train_losses = [h["loss"] for h in run.history if "loss" in h]
        metric, greater = selection_metric(spec, run.task)
        trained = [p for p in model.parameters() if id(p) in self.trainables.trained]
        return RunSummary(
            name=run.recipe.name,
            steps=state.step,
            epochs_completed=state.epoch,
            total_steps=self.total_steps,
            strategies=[s.name for s in adapted.strategies],
            trainable_parameters=sum(parameter_count(p) for p in trained),
            total_parameters=adapted.num_total(),
            # without the progress figures (seconds differ between a resumed run and a straight
            # one) and the forgetting of an evaluation, which the summary has for the final model
            final_metrics={
                k: v
                for k, v in next(h for h in reversed(run.history) if "eval_loss" in h).items()
                if k not in ("tokens", PROGRESS_SECONDS, "forgetting")
            },
            best_metric=state.best,
            best_step=state.best_step,
            best_metrics=state.best_metrics,
            final_train_loss=train_losses[-1] if train_losses else None,
            wall_time_s=wall,
            samples_per_s=state.samples / wall if wall > 0 else None,
            tokens_per_s=state.tokens / wall if wall > 0 else None,
            peak_memory_mb=peak_memory_mb(acc.device),
            num_processes=acc.num_processes,
            mixed_precision=spec.mixed_precision,
            micro_batch_size=spec.micro_batch_size,
            gradient_accumulation=spec.gradient_accumulation,
            packed=bool(getattr(run.task, "packing", False)),
            param_digest=digest,
            ranks_in_sync=len(set(digests)) == 1,
            run_id=recipe_id(run.recipe),
            metric=metric,
            greater_is_better=greater,
            memory_kind="gpu_allocated" if acc.device.type == "cuda" else "cpu_rss",
            memory_plan=self.memory,
            forgetting=forgetting,
            feature_cache=self.cache.summary() if self.cache else None,
        )
