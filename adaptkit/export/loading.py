"""Loading an export back: the code the model card shows, and ``load_adapter``, which needs only the
export directory (its base is found by name: a registered model fetches itself, a hub id downloads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adaptkit.errors import ConfigError

#: What an adapter export records beside the adapter: its base, task, head settings and stack.
EXPORT_RECORD = "adaptkit_export.json"


def how_to_load(kind: str, out: Path, base: dict[str, Any], record: dict[str, Any] | None = None) -> str:
    """The card's "How to load" section for an export of ``kind``."""
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
    return (
        "## How to load\n\n```python\nimport peft, transformers\n\n"
        f'base = transformers.{record["auto_model"]}.from_pretrained("{name}"'
        f"{', ' + kwargs if kwargs else ''})\n"
        f'model = peft.PeftModel.from_pretrained(base, "{out.name}")\n```\n' + via_adaptkit
    )


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
    return peft.PeftModel.from_pretrained(model, directory).eval()
