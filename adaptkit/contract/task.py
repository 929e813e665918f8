"""The task contract: what a task registered through ``adaptkit_register_tasks`` implements.

A task knows which head the model needs, how data rows become model inputs, how to batch them
and how to score predictions. The built-in tasks (``adaptkit_plugins.tasks``) subclass ``Task``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from adaptkit.errors import DataError

if TYPE_CHECKING:
    from adaptkit.recipe.schema import DataSpec, ModelSpec

#: The label value that losses and metrics skip (transformers' convention).
IGNORE = -100


class MeanScore(float):
    """A metric's value that also carries the score of each evaluation example it averages.

    It is a float (logged, compared and written to JSON as the value alone), so a task returns it
    wherever a metric goes: ``metrics`` and ``generation_metrics`` may return
    ``{"accuracy": MeanScore(0.75, [1.0, 0.0, 1.0, 1.0])}``. The training loop keeps the final
    evaluation's per-example scores beside the run's metrics; the comparison report builds its
    confidence intervals and paired tests from them. ``examples[i]`` scores the i-th row of the
    validation split; ``value`` defaults to their mean.
    """

    examples: tuple[float, ...]

    def __new__(cls, value: float | None, examples: Sequence[float]) -> MeanScore:
        """``value`` (None: the mean of ``examples``) carrying ``examples`` as floats."""
        scores = tuple(float(x) for x in examples)
        mean = math.fsum(scores) / len(scores) if scores else 0.0
        obj = super().__new__(cls, mean if value is None else float(value))
        obj.examples = scores
        return obj


class Task:
    """Base class of tasks. ``auto_model`` names the transformers auto class of the model."""

    auto_model: ClassVar[str] = "AutoModel"
    #: The metric that decides the best evaluation, and whether larger is better.
    metric: ClassVar[str] = "eval_loss"
    greater_is_better: ClassVar[bool] = False
    #: Whether ``pack`` packs training rows (``data.packing`` is refused for tasks that do not).
    packs: ClassVar[bool] = False

    #: The recipe's ``model`` section, set by the host before the model loads (None outside a run).
    model_spec: ModelSpec | None = None
    #: Whether this run's training rows are packed, set by the host once the strategies are
    #: applied (``data.packing``; ``adaptkit.adapt.packing``); the training loss reads it.
    packing: bool = False

    def __init__(self, data: DataSpec):
        self.data = data

    def setup(self, splits: Any, files: dict[str, str]) -> None:
        """Inspect the loaded splits before the model exists (columns, label names)."""

    def model_kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments for the head (``num_labels``, label names)."""
        return {}

    def load_processor(self, path: str, common: dict[str, Any]) -> Any:
        """The tokenizer (or image processor) that goes with the model at ``path``."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, **common)

    def prepare_model(self, model: Any, processor: Any) -> None:
        """Make model and processor agree (a pad token for models that have none).

        The memory estimate calls it too, on a weightless model (meta device) and with ``processor``
        None: shape the model as training will, and leave the processor alone when it is None.
        """
        if getattr(processor, "pad_token", "x") is None:
            processor.pad_token = processor.eos_token
        if getattr(processor, "pad_token_id", None) is not None and model.config.pad_token_id is None:
            model.config.pad_token_id = processor.pad_token_id

    def encode(self, split: Any, processor: Any, file: str) -> Any:
        """Turn a split's rows into model inputs (a ``datasets.Dataset`` of token ids and labels)."""
        raise NotImplementedError

    def pack(self, encoded: Any) -> Any:
        """The encoded training rows packed several to a row without padding (``data.packing``).

        Only tasks that set ``packs = True`` implement it; the host never packs validation rows,
        so evaluation means the same with packing on or off.
        """
        raise NotImplementedError

    def packing_refusal(self, model: Any) -> list[tuple[str, str]]:
        """Why ``model`` (loaded, prepared and adapted) cannot train on this task's packed rows, as
        (recipe field, message) pairs; [] where it can. No forward pass: whether the attention keeps
        packed sequences apart is the host's probe's to say. A task whose head reads a row as one
        sequence (a classifier's pooler) says so here."""
        return []

    def collate(self, processor: Any) -> Callable[[list[dict]], dict]:
        """The function that pads a list of encoded rows into a batch of tensors."""
        raise NotImplementedError

    def loss_items(self, batch: dict) -> Any:
        """How many items the model's loss is a mean over in ``batch``: here one per example.

        The training loop weights each micro-batch by this count, so that gradient accumulation
        gives the mean over the whole accumulated batch.
        """
        return batch["labels"].shape[0]

    def predictions(self, outputs: Any, batch: dict) -> tuple[Any, Any] | None:
        """Predictions and references of one evaluation batch (tensors), or None for loss-only tasks."""
        return None

    def metrics(self, predictions: Any, references: Any) -> dict[str, float]:
        """Task metrics from all evaluation predictions."""
        return {}

    def generation_metrics(
        self, model: Any, processor: Any, split: Any, metrics: Mapping[str, Callable]
    ) -> dict[str, float]:
        """Metrics that need the model to generate (evaluation by generation); ``{}`` by default.

        Called by the training loop after each evaluation with the plain model (unwrapped from
        DDP; possibly a peft model; leave its train/eval mode as it was), the processor, the raw
        validation rows (a ``datasets.Dataset``, before ``encode``) and the host's registered
        metric functions by name. An override returns extra metrics to log next to ``eval_loss``
        (``CausalLM`` returns ``answer_accuracy`` when the rows name a ``scorer``); to make one of
        them decide the best evaluation, set ``self.metric`` and ``self.greater_is_better`` in
        ``setup``.
        """
        return {}


def require_columns(dataset, columns: list[str], file: str) -> None:
    """A DataError naming the file and the missing column, with the columns that do exist."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{file}: no column {missing[0]!r}; the columns are {dataset.column_names} (set it in the recipe's data section)"
        )
