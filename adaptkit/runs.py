"""Using a finished run: evaluate, predict and generate from its run directory (``adaptkit.export``
exports it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptkit.adapt.stack import Adapted
from adaptkit.errors import AdaptkitError
from adaptkit.host.manager import PluginHost
from adaptkit.recipe.schema import Recipe, validate
from adaptkit.recipe.yaml import load_yaml


@dataclass
class OpenRun:
    """A run directory loaded back: its recipe, task, processor and the adapted model."""

    recipe: Recipe
    task: Any
    processor: Any
    adapted: Adapted
    splits: Any
    files: dict[str, str]
    batch_size: int  # the micro-batch it trained with (what ``auto`` chose): evaluation needs less memory
    run_dir: Path
    host: PluginHost
    base_id: str | None  # the base model's public identifier (a hub id), where its loader knows one


def open_run(run_dir: str | Path, host: PluginHost, data: str | None = None) -> OpenRun:
    """Rebuild the base model named in the run's recipe and load the final strategy state onto it."""
    from adaptkit.adapt.pipeline import load_base
    from adaptkit.train.setup import quiet_libraries

    quiet_libraries()
    run_dir = Path(run_dir)
    if not (run_dir / "final").is_dir():
        raise AdaptkitError(f"{run_dir}: not a finished run directory (no final/); train it first")
    raw = load_yaml((run_dir / "recipe.yaml").read_text(), source=str(run_dir / "recipe.yaml"))
    if data:
        raw["data"]["source"] = data
    recipe = validate(raw, host=host, source=str(run_dir / "recipe.yaml"))
    base = load_base(recipe, host)
    loaded, task = base.loaded, base.task
    adapted = Adapted.load(loaded.model, run_dir / "final", host=host)
    adapted.model.eval()
    return OpenRun(
        recipe, task, loaded.processor, adapted, base.splits, base.files, trained_batch_size(run_dir, recipe),
        run_dir, host, loaded.public_id,
    )  # fmt: skip


def trained_batch_size(run_dir: Path, recipe: Recipe) -> int:
    """The micro-batch a finished run used: from its summary, else its recipe (8 for an unrecorded ``auto``)."""
    try:
        return int(json.loads((run_dir / "summary.json").read_text())["micro_batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return recipe.train.micro_batch_size if isinstance(recipe.train.micro_batch_size, int) else 8


def evaluate_run(run: OpenRun, split: str = "validation") -> dict[str, float]:
    """Evaluate the run's model on one split of its (or the given) data."""
    import torch
    from accelerate import Accelerator

    from adaptkit.train.context import Run
    from adaptkit.train.evaluate import evaluate

    ds = run.task.encode(run.splits[split], run.processor, run.files[split])
    loader = torch.utils.data.DataLoader(
        ds, batch_size=run.batch_size, collate_fn=run.task.collate(run.processor)
    )
    acc = Accelerator()
    ctx = Run(recipe=run.recipe, host=None, run_dir=Path("."), accelerator=acc, task=run.task)
    model, loader = acc.prepare(run.adapted.model, loader)
    return evaluate(ctx, model, loader)


def predict(run: OpenRun, inputs: list[str]) -> list[dict[str, Any]]:
    """Classify ``inputs`` (texts, or image or audio file paths for those tasks): the predicted
    label and its probability for each.

    Each input goes through the task's own reading, cutting and feature extraction, as validation
    rows do; a file that cannot be read is a DataError naming it.
    """
    import datasets
    import torch

    task, data = run.task, run.recipe.data
    names = getattr(task, "names", None)
    if not names:
        raise AdaptkitError(
            f"predict classifies; this run's task is '{run.recipe.model.task}' (use generate)"
        )
    if getattr(data, "text_pair", None):
        raise AdaptkitError("predict reads one text per input; this run classifies pairs (data.text_pair)")
    column = getattr(data, getattr(task, "column_field", "") or "text")
    # the label column the task's reading expects; the predictions never look at it
    rows = datasets.Dataset.from_dict({column: list(inputs), data.label: [names[0]] * len(inputs)})
    encoded = task.encode(rows, run.processor, "the command line")
    batch = task.collate(run.processor)([encoded[i] for i in range(len(encoded))])
    batch.pop("labels")
    with torch.no_grad():
        probs = run.adapted.model(**batch).logits.softmax(-1)
    return [
        {"input": value, "label": names[int(p.argmax())], "score": float(p.max())}
        for value, p in zip(inputs, probs)
    ]


def generate(run: OpenRun, prompt: str, max_new_tokens: int = 64) -> str:
    """Generate a response to ``prompt`` (through the chat template when the tokenizer has one)."""
    import torch

    tok = run.processor
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        input_ids = ids["input_ids"]
    else:
        input_ids = tok(prompt, return_tensors="pt")["input_ids"]
    # a model with learned positions (GPT-2) fails with an IndexError past its context: stop there
    context = getattr(run.adapted.model.config, "max_position_embeddings", None)
    if context:
        if input_ids.shape[1] >= context:
            raise AdaptkitError(
                f"the prompt has {input_ids.shape[1]} tokens; this model reads at most {context}"
            )
        max_new_tokens = min(max_new_tokens, context - input_ids.shape[1])
    with torch.no_grad():
        out = run.adapted.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
        )
    return tok.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
