"""Built-in plugin: the tasks a recipe can name in ``model.task``.

A task knows which head the model needs, how data rows become model inputs, how to batch them
and how to score predictions. Plugins add tasks through ``adaptkit_register_tasks``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptkit.contract.hookspecs import hookimpl
from adaptkit.contract.task import IGNORE, Task, require_columns
from adaptkit.errors import DataError

SCORER_COLUMN, REFERENCE_COLUMN, MAX_NEW_TOKENS_COLUMN = "scorer", "reference", "max_new_tokens"
#: Tokens generated per answer when the rows do not say (``max_new_tokens`` column).
DEFAULT_MAX_NEW_TOKENS = 32


def extract_answer(text: str) -> str:
    """The answer in a generated text: its first non-empty line, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def generate_texts(
    model: Any, processor: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding, each ending at EOS.

    Returns the decoded new text of each prompt (special tokens removed). Works on plain and
    peft-wrapped models; the model's mode is restored afterwards.
    """
    import torch
    from transformers import GenerationConfig

    pad_id = processor.pad_token_id if processor.pad_token_id is not None else processor.eos_token_id
    # a config of its own: greedy, whatever sampling defaults the checkpoint ships with
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=processor.eos_token_id,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                texts += processor.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return texts


def _chat_ids(processor: Any, messages: list[dict], generation_prompt: bool) -> list[int]:
    """Token ids of a conversation through the processor's chat template."""
    out = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _pad(rows: list[list[int]], value: int) -> Any:
    import torch

    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


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
        return outputs.logits.argmax(-1), batch["labels"]

    def metrics(self, predictions, references):
        from adaptkit_plugins.metrics import accuracy, macro_f1

        p, r = predictions.tolist(), references.tolist()
        return {"accuracy": accuracy(p, r), "macro_f1": macro_f1(p, r)}


class Classification(LabelledTask):
    """Text or text-pair classification; labels by name or by id; a new head sized to the labels."""

    auto_model = "AutoModelForSequenceClassification"

    def setup(self, splits, files):
        cols = [self.data.text, self.data.label] + ([self.data.text_pair] if self.data.text_pair else [])
        for name, split in splits.items():
            require_columns(split, cols, files[name])
        self.setup_labels(splits["train"])

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
        if "validation" in splits and SCORER_COLUMN in splits["validation"].column_names:
            require_columns(splits["validation"], [REFERENCE_COLUMN], files["validation"])
            # judged by generation: the verifier's accuracy, not the loss, picks the best evaluation
            self.metric, self.greater_is_better = "answer_accuracy", True

    def loss_items(self, batch):
        # transformers' causal-LM loss shifts labels left by one: the first label is never predicted
        return (batch["labels"][..., 1:] != IGNORE).sum()

    def _messages(self, row: dict) -> list[dict]:
        if self.data.messages:
            return row[self.data.messages]
        return [
            {"role": "user", "content": row[self.data.prompt]},
            {"role": "assistant", "content": row[self.data.response]},
        ]

    def encode_row(self, row: dict, processor: Any) -> tuple[list[int], list[int]]:
        """Token ids and labels of one row (labels are -100 outside assistant turns)."""
        if getattr(processor, "chat_template", None):
            return self._encode_chat(self._messages(row), processor)
        if self.data.messages:
            raise DataError(
                "data.messages needs a tokenizer with a chat template; use prompt/response columns instead"
            )
        prompt = processor(row[self.data.prompt], add_special_tokens=True)["input_ids"]
        response = processor(row[self.data.response], add_special_tokens=False)["input_ids"] + [
            processor.eos_token_id
        ]
        return prompt + response, [IGNORE] * len(prompt) + response

    def _encode_chat(self, messages: list[dict], processor: Any) -> tuple[list[int], list[int]]:
        def ids(msgs, generation_prompt):
            return _chat_ids(processor, msgs, generation_prompt)

        full = ids(messages, False)
        labels = [IGNORE] * len(full)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start, end = len(ids(messages[:i], True)), len(ids(messages[: i + 1], False))
            labels[start:end] = full[start:end]
        return full, labels

    def prompt_ids(self, row: dict, processor: Any) -> list[int]:
        """The token ids a model continues to answer ``row``: everything before its last assistant turn.

        The same ids ``encode_row`` gives the prompt in training (the chat template's
        generation prompt included), so the model answers where it learned to.
        """
        if getattr(processor, "chat_template", None):
            messages = list(self._messages(row))
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
            return _chat_ids(processor, messages, True)
        if self.data.messages:
            raise DataError(
                "data.messages needs a tokenizer with a chat template; use prompt/response columns instead"
            )
        return processor(row[self.data.prompt], add_special_tokens=True)["input_ids"]

    def generation_metrics(self, model, processor, split, metrics):
        """``answer_accuracy``: greedy answers to the rows' prompts, scored by the metric the rows name.

        Rows that carry a ``scorer`` column (a registered metric, the same for every row) and a
        ``reference`` column are answered by greedy generation (at most ``max_new_tokens`` tokens,
        a column too, else 32); the first line of each answer and the references go to
        ``metrics[scorer](answers, references)``. Without a ``scorer`` column: ``{}``.
        """
        if split is None or len(split) == 0 or SCORER_COLUMN not in split.column_names:
            return {}
        names = sorted(set(split[SCORER_COLUMN]))
        if len(names) != 1:
            raise DataError(
                f"validation split: column '{SCORER_COLUMN}' must name one metric for every row, found {names}"
            )
        if names[0] not in metrics:
            raise DataError(
                f"validation split: column '{SCORER_COLUMN}' names '{names[0]}', which is no registered metric; "
                f"the metrics are {', '.join(sorted(metrics))}"
            )
        cols = split.column_names
        max_new = (
            max(split[MAX_NEW_TOKENS_COLUMN]) if MAX_NEW_TOKENS_COLUMN in cols else DEFAULT_MAX_NEW_TOKENS
        )
        prompts = [self.prompt_ids(row, processor) for row in split]
        answers = [extract_answer(t) for t in generate_texts(model, processor, prompts, max_new)]
        return {"answer_accuracy": float(metrics[names[0]](answers, list(split[REFERENCE_COLUMN])))}

    def encode(self, split, processor, file):
        max_len = self.data.max_length

        def encode(row, idx):
            input_ids, labels = self.encode_row(row, processor)
            input_ids, labels = input_ids[:max_len], labels[:max_len]
            if all(label == IGNORE for label in labels):
                raise DataError(
                    f"{file}: row {idx + 1} has no token to learn (empty response, or the prompt fills max_length={max_len})"
                )
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


#: The column that carries each row's position, for error messages raised while training reads it.
_ROW = "__adaptkit_row__"


class ImageClassification(LabelledTask):
    """Image classification: an image column (a file path, image bytes or an image) and a label.

    Relative paths are resolved against the data file's folder. The image processor comes with the
    model. Every image is checked when the data is encoded; pixels are decoded batch by batch as
    training reads them, so a large image set never sits in memory as tensors.
    """

    auto_model = "AutoModelForImageClassification"

    def setup(self, splits, files):
        for name, split in splits.items():
            require_columns(split, [self.data.image, self.data.label], files[name])
        self.setup_labels(splits["train"])
        # a held-out validation split or a registered source has no file of its own: use the train file's folder
        train = Path(files["train"])
        fallback = train.parent if train.is_file() else Path.cwd()
        self.folders = {f: Path(f).parent if Path(f).is_file() else fallback for f in files.values()}
        self.mode = "RGB"

    def model_kwargs(self):
        # a checkpoint with a head for other classes (ImageNet's 1000) gets a new one sized to the labels
        return {**super().model_kwargs(), "ignore_mismatched_sizes": True}

    def load_processor(self, path, common):
        import transformers
        from transformers.utils import is_torchvision_available

        options = dict(common)
        if not is_torchvision_available():
            # the fast processors need torchvision: ask for the PIL-based one (transformers 5: backend=, before: use_fast=)
            legacy = int(transformers.__version__.split(".")[0]) < 5
            options.update({"use_fast": False} if legacy else {"backend": "pil"})
        return transformers.AutoImageProcessor.from_pretrained(path, **options)

    def prepare_model(self, model, processor):
        self.mode = "L" if getattr(model.config, "num_channels", 3) == 1 else "RGB"

    def open_image(self, value: Any, row: int, file: str, decode: bool = True) -> Any:
        """The image of one row in the model's colour mode (``decode=False``: only read its header).

        A missing or unreadable image is a DataError naming the file, row and column.
        """
        import io

        from PIL import Image

        where = f"{file}: row {row + 1}, column '{self.data.image}'"
        if isinstance(value, dict):  # datasets' undecoded Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        try:
            if isinstance(value, Image.Image):
                image = value
            elif isinstance(value, (bytes, bytearray)):
                image = Image.open(io.BytesIO(value))
            elif isinstance(value, str) and value:
                image = Image.open(self.folders.get(file, Path.cwd()) / value)
            else:
                raise DataError(
                    f"{where}: expected an image file path, image bytes or an image, got {type(value).__name__} {str(value)[:60]!r}"
                )
            if not decode:
                return image
            image.load()
            return image.convert(self.mode)
        except (
            OSError,
            ValueError,
            SyntaxError,
        ) as exc:  # PIL's errors for missing, truncated or non-image files
            raise DataError(f"{where}: cannot read the image: {type(exc).__name__}: {exc}") from None

    def encode(self, split, processor, file):
        import datasets

        col, label = self.data.image, self.data.label
        if isinstance(split.features.get(col), datasets.Image):
            split = split.cast_column(col, datasets.Image(decode=False))  # decoded below, a batch at a time
        split = split.select_columns([col, label]).add_column(_ROW, list(range(len(split))))
        for row, (value, name) in enumerate(
            zip(split[col], split[label])
        ):  # fail before training, naming the row
            self._label_id(name, row, file)
            self.open_image(value, row, file, decode=False)

        def transform(batch):
            rows = batch[_ROW]
            images = [self.open_image(v, r, file) for v, r in zip(batch[col], rows)]
            return {
                "pixel_values": processor(images, return_tensors="pt")["pixel_values"],
                "labels": [self._label_id(v, r, file) for v, r in zip(batch[label], rows)],
            }

        return split.with_transform(transform)

    def collate(self, processor):
        def collate(rows):
            import torch

            return {
                "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long),
            }

        return collate


@hookimpl
def adaptkit_register_tasks(register):
    register("classification", Classification)
    register("causal_lm", CausalLM)
    register("language_modeling", LanguageModeling)
    register("image_classification", ImageClassification)
