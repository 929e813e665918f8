"""Reading and writing tensors: safetensors only, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from adaptkit.errors import CheckpointError

if TYPE_CHECKING:
    import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically.

    Tensors are copied to contiguous CPU memory first: safetensors refuses tensors that share
    storage (tied embeddings), and an empty tensor is refused here because it means a sharded
    parameter was saved without being gathered.
    """
    from safetensors.torch import save

    out = {}
    for name, t in tensors.items():
        if t.numel() == 0:
            raise CheckpointError(f"refusing to save '{name}': it is empty (a sharded parameter that was not gathered?)")
        out[name] = t.detach().to("cpu").contiguous().clone()
    atomic_write_bytes(Path(path), save(out, metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or unreadable file is a CheckpointError naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def load_into(params: Mapping[str, torch.nn.Parameter], path: Path, owner: str = "") -> None:
    """Copy tensors from ``path`` into ``params`` by name, strictly: same names, same shapes."""
    import torch

    tensors = load_tensors(path)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    who = f"strategy '{owner}': " if owner else ""
    if missing or unexpected:
        raise CheckpointError(
            f"{who}{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != tensors[name].shape:
                raise CheckpointError(
                    f"{who}{path}: '{name}' has shape {tuple(tensors[name].shape)}, the model has {tuple(param.shape)}"
                )
            param.copy_(tensors[name].to(param.dtype))
