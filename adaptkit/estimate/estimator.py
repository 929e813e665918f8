"""Will it fit? Memory and time of a training step, estimated from the model's config alone.

No weight is loaded. The model is built on PyTorch's ``meta`` device (tensors with shapes but no
storage), the recipe's strategy stack is applied to it exactly as training applies it
(``adaptkit.estimate.prepare``), and one forward pass runs on meta tensors under
``torch.autograd.graph.saved_tensors_hooks`` (``adaptkit.estimate.meta_pass``): every tensor
autograd keeps for the backward pass is seen once, with its size and where it was made (inside
which transformer block, inside a LoRA dropout, in the loss). The parameters of the adapted model
give the weights (frozen ones by dtype, 4-bit and 8-bit ones at their packed size), the trainable
ones give gradients and optimizer states.

The peak of a step is not the sum of these terms: gradients are allocated while the backward
pass frees the activations, block by block from the top. ``Estimate.total`` follows that order
(see ``adaptkit.estimate.terms.backward_peak``) and also takes the optimizer step into account;
the terms are reported whole.

Measured, not assumed: ``benchmarks/estimate_accuracy.py`` compares the estimate with the peak
resident memory of real runs. On a CPU the estimate is of live memory: what a process holds when
freed tensors go back to the operating system at once (``set_cpu_allocator("release")``, which
``adaptkit train`` chooses when memory is tight). With freed memory kept for reuse (glibc's
default, or ``keep``) a process holds more, up to ``HEAP_SLACK`` times the live peak
(``Estimate.resident_with_reuse``); training keeps freed memory only where that bound fits.

This module owns the ``Estimator`` class, which puts those parts together.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adaptkit.errors import ConfigError
from adaptkit.estimate.config import checkpoint_dtype, source_path
from adaptkit.estimate.inputs import describe_inputs
from adaptkit.estimate.machine import (
    CUDA_CONTEXT_BYTES,
    HEAP_SLACK,
    cpu_overhead_bytes,
    measure_peak_tflops,
)
from adaptkit.estimate.meta_pass import run_profile
from adaptkit.estimate.prepare import Prepared, build_prepared, prepare_key
from adaptkit.estimate.result import Estimate
from adaptkit.estimate.sharding import per_process
from adaptkit.estimate.terms import (
    activation_terms,
    logits_term,
    optimizer_state_bytes,
    step_flops,
    transient_peak,
)

if TYPE_CHECKING:
    from adaptkit.estimate.launch import Launch
    from adaptkit.host.manager import PluginHost
    from adaptkit.recipe.schema import Recipe


class Estimator:
    """Builds meta models for recipes (once per model and strategy stack) and estimates their steps.

    ``device`` is ``cpu`` or ``cuda`` (default: cuda when available); ``overhead_bytes`` the
    process baseline (default: measured once and cached, see ``cpu_overhead_bytes``);
    ``peak_tflops`` the device's matmul rate for the time estimate (default: measured; 0 skips it);
    ``launch`` a launch on several processes, whose estimates are then per process (see
    ``adaptkit.estimate.sharding``; default: one process).
    """

    def __init__(
        self,
        host: PluginHost | None = None,
        device: str | None = None,
        overhead_bytes: int | None = None,
        peak_tflops: float | None = None,
        launch: Launch | None = None,
    ):
        import torch

        from adaptkit.host.manager import default_host

        self.host = host or default_host()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device: '{self.device}' is not supported; use cpu or cuda")
        self._overhead = overhead_bytes
        self._overheads: dict[str | None, int] = {}  # the measured CPU baseline, per model directory
        self._peak_tflops = peak_tflops
        self.launch = None if launch is None or launch.single else launch
        self._prepared: dict[str, Prepared] = {}

    def estimate(self, recipe: Recipe) -> Estimate:
        """The estimate for ``recipe`` (an ``auto`` micro-batch counts as 8: resolve it with
        ``largest_fitting_micro_batch``). The random state is as it was before."""
        import torch

        # a weightless forward in training mode still draws from the CPU's generator (Whisper's and
        # Wav2Vec2's LayerDrop toss a coin per layer): what a run draws later, its new head's
        # initialisation included, must not depend on whether it was estimated first
        with torch.random.fork_rng(devices=[]):
            return self._estimate(recipe)

    def _estimate(self, recipe: Recipe) -> Estimate:
        spec = recipe.train
        micro = spec.micro_batch_size if isinstance(spec.micro_batch_size, int) else 8
        seq = recipe.data.max_length
        checkpointing = recipe.model.gradient_checkpointing
        prep = self._prepare(recipe)
        distributed = self.launch.distributed_type if self.launch else "NO"
        profile = run_profile(prep, spec.mixed_precision, micro, recipe.data, self.device, distributed)

        trainable_numel = sum(p.numel() for p in prep.trainable)
        trainable_bytes = 4 * trainable_numel  # training keeps trainable weights in float32
        # and some strategies a copy of them besides (PiSSA's initial adapter, for its export)
        trainable_bytes += sum(s.held_bytes(prep.model) for s in prep.adapted.strategies)
        states = sum(optimizer_state_bytes(spec.optimizer, p.numel()) for p in prep.stateful)
        frozen = sum(prep.frozen_by_dtype.values())
        activations, lora_dropout = activation_terms(profile, checkpointing)
        checkpoint_pages = self._checkpoint_pages(prep, recipe)
        overhead = self.overhead_bytes(recipe)
        persistent = frozen + trainable_bytes + states + checkpoint_pages + overhead
        transient, phase = transient_peak(
            prep, profile, recipe, [p.numel() for p in prep.trainable], self.device
        )

        flops = step_flops(profile, checkpointing) * spec.gradient_accumulation
        peak = self.peak_tflops(recipe)
        est = Estimate(
            device=self.device,
            model_type=prep.model_type,
            strategies=[s.name for s in prep.adapted.strategies],
            micro_batch_size=micro,
            gradient_accumulation=spec.gradient_accumulation,
            seq_len=seq,
            inputs=describe_inputs(prep.auto_model, prep.model.config, recipe.data),
            optimizer=spec.optimizer,
            gradient_checkpointing=checkpointing,
            mixed_precision=spec.mixed_precision,
            total_parameters=prep.total_parameters,
            trainable_parameters=trainable_numel,
            frozen_weights=frozen,
            trainable_weights=trainable_bytes,
            gradients=trainable_bytes,
            optimizer_states=states,
            activations=activations,
            lora_dropout=lora_dropout,
            logits=logits_term(profile),
            largest_block=max([4 * profile.logits_numel] + [4 * p.numel() for p in prep.trainable]),
            checkpoint_pages=checkpoint_pages,
            overhead=overhead,
            total=persistent + transient,
            resident_with_reuse=int((persistent + transient) * (HEAP_SLACK if self.device == "cpu" else 1)),
            peak_phase=phase,
            frozen_by_dtype=dict(prep.frozen_by_dtype),
            activations_per_block=max(profile.blocks, default=0),
            activations_by_block=list(profile.blocks),
            flops_per_step=flops,
            peak_tflops=peak or None,
            time_per_step_s=flops / (peak * 1e12) if peak else None,
        )
        return per_process(est, prep, profile, recipe, self.launch)

    def overhead_bytes(self, recipe: Recipe | None = None) -> int:
        """The process baseline this estimator adds: given, the CUDA context, or the measured CPU one
        (with ``recipe``, including its model's tokenizer where the model is a local directory)."""
        if self._overhead is not None:
            return self._overhead
        if self.device == "cuda":
            return CUDA_CONTEXT_BYTES
        model_dir = source_path(recipe.model, self.host) if recipe is not None else None
        model_dir = model_dir if model_dir and Path(model_dir).is_dir() else None
        if model_dir not in self._overheads:  # suggestions estimate many variants of one recipe
            self._overheads[model_dir] = cpu_overhead_bytes(model_dir)
        return self._overheads[model_dir]

    def peak_tflops(self, recipe: Recipe) -> float:
        """The device's matmul rate in TFLOP/s in the step's compute dtype (given, or measured once)."""
        if self._peak_tflops is None:
            self._peak_tflops = measure_peak_tflops(self.device, _compute_dtype(recipe))
        return self._peak_tflops

    def _prepare(self, recipe: Recipe) -> Prepared:
        """The meta model for ``recipe``, built once per model, strategy stack and schedule."""
        key = prepare_key(recipe)
        if key not in self._prepared:
            self._prepared[key] = build_prepared(recipe, self.host)
        return self._prepared[key]

    def _checkpoint_pages(self, prep: Prepared, recipe: Recipe) -> int:
        """CPU: the checkpoint's float pages of quantized layers, resident through the file mapping
        (only when the checkpoint's dtype is the one loaded, so the file is mapped, not converted)."""
        if self.device == "cpu" and checkpoint_dtype(prep.config) == recipe.model.dtype:
            return prep.replaced_float_bytes
        return 0


def _compute_dtype(recipe: Recipe) -> str:
    """The dtype the step's matrix products run in: the mixed-precision one, else the model's."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(recipe.train.mixed_precision, recipe.model.dtype)
