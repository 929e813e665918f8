"""Cached backbone features for head-only training (``train.cache_features``).

When nothing inside a model's pretrained backbone trains (a linear probe: ``freeze`` with only
the head trainable), the backbone computes the same features for an example in every epoch.
This module runs the backbone once per distinct example and answers every later call from a
cache, so a probe trained for ten epochs costs one backbone pass over the data, not ten.

The cache sits on the backbone module itself (``model.bert``, ``model.model``, ...): its
``forward`` is replaced on the instance, and everything around it (the head, its dropout, the
pooling, the loss) runs unchanged. An example is recognised by the bytes of its inputs with the
padding removed (the attention mask says which positions are real), so the same example finds
its features whatever batch and padding it comes in; nothing in the data pipeline changes.

The backbone runs in eval mode (no dropout) and without a graph: cached features could not
reproduce fresh dropout masks, so a cached run equals an uncached run whose backbone has no
dropout, not one with dropout.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from adaptkit.contract.anatomy import backbone_of
from adaptkit.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn


#: Arguments under which the backbone is called as usual, without the cache.
BYPASS = ("inputs_embeds", "past_key_values", "use_cache", "output_hidden_states", "output_attentions")


class FeatureCache:
    """Per-example outputs of a frozen backbone, filled on first use."""

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.original_forward = backbone.forward
        self.rows: dict[bytes, dict[str, torch.Tensor]] = {}
        self.output_type: type | None = None
        self.per_token: set[str] = set()  # output fields with one entry per input position
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Memory the cached features take."""
        return sum(t.numel() * t.element_size() for row in self.rows.values() for t in row.values())

    def summary(self) -> dict[str, int]:
        """What the cache held and saved, for the run's summary."""
        return {
            "examples": len(self.rows),
            "bytes": self.nbytes,
            "computed": self.misses,
            "cached": self.hits,
        }

    def report(self) -> str:
        """One line for the log: how many examples, how much memory, how many forward passes saved."""
        return (
            f"adaptkit: feature cache: {len(self.rows)} examples, {self.nbytes / 2**20:.1f} MiB; "
            f"{self.misses} computed, {self.hits} from the cache"
        )

    def install(self) -> None:
        """Answer the backbone's calls from the cache from now on."""
        self.backbone.forward = self.forward

    def remove(self) -> None:
        """Give the backbone its own forward back (the trained model is then used as usual)."""
        if self.backbone.__dict__.get("forward") == self.forward:
            del self.backbone.forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The backbone's forward, computing only the examples the cache has not seen."""
        import torch

        inputs = dict(zip(("input_ids",), args)) | kwargs
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        # what the cache does not keep: given embeddings, a KV cache (generation), extra outputs
        if not tensors or any(inputs.get(k) not in (None, False) for k in BYPASS):
            return self.original_forward(*args, **kwargs)
        mask = inputs.get("attention_mask")
        batch = next(iter(tensors.values())).shape[0]
        positions = [mask[i].bool() if mask is not None and mask.dim() == 2 else None for i in range(batch)]
        keys = [self.key(tensors, i, positions[i]) for i in range(batch)]
        missing = [i for i, k in enumerate(keys) if k not in self.rows]
        self.hits += batch - len(missing)
        self.misses += len(missing)
        if missing:
            self.compute(args, kwargs, missing, keys, positions)
        return self.assemble(keys, positions, mask)

    @staticmethod
    def key(tensors: dict[str, torch.Tensor], i: int, real: torch.Tensor | None) -> bytes:
        """What identifies example ``i``: its inputs at the real (unpadded) positions."""
        import torch

        digest = hashlib.sha1()
        for name in sorted(tensors):
            row = tensors[name][i]
            if real is not None and row.dim() >= 1 and row.shape[0] == real.shape[0]:
                row = row[real]
            raw = row.detach().cpu().contiguous().view(-1).view(torch.uint8)  # any dtype, bfloat16 included
            digest.update(f"{name}{tuple(row.shape)}".encode() + raw.numpy().tobytes())
        return digest.digest()

    def compute(
        self, args: tuple, kwargs: dict, missing: list[int], keys: list[bytes], positions: list
    ) -> None:
        """Run the real backbone on the whole batch and keep the rows the cache lacks.

        The whole batch (not just the missing rows) goes through, so that the first epoch computes
        exactly what an uncached run computes.
        """
        import torch

        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                out = self.original_forward(*args, **kwargs)
        finally:
            self.backbone.train(was_training)
        self.output_type = type(out)
        fields = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        for i in missing:
            row = {}
            for name, value in fields.items():
                # per-token outputs (batch x positions x features) keep only the real positions: the
                # padding differs from batch to batch
                per_token = (
                    positions[i] is not None and value.dim() >= 3 and value.shape[1] == positions[i].shape[0]
                )
                value = value[i][positions[i]] if per_token else value[i]
                if per_token:
                    self.per_token.add(name)
                row[name] = value.clone()
            self.rows[keys[i]] = row

    def assemble(self, keys: list[bytes], positions: list, mask: torch.Tensor | None) -> Any:
        """The batch's outputs from the cache, padded back to this batch's layout (zeros at padding)."""
        import torch

        rows = [self.rows[k] for k in keys]
        out = {}
        for name, first in rows[0].items():
            if name in self.per_token and mask is not None:
                full = first.new_zeros((len(rows), mask.shape[1], *first.shape[1:]))
                for i, row in enumerate(rows):
                    full[i][positions[i]] = row[name]
                out[name] = full
            else:
                out[name] = torch.stack([r[name] for r in rows])
        return self.output_type(**out)


def check_cacheable(model: nn.Module, pending: list) -> nn.Module:
    """The backbone whose features can be cached, or a ``ConfigError`` saying why not."""
    field = "train.cache_features"
    backbone = backbone_of(model)
    if backbone is None:
        raise ConfigError(
            [
                (
                    field,
                    f"{type(model).__name__} has no separate backbone (transformers' base_model_prefix) to cache",
                )
            ]
        )
    ids = {id(p) for p in backbone.parameters()}
    if any(id(p) in ids for p in pending):
        raise ConfigError(
            [
                (
                    field,
                    "a strategy unfreezes backbone parameters later (gradual unfreezing): "
                    "their features change, so they cannot be cached",
                )
            ]
        )
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    if trainable:
        raise ConfigError(
            [
                (
                    field,
                    f"needs a frozen backbone (head-only training, e.g. freeze with train_head), but "
                    f"{len(trainable)} backbone parameters train (e.g. {trainable[0]})",
                )
            ]
        )
    return backbone
