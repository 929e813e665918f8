"""Will it fit? Memory and time of a training step, estimated from the model's config alone.

No weight is loaded. The model is built on PyTorch's ``meta`` device (tensors with shapes but no
storage), the recipe's strategy stack is applied to it exactly as training applies it, and one
forward pass runs on meta tensors under ``torch.autograd.graph.saved_tensors_hooks``: every
tensor autograd keeps for the backward pass is seen once, with its size and where it was made
(inside which transformer block, inside a LoRA dropout, in the loss). The parameters of the
adapted model give the weights (frozen ones by dtype, 4-bit and 8-bit ones at their packed
size), the trainable ones give gradients and optimizer states.

The peak of a step is not the sum of these terms: gradients are allocated while the backward
pass frees the activations, block by block from the top. ``Estimate.total`` follows that order
(see ``_peak``) and also takes the optimizer step into account; the terms are reported whole.

Measured, not assumed: ``benchmarks/estimate_accuracy.py`` compares the estimate with the peak
resident memory of real runs. On a CPU the estimate is of live memory: what a process holds when
freed tensors go back to the operating system at once (``set_cpu_allocator("release")``, which
``adaptkit train`` chooses when memory is tight; otherwise it keeps freed memory for reuse, up to
``ALLOCATOR_SLACK`` times that resident).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from adaptkit.errors import AdaptkitError, ConfigError

if TYPE_CHECKING:
    from adaptkit.host.manager import PluginHost
    from adaptkit.recipe.schema import Recipe

MiB = 2**20
#: Optimizer state bytes per trainable value. bitsandbytes keeps 8-bit states only for tensors
#: of at least ``BNB_MIN_8BIT_SIZE`` values; smaller ones get 32-bit states.
OPTIMIZER_BYTES = {"adamw": 8, "paged_adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 4}
BNB_MIN_8BIT_SIZE = 4096
#: bitsandbytes 8-bit states are quantized blockwise: one float32 scale per block of each state.
BNB_STATE_BLOCK = 256
#: Device memory a CUDA process uses before any tensor (context, kernels, cuBLAS workspace).
#: Not measured here (it varies with GPU, driver and CUDA version); 512 MiB is typical.
CUDA_CONTEXT_BYTES = 512 * MiB
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


# -- parsing ----------------------------------------------------------------------------------


def parse_memory(text: str, what: str = "--device-memory") -> int:
    """Bytes in a size such as ``24GB``, ``512MB``, ``1.5GiB``: GB is 10**9 bytes, GiB 2**30.

    Units are case-insensitive and always bytes (``gb`` is never gigabits); a bad string is a
    ConfigError naming ``what`` and the accepted forms.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]+)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(
            f"{what}: '{text}' is not a memory size; write a positive number with a unit, "
            f"like 24GB, 512MB or 1.5GiB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``1.23 GiB``, ``456.7 MiB``: binary units, as memory is counted."""
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


# -- the result ------------------------------------------------------------------------------


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
    training computes a causal LM's loss in chunks (``adaptkit.kernels.lm_loss``), a chunk's logits
    and their gradient),
    ``checkpoint_pages`` (CPU: float weights replaced by quantized ones stay resident while the
    memory-mapped checkpoint file is open) and ``overhead`` (CPU: the resident size of a process
    that imported the training stack; CUDA: the context). Buffers (rotary tables, position ids)
    are left out: they are a few kilobytes.
    """

    device: str
    model_type: str
    strategies: list[str]
    micro_batch_size: int
    gradient_accumulation: int
    seq_len: int
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
    frozen_by_dtype: dict[str, int] = field(default_factory=dict)
    largest_block: int = (
        0  # the largest tensor a step allocates afresh: the logits, or a trainable weight's gradient
    )
    activations_per_block: int = 0
    activations_by_block: list[int] = field(
        default_factory=list
    )  # saved in each block, bottom first (LoRA dropout apart)
    flops_per_step: float = 0.0
    peak_tflops: float | None = None
    time_per_step_s: float | None = None

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

    def terms(self) -> dict[str, int]:
        """Every byte term by name, in a fixed order."""
        return {name: getattr(self, name) for name in self.TERMS}

    @property
    def dominant(self) -> str:
        """The largest term."""
        terms = self.terms()
        return max(terms, key=terms.get)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping with every field and the dominant term."""
        out = asdict(self)
        out["dominant"] = self.dominant
        return out


@dataclass
class Suggestion:
    """One change that lowers the estimate: recipe overrides and the estimate with it (and the earlier ones) applied."""

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


# -- the model on the meta device ----------------------------------------------------------------


@dataclass
class _Profile:
    """What one meta forward pass saw: saved bytes by place, the logits, FLOPs."""

    pre: int = 0  # saved before the first block (embeddings)
    blocks: list[int] = field(default_factory=list)  # saved inside each block (LoRA dropout apart)
    lora_dropout: list[int] = field(default_factory=list)
    post: int = 0  # saved after the blocks (final norm, head input)
    loss: int = 0  # logits-sized tensors saved by the loss (log-probabilities)
    block_inputs: list[int] = field(default_factory=list)  # each block's input, kept by checkpointing
    held: int = 0  # the logits the model returns, alive until the backward pass is over
    logits_numel: int = 0
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    flops_blocks_fwd: float = 0.0  # forward FLOPs of blocks in the graph (recomputed under checkpointing)
    autocast_copies: int = 0  # half-precision copies of float32 weights kept by autocast
    cpu: bool = True  # the device the pass stands for (attention with dropout differs)


_ACTIVE: list[_Profile] = []  # the profile the attention emulation adds its FLOPs to


def _fused_attention_function():
    """An attention function for meta models that saves what a fused SDPA kernel saves.

    On a CPU and on CUDA, ``scaled_dot_product_attention`` runs a fused kernel (flash or memory-
    efficient) that keeps query, key, value, output and the log-sum-exp for the backward pass;
    on meta tensors it would take the math path and keep the attention matrix instead, which the
    real run never materialises.
    """
    import torch

    class FusedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            b, h, s, _ = q.shape
            # laid out (batch, seq, heads, dim), as the fused kernels return it
            out = q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)
            lse = q.new_empty(b, h, s, dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, _, _ = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def attention(
        module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
    ):
        if _ACTIVE:
            b, h, s, d = query.shape
            causal = (
                0.5 if (is_causal if is_causal is not None else getattr(module, "is_causal", False)) else 1.0
            )
            flops = 4 * b * h * s * key.shape[2] * d * causal
            _ACTIVE[-1].flops_fwd += flops
            if query.requires_grad:
                _ACTIVE[-1].flops_bwd += 2 * flops
            if dropout and _ACTIVE[-1].cpu:
                # the CPU's fused kernel has no dropout: training runs adaptkit's own (adaptkit/attention.py),
                # or the math path where that hands over, as meta tensors do
                from transformers.integrations.sdpa_attention import sdpa_attention_forward

                from adaptkit.kernels.attention import dropout_attention, handled_here

                if handled_here(module, query, key, attention_mask, dropout, is_causal, **kwargs):
                    return dropout_attention(
                        module, query, key, value, attention_mask, dropout, scaling, is_causal
                    ), None
                return sdpa_attention_forward(
                    module,
                    query,
                    key,
                    value,
                    attention_mask,
                    dropout=dropout,
                    scaling=scaling,
                    is_causal=is_causal,
                    **kwargs,
                )
        return FusedAttention.apply(query, key, value).transpose(1, 2), None

    return attention


_ATTENTION_NAME = "adaptkit_estimate_fused"
_REGISTERED: list[bool] = []


def _register_attention() -> None:
    """Make the emulation available to transformers models by name (once per process)."""
    from transformers import AttentionInterface

    if not _REGISTERED:
        AttentionInterface.register(_ATTENTION_NAME, _fused_attention_function())
        _REGISTERED.append(True)


def _no_save_linear(module):
    """A forward for a bitsandbytes layer on meta tensors that saves nothing, as its kernels do.

    bitsandbytes' matmuls keep only the packed weight (a parameter) for the backward pass; on
    meta tensors the weight was never quantized, so the real forward cannot run.
    """
    import torch

    class NoSave(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.in_shape = x.shape
            return x.new_empty(*x.shape[:-1], module.out_features)

        @staticmethod
        def backward(ctx, grad):
            return grad.new_empty(ctx.in_shape)

    def forward(x, *args, **kwargs):
        return NoSave.apply(x)

    return forward


def _source_path(spec: Any, host: PluginHost) -> str:
    """Where the model's config is: a registered model's directory (fetched if needed), else the source."""
    entry = host.registries["models"].get(spec.source)
    return str(entry.obj.fetch()) if entry else spec.source


def load_config(spec: Any, task: Any, host: PluginHost) -> Any:
    """The transformers config of ``model`` (a ModelSpec) as training would load it, without weights."""
    import transformers

    from adaptkit.contract.model import dropout_keys

    path = _source_path(spec, host)
    common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        common["revision"] = spec.revision
    try:
        config = transformers.AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.source: cannot read the config of '{spec.source}' to estimate from: {exc}".splitlines()[0]
        ) from None
    if spec.dropout is not None:
        for key in dropout_keys(config):
            setattr(config, key, spec.dropout)
    if hasattr(task, "setup_labels"):  # a new head sized to the labels; without data, the recipe's or two
        config.num_labels = spec.num_labels or (len(task.data.labels) if task.data.labels else 2)
    return config


def _checkpoint_dtype(config: Any) -> str | None:
    """The dtype the checkpoint's config says its weights are stored in (None when it does not say)."""
    dtype = getattr(config, "dtype", None)
    return str(dtype).replace("torch.", "") if dtype is not None else None


@dataclass
class _Prepared:
    """A meta model with the strategies applied, and what its parameters cost."""

    model: Any
    adapted: Any
    model_type: str
    auto_model: str
    config: Any
    block_path: str
    blocks: list[Any]
    frozen_by_dtype: dict[str, int]
    trainable: list[Any]  # trainable parameters at the run's last stage
    total_parameters: int
    replaced_float_bytes: int  # checkpoint bytes of the layers that were quantized
    param_region: dict[int, int]  # id(param) -> -1 (below the blocks), block index, or len(blocks) (above)


class Estimator:
    """Builds meta models for recipes (once per model and strategy stack) and estimates their steps.

    ``device`` is ``cpu`` or ``cuda`` (default: cuda when available); ``overhead_bytes`` the
    process baseline (default: measured once and cached, see ``cpu_overhead_bytes``);
    ``peak_tflops`` the device's matmul rate for the time estimate (default: measured; 0 skips it).
    """

    def __init__(
        self,
        host: PluginHost | None = None,
        device: str | None = None,
        overhead_bytes: int | None = None,
        peak_tflops: float | None = None,
    ):
        import torch

        from adaptkit.host.manager import default_host

        self.host = host or default_host()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device: '{self.device}' is not supported; use cpu or cuda")
        self._overhead = overhead_bytes
        self._peak_tflops = peak_tflops
        self._prepared: dict[str, _Prepared] = {}

    # -- public ---------------------------------------------------------------------------

    def estimate(self, recipe: Recipe) -> Estimate:
        """The estimate for ``recipe`` (an ``auto`` micro-batch counts as 8: resolve it with ``largest_fitting_micro_batch``)."""
        spec = recipe.train
        micro = spec.micro_batch_size if isinstance(spec.micro_batch_size, int) else 8
        seq = recipe.data.max_length
        prep = self._prepare(recipe)
        profile = self._profile(prep, recipe, micro, seq)

        trainable_numel = sum(p.numel() for p in prep.trainable)
        trainable_bytes = 4 * trainable_numel  # training keeps trainable weights in float32
        grads = trainable_bytes
        states = sum(_optimizer_bytes(spec.optimizer, p.numel()) for p in prep.trainable)
        frozen = sum(prep.frozen_by_dtype.values())

        nblocks = len(prep.blocks)
        in_blocks = [b + d for b, d in zip(profile.blocks, profile.lora_dropout)]
        checkpointing = recipe.model.gradient_checkpointing
        if checkpointing:
            # each block in the graph keeps only its input; its activations come back one block at a time
            kept = [inp if s else 0 for inp, s in zip(profile.block_inputs, in_blocks)]
            activations = profile.pre + profile.post + sum(kept) + max(profile.blocks, default=0)
            lora_dropout = max(profile.lora_dropout, default=0)
        else:
            activations = profile.pre + profile.post + sum(profile.blocks)
            lora_dropout = sum(profile.lora_dropout)
        activations += profile.autocast_copies
        logits = profile.held + profile.loss + 2 * 4 * profile.logits_numel

        checkpoint_pages = 0
        if self.device == "cpu" and _checkpoint_dtype(prep.config) == recipe.model.dtype:
            checkpoint_pages = prep.replaced_float_bytes
        overhead = self.overhead_bytes()
        persistent = frozen + trainable_bytes + states + checkpoint_pages + overhead

        grad_by_region = [0] * (nblocks + 2)  # index 0: below the blocks, 1..n: blocks, n+1: above
        for p in prep.trainable:
            grad_by_region[prep.param_region.get(id(p), nblocks) + 1] += 4 * p.numel()
        if prep.trainable:
            fb_peak, phase = _peak(profile, in_blocks, grad_by_region, checkpointing)
        else:  # nothing trains: the run only evaluates, without a graph
            fb_peak, phase = profile.held, "evaluation only (nothing trains)"
        # the step runs while the output (its logits) is still referenced by the training loop
        step_peak = grads + profile.held + _optimizer_temporaries(spec.optimizer, prep.trainable, self.device)
        transient, phase = (fb_peak, phase) if fb_peak >= step_peak else (step_peak, "optimizer step")

        flops = profile.flops_fwd + profile.flops_bwd + (profile.flops_blocks_fwd if checkpointing else 0)
        flops *= spec.gradient_accumulation
        peak = self.peak_tflops(recipe)
        return Estimate(
            device=self.device,
            model_type=prep.model_type,
            strategies=[s.name for s in prep.adapted.strategies],
            micro_batch_size=micro,
            gradient_accumulation=spec.gradient_accumulation,
            seq_len=seq,
            optimizer=spec.optimizer,
            gradient_checkpointing=checkpointing,
            mixed_precision=spec.mixed_precision,
            total_parameters=prep.total_parameters,
            trainable_parameters=trainable_numel,
            frozen_weights=frozen,
            trainable_weights=trainable_bytes,
            gradients=grads,
            optimizer_states=states,
            activations=activations,
            lora_dropout=lora_dropout,
            logits=logits,
            largest_block=max([4 * profile.logits_numel] + [4 * p.numel() for p in prep.trainable]),
            checkpoint_pages=checkpoint_pages,
            overhead=overhead,
            total=persistent + transient,
            peak_phase=phase,
            frozen_by_dtype=dict(prep.frozen_by_dtype),
            activations_per_block=max(profile.blocks, default=0),
            activations_by_block=list(profile.blocks),
            flops_per_step=flops,
            peak_tflops=peak or None,
            time_per_step_s=flops / (peak * 1e12) if peak else None,
        )

    def overhead_bytes(self) -> int:
        """The process baseline this estimator adds (given, the CUDA context, or the measured CPU one)."""
        if self._overhead is None:
            self._overhead = CUDA_CONTEXT_BYTES if self.device == "cuda" else cpu_overhead_bytes()
        return self._overhead

    def peak_tflops(self, recipe: Recipe) -> float:
        """The device's matmul rate in TFLOP/s in the step's compute dtype (given, or measured once)."""
        if self._peak_tflops is None:
            self._peak_tflops = measure_peak_tflops(self.device, _compute_dtype(recipe))
        return self._peak_tflops

    # -- building ---------------------------------------------------------------------------

    def _prepare(self, recipe: Recipe) -> _Prepared:
        key = json.dumps(
            recipe.model_dump(mode="json", include={"model", "strategies"})
            | {
                "task": recipe.model.task,
                "labels": recipe.data.labels,
                "schedule": _schedule_key(recipe.train),
            },
            sort_keys=True,
        )
        if key not in self._prepared:
            self._prepared[key] = self._build(recipe)
        return self._prepared[key]

    def _build(self, recipe: Recipe) -> _Prepared:
        import torch
        import transformers

        from adaptkit.adapt.stack import Adapted
        from adaptkit.contract.anatomy import find_blocks
        from adaptkit.contract.model import torch_dtype

        spec = recipe.model
        task = self.host.lookup("tasks", spec.task).obj(recipe.data)
        config = load_config(spec, task, self.host)
        auto = getattr(transformers, task.auto_model, None)
        if auto is None or task.auto_model not in _INPUTS:
            raise AdaptkitError(
                f"estimate: task '{spec.task}' (model class {task.auto_model}) is not supported; "
                f"supported: {', '.join(sorted(_INPUTS))}"
            )
        _register_attention()
        with torch.device("meta"):
            model = auto.from_config(copy.deepcopy(config), dtype=torch_dtype(spec.dtype))
        if model.config._attn_implementation == "sdpa":
            model.set_attn_implementation(_ATTENTION_NAME)
        stack = self.host.build_strategies(recipe.strategies)
        for s in stack:
            try:
                with torch.device(
                    "meta"
                ):  # whatever a strategy creates (adapters, a fresh model) stays weightless
                    model = s.apply(model)
            except AdaptkitError:
                raise
            except Exception as exc:  # a strategy that needs real weights: say which, and why
                raise AdaptkitError(
                    f"estimate: strategy '{s.name}' cannot be applied to a model without weights "
                    f"(meta device): {type(exc).__name__}: {exc}"
                ) from None
        adapted = Adapted(model, stack, "")
        _final_stage(adapted, recipe.train)
        model.train()

        path, blocks = find_blocks(model)
        region = _param_regions(model, path, len(blocks))
        params = {id(p): p for p in model.parameters()}
        frozen_by_dtype: dict[str, int] = {}
        replaced = 0
        ckpt_dtype = _checkpoint_dtype(config)
        ckpt_size = (
            torch.empty((), dtype=getattr(torch, ckpt_dtype)).element_size()
            if ckpt_dtype in ("float32", "bfloat16", "float16")
            else 4
        )
        for p in params.values():
            kind, nbytes = _stored(p)
            if kind in ("nf4", "nf4+dq", "fp4", "fp4+dq", "int8"):
                replaced += p.numel() * ckpt_size
            if p.requires_grad:
                continue
            frozen_by_dtype[kind] = frozen_by_dtype.get(kind, 0) + nbytes
        for module in model.modules():  # bitsandbytes layers cannot run on meta tensors (peft's wrappers can)
            if type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in (
                "Linear4bit",
                "Linear8bitLt",
            ):
                module.forward = _no_save_linear(module)
        trainable = [p for p in params.values() if p.requires_grad]
        return _Prepared(
            model=model,
            adapted=adapted,
            model_type=getattr(config, "model_type", type(model).__name__),
            auto_model=task.auto_model,
            config=config,
            block_path=path,
            blocks=blocks,
            frozen_by_dtype=frozen_by_dtype,
            trainable=trainable,
            total_parameters=sum(p.numel() for p in params.values()),
            replaced_float_bytes=replaced,
            param_region={pid: r for pid, r in region.items() if pid in params},
        )

    # -- the forward pass ---------------------------------------------------------------------

    def _profile(self, prep: _Prepared, recipe: Recipe, micro: int, seq: int) -> _Profile:
        """Run one forward pass on meta tensors and sort every tensor autograd saves by where it was made."""
        import torch

        from adaptkit.kernels.lm_loss import chunk_rows, chunked_output_layer

        model, nblocks = prep.model, len(prep.blocks)
        prof = _Profile(
            blocks=[0] * nblocks,
            lora_dropout=[0] * nblocks,
            block_inputs=[0] * nblocks,
            cpu=self.device == "cpu",
        )
        weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
        block_of = {id(b): i for i, b in enumerate(prep.blocks)}
        vocab = _vocab(prep.config)
        state = {"block": None, "after": False, "dropout": 0, "lora": 0}
        lora_outputs: set[int] = set()  # storages LoRA's dropout made (saved later by the LoRA matmul)
        keep: list[Any] = []  # recorded tensors stay alive, so no storage address is reused during the pass
        seen: set[int] = set()
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.mixed_precision)
        cuda = self.device == "cuda"

        def pack(t):
            key = t.untyped_storage()._cdata
            if key in weights or key in seen:
                return t
            seen.add(key)
            keep.append(t)
            nbytes = t.untyped_storage().nbytes()
            if cuda and state["dropout"] and t.dtype != torch.bool:
                nbytes = t.numel()  # CUDA's fused dropout keeps a bool mask; the CPU keeps the scaled values
            b = state["block"]
            if b is not None:
                if state["lora"] or key in lora_outputs:
                    prof.lora_dropout[b] += nbytes
                else:
                    prof.blocks[b] += nbytes
            elif not state["after"]:
                prof.pre += nbytes
            elif vocab > 1 and t.dim() >= 2 and t.shape[-1] == vocab:
                prof.loss += nbytes
            else:
                prof.post += nbytes
            return t

        def block_pre(module, args, kwargs):
            i = block_of[id(module)]
            state["block"] = i
            hidden = (
                args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            )
            if isinstance(hidden, torch.Tensor):
                prof.block_inputs[i] = hidden.numel() * hidden.element_size()

        def block_post(module, args, output):
            state["block"], state["after"] = None, True

        def enter(key):
            def hook(module, args):
                state[key] += 1

            return hook

        def leave(key):
            def hook(module, args, output):
                state[key] -= 1
                if (
                    key == "lora"
                    and isinstance(output, torch.Tensor)
                    and args
                    and output.untyped_storage()._cdata != args[0].untyped_storage()._cdata
                ):
                    keep.append(output)
                    lora_outputs.add(output.untyped_storage()._cdata)

            return hook

        real_dtype: dict[int, Any] = {}

        def matmul_hook(module, args, output):
            x, weight = (args[0] if args else None), getattr(module, "weight", None)
            if not isinstance(x, torch.Tensor) or weight is None:
                return
            flops = 2 * (x.numel() // max(x.shape[-1], 1)) * weight.numel()
            prof.flops_fwd += flops
            prof.flops_bwd += flops * (int(x.requires_grad) + int(weight.requires_grad))
            if x.requires_grad or weight.requires_grad:
                if state["block"] is not None:
                    prof.flops_blocks_fwd += flops
                if half is not None and real_dtype.get(id(module)) == torch.float32:
                    prof.autocast_copies += 2 * weight.numel()  # autocast's half copy, kept for the backward

        hooks = []
        for b in prep.blocks:
            hooks.append(b.register_forward_pre_hook(block_pre, with_kwargs=True))
            hooks.append(b.register_forward_hook(block_post))
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Dropout):
                hooks += [
                    module.register_forward_pre_hook(enter("dropout")),
                    module.register_forward_hook(leave("dropout")),
                ]
            if ".lora_dropout." in f".{name}" and not any(True for _ in module.children()):
                hooks += [
                    module.register_forward_pre_hook(enter("lora")),
                    module.register_forward_hook(leave("lora")),
                ]
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                hooks.append(module.register_forward_hook(matmul_hook))
                real_dtype[id(module)] = module.weight.dtype
        casted = []
        if half is not None:  # autocast does not act on meta tensors: run the pass in the half dtype instead
            for p in model.parameters():
                if type(p).__name__ == "Parameter" and p.dtype == torch.float32:
                    casted.append((p, p.data))
                    p.data = p.data.to(half)
        _ACTIVE.append(prof)
        try:
            inputs = _INPUTS[prep.auto_model](prep.config, micro, seq)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(**inputs)
        finally:
            _ACTIVE.pop()
            for h in hooks:
                h.remove()
            for p, data in casted:
                p.data = data
        logits = getattr(out, "logits", None)
        if isinstance(logits, torch.Tensor):
            prof.held = logits.numel() * logits.element_size()
            if logits.shape[-1] == vocab:
                prof.logits_numel = logits.numel()
        if prof.logits_numel == 0:  # a classifier's loss saves nothing logits-sized
            prof.post += prof.loss
            prof.loss = 0
        elif chunked_output_layer(model, prep.auto_model) is not None:
            # training computes this loss a chunk of tokens at a time (adaptkit.kernels.lm_loss): no logits
            # are returned or kept, and a chunk's logits and their gradient are the largest blocks
            prof.held = prof.loss = 0
            prof.logits_numel = min(prof.logits_numel // vocab, chunk_rows(vocab, self.device)) * vocab
        return prof


def _vocab(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", 0) or 0)


def _causal_inputs(config: Any, micro: int, seq: int) -> dict[str, Any]:
    import torch

    ids = torch.zeros(micro, seq, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": ids}


def _classification_inputs(config: Any, micro: int, seq: int) -> dict[str, Any]:
    import torch

    ids = torch.zeros(micro, seq, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": torch.zeros(micro, dtype=torch.long, device="meta")}


def _image_inputs(config: Any, micro: int, seq: int) -> dict[str, Any]:
    import torch

    size = getattr(config, "image_size", 224)
    pixels = torch.zeros(micro, getattr(config, "num_channels", 3), size, size, device="meta")
    return {"pixel_values": pixels, "labels": torch.zeros(micro, dtype=torch.long, device="meta")}


#: The model classes the estimator can feed, and a batch for each (on meta tensors: no padding,
#: so every sequence is ``data.max_length`` long, the worst case of dynamic padding).
_INPUTS = {
    "AutoModelForCausalLM": _causal_inputs,
    "AutoModelForSequenceClassification": _classification_inputs,
    "AutoModelForImageClassification": _image_inputs,
}


def _stored(p: Any) -> tuple[str, int]:
    """(kind, bytes) of a parameter as stored: bitsandbytes' packed layouts, else its dtype."""
    kind = type(p).__name__
    if kind == "Params4bit":
        n = p.numel()
        blocks = math.ceil(n / p.blocksize)
        quant = getattr(p, "quant_type", "nf4")
        code = 16 * 4  # the 4-bit code book, float32
        if p.compress_statistics:  # double quantization: 8-bit absmax, with float32 scales per 256 of them
            return f"{quant}+dq", math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + code + 256 * 4 + 4
        return quant, math.ceil(n / 2) + 4 * blocks + code
    if kind == "Int8Params":
        return "int8", p.numel() + 4 * p.shape[0]  # a float32 scale per row
    return str(p.dtype).replace("torch.", ""), p.numel() * p.element_size()


def _optimizer_bytes(optimizer: str, numel: int) -> int:
    per = OPTIMIZER_BYTES[optimizer]
    if per == 2 and numel < BNB_MIN_8BIT_SIZE:
        per = 8
    elif per == 2:
        return 2 * numel + 2 * 4 * math.ceil(numel / BNB_STATE_BLOCK)
    return per * numel


def _optimizer_temporaries(optimizer: str, trainable: list[Any], device: str) -> int:
    """Scratch memory of one optimizer step over the trainable parameters.

    Training runs torch's fused AdamW and bitsandbytes' optimizers, which update in place. torch's
    SGD on a CPU updates one tensor at a time and needs two temporaries the size of the largest;
    on CUDA its foreach implementation needs one the size of all of them.
    """
    if optimizer != "sgd" or not trainable:
        return 0
    if device == "cuda":
        return 4 * sum(p.numel() for p in trainable)
    return 2 * 4 * max(p.numel() for p in trainable)


def _peak(prof: _Profile, in_blocks: list[int], grads: list[int], checkpointing: bool) -> tuple[int, str]:
    """The highest live memory of forward + backward beyond the weights, and when it happens.

    After the forward pass every saved tensor and the logits are alive. The loss' backward adds
    two logits-sized float32 gradients; then each part of the model, from the top down, gets its
    parameters' gradients while its saved tensors are freed (with one more block-sized
    transient for the gradients flowing through it, and under checkpointing its recomputation).
    """
    n = len(in_blocks)
    kept = [inp if s else 0 for inp, s in zip(prof.block_inputs, in_blocks)] if checkpointing else in_blocks
    live = prof.pre + sum(kept) + prof.post + prof.loss + prof.held
    logits_grad = 4 * prof.logits_numel
    best, phase = live + 2 * logits_grad, "backward: loss"
    live += grads[n + 1] - prof.loss
    if live + logits_grad > best:
        best, phase = live + logits_grad, "backward: head"
    live -= prof.post
    for i in reversed(range(n)):
        rebuilt = in_blocks[i] if checkpointing else 0
        candidate = live + rebuilt + in_blocks[i] + grads[i + 1]
        if candidate > best:
            best, phase = candidate, f"backward: block {i}"
        live += grads[i + 1] - kept[i]
    live += grads[0]
    if live + prof.pre > best:
        best, phase = live + prof.pre, "backward: embeddings"
    return best, phase


def _param_regions(model: Any, block_path: str, nblocks: int) -> dict[int, int]:
    """Where each parameter is used, for the order of the backward pass: -1 below the blocks,
    the block index, or ``nblocks`` above them. A tied parameter counts where it is used last."""
    region: dict[int, int] = {}
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    first_block = next((i for i, n in enumerate(names) if n.startswith(block_path + ".")), len(names))
    for i, (name, p) in enumerate(model.named_parameters(remove_duplicate=False)):
        if name.startswith(block_path + "."):
            r = int(name[len(block_path) + 1 :].split(".", 1)[0])
        else:
            r = -1 if i < first_block else nblocks
        region[id(p)] = max(region.get(id(p), -1), r)
    return region


def _schedule_key(spec: Any) -> tuple:
    return (spec.max_steps, spec.epochs)


def _final_stage(adapted: Any, spec: Any) -> None:
    """Move scheduled strategies (gradual unfreezing) to the stage of the run's last step.

    The last step is known when ``train.max_steps`` is set (steps) or it is not (epochs); the
    other count depends on the data size and is taken as unbounded, the worst case.
    """
    from adaptkit.contract.strategy import TrainState

    unbounded = 10**9
    if spec.max_steps is not None:
        state = TrainState(step=spec.max_steps - 1, epoch=unbounded, total_steps=spec.max_steps)
    else:
        state = TrainState(step=unbounded, epoch=max(0, math.ceil(spec.epochs) - 1))
    for event in ("train_start", "epoch_start", "step_start"):
        adapted.on_event(event, state)


def _compute_dtype(recipe: Recipe) -> str:
    return {"bf16": "bfloat16", "fp16": "float16"}.get(recipe.train.mixed_precision, recipe.model.dtype)


# -- the device -----------------------------------------------------------------------------------


def measure_peak_tflops(device: str, dtype: str = "float32", seconds: float = 0.3) -> float:
    """The best matmul rate (TFLOP/s) of ``device`` in ``dtype`` over about ``seconds``, in this process."""
    import torch

    n = 1024 if device == "cpu" else 4096
    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    best = 0.0
    deadline = time.perf_counter() + seconds
    for _ in range(50):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e12)
        if time.perf_counter() > deadline:
            break
    return best


#: What a training process imports before it loads a model (its resident baseline).
_STACK = ("torch", "transformers", "accelerate", "datasets", "peft", "adaptkit.train.loop")


def cpu_overhead_bytes() -> int:
    """Resident memory of a fresh Python process that imported the training stack.

    Measured once in a subprocess (a few seconds) and cached under the adaptkit cache directory,
    keyed by the library versions.
    """
    from adaptkit.files import cache_dir, write_json
    from adaptkit.recipe.identity import library_versions

    key = json.dumps(library_versions(), sort_keys=True)
    path = cache_dir() / "estimate" / "cpu-overhead.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return int(cached["bytes"])
    except (OSError, ValueError, KeyError):
        pass
    code = "import " + ", ".join(_STACK) + "; import psutil; print(psutil.Process().memory_info().rss)"
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    if res.returncode != 0:
        raise AdaptkitError(
            f"estimate: could not measure the process baseline: {res.stderr.strip().splitlines()[-1:]}"
        )
    value = int(res.stdout.strip().splitlines()[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, "bytes": value})
    return value


def free_memory(device: Any) -> int | None:
    """Bytes free now on ``device``: CUDA's free memory, or the RAM available (psutil); None elsewhere."""
    import torch

    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if kind == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    return None


# -- making it fit --------------------------------------------------------------------------------


def _with(recipe: Recipe, overrides: list[str], host: Any) -> Recipe:
    from adaptkit.recipe.schema import apply_overrides, validate

    return validate(apply_overrides(recipe.model_dump(mode="json"), overrides), host=host)


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, largest first."""
    return sorted({d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}, reverse=True)


def effective_batch(spec: Any) -> int:
    """Examples per optimizer step: ``effective_batch_size`` with an ``auto`` micro-batch, else micro-batch x accumulation."""
    if isinstance(spec.micro_batch_size, int):
        return spec.micro_batch_size * spec.gradient_accumulation
    return spec.effective_batch_size or 8 * spec.gradient_accumulation


def largest_fitting_micro_batch(
    estimator: Estimator, recipe: Recipe, budget: int, candidates: list[int] | None = None
) -> tuple[int, Estimate] | None:
    """The largest micro-batch (a divisor of the effective batch, or of ``candidates``) whose estimate fits ``budget``.

    The estimate grows with the micro-batch, so the divisors are searched by bisection. None
    when even the smallest does not fit.
    """
    sizes = sorted(candidates or divisors(effective_batch(recipe.train)))
    lo, hi, found = 0, len(sizes) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        est = estimator.estimate(with_micro_batch(recipe, sizes[mid]))
        if est.total <= budget:
            found, lo = (sizes[mid], est), mid + 1
        else:
            hi = mid - 1
    return found


def with_micro_batch(recipe: Recipe, micro: int) -> Recipe:
    total = effective_batch(recipe.train)
    train = recipe.train.model_copy(
        update={
            "micro_batch_size": micro,
            "gradient_accumulation": max(1, total // micro),
            "effective_batch_size": None,
        }
    )
    return recipe.model_copy(update={"train": train})


def suggest(estimator: Estimator, recipe: Recipe, budget: int) -> list[Suggestion]:
    """Changes that lower the estimate towards ``budget``, cheapest first, each applied on top of the earlier ones.

    In order: gradient checkpointing; a smaller micro-batch with more accumulation (the same
    effective batch); an 8-bit optimizer; a 4-bit base (for strategies with a ``quantize``
    option, LoRA); shorter sequences. It stops at the first change after which the run fits;
    a change that would not lower the estimate is left out.
    """
    out: list[Suggestion] = []
    current = recipe
    base = estimator.estimate(current)
    if base.total <= budget:
        return out

    def add(change: str, overrides: list[str], new_recipe: Recipe, est: Estimate) -> bool:
        nonlocal current, base
        if est.total >= base.total:
            return False
        out.append(Suggestion(change, overrides, est, est.total <= budget))
        current, base = new_recipe, est
        return est.total <= budget

    if not current.model.gradient_checkpointing:
        r = _with(current, ["model.gradient_checkpointing=true"], estimator.host)
        if add(
            "gradient checkpointing (recompute each block's activations in the backward pass; about a third more compute)",
            ["model.gradient_checkpointing=true"],
            r,
            estimator.estimate(r),
        ):
            return out
    spec = current.train
    if isinstance(spec.micro_batch_size, int) and spec.micro_batch_size > 1:
        total = effective_batch(spec)
        smaller = [d for d in divisors(total) if d < spec.micro_batch_size]
        found = largest_fitting_micro_batch(estimator, current, budget, smaller)
        micro = found[0] if found else min(smaller, default=1)
        overrides = [f"train.micro_batch_size={micro}", f"train.gradient_accumulation={total // micro}"]
        r = _with(current, overrides, estimator.host)
        if add(
            f"micro-batch {micro} with {total // micro} accumulation steps (the same {total} examples per step)",
            overrides,
            r,
            estimator.estimate(r),
        ):
            return out
    eight_bit = {"adamw": "adamw_8bit", "paged_adamw": "paged_adamw_8bit"}.get(current.train.optimizer)
    if eight_bit:
        overrides = [f"train.optimizer={eight_bit}"]
        r = _with(current, overrides, estimator.host)
        if add(f"8-bit optimizer states ({eight_bit}, bitsandbytes)", overrides, r, estimator.estimate(r)):
            return out
    for i, s in enumerate(current.strategies):
        options = {"name": s} if isinstance(s, str) else s
        config_class = estimator.host.strategy(options["name"]).extra["config_class"]
        if "quantize" in config_class.model_fields and options.get("quantize") != "4bit":
            overrides = [f"strategies.{i}.quantize=4bit"]
            r = _with(current, overrides, estimator.host)
            if add(
                f"4-bit base (QLoRA: {options['name']} over NF4 weights)", overrides, r, estimator.estimate(r)
            ):
                return out
            break
    length = current.data.max_length
    tried = [length // 2**k for k in (1, 2, 3) if length // 2**k >= 8]
    for new_length in tried:
        overrides = [f"data.max_length={new_length}"]
        r = _with(current, overrides, estimator.host)
        est = estimator.estimate(r)
        if est.total <= budget or new_length == tried[-1]:
            add(
                f"shorter sequences (data.max_length {new_length} instead of {length}; longer examples are truncated)",
                overrides,
                r,
                est,
            )
            break
    return out


# -- in training ----------------------------------------------------------------------------------


def does_not_fit_message(est: Estimate, budget: int, suggestions: list[Suggestion], device: str) -> str:
    """One message: the estimate against the budget, its largest terms, and the changes that would fit."""
    terms = sorted(est.terms().items(), key=lambda kv: -kv[1])[:3]
    lines = [
        f"this run needs about {format_bytes(est.total)} at its peak ({est.peak_phase}) but {format_bytes(budget)} "
        f"is available on the {device}; largest terms: "
        + ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in terms)
    ]
    if suggestions:
        lines.append("changes that lower it, cheapest first (each on top of the previous):")
        for s in suggestions:
            lines.append(
                f"  {' '.join(s.overrides)}  -> {format_bytes(s.estimate.total)}"
                f"{' (fits)' if s.fits else ''}  # {s.change}"
            )
    if not any(s.fits for s in suggestions):
        lines.append(
            "nothing listed here makes it fit; use a smaller model or a device with more memory "
            "(or set train.preflight: false to try anyway)"
        )
    return "\n".join(lines)


# -- the table -------------------------------------------------------------------------------------


def render(
    est: Estimate,
    budget: int | None,
    suggestions: list[Suggestion],
    budget_label: str = "",
    auto: bool = False,
) -> str:
    """The estimate as a readable table, with the device, the dominant term, the time and the suggestions."""
    chosen = " (auto: the largest that fits)" if auto else ""
    lines = [
        f"{est.model_type}, strategies {'+'.join(est.strategies)}: {est.total_parameters:,} parameters, "
        f"{est.trainable_parameters:,} trainable ({100 * est.trainable_parameters / max(est.total_parameters, 1):.2f}%)",
        f"micro-batch {est.micro_batch_size}{chosen} x {est.seq_len} tokens, accumulation {est.gradient_accumulation}, "
        f"optimizer {est.optimizer}, mixed precision {est.mixed_precision}, "
        f"gradient checkpointing {'on' if est.gradient_checkpointing else 'off'}, device {est.device}",
        "",
    ]
    width = max(len(t) for t in est.TERMS) + 2
    for name, value in est.terms().items():
        note = ""
        if name == "frozen_weights" and est.frozen_by_dtype:
            note = (
                "  ("
                + ", ".join(
                    f"{k} {format_bytes(v)}"
                    for k, v in sorted(est.frozen_by_dtype.items(), key=lambda kv: -kv[1])
                    if v
                )
                + ")"
            )
        elif name == "activations":
            note = f"  ({format_bytes(est.activations_per_block)} per block)"
        lines.append(f"  {name.replace('_', ' '):<{width}}{format_bytes(value):>12}{note}")
    lines.append(
        f"  {'peak':<{width}}{format_bytes(est.total):>12}  ({est.peak_phase}; terms are not all live at once)"
    )
    if budget is not None:
        verdict = "fits" if est.total <= budget else "does NOT fit"
        lines.append(f"  {'device':<{width}}{format_bytes(budget):>12}  {budget_label}-> {verdict}")
    lines.append(f"dominant term: {est.dominant.replace('_', ' ')}")
    if est.time_per_step_s is not None:
        lines.append(
            f"time per optimizer step: {est.time_per_step_s:.3g} s at {est.peak_tflops:.3g} TFLOP/s "
            f"({est.flops_per_step / 1e12:.3g} TFLOP per step; a lower bound, at the device's matmul peak)"
        )
    if suggestions:
        lines += ["", "to make it fit (cheapest first, each on top of the previous):"]
        for s in suggestions:
            lines.append(
                f"  {' '.join(s.overrides):<60} -> {format_bytes(s.estimate.total):>12}{'  fits' if s.fits else ''}"
            )
            lines.append(f"      {s.change}")
        if not any(s.fits for s in suggestions):
            lines.append("  none of these is enough: a smaller model or more memory is needed")
    return "\n".join(lines)


def estimate_report(
    recipe: Recipe,
    host: PluginHost,
    device_memory: str | None = None,
    device: str | None = None,
    peak_tflops: float | None = None,
) -> tuple[Estimate, int, list[Suggestion], dict[str, Any]]:
    """What ``adaptkit estimate`` shows: the estimate against the device, and suggestions when it does not fit.

    ``device_memory`` is a size (``24GB``); without it, what the device has free now. A
    ``micro_batch_size: auto`` is resolved as training would, against that memory. Returns the
    estimate, the budget in bytes, the suggestions and a JSON-ready report.
    """
    budget = parse_memory(device_memory) if device_memory is not None else None
    estimator = Estimator(host, device=device, peak_tflops=peak_tflops)
    if budget is None:
        import torch

        budget = free_memory(
            torch.device(estimator.device, 0) if estimator.device == "cuda" else torch.device("cpu")
        )
        label = f"free on this {estimator.device} now "
    else:
        label = f"--device-memory {device_memory} "
    auto = not isinstance(recipe.train.micro_batch_size, int)
    if auto:
        found = largest_fitting_micro_batch(estimator, recipe, budget)
        recipe = with_micro_batch(recipe, found[0] if found else 1)
    est = estimator.estimate(recipe)
    suggestions = suggest(estimator, recipe, budget) if est.total > budget else []
    report = {
        "estimate": est.to_dict(),
        "device_memory": budget,
        "fits": est.total <= budget,
        "micro_batch_size_auto": auto,
        "suggestions": [s.to_dict() for s in suggestions],
    }
    return est, budget, suggestions, {"label": label, **report}
