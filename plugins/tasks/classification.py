"""Classification tasks: the labelled-task base (label names, accuracy, macro-F1) and text classification."""

from __future__ import annotations

from typing import Any

from adaptkit.contract.task import MeanScore, Task, require_columns
from adaptkit.errors import DataError

from .padding import pad


class LabelledTask(Task):
    """Base of the classification tasks: label names, labels by name or id, accuracy and macro-F1.

    The names come from ``data.labels``, else from the training split: ids ``0..max`` when every
    value is an integer, otherwise the sorted distinct values. A new head is sized to them.
    """

    metric = "accuracy"
    greater_is_better = True

    def setup_labels(self, train: Any) -> None:
        """Fix ``self.names`` (label names in id order) and ``self.ids`` from the recipe or ``train``."""
        values = train.unique(self.data.label)
        if self.data.labels:
            self.names = list(self.data.labels)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            self.names = [str(i) for i in range(max(values) + 1)]
        else:
            self.names = sorted(str(v) for v in values)
        self.ids = {name: i for i, name in enumerate(self.names)}

    def model_kwargs(self):
        """A head sized to the labels, with their names both ways."""
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
        raise DataError(
            f"{file}: row {row + 1}, column '{self.data.label}': unknown label {value!r}; the labels are {self.names}"
        )

    def predictions(self, outputs, batch):
        """The most likely label of each example, and the true labels."""
        return outputs.logits.argmax(-1), batch["labels"]

    def metrics(self, predictions, references):
        """Accuracy (carrying each example's 1.0 or 0.0) and macro-F1 over all evaluation predictions."""
        from adaptkit_plugins.metrics import accuracy, macro_f1

        p, r = predictions.tolist(), references.tolist()
        correct = [float(a == b) for a, b in zip(p, r)]
        return {"accuracy": MeanScore(accuracy(p, r), correct), "macro_f1": macro_f1(p, r)}


class Classification(LabelledTask):
    """Text or text-pair classification; labels by name or by id; a new head sized to the labels."""

    auto_model = "AutoModelForSequenceClassification"

    def prepare_model(self, model, processor):
        """Pad tokens as the base task does, and pool the encoder as ``model.pooling`` says."""
        from .pooling import apply_pooling

        super().prepare_model(model, processor)
        apply_pooling(model, self.model_spec.pooling if self.model_spec else "auto")

    def setup(self, splits, files):
        """Check the text, text-pair and label columns, and fix the label names."""
        cols = [self.data.text, self.data.label] + ([self.data.text_pair] if self.data.text_pair else [])
        for name, split in splits.items():
            require_columns(split, cols, files[name])
        self.setup_labels(splits["train"])

    def encode(self, split, processor, file):
        """Tokenized texts (truncated to ``max_length``) with label ids; a bad label fails naming its row."""
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
        """A collate function padding token ids, attention masks (and token type ids) to the longest row."""
        pad_id = processor.pad_token_id or 0

        def collate(rows):
            import torch

            batch = {
                "input_ids": pad([r["input_ids"] for r in rows], pad_id),
                "attention_mask": pad([r["attention_mask"] for r in rows], 0),
                "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long),
            }
            if "token_type_ids" in rows[0]:
                batch["token_type_ids"] = pad([r["token_type_ids"] for r in rows], 0)
            return batch

        return collate
