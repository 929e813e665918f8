"""Built-in plugin: the tasks a recipe can name in ``model.task``.

A task knows which head the model needs, how data rows become model inputs, how to batch them
and how to score predictions. Plugins add tasks through ``adaptkit_register_tasks``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar

from adaptkit.data import require_columns
from adaptkit.errors import DataError
from adaptkit.hookspecs import hookimpl

if TYPE_CHECKING:
    from adaptkit.recipe import DataSpec

IGNORE = -100


class Task:
    """Base class of tasks. ``auto_model`` names the transformers auto class of the model."""

    auto_model: ClassVar[str] = "AutoModel"
    #: The metric that decides the best evaluation, and whether larger is better.
    metric: ClassVar[str] = "eval_loss"
    greater_is_better: ClassVar[bool] = False

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
        """Make model and processor agree (a pad token for models that have none)."""
        if getattr(processor, "pad_token", "x") is None:
            processor.pad_token = processor.eos_token
        if getattr(processor, "pad_token_id", None) is not None and model.config.pad_token_id is None:
            model.config.pad_token_id = processor.pad_token_id

    def encode(self, split: Any, processor: Any, file: str) -> Any:
        """Turn a split's rows into model inputs (a ``datasets.Dataset`` of token ids and labels)."""
        raise NotImplementedError

    def collate(self, processor: Any) -> Callable[[list[dict]], dict]:
        """The function that pads a list of encoded rows into a batch of tensors."""
        raise NotImplementedError

    def predictions(self, outputs: Any, batch: dict) -> tuple[Any, Any] | None:
        """Predictions and references of one evaluation batch (tensors), or None for loss-only tasks."""
        return None

    def metrics(self, predictions: Any, references: Any) -> dict[str, float]:
        """Task metrics from all evaluation predictions."""
        return {}


def _pad(rows: list[list[int]], value: int) -> Any:
    import torch

    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


class Classification(Task):
    """Text or text-pair classification; labels by name or by id; a new head sized to the labels."""

    auto_model = "AutoModelForSequenceClassification"
    metric = "accuracy"
    greater_is_better = True

    def setup(self, splits, files):
        cols = [self.data.text, self.data.label] + ([self.data.text_pair] if self.data.text_pair else [])
        for name, split in splits.items():
            require_columns(split, cols, files[name])
        values = splits["train"].unique(self.data.label)
        if self.data.labels:
            self.names = list(self.data.labels)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            self.names = [str(i) for i in range(max(values) + 1)]
        else:
            self.names = sorted(str(v) for v in values)
        self.ids = {name: i for i, name in enumerate(self.names)}

    def model_kwargs(self):
        return {
            "num_labels": len(self.names),
            "id2label": dict(enumerate(self.names)),
            "label2id": dict(self.ids),
        }

    def _label_id(self, value: Any, row: int, file: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.names):
            return value
        if str(value) in self.ids:
            return self.ids[str(value)]
        raise DataError(f"{file}: row {row + 1}, column '{self.data.label}': unknown label {value!r}; the labels are {self.names}")

    def encode(self, split, processor, file):
        d = self.data
        for row, value in enumerate(split[d.label]):
            self._label_id(value, row, file)  # fail on the first bad row, naming it

        def tokenize(batch):
            texts = [t if isinstance(t, str) else "" for t in batch[d.text]]
            pairs = [t if isinstance(t, str) else "" for t in batch[d.text_pair]] if d.text_pair else None
            enc = processor(texts, pairs, truncation=True, max_length=d.max_length)
            enc["labels"] = [self._label_id(v, 0, file) for v in batch[d.label]]
            return enc

        return split.map(tokenize, batched=True, remove_columns=split.column_names)

    def collate(self, processor):
        pad_id = processor.pad_token_id or 0

        def collate(rows):
            import torch

            batch = {
                "input_ids": _pad([r["input_ids"] for r in rows], pad_id),
                "attention_mask": _pad([r["attention_mask"] for r in rows], 0),
                "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long),
            }
            if "token_type_ids" in rows[0]:
                batch["token_type_ids"] = _pad([r["token_type_ids"] for r in rows], 0)
            return batch

        return collate

    def predictions(self, outputs, batch):
        return outputs.logits.argmax(-1), batch["labels"]

    def metrics(self, predictions, references):
        from adaptkit.metrics import accuracy, macro_f1

        p, r = predictions.tolist(), references.tolist()
        return {"accuracy": accuracy(p, r), "macro_f1": macro_f1(p, r)}


class CausalLM(Task):
    """Supervised fine-tuning of a causal LM: loss on response tokens only, EOS learned.

    Rows hold ``prompt``/``response`` columns or a chat ``messages`` column; the tokenizer's chat
    template is used when it has one. Padding is masked by position, never by token id, so an
    EOS that doubles as the pad token is still learned.
    """

    auto_model = "AutoModelForCausalLM"

    def setup(self, splits, files):
        cols = [self.data.messages] if self.data.messages else [self.data.prompt, self.data.response]
        for name, split in splits.items():
            require_columns(split, cols, files[name])

    def _messages(self, row: dict) -> list[dict]:
        if self.data.messages:
            return row[self.data.messages]
        return [{"role": "user", "content": row[self.data.prompt]}, {"role": "assistant", "content": row[self.data.response]}]

    def encode_row(self, row: dict, processor: Any) -> tuple[list[int], list[int]]:
        """Token ids and labels of one row (labels are -100 outside assistant turns)."""
        if getattr(processor, "chat_template", None):
            return self._encode_chat(self._messages(row), processor)
        if self.data.messages:
            raise DataError("data.messages needs a tokenizer with a chat template; use prompt/response columns instead")
        prompt = processor(row[self.data.prompt], add_special_tokens=True)["input_ids"]
        response = processor(row[self.data.response], add_special_tokens=False)["input_ids"] + [processor.eos_token_id]
        return prompt + response, [IGNORE] * len(prompt) + response

    def _encode_chat(self, messages: list[dict], processor: Any) -> tuple[list[int], list[int]]:
        def ids(msgs, generation_prompt):
            out = processor.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

        full = ids(messages, False)
        labels = [IGNORE] * len(full)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start, end = len(ids(messages[:i], True)), len(ids(messages[: i + 1], False))
            labels[start:end] = full[start:end]
        return full, labels

    def encode(self, split, processor, file):
        max_len = self.data.max_length

        def encode(row, idx):
            input_ids, labels = self.encode_row(row, processor)
            input_ids, labels = input_ids[:max_len], labels[:max_len]
            if all(label == IGNORE for label in labels):
                raise DataError(f"{file}: row {idx + 1} has no token to learn (empty response, or the prompt fills max_length={max_len})")
            return {"input_ids": input_ids, "labels": labels}

        try:
            return split.map(encode, with_indices=True, remove_columns=split.column_names)
        except Exception as exc:  # datasets wraps errors raised inside map
            cause = exc if isinstance(exc, DataError) else exc.__cause__ or exc.__context__
            if isinstance(cause, DataError):
                raise cause from None
            raise

    def collate(self, processor):
        pad_id = processor.pad_token_id if processor.pad_token_id is not None else processor.eos_token_id

        def collate(rows):
            ids = [r["input_ids"] for r in rows]
            return {
                "input_ids": _pad(ids, pad_id),
                "attention_mask": _pad([[1] * len(i) for i in ids], 0),
                "labels": _pad([r["labels"] for r in rows], IGNORE),
            }

        return collate


class LanguageModeling(CausalLM):
    """Plain language modelling on a text column (every real token is learned)."""

    def setup(self, splits, files):
        for name, split in splits.items():
            require_columns(split, [self.data.text], files[name])

    def encode_row(self, row, processor):
        ids = processor(row[self.data.text], add_special_tokens=True)["input_ids"] + [processor.eos_token_id]
        return ids, list(ids)


@hookimpl
def adaptkit_register_tasks(register):
    register("classification", Classification)
    register("causal_lm", CausalLM)
    register("language_modeling", LanguageModeling)
