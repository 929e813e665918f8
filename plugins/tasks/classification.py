"""Classification tasks: the labelled-task base (label names, accuracy, macro-F1) and text classification."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptkit.contract.task import MeanScore, Task, require_columns
from adaptkit.errors import DataError

from .packing import collate_packed_sequences, pack_sequence_dataset, packed_or_padded
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


class LabelledFiles(LabelledTask):
    """Base of the image and audio tasks: a column of media (file paths relative to the data
    file, their bytes, or decoded values) and a label; a checkpoint's head for other classes is
    replaced by one sized to the labels."""

    #: The recipe's ``data`` field that names the media column (``image``, ``audio``).
    column_field: str = ""

    def setup(self, splits, files):
        """Check the media and label columns, fix the label names and the folders relative paths start from."""
        column = getattr(self.data, self.column_field)
        for name, split in splits.items():
            require_columns(split, [column, self.data.label], files[name])
        self.setup_labels(splits["train"])
        # a held-out validation split or a registered source has no file of its own: use the train file's folder
        train = Path(files["train"])
        fallback = train.parent if train.is_file() else Path.cwd()
        self.folders = {f: Path(f).parent if Path(f).is_file() else fallback for f in files.values()}

    def model_kwargs(self):
        """The labelled head, replacing a checkpoint's head of another size (ImageNet's 1000 classes)."""
        return {**super().model_kwargs(), "ignore_mismatched_sizes": True}


class Classification(LabelledTask):
    """Text or text-pair classification; labels by name or by id; a new head sized to the labels.

    Training rows pack (``data.packing``) where the head pools each packed sequence on its own: a
    BERT-style encoder with ``model.pooling`` ``cls`` or ``mean`` (``pooling.packing_refusal``);
    ``data.packing: true`` on any other head is refused once the model is loaded, naming
    ``data.packing`` (and ``model.pooling`` where choosing it would help); ``auto`` leaves it unpacked. A packed batch holds
    one label per sequence.
    """

    auto_model = "AutoModelForSequenceClassification"
    packs = True

    def prepare_model(self, model, processor):
        """Pad tokens as the base task does, and pool the encoder as ``model.pooling`` says."""
        from .pooling import apply_pooling

        super().prepare_model(model, processor)
        apply_pooling(model, self.model_spec.pooling if self.model_spec else "auto")

    def packing_refusal(self, model) -> list[tuple[str, str]]:
        """Why the head cannot pool each packed sequence on its own (``pooling.packing_refusal``)."""
        from .pooling import packing_refusal

        return packing_refusal(model)

    def pack(self, encoded):
        """The encoded training rows packed into rows of up to ``max_length`` tokens, a label per sequence."""
        return pack_sequence_dataset(encoded, self.data.max_length)

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
        """A collate function padding token ids, attention masks (and token type ids) to the longest row.

        Packed rows (``data.packing``) go through ``packing.collate_packed_sequences``.
        """
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

        return packed_or_padded(collate, pad_id, collate_packed_sequences)
