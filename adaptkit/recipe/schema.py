"""Recipes: the YAML description of a fine-tuning run, validated by pydantic.

A recipe has five sections (``model``, ``data``, ``strategies``, ``train``, ``output``), may
``extends:`` another recipe, and takes command-line overrides ``key.sub=value`` typed by the
schema. Every problem is reported at once with its dotted path, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adaptkit.errors import ConfigError
from adaptkit.recipe.yaml import load_yaml, parse_scalar


class Section(BaseModel):
    """A recipe section: unknown keys are errors (a misspelt key must not be ignored)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSpec(Section):
    """``model``: what to load and which task head it gets."""

    source: str = Field(description="hub id, local directory, GGUF file or packaged model name")
    task: str = Field(
        "classification", description="a registered task: classification, causal_lm, language_modeling, ..."
    )
    num_labels: int | None = Field(
        None, ge=1, description="classes of a classification head (default: from the data)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the frozen weights"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward to save memory"
    )
    trust_remote_code: bool = Field(
        False, description="run Python code shipped with the model (off unless you trust it)"
    )
    allow_bin: bool = Field(
        False,
        description="also load pickled PyTorch weights (pytorch_model.bin) when a model has no "
        "safetensors; unpickling can run code, so only for files you trust",
    )
    revision: str | None = Field(
        None, description="hub revision; a 40-hex commit is required with trust_remote_code"
    )
    dropout: float | None = Field(None, ge=0, lt=1, description="override the model's dropout probabilities")
    pooling: Literal["auto", "pooler", "cls", "mean"] = Field(
        "auto",
        description="how a text-classification head reads an encoder's tokens: its pooler, the first "
        "token, their mean; auto follows the model's sentence-transformers pooling config",
    )

    @model_validator(mode="after")
    def _pinned_remote_code(self) -> ModelSpec:
        # No revision means the hub's moving default branch: as unpinned as "main". Only a local
        # directory (where a revision means nothing) may run its code without a pinned commit.
        pinned = self.revision is not None and re.fullmatch(r"[0-9a-f]{40}", self.revision)
        if self.trust_remote_code and not pinned and not Path(self.source).is_dir():
            raise ValueError(
                "with trust_remote_code, pin 'revision' to a 40-hex commit so the code that runs cannot change"
            )
        return self


class DataSpec(Section):
    """``data``: where examples come from and which columns hold what."""

    source: str = Field(
        description="a file (.jsonl .json .csv .tsv .parquet), a directory of split files, or a registered source"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="options for a registered data source")
    text: str = Field("text", description="column with the input text")
    text_pair: str | None = Field(None, description="column with the second text of a pair")
    label: str = Field("label", description="column with the label (name or id)")
    image: str = Field("image", description="column with the image (image classification)")
    audio: str = Field(
        "audio",
        description="column with the audio (audio classification): a wav or flac file path, the file's "
        "bytes, {array, sampling_rate}, or samples at the feature extractor's rate",
    )
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="audio classification: cut longer clips to this many seconds and pad shorter ones to it "
        "(default: no cut, padded to the longest of the batch); Whisper's encoder is shortened to it, "
        "in whole seconds (default: its 30 s)",
    )
    prompt: str = Field("prompt", description="column with the prompt (causal-LM fine-tuning)")
    response: str = Field("response", description="column with the response (causal-LM fine-tuning)")
    messages: str | None = Field(
        None, description="column with chat messages [{role, content}] instead of prompt/response"
    )
    labels: list[str] | None = Field(
        None, description="label names in id order (default: sorted values found)"
    )
    max_length: int = Field(128, ge=8, description="tokens per example after truncation")
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="pack training sequences into rows of up to max_length tokens, position ids "
        "restarting and attention kept within each sequence; auto: wherever the task, strategies "
        "and model allow it; true: pack or refuse",
    )
    validation_size: float = Field(
        0.1, gt=0, lt=1, description="fraction held out when the data has no validation split"
    )
    max_train_examples: int | None = Field(None, ge=1, description="use only the first N training examples")
    max_eval_examples: int | None = Field(None, ge=1, description="use only the first N validation examples")
    transforms: list[dict[str, Any]] = Field(
        default_factory=list, description="training-data transforms [{name, ...options}]"
    )


class TrainSpec(Section):
    """``train``: the optimisation loop."""

    epochs: float = Field(
        1, gt=0, description="passes over the training data (ignored when max_steps is set)"
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="stop once this many training tokens were seen (a budget matched across a comparison)",
    )
    max_time: float | None = Field(
        None, gt=0, description="stop after this many seconds of training (a wall-time budget)"
    )
    micro_batch_size: int | Literal["auto"] = Field(
        8,
        description="examples per forward pass, or auto: the largest divisor of effective_batch_size that fits in memory",
    )
    gradient_accumulation: int = Field(
        1, ge=1, description="micro-batches per optimizer step (with auto: chosen)"
    )
    effective_batch_size: int | None = Field(
        None,
        ge=1,
        description="examples per optimizer step and process with micro_batch_size auto (default 8 x gradient_accumulation)",
    )
    preflight: bool = Field(
        True, description="estimate memory before loading the model and refuse a run that will not fit"
    )
    memory_limit_mb: float | None = Field(
        None,
        gt=0,
        description="memory (MiB) the run may add to the process, for the pre-flight check and micro_batch_size auto "
        "(default: what the device has free)",
    )
    cache_features: bool = Field(
        False,
        description="head-only training: run the frozen backbone once per example and train the head on its cached "
        "outputs (the backbone runs without dropout)",
    )
    batching: Literal["random", "by_length"] = Field(
        "random",
        description="how examples form micro-batches: random (a seeded shuffle), or by_length: examples of "
        "similar token counts together (less padding), the batches in a seeded random order",
    )
    lr: float = Field(5e-5, gt=0, le=10, description="peak learning rate")
    scheduler: Literal["linear", "cosine", "constant", "range_test"] = Field(
        "linear",
        description="learning-rate schedule after warmup; range_test: a learning-rate range test, the rate "
        "growing geometrically from lr_low at the first step to lr at the last",
    )
    lr_low: float | None = Field(
        None, gt=0, description="with scheduler range_test: the rate of the first step (lr is the last one's)"
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of steps spent warming up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never on biases and norms)")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd"] = Field(
        "adamw", description="optimizer"
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="autocast precision (trainable weights stay float32)"
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip gradients to this norm (null: no clipping)"
    )
    seed: int = Field(0, description="seed for initialisation, data order and dropout")
    eval_every: int | None = Field(
        None, ge=1, description="evaluate every N steps (default: at the end of each epoch)"
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after N evaluations without improvement"
    )
    metric: str | None = Field(
        None, description="metric that decides the best evaluation (default: the task's)"
    )
    save_every: int | None = Field(None, ge=1, description="write a checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1, description="how many checkpoints to keep")
    log_every: int = Field(10, ge=1, description="log training loss every N steps")
    report_to: list[Literal["tensorboard"]] = Field(
        default_factory=list,
        description="experiment trackers that also get the metrics, through Accelerate: [tensorboard] writes to "
        "<run dir>/tracking (needs the tensorboard package); default: none, metrics.jsonl only",
    )

    @model_validator(mode="after")
    def _effective_batch_needs_auto(self) -> TrainSpec:
        # with a fixed micro-batch the effective batch is micro x accumulation; a second number could contradict it
        if self.effective_batch_size is not None and self.micro_batch_size != "auto":
            raise ValueError(
                "effective_batch_size is for micro_batch_size: auto; with a fixed micro-batch set gradient_accumulation"
            )
        return self

    @model_validator(mode="after")
    def _range_test_rises(self) -> TrainSpec:
        if self.scheduler == "range_test" and self.lr_low is not None and self.lr_low >= self.lr:
            raise ValueError(
                f"with scheduler range_test, lr_low ({self.lr_low:g}) must be below lr ({self.lr:g})"
            )
        return self

    @field_validator("micro_batch_size")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be a positive integer or 'auto'")
        return v

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _false_means_no(cls, v):
        return "no" if v is False else v

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, v):
        return [v] if isinstance(v, str) else v


class ForgettingSpec(Section):
    """``forgetting``: measure how far training moved the model on general text (see adaptkit.train.forgetting)."""

    source: str = Field(
        "pydoc",
        description="'pydoc' (Python's documentation topics, always available) or a .txt/.jsonl/.csv file with a text column",
    )
    max_texts: int = Field(16, ge=1, description="paragraphs to measure on")
    max_length: int = Field(64, ge=8, description="tokens per paragraph")
    every_evaluation: bool = Field(
        False,
        description="measure it at every evaluation too (costs time): the comparison report then "
        "names each run's checkpoint with the best task gain per unit of forgetting",
    )


class Recipe(Section):
    """A whole recipe."""

    name: str | None = Field(None, description="run name (default: the recipe file's stem)")
    extends: str | None = Field(None, description="a recipe this one overrides (path relative to this file)")
    model: ModelSpec
    data: DataSpec
    strategies: list[str | dict[str, Any]] = Field(min_length=1, description="strategies applied in order")
    train: TrainSpec = Field(default_factory=TrainSpec)
    forgetting: ForgettingSpec | None = Field(
        None, description="measure forgetting on general text (comparisons turn it on)"
    )
    output: str = Field("runs/{name}", description="run directory; {name} is replaced by the run name")

    @property
    def run_dir(self) -> Path:
        """The run directory with ``{name}`` filled in."""
        return Path(self.output.format(name=self.name or "run"))


# -- reading ---------------------------------------------------------------------------------


def deep_merge(base: dict, override: dict) -> dict:
    """Merge ``override`` into ``base``: mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def read_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe file as a mapping, resolving ``extends`` (paths relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    raw = load_yaml(path.read_text(), source=str(path))
    if not isinstance(raw, dict):
        raise ConfigError(
            "a recipe must be a mapping of sections (model, data, strategies, train, output)",
            source=str(path),
        )
    parent = raw.get("extends")
    if parent:
        parent_path = (path.parent / parent).resolve()
        if parent_path in _seen:
            raise ConfigError(f"extends: '{parent}' leads back to itself", source=str(path))
        base = read_raw(parent_path, _seen + (path.resolve(),))
        base.pop("name", None)
        raw = deep_merge(base, {k: v for k, v in raw.items() if k != "extends"})
    raw.setdefault("name", path.stem)
    return raw


_INDEX = re.compile(r"\[(\d+)\]")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML, so ``train.lr=1e-4`` is a float.

    List items are addressed by index: ``strategies.1.r=16`` or ``strategies[1].r=16``.
    """
    raw = copy.deepcopy(raw)  # nested lists and dicts too: the caller's mapping is never changed
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, value = item.split("=", 1)
        parts = _INDEX.sub(r".\1", key.strip()).split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"override '{key}': index '{part}' is out of range (the list has {len(node)} items)"
                    )
                idx = int(part)
                if isinstance(node[idx], str) and not last:
                    node[idx] = {"name": node[idx]}
                if last:
                    node[idx] = parse_scalar(value)
                node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = parse_scalar(value)
                else:
                    node[part] = (
                        deep_merge(node[part], {}) if isinstance(node.get(part), dict) else node.get(part, {})
                    )
                    if isinstance(node[part], list):
                        node[part] = list(node[part])
                    node = node[part]
            else:
                raise ConfigError(f"override '{key}': '{'.'.join(parts[:i])}' is not a section")
    return raw


def validate(raw: dict, host: Any = None, source: str | None = None) -> Recipe:
    """Validate a raw recipe mapping, collecting every problem at once.

    ``host`` (a ``PluginHost``, or any object with ``recipe_problems(raw)``) adds what only the
    installed plugins can check: the strategies' options and stack, and the task's name.
    """
    problems: list[tuple[str, str]] = []
    recipe = None
    try:
        recipe = Recipe(**raw)
    except ValidationError as exc:
        merged: dict[str, str] = {}
        for err in exc.errors():
            loc = _error_path(err["loc"], raw)
            # the branches of a union fail together: one problem per field, not one per branch
            merged[loc] = f"{merged[loc]}; or {_describe(err)}" if loc in merged else _describe(err)
            if err["type"] == "extra_forbidden":
                merged[loc] += _allowed_keys(err["loc"][:-1])
        problems.extend(merged.items())
    if host is not None:
        problems.extend(host.recipe_problems(raw))
    if problems:
        raise ConfigError(problems, source=source)
    assert recipe is not None
    return recipe


def _error_path(loc: tuple, raw: Any) -> str:
    """The dotted path of a pydantic error (``strategies[0]``, ``train.lr``), following the raw recipe.

    Pydantic adds the tag of each union member to the location (``micro_batch_size.int``,
    ``strategies.0.dict[str,any]``); a tag names no key of the recipe, so it is left out.
    """
    path, node = "", raw
    for i, part in enumerate(loc):
        if isinstance(node, dict) and (part in node or i == len(loc) - 1):
            path, node = f"{path}.{part}" if path else str(part), node.get(part)
        elif isinstance(node, list) and isinstance(part, int):
            path, node = f"{path}[{part}]", node[part] if part < len(node) else None
    return path


def _allowed_keys(section: tuple) -> str:
    """``; the keys of train are: epochs, ...`` for the section an unknown key was found in."""
    sections = {
        (): Recipe,
        ("model",): ModelSpec,
        ("data",): DataSpec,
        ("train",): TrainSpec,
        ("forgetting",): ForgettingSpec,
    }
    cls = sections.get(tuple(section))
    if cls is None:
        return ""
    where = f"of {section[0]} " if section else "of a recipe "
    return f"; the keys {where}are {', '.join(cls.model_fields)}"


def _describe(err: dict) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return "unknown key (check the spelling; see `adaptkit validate --help` for the sections)"
    if err["type"] != "missing" and "input" in err:
        msg += f" (got {err['input']!r})"
    return msg


def load_recipe(path: str | Path, overrides: list[str] = (), host: Any = None) -> Recipe:
    """Read, merge, override and validate a recipe file."""
    raw = apply_overrides(read_raw(path), list(overrides))
    return validate(raw, host=host, source=str(path))
