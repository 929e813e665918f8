"""Built-in plugin: load models with transformers' ``from_pretrained`` (a hub id or a directory).

Registered ``trylast``, so any plugin recognising a source (a packaged model, a GGUF file, a
test double) answers first.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.contract.hookspecs import hookimpl
from adaptkit.contract.model import LoadedModel, dropout_keys, torch_dtype
from adaptkit.errors import ConfigError

if TYPE_CHECKING:
    from adaptkit.contract.task import Task
    from adaptkit.recipe.schema import ModelSpec


def from_pretrained(path: str, spec: ModelSpec, task: Task) -> LoadedModel:
    """Load model and processor from a directory or hub id for ``task``, honouring the spec."""
    import transformers

    common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        common["revision"] = spec.revision
    auto = getattr(transformers, task.auto_model)
    overrides = dict(task.model_kwargs())
    _refuse_pickled_weights(path, spec)
    # use_safetensors=True: transformers never falls back to a pytorch_model.bin pickle
    weights = {} if spec.allow_bin else {"use_safetensors": True}
    try:
        if spec.dropout is not None:
            config = transformers.AutoConfig.from_pretrained(path, **common)
            overrides.update({key: spec.dropout for key in dropout_keys(config)})
        model = auto.from_pretrained(path, dtype=torch_dtype(spec.dtype), **overrides, **weights, **common)
        processor = task.load_processor(path, common)
    except OSError as exc:
        raise ConfigError(f"model.source: cannot load '{path}': {exc}".splitlines()[0]) from None
    except (
        pickle.UnpicklingError
    ) as exc:  # allow_bin, and torch.load(weights_only=True) met more than tensors
        found = re.search(r"Unsupported global: (?:GLOBAL )?(\S+)", str(exc))
        what = f" (it calls {found.group(1)})" if found else ""
        raise ConfigError(
            [
                (
                    "model.allow_bin",
                    f"'{path}': its pickled weights hold more than tensors{what}; "
                    "they are not loaded, since unpickling them could run code",
                )
            ]
        ) from None
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ConfigError(
            [
                (
                    "model.trust_remote_code",
                    f"'{path}' ships its own Python code (auto_map in its config), which "
                    "adaptkit runs only when the recipe sets trust_remote_code: true",
                )
            ]
        ) from None
    pytorch_batch_norm_momentum(model)
    # a source that is no local path was a hub id: what another machine loads it by too
    public_id = None if Path(path).exists() else path
    return LoadedModel(model=model, processor=processor, source=path, public_id=public_id)


#: Families whose transformers modules build their batch norms with TensorFlow's moving-average
#: decay (0.997, 0.9997) passed as PyTorch's ``momentum``, where it means the opposite.
TF_DECAY_FAMILIES = ("mobilenet_v1", "mobilenet_v2")
#: A config key naming the momentum the weights were trained with (set by conversions from PyTorch).
MOMENTUM_KEY = "adaptkit_batch_norm_momentum"


def pytorch_batch_norm_momentum(model: Any) -> None:
    """Give the batch norms of a ``TF_DECAY_FAMILIES`` model a momentum in PyTorch's sense.

    Left as transformers builds them, every training batch would replace 99.7% of the running
    statistics. The config's ``MOMENTUM_KEY`` wins; otherwise the decay d becomes 1 - d, the
    rate TensorFlow trained with. The value lives in the modules, not in the weights, so it is
    set on every load.
    """
    if getattr(model.config, "model_type", None) not in TF_DECAY_FAMILIES:
        return
    from torch import nn

    recorded = getattr(model.config, MOMENTUM_KEY, None)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.momentum or 0) > 0.5:
            module.momentum = recorded if recorded is not None else 1 - module.momentum


def _refuse_pickled_weights(path: str, spec: ModelSpec) -> None:
    """A ConfigError when a local model has only pickled weights and the recipe does not allow them."""
    directory = Path(path)
    if spec.allow_bin or not directory.is_dir() or any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.glob("pytorch_model*.bin"))
    if pickles:
        raise ConfigError(
            [
                (
                    "model.allow_bin",
                    f"'{path}' has only pickled PyTorch weights ({pickles[0]}) and no safetensors; "
                    "unpickling can run code, so adaptkit refuses them unless the recipe sets allow_bin: true",
                )
            ]
        )


@hookimpl(trylast=True)
def adaptkit_load_model(spec, task):
    """Load a local model directory or a hub id through transformers (the loader of last resort)."""
    source = spec.source
    if Path(source).exists() and not Path(source).is_dir():
        return None  # a single file (GGUF, ...) is for another loader
    if not Path(source).exists() and (
        Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
    ):
        # not a hub id (namespace/name) either: transformers would only complain about the id's form
        raise ConfigError(
            [
                (
                    "model.source",
                    f"'{source}' is not an existing directory (nor a hub id namespace/name, "
                    "nor a packaged model: see `adaptkit models`)",
                )
            ]
        )
    return from_pretrained(source, spec, task)
