"""Built-in plugin: load models with transformers' ``from_pretrained`` (a hub id or a directory).

Registered ``trylast``, so any plugin recognising a source (a packaged model, a GGUF file, a
test double) answers first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.errors import ConfigError
from adaptkit.hookspecs import hookimpl

if TYPE_CHECKING:
    from adaptkit.recipe import ModelSpec
    from adaptkit.tasks import Task


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer or image processor, and where it came from."""

    model: Any
    processor: Any
    source: str


def torch_dtype(name: str):
    """The torch dtype for a recipe's dtype name."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def from_pretrained(path: str, spec: ModelSpec, task: Task) -> LoadedModel:
    """Load model and processor from a directory or hub id for ``task``, honouring the spec."""
    import transformers

    common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        common["revision"] = spec.revision
    auto = getattr(transformers, task.auto_model)
    overrides = dict(task.model_kwargs())
    if spec.dropout is not None:
        overrides.update(_dropout_overrides(transformers.AutoConfig.from_pretrained(path, **common), spec.dropout))
    try:
        model = auto.from_pretrained(path, dtype=torch_dtype(spec.dtype), **overrides, **common)
        processor = task.load_processor(path, common)
    except OSError as exc:
        raise ConfigError(f"model.source: cannot load '{path}': {exc}".splitlines()[0]) from None
    return LoadedModel(model=model, processor=processor, source=path)


def _dropout_overrides(config: Any, p: float) -> dict[str, float]:
    """Every config attribute that is a dropout probability (names differ between families)."""
    keys = [k for k, v in config.to_dict().items() if isinstance(v, float) and ("dropout" in k or k.endswith("_pdrop"))]
    return {k: p for k in keys}


@hookimpl(trylast=True)
def adaptkit_load_model(spec, task):
    source = spec.source
    if Path(source).exists() and not Path(source).is_dir():
        return None  # a single file (GGUF, ...) is for another loader
    return from_pretrained(source, spec, task)
