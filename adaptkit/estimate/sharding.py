"""The estimate of one process of a run launched on several (``adaptkit.estimate.launch``).

**DDP** (several processes, nothing sharded): every process holds the one-process estimate, plus
DDP's gradient buckets. DDP's reducer allocates, when the model is wrapped, flat buckets holding
every trainable gradient for the all-reduce; with ``gradient_as_bucket_view=False`` (DDP's
default, which Accelerate and adaptkit keep) ``.grad`` is a separate tensor copied in and out of
them, so the buckets are a second copy of the trainable gradients for the whole run.

**FSDP2 through Accelerate**: Accelerate calls ``fully_shard`` on each transformer block
(TRANSFORMER_BASED_WRAP), on the input embeddings when they are not tied, on a tail group (final
norm, output layer, and the input embeddings when tied) with ``reshard_after_forward=False``, and
on the root (the rest), which PyTorch keeps gathered after forward. So:

- frozen and trainable weights, their gradients and optimizer states are sharded: FSDP2 splits
  every parameter on its own along dim 0 (``torch.chunk``) and pads each rank's shard to rank 0's,
  so a process holds ``ceil(rows / N)`` rows of each tensor (rounded up per tensor). The float32
  trainable weights are already the master copy (no separate one); 4-bit and 8-bit layers are left
  unsharded, as Accelerate leaves bitsandbytes' uint8 storage out of ``fully_shard``.
- the working set FSDP gathers whole: the root and tail groups for the whole step (the untied
  tail is gathered only around the head's forward and backward, which this over-counts), and
  the two largest units FSDP gathers one at a time (blocks, untied input embeddings): the one
  computing and the next. FSDP2 prefetches one unit by default (implicitly in forward, through
  its all-gather stream; explicitly one unit in backward), and Accelerate's FSDP2 path cannot turn
  that off (it drops ``backward_prefetch`` and refuses ``forward_prefetch``). Under SHARD_GRAD_OP
  (``reshard_after_forward: false``) every unit stays gathered from its forward to its backward,
  so all are counted. Under mixed precision they are gathered in bf16 or fp16 (Accelerate sets
  FSDP's ``param_dtype`` to it).
- in backward, a unit's gradients exist whole until they are reduce-scattered: the largest unit's,
  and the root and tail groups' (reduced only at the end of backward), in the gathered dtype.
- activations, LoRA dropout, the logits (the model's own loss: training's chunked loss is not
  used under FSDP) and the batch are per process: the micro-batch is per process.

Not modelled: communication buffers beyond the gathered units (NCCL's own, the reduce-scatter's
flat input while it runs), the allocator's fragmentation, and CPU offload.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from adaptkit.estimate.machine import HEAP_SLACK
from adaptkit.estimate.terms import (
    QUANTIZED_KINDS,
    optimizer_state_bytes,
    stored_bytes,
    transient_peak,
)

if TYPE_CHECKING:
    from adaptkit.estimate.launch import Launch
    from adaptkit.estimate.prepare import Prepared
    from adaptkit.estimate.profile import Profile
    from adaptkit.estimate.result import Estimate
    from adaptkit.recipe.schema import Recipe

#: Units FSDP2 holds gathered at once under full sharding: the one computing and the one prefetched.
PREFETCHED_UNITS = 2
ROUNDING = "each tensor's dim 0 split over the processes, rounded up to whole rows (rank 0's shard)"


def shard_numel(p: Any, n: int) -> int:
    """Values of ``p`` one process holds when FSDP2 shards it over ``n``: ``ceil(rows / n)`` rows.

    FSDP2 pads every rank's shard to rank 0's size, so that is what each process allocates. A
    scalar is not split.
    """
    shape = tuple(p.shape)
    if not shape or shape[0] == 0:
        return p.numel()
    return -(-shape[0] // n) * (p.numel() // shape[0])


def _sharded(p: Any) -> bool:
    """Whether FSDP shards ``p``: every parameter but bitsandbytes' packed layers."""
    return stored_bytes(p)[0] not in QUANTIZED_KINDS


def _unique(params: Any) -> list[Any]:
    return list({id(p): p for p in params}.values())


def per_process(
    est: Estimate, prep: Prepared, profile: Profile, recipe: Recipe, launch: Launch | None
) -> Estimate:
    """``est`` (one process) as one process of ``launch`` holds it; unchanged without one."""
    if launch is None or launch.single:
        return est
    if launch.sharding == "fsdp":
        return _fsdp(est, prep, profile, recipe, launch)
    buckets = 4 * sum(p.numel() for p in prep.trainable)  # float32, as training keeps them
    return _finish(est, launch, est.total + buckets, ddp_buckets=buckets)


def _finish(est: Estimate, launch: Launch, total: int, **fields: Any) -> Estimate:
    """``est`` with per-process ``fields``, ``total`` and the launch that explains them."""
    info = {
        "description": launch.describe(),
        "num_processes": launch.num_processes,
        "kind": launch.kind,
        "source": launch.source,
        "one_process_total": est.total,
    }
    if launch.sharding == "fsdp":
        info["rounding"] = ROUNDING
        info["gathered_units"] = PREFETCHED_UNITS if launch.reshard_after_forward else "all"
        info["wrap"] = launch.wrap
    slack = HEAP_SLACK if est.device == "cpu" else 1
    return dataclasses.replace(
        est, total=total, resident_with_reuse=int(total * slack), launch=info, **fields
    )


def fsdp_units(prep: Prepared, wrap: str) -> tuple[list[list[Any]], list[Any]]:
    """FSDP's units as Accelerate wraps the model: (those gathered one at a time, the parameters
    gathered for the whole step: root and tail). Packed quantized layers are in neither."""
    from adaptkit.contract.anatomy import unwrap

    taken: set[int] = set()
    rotating: list[list[Any]] = []

    def unit(module: Any) -> None:
        params = [p for p in _unique(module.parameters()) if id(p) not in taken and _sharded(p)]
        taken.update(id(p) for p in params)
        if params:
            rotating.append(params)

    _, inner = unwrap(prep.model)
    embed = getattr(inner, "get_input_embeddings", lambda: None)()
    output = getattr(inner, "get_output_embeddings", lambda: None)()
    # tied input embeddings belong to the tail group (gathered all step), not a unit of their own
    tied = output is not None and embed is not None and output.weight is embed.weight
    if wrap == "blocks":
        for block in prep.blocks:
            unit(block)
    if embed is not None and not tied:
        unit(embed)
    resident = [p for p in _unique(prep.model.parameters()) if id(p) not in taken and _sharded(p)]
    return rotating, resident


def _gathered(params: list[Any], mixed_precision: str) -> tuple[int, int]:
    """Bytes of ``params`` gathered whole, and of their trainable ones' whole gradients: in the
    mixed-precision dtype when there is one (FSDP's ``param_dtype``), else as training keeps them."""
    half = mixed_precision in ("bf16", "fp16")
    weights = grads = 0
    for p in params:
        size = 2 if half and p.is_floating_point() else (4 if p.requires_grad else p.element_size())
        weights += size * p.numel()
        grads += size * p.numel() if p.requires_grad else 0
    return weights, grads


def _working_set(prep: Prepared, recipe: Recipe, launch: Launch) -> tuple[int, int]:
    """(parameters FSDP holds gathered at once at worst, whole gradients awaiting reduce-scatter)."""
    mixed = recipe.train.mixed_precision
    rotating, resident = fsdp_units(prep, launch.wrap)
    weights, grads = _gathered(resident, mixed)
    units = sorted((_gathered(u, mixed) for u in rotating), reverse=True)
    held = units[:PREFETCHED_UNITS] if launch.reshard_after_forward else units
    weights += sum(w for w, _ in held)
    grads += max((g for _, g in units), default=0)
    return weights, grads


def _fsdp(est: Estimate, prep: Prepared, profile: Profile, recipe: Recipe, launch: Launch) -> Estimate:
    """One process of an FSDP2 launch: sharded weights, gradients and states, the gathered
    working set, and the peak of forward and backward with gradients arriving sharded."""
    n, spec = launch.num_processes, recipe.train
    frozen_by_dtype: dict[str, int] = {}
    for p in _unique(prep.model.parameters()):
        if p.requires_grad:
            continue
        kind, nbytes = stored_bytes(p)
        part = nbytes if kind in QUANTIZED_KINDS else shard_numel(p, n) * p.element_size()
        frozen_by_dtype[kind] = frozen_by_dtype.get(kind, 0) + part
    shards = [shard_numel(p, n) for p in prep.trainable]
    held_copies = est.trainable_weights - 4 * est.trainable_parameters  # strategies' own, not FSDP's
    trainable = 4 * sum(shards) + held_copies
    gradients = 4 * sum(shards)
    states = sum(optimizer_state_bytes(spec.optimizer, shard_numel(p, n)) for p in prep.stateful)
    gathered, whole_grads = _working_set(prep, recipe, launch)

    transient, phase = transient_peak(prep, profile, recipe, shards, est.device, held=gathered + whole_grads)
    frozen = sum(frozen_by_dtype.values())
    persistent = frozen + trainable + states + est.checkpoint_pages + est.overhead
    return _finish(
        est,
        launch,
        persistent + transient,
        frozen_weights=frozen,
        frozen_by_dtype=frozen_by_dtype,
        trainable_weights=trainable,
        gradients=gradients,
        optimizer_states=states,
        gathered_parameters=gathered,
        unsharded_gradients=whole_grads,
        peak_phase=phase,
    )
