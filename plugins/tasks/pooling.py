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

Packed rows (``data.packing``, ``packing.py``): ``cls`` and ``mean`` pool each packed sequence on
its own, so a row of several sequences gives one vector per sequence (rows first, in order), and
the head's loss reads one label per sequence. A packed forward is one with ``position_ids`` and
no attention mask (how ``adaptkit.kernels.lm_loss.packed_model_inputs`` calls the model); a
sequence is a run of position ids 0, 1, 2, ..., and the padding after a row's last sequence,
whose position ids never start at 0, belongs to none. The model's own ``pooler`` reads a row's
first token only, so it cannot pack (``packing_refusal``).
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
#: The poolings that read each packed sequence on its own.
PACKING_MODES = ("cls", "mean")


def sentence_transformers_pooling(source: str | Path) -> str | None:
    """``"mean"`` or ``"cls"`` from the pooling config of a sentence-transformers model (a directory,
    or a hub id, read through transformers' hub cache as the weights were), else None."""
    try:
        modules = json.loads(_model_file(source, "modules.json").read_text())
        path = next(m["path"] for m in modules if m.get("type", "").endswith("models.Pooling"))
        config = json.loads(_model_file(source, f"{path}/config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return None
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    if config.get("pooling_mode_cls_token"):
        return "cls"
    return None  # max or weighted pooling: no replacement offered, the model's own head stays


def _model_file(source: str | Path, name: str) -> Path | None:
    """A file of a model directory, or of a hub model (None where it has none)."""
    if not str(source):
        return None
    if Path(source).is_dir():
        return Path(source) / name
    from transformers.utils import cached_file

    folder, _, filename = name.rpartition("/")
    found = cached_file(
        str(source),
        filename,
        subfolder=folder,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    return Path(found) if found else None


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
    backbone.register_forward_pre_hook(_remember_inputs, with_kwargs=True)
    model.config.update({POOLING_KEY: mode})
    return mode


def packing_refusal(model: Any) -> list[tuple[str, str]]:
    """Why ``model``'s head cannot pool packed rows (``data.packing``): (field, message) pairs; [] if it can.

    Static (no forward pass): the pooling in force must be one of ``PACKING_MODES``, in the
    backbone's pooler's place; ``model.pooling`` is named where choosing it would help. Whether
    the attention keeps packed sequences apart is the probe's to say
    (``adaptkit.kernels.lm_loss.check_packing``).
    """
    pooler = getattr(backbone_of(model), "pooler", None)
    token_pooling = token_pooling_class()
    if isinstance(pooler, token_pooling) and pooler.mode in PACKING_MODES:
        return []
    if pooler is None:
        return [
            (
                "data.packing",
                f"classification packs only a BERT-style encoder with model.pooling cls or mean; "
                f"{type(model).__name__}'s head reads each row as a whole (its own head, or its last token)",
            )
        ]
    mode = pooler.mode if isinstance(pooler, token_pooling) else "pooler"
    return [
        (
            "data.packing",
            "classification packs only with model.pooling cls or mean: the model's own pooler reads a "
            "row's first token only, so packed sequences would share one prediction",
        ),
        ("model.pooling", f"'{mode}' cannot pool packed sequences; set cls or mean (or data.packing: false)"),
    ]


def _remember_inputs(backbone: Any, args: tuple, kwargs: dict) -> None:
    # The backbone calls its pooler with the hidden states alone; mean pooling also needs to know
    # which positions are padding, and a packed forward where each sequence starts, so the mask
    # and the position ids are handed over here, for this forward pass only.
    def given(name: str, index: int) -> Any:
        return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)

    # BERT's forward: input_ids, attention_mask, token_type_ids, position_ids, ...
    backbone.pooler.mask, backbone.pooler.positions = given("attention_mask", 1), given("position_ids", 3)


@functools.cache
def token_pooling_class() -> type:
    """The pooling module class (built on first use, so that listing plugins never imports torch)."""
    from torch import nn

    class TokenPooling(nn.Module):
        """The first token's hidden state (``cls``) or the mean over the non-padding tokens (``mean``).

        In a packed forward (position ids and no mask) one vector per packed sequence (``packed``).
        """

        def __init__(self, mode: str):
            super().__init__()
            self.mode, self.mask, self.positions = mode, None, None

        def forward(self, hidden_states):
            mask, self.mask = self.mask, None
            positions, self.positions = self.positions, None
            if mask is None and positions is not None:
                return packed(hidden_states, positions, self.mode)
            if self.mode == "cls":
                return hidden_states[:, 0]
            if mask is None or mask.dim() != 2:
                return hidden_states.mean(dim=1)
            weights = mask.to(hidden_states.dtype).unsqueeze(-1)
            return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

        def extra_repr(self) -> str:
            return f"mode={self.mode!r}"

    return TokenPooling


def packed(hidden: Any, positions: Any, mode: str) -> Any:
    """One vector per packed sequence (rows first, in order): its first token's or its tokens' mean.

    ``hidden`` is (rows, tokens, features), ``positions`` the position ids (rows, tokens); a
    sequence is a run 0, 1, 2, ... of them (module docstring). The mean is a batched matrix
    product with each sequence's 0/1 weights (deterministic on every device, unlike a scatter).
    """
    import torch

    rows, width = hidden.shape[:2]
    positions = positions.to(hidden.device).expand(rows, width)
    first = positions == 0
    if mode == "cls":
        return hidden[first]
    # a token starts a segment where its position is not the previous one plus 1 (as transformers
    # splits packed rows); it belongs to a sequence where its segment starts at position 0
    starts = torch.ones_like(first)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    at = torch.arange(width, device=hidden.device).expand(rows, width)
    segment_start = torch.where(starts, at, torch.zeros_like(at)).cummax(dim=1).values
    real = positions.gather(1, segment_start) == 0
    index = first.cumsum(dim=1) - 1  # each token's sequence within its row
    count = int(first.sum(dim=1).max())
    weights = torch.nn.functional.one_hot(index.clamp(min=0), count) * real.unsqueeze(-1)
    weights = weights.to(hidden.dtype).transpose(1, 2)  # (rows, sequences, tokens)
    sums = torch.bmm(weights, hidden)
    means = sums / weights.sum(dim=2, keepdim=True).clamp(min=1.0)
    exists = torch.arange(count, device=hidden.device) < first.sum(dim=1, keepdim=True)
    return means[exists]
