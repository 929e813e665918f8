"""The model's config, read from its source as training would read it, without any weights, and
what the estimate takes from it (the checkpoint's dtype, the vocabulary size)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptkit.errors import ConfigError

if TYPE_CHECKING:
    from adaptkit.host.manager import PluginHost


def source_path(spec: Any, host: PluginHost) -> str:
    """Where the model's config is: a registered model's directory (fetched if needed), else the source."""
    entry = host.registries["models"].get(spec.source)
    return str(entry.obj.fetch()) if entry else spec.source


def load_config(spec: Any, task: Any, host: PluginHost) -> Any:
    """The transformers config of ``model`` (a ModelSpec) as training would load it, without weights."""
    import transformers

    from adaptkit.contract.model import dropout_keys

    path = source_path(spec, host)
    common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        common["revision"] = spec.revision
    try:
        config = transformers.AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError) as exc:
        message = f"model.source: cannot read the config of '{spec.source}' to estimate from: {exc}"
        raise ConfigError(message.splitlines()[0]) from None
    if spec.dropout is not None:
        for key in dropout_keys(config):
            setattr(config, key, spec.dropout)
    if hasattr(task, "setup_labels"):
        # a new head sized to the labels; without data, the recipe's labels or two
        config.num_labels = spec.num_labels or (len(task.data.labels) if task.data.labels else 2)
    return config


def checkpoint_dtype(config: Any) -> str | None:
    """The dtype the checkpoint's config says its weights are stored in (None when it does not say)."""
    dtype = getattr(config, "dtype", None)
    return str(dtype).replace("torch.", "") if dtype is not None else None


def vocab_size(config: Any) -> int:
    """The vocabulary size of the model's text part (0 when it has none, as an image model)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", 0) or 0)
