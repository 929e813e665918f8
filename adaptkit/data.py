"""Reading training data: local files through the ``datasets`` library, or registered sources."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.errors import DataError

if TYPE_CHECKING:
    from datasets import DatasetDict

    from adaptkit.plugins import PluginHost
    from adaptkit.recipe import DataSpec

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev", "eval"),
    "test": ("test",),
}


def _read_file(path: Path):
    import datasets

    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    kwargs: dict[str, Any] = {}
    if path.suffix.lower() == ".tsv":
        kwargs = {"sep": "\t", "quoting": 3}  # QUOTE_NONE: quotes are text in TSV
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # the datasets library raises many types for a malformed file
        cause = exc.__cause__ or exc
        raise DataError(f"{path}: could not be parsed as {path.suffix[1:]}: {type(cause).__name__}: {cause}".splitlines()[0]) from None
    if len(ds) == 0:
        raise DataError(f"{path}: no rows")
    return ds


def _split_files(directory: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split, stems in SPLIT_NAMES.items():
        for f in sorted(directory.iterdir()):
            if f.stem.lower() in stems and f.suffix.lower() in FORMATS:
                found.setdefault(split, f)
    if "train" not in found:
        raise DataError(f"{directory}: no train.* file (expected train.jsonl, train.csv, train.tsv, train.parquet, ...)")
    return found


def load_data(spec: DataSpec, host: PluginHost, seed: int) -> tuple[DatasetDict, dict[str, str]]:
    """Load train and validation splits; hold out ``validation_size`` when there is no validation split.

    Returns the splits and the file each came from (for error messages).
    """
    import datasets

    source = spec.source
    path = Path(source)
    if source in host.registries["data_sources"]:
        loaded = host.lookup("data_sources", source).obj(dict(spec.options), seed)
        files = {split: f"{source} ({split})" for split in loaded}
    elif path.exists():
        files_by_split = _split_files(path) if path.is_dir() else {"train": path}
        loaded = datasets.DatasetDict({split: _read_file(f) for split, f in files_by_split.items()})
        files = {split: str(f) for split, f in files_by_split.items()}
    else:
        loaded, files = _load_hub(source, host)
    if "validation" not in loaded:
        if len(loaded["train"]) < 2:
            raise DataError(f"{files['train']}: at least 2 rows are needed to hold out a validation split")
        parts = loaded["train"].train_test_split(test_size=spec.validation_size, seed=seed)
        loaded = datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]})
        files["validation"] = files["train"] + f" (held out {spec.validation_size:.0%}, seed {seed})"
    if spec.max_train_examples:
        loaded["train"] = loaded["train"].select(range(min(spec.max_train_examples, len(loaded["train"]))))
    if spec.max_eval_examples:
        loaded["validation"] = loaded["validation"].select(range(min(spec.max_eval_examples, len(loaded["validation"]))))
    return loaded, files


def _load_hub(name: str, host: PluginHost):
    """A dataset from the Hugging Face hub by name (where a network exists)."""
    import datasets

    known = ", ".join(sorted(host.registries["data_sources"])) or "none registered"
    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:  # offline, unknown name, gated: all end here
        raise DataError(
            f"data.source: '{name}' is not an existing file or directory, not a registered data source ({known}), "
            f"and could not be loaded from the hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    return loaded, {split: f"{name} ({split})" for split in loaded}


def require_columns(dataset, columns: list[str], file: str) -> None:
    """A DataError naming the file and the missing column, with the columns that do exist."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataError(f"{file}: no column {missing[0]!r}; the columns are {dataset.column_names} (set it in the recipe's data section)")


def apply_transforms(dataset, spec: DataSpec, host: PluginHost):
    """Apply the recipe's training-data transforms in order."""
    for i, t in enumerate(spec.transforms):
        options = dict(t)
        name = options.pop("name", None)
        if name is None:
            raise DataError(f"data.transforms[{i}]: give the transform a name")
        factory = host.lookup("transforms", name).obj
        dataset = dataset.map(factory(**options))
    return dataset
