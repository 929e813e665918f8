"""The batches a meta forward pass is fed: one builder per model class the estimator supports."""

from __future__ import annotations

from typing import Any


def _causal_inputs(config: Any, micro: int, seq: int) -> dict[str, Any]:
    import torch

    ids = torch.zeros(micro, seq, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": ids, "attention_mask": _mask(micro, seq)}


def _mask(micro: int, seq: int) -> Any:
    """An attention mask, as training batches carry: without one, transformers looks for padding in
    the token ids (a model with a pad token), which a meta tensor cannot answer."""
    import torch

    return torch.ones(micro, seq, dtype=torch.long, device="meta")


def _classification_inputs(config: Any, micro: int, seq: int) -> dict[str, Any]:
    import torch

    ids = torch.zeros(micro, seq, dtype=torch.long, device="meta")
    labels = torch.zeros(micro, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": labels, "attention_mask": _mask(micro, seq)}


def _image_inputs(config: Any, micro: int, seq: int) -> dict[str, Any]:
    import torch

    size = getattr(config, "image_size", 224)
    pixels = torch.zeros(micro, getattr(config, "num_channels", 3), size, size, device="meta")
    return {"pixel_values": pixels, "labels": torch.zeros(micro, dtype=torch.long, device="meta")}


#: The model classes the estimator can feed, and a batch for each (on meta tensors: no padding,
#: so every sequence is ``data.max_length`` long, the worst case of dynamic padding).
INPUTS = {
    "AutoModelForCausalLM": _causal_inputs,
    "AutoModelForSequenceClassification": _classification_inputs,
    "AutoModelForImageClassification": _image_inputs,
}
