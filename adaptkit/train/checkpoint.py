"""Training checkpoints: atomic, verifiable, pickle-free.

A checkpoint is a directory ``checkpoints/step-00000012`` written under a temporary name and
renamed into place, with ``manifest.json`` (a sha256 of every file) written last. Only
safetensors and JSON are written: optimizer tensors and RNG states as safetensors, everything
else as JSON, so loading a checkpoint can never run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adaptkit.errors import CheckpointError
from adaptkit.files import load_tensors, save_tensors, write_json

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- optimizer, scheduler and RNG state without pickle ----------------------------------------


def optimizer_state(optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and the rest (for JSON)."""
    import torch

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}

    def split(prefix: str, state: dict) -> None:
        # bitsandbytes' 8-bit optimizers nest their quantised state one level down
        # ("__bnb_optimizer_quant_state__": {"state1": ..., "absmax1": ...}): keys are paths "0.a/b"
        for key, value in state.items():
            if isinstance(value, dict):
                split(f"{prefix}{key}/", value)
            elif isinstance(value, torch.Tensor):
                tensors[f"{prefix}{key}"] = value
            else:
                scalars[f"{prefix}{key}"] = value

    for idx, state in sd["state"].items():
        split(f"{idx}.", state)
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: Any, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Rebuild the state dict split by ``optimizer_state`` and load it."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, path = key.split(".", 1)
        *parents, name = path.split("/")
        node = state.setdefault(int(idx), {})
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """The torch, numpy and Python RNG states, as tensors and JSON."""
    import numpy as np
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, py_gauss = meta["python"]
    random.setstate((version, tuple(state), py_gauss))


# -- checkpoint directories --------------------------------------------------------------------


def step_of(path: Path) -> int:
    """The step number in a checkpoint directory's name."""
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def checkpoint_dirs(root: Path) -> list[Path]:
    """Checkpoint directories, oldest first, sorted by step number (not by string)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=step_of)


def finalize(tmp: Path, final: Path, extra: dict[str, Any]) -> Path:
    """Write the manifest last, then rename ``tmp`` into place; a partial ``tmp`` is never used."""
    files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_json(tmp / MANIFEST, {"files": files, **extra})
    if final.exists():  # the same step saved twice (at an interval and at the end)
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def verify(path: Path) -> dict[str, Any]:
    """Check every file against the manifest; a CheckpointError names the first bad, missing or extra file."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        raise CheckpointError(f"{path}: {MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: {MANIFEST} has no 'files' mapping of file names to sha256 digests")
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{path}: {name} is corrupted (its checksum does not match the manifest)")
    # a file the manifest does not list was put there later: nothing unverified is ever read
    extra = sorted(
        str(p.relative_to(path))
        for p in path.rglob("*")
        if p.is_file() and p != manifest_path and str(p.relative_to(path)) not in manifest["files"]
    )
    if extra:
        raise CheckpointError(
            f"{path}: {extra[0]} is not listed in {MANIFEST} (added after the checkpoint was written)"
        )
    return manifest


def _write_failure(exc: BaseException) -> str | None:
    """Why a write failed (a full disk, a file-size limit, ...), or None when ``exc`` is not a failed write."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    # safetensors' own writer (peft saves adapters with it) reports an io::Error as a SafetensorError
    if type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc):
        return str(exc).split("I/O error: ", 1)[1]
    return None


@contextmanager
def write_failures_reported(target: Path, root: Path, partial: Path | None = None) -> Iterator[None]:
    """Turn a failed write of ``target`` (ENOSPC, EFBIG, EACCES, ...) into a CheckpointError.

    ``partial`` (a temporary directory) is removed; the message names the newest complete
    checkpoint under ``root``, which a finalized checkpoint never shares files with, so it is intact.
    """
    try:
        yield
    except Exception as exc:
        reason = _write_failure(exc)
        if reason is None:
            raise
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        kept = checkpoint_dirs(root)
        where = (
            f"the previous checkpoint {kept[-1]} is kept; free some space and run the same command again to resume from it"
            if kept
            else "there is no earlier checkpoint to resume from"
        )
        removed = "the partial checkpoint was removed and " if partial is not None else ""
        raise CheckpointError(f"cannot write {target}: {reason}; {removed}{where}") from None


def latest_valid(root: Path, run_id: str | None = None, log: Any = print) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies and belongs to ``run_id``; corrupted ones are reported and skipped."""
    for path in reversed(checkpoint_dirs(root)):
        try:
            manifest = verify(path)
        except CheckpointError as exc:
            log(f"adaptkit: skipping checkpoint: {exc}")
            continue
        if run_id is not None and manifest.get("run_id") != run_id:
            log(f"adaptkit: skipping {path.name}: it belongs to a different recipe")
            continue
        return path, manifest
    return None


def rotate(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and leftovers of interrupted saves."""
    dirs = checkpoint_dirs(root)
    for old in dirs[:-keep] if keep else dirs:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def save_parts(tmp: Path, tensors: dict[str, dict[str, Any]], jsons: dict[str, Any]) -> None:
    """Write named groups of tensors (``name.safetensors``) and JSON documents (``name.json``)."""
    for name, group in tensors.items():
        if group:
            save_tensors(group, tmp / f"{name}.safetensors")
    for name, data in jsons.items():
        write_json(tmp / f"{name}.json", data)


def read_part(path: Path, name: str) -> dict[str, Any]:
    """Read a tensor group written by ``save_parts`` (empty if it was empty)."""
    f = path / f"{name}.safetensors"
    return load_tensors(f) if f.exists() else {}


def read_json(path: Path, name: str) -> Any:
    """Read a JSON document written by ``save_parts``."""
    return json.loads((path / f"{name}.json").read_text())
