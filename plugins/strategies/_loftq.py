"""LoftQ (Li et al., 2023): a 4-bit base and a LoRA adapter initialised together, so that their sum
starts close to the full-precision weight instead of carrying the whole quantization error.

For a weight W it alternates: quantize what the adapter does not hold (Q = quant(W - B A)), then
set the adapter to the best rank-r approximation of what the quantized base misses
(B A = SVD_r(W - dequant(Q))). One step is peft's default. peft computes LoftQ on CUDA only;
this computes the same alternation with bitsandbytes' own 4-bit quantization, which also runs
on the CPU, and with the same block size and data type the QLoRA layers then use, so the base the
adapter was fitted to is exactly the base that trains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def loftq_split(
    weight: torch.Tensor, rank: int, iterations: int, quant_type: str, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(base, lora_a, lora_b)`` for ``weight`` ([out, in]): ``base`` is what to quantize for the
    base layer, and ``lora_b @ lora_a`` (unscaled) approximates what its quantization loses."""
    import bitsandbytes.functional as bnbf
    import torch

    w = weight.detach().float()
    low_rank = torch.zeros_like(w)
    for _ in range(iterations):
        base = w - low_rank
        packed, state = bnbf.quantize_4bit(base, quant_type=quant_type, compress_statistics=double_quant)
        missed = w - bnbf.dequantize_4bit(packed, state).float()
        u, s, vh = torch.linalg.svd(missed, full_matrices=False)
        root = s[:rank].sqrt()
        lora_b, lora_a = u[:, :rank] * root, root[:, None] * vh[:rank]
        low_rank = lora_b @ lora_a
    return base, lora_a.contiguous(), lora_b.contiguous()


def prepare_loftq(model: Any, names: list[str], config: Any) -> dict[str, tuple[Any, Any]]:
    """Write each named layer's LoftQ base into it (before it is quantized); its adapter by name.

    GPT-2's Conv1D stores its weight transposed ([in, out]); the split is computed on [out, in].
    """
    import torch

    adapters = {}
    for name in names:
        layer = model.get_submodule(name)
        if layer.weight.is_meta:  # the estimator's shape-only model: the default adapter has the same shapes
            continue
        conv1d = type(layer).__name__ == "Conv1D"
        weight = layer.weight.t() if conv1d else layer.weight
        base, lora_a, lora_b = loftq_split(
            weight, config.r, config.loftq_iterations, config.quant_type, config.double_quant
        )
        with torch.no_grad():
            layer.weight.copy_((base.t() if conv1d else base).to(layer.weight.dtype))
        adapters[name] = (lora_a, lora_b)
    return adapters


def set_adapters(wrapped: Any, adapters: dict[str, tuple[Any, Any]]) -> None:
    """Put the LoftQ adapters into peft's LoRA layers (B divided by the layer's scaling, so that
    scaling * B A is the low-rank part LoftQ fitted)."""
    import torch

    inner = wrapped.get_base_model()
    for name, (lora_a, lora_b) in adapters.items():
        layer = inner.get_submodule(name)
        scaling = layer.scaling["default"]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(lora_a)
            layer.lora_B["default"].weight.copy_(lora_b / scaling)
