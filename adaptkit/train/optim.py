"""The optimizer and learning-rate schedule a recipe asks for, and the gradient rescale of a step."""

from __future__ import annotations

from typing import Any


def scale_gradients(params: Any, factor: float) -> None:
    """Multiply every gradient by ``factor`` in one foreach call.

    The list of gradients lives only inside this call: a list kept in the training loop would
    hold every gradient alive through the next step's forward pass, raising the run's peak.
    """
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)


def build_optimizer(groups: list[dict], spec: Any):
    """AdamW (torch), bitsandbytes 8-bit or paged AdamW, or SGD, over the strategy's groups."""
    import torch

    if spec.optimizer == "adamw":
        # torch's fused AdamW: one kernel per dtype and device and no temporaries, so its step is
        # both faster and lighter than the default loop over tensors (benchmarks/README.md)
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


def build_scheduler(optimizer: Any, spec: Any, total_steps: int):
    """Linear, cosine or constant schedule with warmup, stepped once per optimizer step; or the
    geometric ramp of a learning-rate range test (each group's rate scaled alike)."""
    from transformers import get_scheduler

    if spec.scheduler == "range_test":
        import torch

        start = (spec.lr_low or spec.lr / 1e4) / spec.lr
        last = max(total_steps - 1, 1)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: start ** (1 - min(step, last) / last)
        )

    warmup = int(spec.warmup_ratio * total_steps)
    name = "constant_with_warmup" if spec.scheduler == "constant" else spec.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
