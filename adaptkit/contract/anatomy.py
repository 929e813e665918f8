"""Finding the parts of a model that strategies act on: blocks, head, embeddings, norms, ties.

These helpers work on plain transformers models and on models already wrapped by an earlier
strategy (peft's ``PeftModel``), so strategies compose. Every name they return is a name in the
model they are given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptkit.errors import StrategyError

if TYPE_CHECKING:
    from torch import nn


def unwrap(model: nn.Module) -> tuple[str, nn.Module]:
    """The innermost transformers model and its name prefix inside ``model`` ("" if none)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if inner is model:
        return "", model
    for name, module in model.named_modules():
        if module is inner:
            return name + ".", inner
    return "", model


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, list[nn.Module]]:
    """The transformer blocks, bottom to top, and the dotted path of their container.

    Without ``path``, picks the ``nn.ModuleList`` of same-class modules that holds the most
    parameters (``bert.encoder.layer``, ``transformer.h``, ``model.layers``, ...).
    """
    from torch import nn

    modules = dict(model.named_modules())
    if path is not None:
        found = modules.get(path)
        if found is None:
            # allow a path relative to the unwrapped model
            prefix, _ = unwrap(model)
            found = modules.get(prefix + path)
            path = prefix + path
        if not isinstance(found, (nn.ModuleList, nn.Sequential)):
            raise StrategyError(f"blocks: '{path}' is not a ModuleList in {type(model).__name__}")
        return path, list(found)
    best, best_size = None, 0
    for name, module in modules.items():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            size = sum(p.numel() for p in module.parameters())
            if len(kinds) == 1 and size > best_size:
                best, best_size = name, size
    if best is None:
        raise StrategyError(
            f"cannot find the transformer blocks of {type(model).__name__}; name them with 'blocks'"
        )
    return best, list(modules[best])


def backbone_of(model: nn.Module) -> nn.Module | None:
    """The pretrained backbone inside ``model`` (``bert`` in ``BertForSequenceClassification``).

    Found through transformers' ``base_model_prefix``; None for a bare backbone (no head around
    it) and for models that do not say.
    """
    _, inner = unwrap(model)
    attr = getattr(inner, "base_model_prefix", None)
    backbone = getattr(inner, attr, None) if attr else None
    return None if backbone is inner else backbone


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters outside the pretrained backbone (the task head).

    In ``BertForSequenceClassification`` the backbone is ``bert`` and the head is ``classifier``.
    A bare backbone has no head.
    """
    prefix, inner = unwrap(model)
    backbone = backbone_of(model)
    if backbone is None:
        if getattr(inner, "base_model_prefix", None) is None:
            raise StrategyError(f"cannot tell the head from the backbone of {type(inner).__name__}")
        return []
    backbone_prefix = prefix + inner.base_model_prefix + "."
    names = model.named_parameters(remove_duplicate=False)  # a tied head is listed under its own name too
    return [n for n, _ in names if n.startswith(prefix) and not n.startswith(backbone_prefix)]


def is_norm(module: nn.Module) -> bool:
    """True for normalisation layers (LayerNorm, RMSNorm and their model-specific variants)."""
    from torch import nn

    return (
        isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d))
        or "norm" in type(module).__name__.lower()
    )


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Groups of names that refer to one shared parameter (tied input and output embeddings)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def parameter_count(param: Any) -> int:
    """How many values a parameter holds: a packed 4-bit bitsandbytes weight counts unpacked."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return int(shape.numel()) if shape is not None else param.numel()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameter elements (shared parameters counted once).

    4-bit bitsandbytes weights are stored packed, two values a byte; they are counted as the
    number of values they hold, so the total matches the unquantized model.
    """
    return sum(parameter_count(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def untie_output_embeddings(model: nn.Module) -> None:
    """Give the output embeddings (``lm_head``) their own copy of a weight tied to the input embeddings."""
    import torch

    _, inner = unwrap(model)
    out = inner.get_output_embeddings()
    out.weight = torch.nn.Parameter(out.weight.detach().clone())
    inner.config.tie_word_embeddings = False
    if hasattr(inner.config, "get_text_config"):
        inner.config.get_text_config().tie_word_embeddings = False


def resolve_ties(model: nn.Module, names: set[str], mode: str, owner: str, hint: str = "") -> None:
    """Make a strategy's choice of trainable ``names`` explicit where a parameter is tied.

    A tied weight is one Parameter: training it under one name trains it under all. ``mode``
    ``share`` adds every tied name to ``names``; ``untie`` gives the output embeddings their own
    copy; ``error`` raises ``SharedParameterError`` naming the option ``<owner>.tied_head``.
    """
    from adaptkit.errors import SharedParameterError

    for group in tied_groups(model):
        inside = [n for n in group if n in names]
        if not inside or len(inside) == len(group):
            continue
        if mode == "share":
            names.update(group)
        elif mode == "untie":
            untie_output_embeddings(model)
        else:
            raise SharedParameterError(
                f"{owner}: {inside} would train, but it is the same parameter as frozen {sorted(set(group) - set(inside))} "
                f"(tied embeddings); set {owner}.tied_head to 'untie' (train a separate copy) or 'share' (train both){hint}"
            )
