"""Files on disk: tensors as safetensors and JSON, always written atomically, and the cache directory."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.errors import CheckpointError

if TYPE_CHECKING:
    import torch


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` for the caller to write; then synced and renamed onto ``path``.

    Readers never see half a file; if the block raises, the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors, atomically.

    safetensors writes the file from the tensors' own memory: a model is not copied (an
    in-memory ``save`` would hold two copies, a full fine-tune's checkpoint tripling its weights'
    memory). Tensors that share storage (tied embeddings) are copied, as safetensors refuses
    them; an empty tensor is refused here because it means a sharded parameter was saved
    without being gathered.
    """
    from safetensors.torch import save_file

    out, storages = {}, set()
    for name, t in tensors.items():
        if t.numel() == 0:
            raise CheckpointError(
                f"refusing to save '{name}': it is empty (a sharded parameter that was not gathered?)"
            )
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=metadata)


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


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    atomic_write_bytes(path, json.dumps(data, indent=2, default=str).encode())


def size_on_disk(path: Path) -> int:
    """Bytes taken by the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cache_dir() -> Path:
    """Where fetched models live: ``$ADAPTKIT_HOME`` or ``$XDG_CACHE_HOME/adaptkit`` (default ~/.cache/adaptkit)."""
    if os.environ.get("ADAPTKIT_HOME"):
        return Path(os.environ["ADAPTKIT_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adaptkit"
