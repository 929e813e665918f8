"""How a text-classification head reads the encoder: its pooler, the first token, or the token mean.

BERT's sequence-classification head reads its backbone's pooler: the first token through a dense
layer and tanh, trained for next-sentence prediction. Sentence encoders such as all-MiniLM-L6-v2
were trained with mean pooling instead, and their sentence-transformers files
(``modules.json``, ``1_Pooling/config.json``) say so; a head on the pooler starts from features
such an encoder never learned to produce. ``model.pooling`` puts the pooling the encoder was
trained with in the pooler's place, so every strategy, checkpoint and export sees one model.

``auto`` reads, in order: a pooling recorded in the model's config by an earlier export
(``adaptkit_pooling``), the sentence-transformers pooling config beside the weights, else the
model's own head (``pooler``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from adaptkit.contract.anatomy import backbone_of
from adaptkit.contract.model import POOLING_KEY
from adaptkit.errors import ConfigError

MODES = ("auto", "pooler", "cls", "mean")


def sentence_transformers_pooling(directory: str | Path) -> str | None:
    """``"mean"`` or ``"cls"`` from a sentence-transformers model directory's pooling config, else None."""
    directory = Path(directory)
    try:
        modules = json.loads((directory / "modules.json").read_text())
        path = next(m["path"] for m in modules if m.get("type", "").endswith("models.Pooling"))
        config = json.loads((directory / path / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        return None
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    if config.get("pooling_mode_cls_token"):
        return "cls"
    return None  # max or weighted pooling: no replacement offered, the model's own head stays


def resolve(requested: str, model: Any) -> str:
    """The pooling ``requested`` means for ``model`` (``auto`` resolved as the module docstring says)."""
    if requested != "auto":
        return requested
    recorded = getattr(model.config, POOLING_KEY, None)
    if recorded in MODES[1:]:
        return recorded
    return sentence_transformers_pooling(getattr(model.config, "_name_or_path", "")) or "pooler"


def apply_pooling(model: Any, requested: str) -> str:
    """Make ``model``'s head read the tokens as ``requested``; the pooling in force.

    Idempotent. A model whose head does not read a replaceable pooler (GPT-2 reads its last
    token, RoBERTa its own head) keeps its head under ``auto`` and is refused an explicit mode.
    """
    mode = resolve(requested, model)
    backbone = backbone_of(model)
    pooler = getattr(backbone, "pooler", None)
    if isinstance(pooler, token_pooling_class()):
        if pooler.mode != mode:
            raise ConfigError(
                [("model.pooling", f"the model already pools by '{pooler.mode}', not '{mode}'")]
            )
        return mode
    if mode == "pooler":
        return mode
    if pooler is None:
        if requested == "auto":
            return "pooler"
        raise ConfigError(
            [
                (
                    "model.pooling",
                    f"'{mode}' replaces a BERT-style pooler, which {type(model).__name__} has not; "
                    "use auto or pooler",
                )
            ]
        )
    backbone.pooler = token_pooling_class()(mode)
    if mode == "mean":
        backbone.register_forward_pre_hook(_remember_mask, with_kwargs=True)
    model.config.update({POOLING_KEY: mode})
    return mode


def _remember_mask(backbone: Any, args: tuple, kwargs: dict) -> None:
    # The backbone calls its pooler with the hidden states alone; mean pooling also needs to know
    # which positions are padding, so the mask is handed over here, for this forward pass only.
    mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None)
    backbone.pooler.mask = mask


@functools.cache
def token_pooling_class() -> type:
    """The pooling module class (built on first use, so that listing plugins never imports torch)."""
    from torch import nn

    class TokenPooling(nn.Module):
        """The first token's hidden state (``cls``) or the mean over the non-padding tokens (``mean``)."""

        def __init__(self, mode: str):
            super().__init__()
            self.mode, self.mask = mode, None

        def forward(self, hidden_states):
            mask, self.mask = self.mask, None
            if self.mode == "cls":
                return hidden_states[:, 0]
            if mask is None or mask.dim() != 2:
                return hidden_states.mean(dim=1)
            weights = mask.to(hidden_states.dtype).unsqueeze(-1)
            return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

        def extra_repr(self) -> str:
            return f"mode={self.mode!r}"

    return TokenPooling
