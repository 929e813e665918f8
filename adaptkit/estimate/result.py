"""What an estimate returns: ``Estimate`` (the memory of a step term by term, its peak and its
time) and ``Suggestion`` (one change to the recipe that lowers it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Estimate:
    """The memory of one training step, term by term, its peak, and its time from FLOPs.

    Byte terms: ``frozen_weights`` (by dtype in ``frozen_by_dtype``; ``nf4``, ``nf4+dq`` and
    ``int8`` are bitsandbytes' packed layers with their scales), ``trainable_weights`` (float32,
    as training keeps them), ``gradients``, ``optimizer_states``, ``activations`` (what autograd
    keeps for the backward pass, LoRA dropout and the loss excluded; with gradient checkpointing,
    each block's input plus one block recomputed), ``lora_dropout`` (the dropped-out copies of
    the LoRA inputs and their masks), ``logits`` (the logits the output holds, the loss' saved
    log-probabilities and the two logits-sized gradients of the backward's start; where
    training computes a causal LM's loss in chunks (``adaptkit.kernels.lm_loss``), a chunk's
    logits and their gradient),
    ``checkpoint_pages`` (CPU: float weights replaced by quantized ones stay resident while the
    memory-mapped checkpoint file is open) and ``overhead`` (CPU: the resident size of a process
    that imported the training stack; CUDA: the context). Buffers (rotary tables, position ids)
    are left out: they are a few kilobytes.

    ``total`` is the live peak: what the step needs when freed memory goes back at once. On a CPU
    ``resident_with_reuse`` bounds what the process may hold when glibc keeps freed memory for
    reuse instead (``HEAP_SLACK`` times the total; see ``adaptkit.estimate.machine``); on a GPU
    it is the total.

    For a run launched on several processes (``adaptkit.estimate.sharding``) every figure is one
    process's, ``launch`` says which launch (None: one process, and the fields below are left out
    of ``to_dict``), and the terms of ``DISTRIBUTED_TERMS`` join in: ``gathered_parameters`` and
    ``unsharded_gradients`` (FSDP's working set), ``ddp_buckets`` (DDP's copy of the gradients).
    """

    device: str
    model_type: str
    strategies: list[str]
    micro_batch_size: int
    gradient_accumulation: int
    seq_len: int
    inputs: str  # one example of the batch, in words ("512 tokens", "224x224 pixels", "2 s of audio")
    optimizer: str
    gradient_checkpointing: bool
    mixed_precision: str
    total_parameters: int
    trainable_parameters: int
    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer_states: int
    activations: int
    lora_dropout: int
    logits: int
    checkpoint_pages: int
    overhead: int
    total: int
    peak_phase: str
    resident_with_reuse: int = 0
    frozen_by_dtype: dict[str, int] = field(default_factory=dict)
    #: the largest tensor a step allocates afresh: the logits, or a trainable weight's gradient
    largest_block: int = 0
    activations_per_block: int = 0
    #: saved in each block, bottom first (LoRA dropout apart)
    activations_by_block: list[int] = field(default_factory=list)
    flops_per_step: float = 0.0
    peak_tflops: float | None = None
    time_per_step_s: float | None = None
    #: the launch these figures are per process of (``sharding.per_process``); None: one process
    launch: dict[str, Any] | None = None
    gathered_parameters: int = 0
    unsharded_gradients: int = 0
    ddp_buckets: int = 0

    TERMS = (
        "frozen_weights",
        "trainable_weights",
        "gradients",
        "optimizer_states",
        "activations",
        "lora_dropout",
        "logits",
        "checkpoint_pages",
        "overhead",
    )

    DISTRIBUTED_TERMS = ("gathered_parameters", "unsharded_gradients", "ddp_buckets")

    def terms(self) -> dict[str, int]:
        """Every byte term by name, in a fixed order (with a launch, the terms it adds)."""
        names = list(self.TERMS)
        if self.launch is not None:
            fsdp = self.launch["kind"].startswith("FSDP")
            names += list(self.DISTRIBUTED_TERMS[:2] if fsdp else self.DISTRIBUTED_TERMS[2:])
        return {name: getattr(self, name) for name in names}

    @property
    def dominant(self) -> str:
        """The largest term."""
        terms = self.terms()
        return max(terms, key=terms.get)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping with every field and the dominant term."""
        out = asdict(self)
        if self.launch is None:  # one process: the report as it was before launches were modelled
            for name in ("launch", *self.DISTRIBUTED_TERMS):
                del out[name]
        out["dominant"] = self.dominant
        return out


@dataclass
class Suggestion:
    """One change that lowers the estimate: recipe overrides, and the estimate with it (and the
    earlier ones) applied."""

    change: str
    overrides: list[str]
    estimate: Estimate
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return {
            "change": self.change,
            "overrides": self.overrides,
            "total": self.estimate.total,
            "fits": self.fits,
        }
