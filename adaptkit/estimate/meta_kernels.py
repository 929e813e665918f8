"""Stand-ins for kernels that would save something else, or could not run at all, on meta tensors:
the fused attention of ``scaled_dot_product_attention`` (registered with transformers by name)
and bitsandbytes' quantized linear layers."""

from __future__ import annotations

from typing import Any

from adaptkit.estimate.profile import ACTIVE_PROFILES, Profile

#: The name the attention stand-in is registered under with transformers' ``AttentionInterface``.
FUSED_ATTENTION_NAME = "adaptkit_estimate_fused"
_REGISTERED: list[bool] = []


def _count_attention_flops(prof: Profile, module: Any, query: Any, key: Any, is_causal: Any) -> None:
    """Add attention's two matrix products, forward and backward, to ``prof``."""
    b, h, s, d = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    flops = 4 * b * h * s * key.shape[2] * d * (0.5 if causal else 1.0)
    prof.flops_fwd += flops
    if query.requires_grad:
        prof.flops_bwd += 2 * flops


def _cpu_dropout_attention(
    module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
) -> tuple[Any, Any]:
    """Attention with dropout as training runs it on a CPU, whose fused kernel has no dropout.

    Training runs adaptkit's own (``adaptkit.kernels.attention``), or the math path where that
    hands over, as meta tensors do.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from adaptkit.kernels.attention import dropout_attention, handled_here

    if handled_here(module, query, key, attention_mask, dropout, is_causal, **kwargs):
        out = dropout_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal)
        return out, None
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


def fused_attention_function():
    """An attention function for meta models that saves what a fused SDPA kernel saves.

    On a CPU and on CUDA, ``scaled_dot_product_attention`` runs a fused kernel (flash or memory-
    efficient) that keeps query, key, value, output and the log-sum-exp for the backward pass;
    on meta tensors it would take the math path and keep the attention matrix instead, which the
    real run never materialises.
    """
    import torch

    class FusedAttention(torch.autograd.Function):
        """Empty outputs shaped as the fused kernels', saving what they save."""

        @staticmethod
        def forward(ctx, q, k, v):
            b, h, s, _ = q.shape
            # laid out as the query is, as the fused kernels return it: (batch, seq, heads, dim) for
            # a query viewed from its projection (Llama), (batch, heads, seq, dim) for one made
            # contiguous first (Whisper), whose output the model then copies back
            if v.shape[-1] == q.shape[-1]:
                out = torch.empty_like(q)
            else:
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
        """transformers' attention interface: count the FLOPs, then run the stand-in."""
        if ACTIVE_PROFILES:
            prof = ACTIVE_PROFILES[-1]
            _count_attention_flops(prof, module, query, key, is_causal)
            if dropout and prof.cpu:
                return _cpu_dropout_attention(
                    module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
                )
        return FusedAttention.apply(query, key, value).transpose(1, 2), None

    return attention


def register_fused_attention() -> None:
    """Make the attention stand-in available to transformers models by name (once per process)."""
    from transformers import AttentionInterface

    if not _REGISTERED:
        AttentionInterface.register(FUSED_ATTENTION_NAME, fused_attention_function())
        _REGISTERED.append(True)


def no_save_linear(module: Any) -> Any:
    """A forward for a bitsandbytes layer on meta tensors that saves nothing, as its kernels do.

    bitsandbytes' matmuls keep only the packed weight (a parameter) for the backward pass; on
    meta tensors the weight was never quantized, so the real forward cannot run.
    """
    import torch

    class NoSave(torch.autograd.Function):
        """An empty output of the layer's shape, with nothing saved for the backward pass."""

        @staticmethod
        def forward(ctx, x):
            ctx.in_shape = x.shape
            return x.new_empty(*x.shape[:-1], module.out_features)

        @staticmethod
        def backward(ctx, grad):
            return grad.new_empty(ctx.in_shape)

    def forward(x, *args, **kwargs):
        """The layer's forward, for its input alone."""
        return NoSave.apply(x)

    return forward
