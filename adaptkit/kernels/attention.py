"""Attention with dropout on the CPU, keeping no attention-sized float tensor for the backward pass.

torch's CPU ``scaled_dot_product_attention`` has a fused kernel only without dropout; with
dropout (BERT's attention dropout of 0.1, GPT-2's) it takes the math path, which keeps three
attention-sized tensors per layer for the backward pass (batch x heads x sequence x sequence
floats, on top of the queries, keys and values) and draws its mask with ``bernoulli_``. Here, as
in the fused kernels, the backward pass recomputes the attention probabilities from the saved
queries, keys and each row's log-sum-exp; only the dropout mask is kept, as booleans, drawn with
``rand >= p``, which is faster than ``bernoulli_``. A layer then keeps one byte per attention
score instead of three floats, and takes about the math path's time with a backward pass and
less without one (a frozen layer).

Training sets it on every model that uses transformers' ``sdpa`` attention
(``use_cpu_dropout_attention``); it hands every other call to transformers' own
``sdpa_attention_forward``: no dropout (evaluation), another device (CUDA's kernels have
dropout), a dtype other than float32, a position bias, a soft cap.
"""

from __future__ import annotations

from typing import Any

import torch

ATTENTION_NAME = "adaptkit_sdpa"
_REGISTERED: list[bool] = []


def _probabilities(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, lse: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T x scale + mask) over the keys, and each row's log-sum-exp (computed unless given)."""
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if mask is not None:
        if mask.dtype == torch.bool:  # True: attend (SDPA's convention)
            scores.masked_fill_(mask.logical_not(), float("-inf"))
        else:
            scores.add_(mask)
    if lse is None:
        # a row with every key masked has -inf: clamped, its probabilities are 0 (as SDPA's)
        lse = torch.logsumexp(scores, -1, keepdim=True).clamp_(min=torch.finfo(scores.dtype).min)
    return scores.sub_(lse).exp_(), lse


class DropoutAttention(torch.autograd.Function):
    """dropout(softmax(q k^T x scale + mask), p) @ v, saving q, k, v, the output, the boolean keep mask and the row log-sum-exp."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        p: float,
        scale: float,
    ) -> torch.Tensor:
        """The attention output; saves what the backward pass recomputes the probabilities from."""
        probs, lse = _probabilities(q, k, mask, scale)
        keep = torch.rand_like(probs) >= p
        out = torch.matmul(probs.mul_(keep), v).mul_(1 / (1 - p))  # the 1/(1-p) on the smaller tensor
        ctx.save_for_backward(q, k, v, mask, keep, lse, out)
        ctx.p, ctx.scale = p, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        """Gradients of q, k and v, with the probabilities recomputed from the saved log-sum-exp."""
        q, k, v, mask, keep, lse, out = ctx.saved_tensors
        probs, _ = _probabilities(q, k, mask, ctx.scale, lse)
        # softmax's backward needs sum_j P_ij dP_ij per row, which is grad_i . out_i: no attention-sized product
        row = (grad * out).sum(-1, keepdim=True)
        grad = grad * (1 / (1 - ctx.p))
        grad_scores = torch.matmul(grad, v.transpose(-2, -1)).mul_(keep).sub_(row).mul_(probs).mul_(ctx.scale)
        grad_v = torch.matmul(probs.mul_(keep).transpose(-2, -1), grad)
        del probs
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q)
        return grad_q, grad_k, grad_v, None, None, None


def dropout_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None = None,
    is_causal: bool | None = None,
) -> torch.Tensor:
    """``DropoutAttention`` with transformers' conventions: grouped key/value heads, ``is_causal``;
    returns (batch, sequence, heads, dim), as ``sdpa_attention_forward`` does."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if q_len > 1 and attention_mask is None and causal:
        # SDPA's is_causal: query i sees keys 0..i (training, where queries and keys are the same tokens)
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril_()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = DropoutAttention.apply(query, key, value, attention_mask, dropout, scale)
    return out.transpose(1, 2).contiguous()


def handled_here(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> bool:
    """Whether a call is one ``dropout_attention`` takes (any device): dropout in float32, nothing it does not model."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return (
        dropout > 0
        and query.dtype == torch.float32
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions")
        and not (attention_mask is not None and attention_mask.requires_grad)
        # is_causal with more keys than queries is a cache's prefill, never training
        and not (causal and attention_mask is None and key.shape[2] != query.shape[2])
    )


def attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``dropout_attention`` for dropout on the CPU, ``sdpa_attention_forward`` otherwise."""
    if query.device.type == "cpu" and handled_here(
        module, query, key, attention_mask, dropout, is_causal, **kwargs
    ):
        return dropout_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

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


def use_cpu_dropout_attention(model: Any) -> bool:
    """Switch a model on transformers' ``sdpa`` attention to ``attention_forward``; True if it was switched.

    Only a model with some dropout in its config is switched; one without (LLaMA's defaults),
    on another attention implementation (eager, flash) or without the attention interface is
    left as it is.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from adaptkit.contract.model import dropout_keys

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not any(
        getattr(config, k) > 0 for k in dropout_keys(config)
    ):
        return False
    if not _REGISTERED:
        AttentionInterface.register(ATTENTION_NAME, attention_forward)
        # the masks SDPA gets; without one registered, transformers builds no mask at all (padding ignored)
        AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        _REGISTERED.append(True)
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, AttributeError):  # a model class that cannot take a registered function
        return False
    return True
