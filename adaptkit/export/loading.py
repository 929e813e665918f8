"""Loading an export back: the code the model card shows, and ``load_adapter``, which needs only the
export directory (its base is found by name: a registered model fetches itself, a hub id downloads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adaptkit.errors import ConfigError

#: What an adapter export records beside the adapter: its base, task, head settings and stack.
EXPORT_RECORD = "adaptkit_export.json"


def how_to_load(
    kind: str, out: Path, base: dict[str, Any], record: dict[str, Any] | None = None, pooling: str = "pooler"
) -> str:
    """The card's "How to load" section for an export of ``kind`` whose head reads the tokens by ``pooling``."""
    name = base["public_id"] or base["source"]
    if kind == "gguf":
        return (
            "## How to load\n\n```bash\nllama-cli -m "
            f"{out.name} -p 'Hello'\nollama create mymodel -f Modelfile   # FROM ./{out.name}\n```\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained(".", gguf_file="{out.name}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained(".", gguf_file="{out.name}")\n```\n'
        )
    if kind == "transformers":
        if pooling != "pooler":
            return _pooled_snippet(
                pooling,
                f'model = transformers.AutoModelForSequenceClassification.from_pretrained("{out.name}").eval()',
                f'tokenizer = transformers.AutoTokenizer.from_pretrained("{out.name}")',
                "model",
            )
        return (
            "## How to load\n\n```python\nimport transformers\n\n"
            f'model = transformers.AutoModel.from_pretrained("{out.name}")'
            "  # or the AutoModelFor... of the task\n```\n"
        )
    assert record is not None
    kwargs = ", ".join(f"{k}={v!r}" for k, v in record["model_kwargs"].items())
    via_adaptkit = (
        "\nWith adaptkit, which fetches a registered base by name:\n\n```python\n"
        f'from adaptkit.export.loading import load_adapter\n\nmodel = load_adapter("{out.name}")\n```\n'
    )
    load_base = f'base = transformers.{record["auto_model"]}.from_pretrained("{name}"' + (
        f"{', ' + kwargs if kwargs else ''})"
    )
    load_adapter_line = f'model = peft.PeftModel.from_pretrained(base, "{out.name}").eval()'
    if pooling != "pooler":
        tokenizer = f'tokenizer = transformers.AutoTokenizer.from_pretrained("{out.name}")'
        return (
            _pooled_snippet(
                pooling, f"{load_base}\n{load_adapter_line}", tokenizer, "model.get_base_model()", "peft, "
            )
            + via_adaptkit
        )
    return (
        "## How to load\n\n```python\nimport peft, transformers\n\n"
        f"{load_base}\n{load_adapter_line}\n```\n" + via_adaptkit
    )


def _pooled_snippet(pooling: str, load: str, tokenizer: str, inner: str, imports: str = "") -> str:
    """Loading code for a head that pools the tokens itself (``cls`` or ``mean``): transformers'
    classification models read BERT's pooler instead, so the card computes the logits explicitly."""
    if pooling == "cls":
        pooled = "    pooled = hidden[:, 0]\n"
    else:
        pooled = (
            '    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)\n'
            "    pooled = (hidden * mask).sum(1) / mask.sum(1)\n"
        )
    return (
        f"## How to load\n\nThis model's head reads the {_POOLING_WORDS[pooling]} (adaptkit's "
        f"`model.pooling: {pooling}`), not the pooler that transformers' classification models read, "
        "so compute its logits like this:\n\n"
        f"```python\nimport {imports}torch, transformers\n\n{load}\n{tokenizer}\n"
        'inputs = tokenizer(["a sentence to classify"], padding=True, return_tensors="pt")\n'
        f"inner = {inner}\nwith torch.no_grad():\n"
        "    hidden = inner.base_model(**inputs).last_hidden_state\n"
        f"{pooled}    logits = inner.classifier(pooled)\n```\n"
    )


_POOLING_WORDS = {"cls": "first token's hidden state", "mean": "mean of the encoder's token states"}


def load_adapter(directory: str | Path, host: Any = None) -> Any:
    """An exported adapter on its base, as a ``peft.PeftModel`` in eval mode.

    The base is found from the export alone: a model registered by name (a packaged model) is
    fetched into this machine's cache, a public id is loaded from the hub, a path from disk.
    """
    import peft
    import transformers

    from adaptkit.host.manager import default_host

    directory = Path(directory)
    try:
        record = json.loads((directory / EXPORT_RECORD).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{directory}: no readable {EXPORT_RECORD}; is it an adapter export? ({exc})"
        ) from None
    base = record["base"]
    registry = (host or default_host()).registries["models"]
    if base["registered"] and base["source"] in registry:
        where = str(registry[base["source"]].obj.fetch())
    else:
        where = base["public_id"] or base["source"]
    auto = getattr(transformers, record["auto_model"])
    kwargs = dict(record["model_kwargs"])
    if "id2label" in kwargs:  # JSON turned the ids into strings
        kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
    model = auto.from_pretrained(where, use_safetensors=True, **kwargs)
    _prepare_as_trained(model, directory, record, host)
    return peft.PeftModel.from_pretrained(model, directory).eval()


def _prepare_as_trained(model: Any, directory: Path, record: dict[str, Any], host: Any) -> None:
    """Let the export's task prepare the base as the run's did (with the run's data section and the
    exported processor): pooling the tokens as it trained, a Whisper encoder cut to its length."""
    from adaptkit.contract.model import POOLING_KEY
    from adaptkit.host.manager import default_host
    from adaptkit.recipe.schema import DataSpec

    pooling = record.get("pooling", "pooler")
    if pooling != "pooler":
        model.config.update({POOLING_KEY: pooling})  # what model.pooling: auto reads, as from a merged export
    recipe_file = directory / "adaptkit_recipe.json"
    data = DataSpec(**json.loads(recipe_file.read_text())["data"]) if recipe_file.is_file() else None
    task = (host or default_host()).lookup("tasks", record["task"]).obj(data)
    task.prepare_model(model, task.load_processor(str(directory), {}))
