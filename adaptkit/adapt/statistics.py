"""Batch-norm running statistics: kept as they are where the layer is frozen, saved where it trains.

Running statistics are buffers, not parameters, so neither ``requires_grad`` nor a strategy's
saved weights cover them. Left alone, a frozen batch norm in training mode would still follow the
training batches: a probe's head would learn on features that evaluation (which normalises with
the running statistics) never produces, and a LoRA adapter, which saves only its own weights,
would not reproduce the model it trained. A trained batch norm's statistics move with its weights,
so the host saves them beside the strategies' files, and a resumed or reloaded run gets them back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adaptkit.errors import CheckpointError

if TYPE_CHECKING:
    from torch import nn

STATISTICS_FILE = "running_statistics.safetensors"


def hold_frozen_statistics(model: nn.Module) -> None:
    """Make each batch norm whose parameters are all frozen normalise as in evaluation, in training
    too, so that its statistics never move; one whose parameters train follows the batches.

    Decided at every call, so a layer a schedule unfreezes later (gradual unfreezing) starts
    following the batches then. A batch norm without parameters (``affine=False``) has nothing to
    freeze and always follows them, as in PyTorch. Registering twice (a resume) is harmless.
    """
    for module in model.modules():
        if _tracks_statistics(module) and not getattr(module, "adaptkit_statistics_hooks", False):
            module.register_forward_pre_hook(_before_call)
            # the mode is put back even when the call raises, so the model's mode never leaks
            module.register_forward_hook(_after_call, always_call=True)
            module.adaptkit_statistics_hooks = True


def _tracks_statistics(module: nn.Module) -> bool:
    from torch import nn

    return isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats


def _before_call(module: nn.Module, args: tuple) -> None:
    if not module.training:
        return
    params = list(module.parameters(recurse=False))
    if params and not any(p.requires_grad for p in params):
        module.training = False
        module.adaptkit_held = True
    else:
        module.adaptkit_statistics_moved = True


def _after_call(module: nn.Module, args: tuple, output: object) -> None:
    if getattr(module, "adaptkit_held", False):
        module.training = True
        module.adaptkit_held = False


def save_statistics(model: nn.Module, directory: Path) -> None:
    """Write the running statistics of every batch norm that has followed training batches (or had
    them loaded) to ``directory``, by buffer name in ``model``; nothing when none has."""
    from adaptkit.files import save_tensors

    moved = {
        f"{name}.{buffer_name}": buffer.detach()
        for name, module in model.named_modules()
        if getattr(module, "adaptkit_statistics_moved", False)
        for buffer_name, buffer in module.named_buffers(recurse=False)
    }
    if moved:
        save_tensors(moved, directory / STATISTICS_FILE)


def load_statistics(model: nn.Module, directory: Path) -> None:
    """Copy the statistics ``save_statistics`` wrote into ``model`` (the same stack on a fresh base)."""
    import torch

    from adaptkit.files import load_tensors

    path = directory / STATISTICS_FILE
    if not path.is_file():
        return
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, saved in load_tensors(path).items():
            module_name, _, buffer_name = key.rpartition(".")
            module = modules.get(module_name)
            buffer = getattr(module, buffer_name, None) if _tracks_statistics(module) else None
            if not isinstance(buffer, torch.Tensor) or buffer.shape != saved.shape:
                raise CheckpointError(f"{path}: '{key}' matches no batch-norm statistic of this model")
            buffer.copy_(saved)
            module.adaptkit_statistics_moved = True
