"""Causal language-model tasks: supervised fine-tuning on prompts and responses, and plain language modelling.

Supervised fine-tuning can also be judged by generation: validation rows that name a ``scorer``
metric and a ``reference`` answer are answered greedily and scored (``answer_accuracy``).
"""

from __future__ import annotations

import math
from typing import Any

from adaptkit.contract.task import IGNORE, MeanScore, Task, require_columns
from adaptkit.errors import DataError

from .generation import extract_answer, generate_texts
from .packing import pack_dataset, packed_or_padded
from .padding import pad

SCORER_COLUMN, REFERENCE_COLUMN, MAX_NEW_TOKENS_COLUMN = "scorer", "reference", "max_new_tokens"
#: Tokens generated per answer when the rows do not say (``max_new_tokens`` column).
DEFAULT_MAX_NEW_TOKENS = 32


def _chat_ids(processor: Any, messages: list[dict], generation_prompt: bool) -> list[int]:
    """Token ids of a conversation through the processor's chat template."""
    out = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


class CausalLM(Task):
    """Supervised fine-tuning of a causal LM: loss on response tokens only, EOS learned.

    Rows hold ``prompt``/``response`` columns or a chat ``messages`` column; the tokenizer's chat
    template is used when it has one. Padding is masked by position, never by token id, so an
    EOS that doubles as the pad token is still learned.
    """

    auto_model = "AutoModelForCausalLM"
    packs = True

    def pack(self, encoded):
        """The encoded training rows packed into rows of at most ``max_length`` tokens (``packing.pack_dataset``)."""
        return pack_dataset(encoded, self.data.max_length)

    def setup(self, splits, files):
        """Check the prompt/response (or messages) columns; a ``scorer`` column makes answers decide the best evaluation."""
        cols = [self.data.messages] if self.data.messages else [self.data.prompt, self.data.response]
        for name, split in splits.items():
            require_columns(split, cols, files[name])
        if "validation" in splits and SCORER_COLUMN in splits["validation"].column_names:
            require_columns(splits["validation"], [REFERENCE_COLUMN], files["validation"])
            # judged by generation: the verifier's accuracy, not the loss, picks the best evaluation
            self.metric, self.greater_is_better = "answer_accuracy", True

    def loss_items(self, batch):
        """The number of labelled tokens the model's loss averages over."""
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
        scorer, references = metrics[names[0]], list(split[REFERENCE_COLUMN])
        value = float(scorer(answers, references))
        # each answer scored alone: kept only when their mean is the metric itself (a metric that
        # does not average over examples, an F1 say, has no per-example scores to keep)
        each = [float(scorer([a], [r])) for a, r in zip(answers, references)]
        if each and math.isclose(math.fsum(each) / len(each), value, rel_tol=1e-9, abs_tol=1e-12):
            value = MeanScore(value, each)
        return {"answer_accuracy": value}

    def encode(self, split, processor, file):
        """Token ids and labels of every row, cut to ``max_length``; a row with nothing to learn fails, naming it."""
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
        """A collate function padding ids with the pad (or EOS) token and labels with -100, masked by position.

        Packed rows (``data.packing``) also get their ``position_ids``; see ``packing.collate_packed``.
        """
        pad_id = processor.pad_token_id if processor.pad_token_id is not None else processor.eos_token_id

        def collate(rows):
            ids = [r["input_ids"] for r in rows]
            return {
                "input_ids": pad(ids, pad_id),
                "attention_mask": pad([[1] * len(i) for i in ids], 0),
                "labels": pad([r["labels"] for r in rows], IGNORE),
            }

        return packed_or_padded(collate, pad_id)


class LanguageModeling(CausalLM):
    """Plain language modelling on a text column (every real token is learned)."""

    def setup(self, splits, files):
        """Check that every split has the text column."""
        for name, split in splits.items():
            require_columns(split, [self.data.text], files[name])

    def encode_row(self, row, processor):
        """The text's token ids followed by EOS, every one of them a label."""
        ids = processor(row[self.data.text], add_special_tokens=True)["input_ids"] + [processor.eos_token_id]
        return ids, list(ids)
