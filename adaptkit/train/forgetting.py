"""Forgetting: how far fine-tuning moved a model on general text it was not tuned on.

Measured twice in the same process, on the pretrained model before any strategy is applied and
on the trained model at the end, so every variant of a comparison carries its own reference:

- causal language models: the language-modelling loss (nats per token) on the general text;
  forgetting is the increase, ``loss_after - loss_before`` (perplexity ratio ``exp`` of it);
- other models (encoders with a classification head): the drift of the backbone's mean-pooled
  last hidden states, ``1 - cosine(before, after)`` averaged over the texts, since a new head
  has no language-modelling loss to compare.

The default text is English prose that ships with Python itself (the ``pydoc_data`` topics of
the standard library documentation), so the measure needs no download.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from adaptkit.errors import DataError


def general_texts(source: str, max_texts: int) -> list[str]:
    """Paragraphs of general text: ``pydoc`` (Python's documentation topics) or a file.

    A ``.txt`` file is split at blank lines; ``.jsonl``/``.json``/``.csv``/``.parquet`` files
    are read through ``datasets`` and their ``text`` column used.
    """
    if source == "pydoc":
        from pydoc_data.topics import topics

        raw = "\n\n".join(topics[k] for k in sorted(topics))
        paragraphs = re.split(r"\n\s*\n", raw)
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(
                f"forgetting.source: {source}: no such file (use 'pydoc' or a .txt/.jsonl/.csv file)"
            )
        if path.suffix.lower() == ".txt":
            paragraphs = re.split(r"\n\s*\n", path.read_text(errors="replace"))
        else:
            from adaptkit.data.load import _read_file

            ds = _read_file(path)
            if "text" not in ds.column_names:
                raise DataError(
                    f"{path}: forgetting text needs a 'text' column; the columns are {ds.column_names}"
                )
            paragraphs = [t for t in ds["text"] if isinstance(t, str)]
    # Prose only: skip code listings and grammar rules, which say little about language skills.
    prose = [
        " ".join(p.split()) for p in paragraphs if len(p) >= 200 and not p.lstrip().startswith((">>>", "::"))
    ]
    if not prose:
        raise DataError(f"forgetting.source: {source}: no paragraph of at least 200 characters")
    step = max(1, len(prose) // max_texts)  # spread the sample over the whole source
    return prose[::step][:max_texts]


def measure(
    model: Any, processor: Any, texts: list[str], max_length: int, causal: bool
) -> dict[str, Any] | None:
    """Loss (causal LMs) or mean-pooled features (others) of ``model`` on ``texts``; None without a tokenizer."""
    import torch

    if not callable(processor) or not hasattr(processor, "pad_token_id"):
        return None  # an image processor: general text means nothing to the model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses, tokens, features = 0.0, 0, []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding to mask, and memory stays flat
            enc = processor(text, truncation=True, max_length=max_length, return_tensors="pt").to(device)
            if causal:
                out = model(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=enc["input_ids"]
                )
                n = int(enc["input_ids"].shape[1]) - 1  # predicted tokens
                losses += float(out.loss) * n
                tokens += n
            else:
                out = model(**enc, output_hidden_states=True)
                features.append(out.hidden_states[-1][0].float().mean(0).cpu())
    model.train(was_training)
    if causal:
        return {"loss": losses / max(tokens, 1)}
    return {"features": torch.stack(features)}


def compare(before: dict[str, Any], after: dict[str, Any], source: str) -> dict[str, Any]:
    """The forgetting figures of a run: its value, what it measures, and the raw numbers."""
    import math

    if "loss" in before:
        delta = after["loss"] - before["loss"]
        return {
            "value": delta,
            "measure": f"increase of LM loss (nats/token) on {source} text",
            "loss_before": before["loss"],
            "loss_after": after["loss"],
            "perplexity_ratio": math.exp(min(delta, 50)),
        }
    import torch

    cos = torch.nn.functional.cosine_similarity(before["features"], after["features"], dim=-1)
    return {
        "value": float(1 - cos.mean()),
        "measure": f"1 - cosine of mean-pooled hidden states on {source} text",
    }


def measure_run_texts(run: Any, model: Any, processor: Any, task: Any) -> dict[str, Any] | None:
    """``measure`` on the run's general texts: the reference before the strategies, and after training."""
    causal = task.auto_model == "AutoModelForCausalLM"
    return measure(model, processor, run.forgetting_texts, run.recipe.forgetting.max_length, causal=causal)
