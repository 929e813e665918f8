"""Confirm the micro-batch ``micro_batch_size: auto`` chose with real training steps.

The estimator picks the largest micro-batch it believes fits; trial steps at that size, run by
Accelerate's ``find_executable_batch_size``, find out. On an out-of-memory error the trial moves
on to the next smaller divisor of the effective batch, so the effective batch is kept and gradient
accumulation grows. A trial is two forward and backward passes over the longest training
examples with an optimizer step between them: the second pass runs with the optimizer state
resident, as every step after the first does. Parameters that a strategy unfreezes later train in
the trial too, so the micro-batch still fits in the last phase of gradual unfreezing.

The trial leaves no trace: weights, buffers, optimizer state, train/eval modes and the random
number generators are put back as they were, so a run that probes trains exactly like one that
was given the chosen micro-batch outright. The weights being trained are copied to the CPU for
that; on a CPU the copy takes memory the run itself will not need, which makes the trial err on
the small side by the size of the trainable weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adaptkit.errors import DoesNotFitError


def probe_micro_batch(
    acc: Any,
    model: Any,
    optimizer: Any,
    dataset: Any,
    collate: Callable[[list], dict],
    candidates: list[int],
    pending: list[Any],
    log: Callable[[str], None],
    loss_fn: Callable[[Any, dict], Any],
) -> tuple[int, list[int]]:
    """The largest of ``candidates`` (descending divisors of the effective batch) whose trial step runs.

    ``model`` and ``optimizer`` are what ``acc.prepare`` returned; ``pending`` are the parameters a
    strategy unfreezes later, ``loss_fn(model, batch)`` the loss training computes. Returns the
    micro-batch and the sizes tried. Raises ``DoesNotFitError`` when even the smallest candidate
    runs out of memory; any other error propagates, as it would have at the first step of training.
    """
    from accelerate.utils import find_executable_batch_size

    rows = _longest_first(dataset, candidates[0])
    tried: list[int] = []
    inner = optimizer.optimizer  # the torch optimizer: Accelerate's wrapper would count an accumulation step
    trial = _trial(acc, model, inner, dataset, collate, rows, loss_fn, tried)
    next_smaller = _next_smaller(list(candidates[1:]), tried, log)
    snapshot = _Snapshot(model, pending)
    model.train()
    try:
        with _fork_rng(acc):
            size = find_executable_batch_size(
                trial, starting_batch_size=candidates[0], reduce_batch_size_fn=next_smaller
            )()
    except RuntimeError as exc:
        if "No executable batch size found" not in str(exc):
            raise
        raise DoesNotFitError(
            f"train.micro_batch_size auto: a trial step ran out of memory even with a micro-batch of "
            f"{tried[-1]} (tried {', '.join(map(str, tried))}); try model.gradient_checkpointing=true, "
            "train.optimizer=adamw_8bit or a shorter data.max_length"
        ) from None
    finally:
        snapshot.restore()
    return size, tried


def _trial(
    acc: Any,
    model: Any,
    inner: Any,
    dataset: Any,
    collate: Callable[[list], dict],
    rows: list[int],
    loss_fn: Callable[[Any, dict], Any],
    tried: list[int],
) -> Callable[[int], int]:
    """The trial for ``find_executable_batch_size``: two forward and backward passes over the
    longest rows with an optimizer step between them, leaving no gradient or optimizer state."""
    from accelerate.utils import send_to_device

    def trial(batch_size: int) -> int:
        tried.append(batch_size)
        batch = send_to_device(collate([dataset[rows[i % len(rows)]] for i in range(batch_size)]), acc.device)
        try:
            for step in range(2):
                with acc.no_sync(model):  # each process tries alone: no gradient all-reduce
                    loss_fn(model, batch).backward()
                if step == 0:
                    inner.step()
                inner.zero_grad(set_to_none=True)
        finally:  # an out-of-memory error halfway leaves gradients and optimizer state behind
            inner.zero_grad(set_to_none=True)
            inner.state.clear()
        return batch_size

    return trial


def _next_smaller(remaining: list[int], tried: list[int], log: Callable[[str], None]) -> Callable[[], int]:
    """What ``find_executable_batch_size`` calls after an out-of-memory error: the next candidate,
    logged, or 0, which makes it give up."""

    def next_smaller() -> int:
        size = remaining.pop(0) if remaining else 0
        log(
            f"adaptkit: micro_batch_size auto: a trial step with {tried[-1]} ran out of memory"
            + (f"; trying {size}" if size else "")
        )
        return size

    return next_smaller


class _Snapshot:
    """What a trial changes, copied before it (trainable and pending weights, buffers, train/eval
    modes) so that ``restore`` puts it back; the pending parameters train during the trial."""

    def __init__(self, model: Any, pending: list[Any]):
        self.pending = list(pending)
        self.params = [p for p in model.parameters() if p.requires_grad] + self.pending
        self.weights = [p.detach().to("cpu", copy=True) for p in self.params]
        self.buffers = [(b, b.detach().to("cpu", copy=True)) for b in model.buffers()]
        self.modes = [(m, m.training) for m in model.modules()]
        for p in self.pending:
            p.requires_grad_(True)

    def restore(self) -> None:
        """Put weights, buffers, ``requires_grad`` and modes back as they were."""
        import torch

        with torch.no_grad():
            for p, saved in zip(self.params, self.weights):
                p.copy_(saved)
            for b, saved in self.buffers:
                b.copy_(saved)
        for p in self.pending:
            p.requires_grad_(False)
        for m, training in self.modes:
            m.training = training


def _fork_rng(acc: Any) -> Any:
    """Fork the random number generators a trial draws from: the CPU's, and the device's that runs it."""
    import torch

    kind = acc.device.type
    devices = [] if kind == "cpu" else [acc.device.index or 0]
    return torch.random.fork_rng(devices=devices, device_type="cuda" if kind == "cpu" else kind)


def _longest_first(dataset: Any, count: int) -> list[int]:
    """Indices of the ``count`` longest rows (token sequences), longest first: the trial must fit
    the worst micro-batch.

    The lengths are read from Arrow a slice at a time, never as Python lists of token ids (a large
    data set would not fit). Images all have one size: the first rows.
    """
    columns = getattr(dataset, "column_names", None) or []
    if "input_ids" not in columns:
        return list(range(min(count, len(dataset))))
    import numpy as np
    import pyarrow.compute as pc

    ids = dataset.select_columns(["input_ids"]).with_format("arrow")
    lengths = np.concatenate(
        [
            pc.list_value_length(part["input_ids"]).to_numpy(zero_copy_only=False)
            for part in ids.iter(batch_size=10_000)
        ]
    )
    return [int(i) for i in np.argsort(-lengths, kind="stable")[:count]]
