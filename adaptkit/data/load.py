"""Reading training data: local files through the ``datasets`` library, or registered sources."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.errors import AdaptkitError, ConfigError, DataError

if TYPE_CHECKING:
    from datasets import DatasetDict

    from adaptkit.host.manager import PluginHost
    from adaptkit.recipe.schema import DataSpec

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
    header = fmt == "csv"
    if fmt in ("csv", "json") and path.suffix.lower() != ".json" and not _has_lines(path, 2 if header else 1):
        # the datasets library would only say 'Instruction "train" corresponds to no data'
        raise DataError(f"{path}: no rows" + (" (only a header line)" if header else " (only blank lines)"))
    kwargs: dict[str, Any] = {}
    if path.suffix.lower() == ".tsv":
        kwargs = {"sep": "\t", "quoting": 3}  # QUOTE_NONE: quotes are text in TSV
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # the datasets library raises many types for a malformed file
        cause = exc.__cause__ or exc
        if fmt == "json" and path.suffix.lower() == ".jsonl":
            _raise_bad_json_line(path)
        raise DataError(
            f"{path}: could not be parsed as {path.suffix[1:]}: {type(cause).__name__}: {cause}".splitlines()[
                0
            ]
        ) from None
    if len(ds) == 0:
        raise DataError(f"{path}: no rows")
    return ds


def _raise_bad_json_line(path: Path) -> None:
    """A DataError naming the first line of a JSON-lines file that is not a JSON object (if there is one)."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(
                    f"{path}: could not be parsed as jsonl: line {number} is not valid JSON ({exc})"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: could not be parsed as jsonl: line {number} is a JSON {type(row).__name__}, "
                    "not an object of column values"
                ) from None


def _has_lines(path: Path, n: int) -> bool:
    """Whether ``path`` has at least ``n`` non-blank lines (reading no further than needed)."""
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                n -= 1
                if n == 0:
                    return True
    return False


def _split_files(directory: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split, stems in SPLIT_NAMES.items():
        for f in sorted(directory.iterdir()):
            if f.stem.lower() in stems and f.suffix.lower() in FORMATS:
                found.setdefault(split, f)
    if "train" not in found:
        raise DataError(
            f"{directory}: no train.* file (expected train.jsonl, train.csv, train.tsv, train.parquet, ...)"
        )
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
    elif not path.exists() and (path.is_absolute() or path.suffix.lower() in FORMATS):
        raise DataError(f"data.source: {path}: file not found")
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
        loaded["validation"] = loaded["validation"].select(
            range(min(spec.max_eval_examples, len(loaded["validation"])))
        )
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


def apply_transforms(dataset, spec: DataSpec, host: PluginHost):
    """Apply the recipe's training-data transforms in order.

    A transform's function takes an example, or an example and its index (``with_indices``), and
    returns the new example. A bad name or option is a ConfigError naming ``data.transforms[i]``.
    """
    for i, t in enumerate(spec.transforms):
        where = f"data.transforms[{i}]"
        options = dict(t)
        name = options.pop("name", None)
        if name is None:
            raise ConfigError([(where, "give the transform a name")])
        try:
            factory = host.lookup("transforms", name).obj
        except AdaptkitError as exc:
            raise ConfigError([(where, str(exc))]) from None
        params = inspect.signature(factory).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(options) - set(params))
            if unknown:
                allowed = ", ".join(params) or "none"
                raise ConfigError(
                    [(where, f"{name}: unknown option {unknown[0]!r}; the options are {allowed}")]
                )
        try:
            fn = factory(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError([(where, f"{name}: {exc}")]) from None
        positional = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        try:
            dataset = dataset.map(fn, with_indices=len(positional) >= 2)
        except Exception as exc:  # datasets wraps errors raised inside map
            cause = exc if isinstance(exc, AdaptkitError) else exc.__cause__ or exc.__context__
            if isinstance(cause, AdaptkitError):
                raise DataError(f"{where} ({name}): {cause}") from None
            raise
    return dataset
