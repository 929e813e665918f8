"""Exporting a finished run for use elsewhere, each export with a model card generated from the run.

- ``transformers`` (``adaptkit export RUN OUT --merge``): the strategies folded into a plain
  transformers model directory;
- ``peft``: the run's peft adapter, its base named by a public identifier (a hub id) where one
  is known, with the label names and the task beside it (``adaptkit_export.json``);
- ``gguf``: one merged GGUF file for llama.cpp, Ollama and LM Studio (LLaMA-family causal LMs).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from adaptkit.contract.model import POOLING_KEY
from adaptkit.errors import AdaptkitError, ConfigError, NotMergeableError
from adaptkit.export.card import model_card
from adaptkit.export.loading import EXPORT_RECORD, how_to_load
from adaptkit.files import atomic_write_bytes

FORMATS = ("transformers", "peft", "gguf")


def export(run: Any, out: str | Path, fmt: str = "peft", quant: str = "f16") -> Path:
    """Export ``run`` (an ``adaptkit.runs.OpenRun``) to ``out`` in format ``fmt`` (see ``FORMATS``)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    out = Path(out)
    if fmt == "gguf":
        return _gguf(run, out, quant)
    return _merged(run, out) if fmt == "transformers" else _adapter(run, out)


def base_record(run: Any) -> dict[str, Any]:
    """How the export names its base: the recipe's ``model.source``, its public id where known, and
    whether that source is a model registered by name (a packaged model) that adaptkit can fetch."""
    source = run.recipe.model.source
    registered = source in run.host.registries["models"]
    return {"source": source, "public_id": run.base_id, "registered": registered}


def pooling_of(run: Any) -> str:
    """How the run's classification head reads the tokens (``model.pooling`` as resolved), ``pooler`` by default."""
    config = getattr(run.adapted.model, "config", None)
    return getattr(config, POOLING_KEY, None) or "pooler"


def _merged(run: Any, out: Path) -> Path:
    model = _merge(run)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    run.processor.save_pretrained(tmp)
    base = base_record(run)
    (tmp / "README.md").write_text(
        model_card(run, base, "transformers", how_to_load("transformers", out, base, pooling=pooling_of(run)))
    )
    _replace_dir(tmp, out)
    return out


def _adapter(run: Any, out: Path) -> Path:
    # training-only strategies (neftune) changed how it trained, not what it is: nothing to export
    saving = run.adapted.saving
    if len(saving) != 1 or not saving[0].wraps_with_peft:
        raise ConfigError(
            f"only a single peft strategy exports as an adapter (this run has {[s.name for s in saving]}); "
            "use --merge"
        )
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    saving[0].export(run.adapted.model, tmp)
    base = base_record(run)
    _name_the_base(tmp / "adapter_config.json", base)
    record = {
        "format": "peft",
        "base": base,
        "task": run.recipe.model.task,
        "auto_model": run.task.auto_model,
        "model_kwargs": run.task.model_kwargs(),
        "pooling": pooling_of(run),
        "strategies": [{"name": s.name, **s.config.model_dump(mode="json")} for s in run.adapted.strategies],
    }
    (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
    run.processor.save_pretrained(tmp)  # the tokenizer travels with the adapter
    (tmp / "adaptkit_recipe.json").write_text(json.dumps(run.recipe.model_dump(mode="json"), indent=2))
    (tmp / "README.md").write_text(
        model_card(run, base, "peft", how_to_load("peft", out, base, record, record["pooling"]))
    )
    _replace_dir(tmp, out)
    return out


def _name_the_base(config_file: Path, base: dict[str, Any]) -> None:
    """Point the adapter at its base by public id (else the recipe's source), not this machine's cache."""
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base["public_id"] or base["source"]
    config_file.write_text(json.dumps(config, indent=2))
    if not base["public_id"] and not base["registered"]:
        print(
            f"adaptkit: warning: the base model is the local path {base['source']}; the adapter loads "
            "elsewhere only where that path holds the same model",
            file=sys.stderr,
        )


def _gguf(run: Any, out: Path, quant: str) -> Path:
    from adaptkit.export.gguf import check_model, write_gguf

    if out.suffix != ".gguf":
        raise ConfigError(f"{out}: a GGUF export is one file; name it ending in .gguf")
    check_model(run.adapted.model)  # before merging: a model GGUF cannot hold is refused unchanged
    model = _merge(run)
    write_gguf(model, run.processor, out, quant=quant)
    base = base_record(run)
    card = model_card(run, base, "gguf", how_to_load("gguf", out, base))
    atomic_write_bytes(out.with_suffix(".md"), card.encode())
    return out


def _merge(run: Any) -> Any:
    try:
        return run.adapted.merge()
    except NotMergeableError as exc:
        raise AdaptkitError(f"{exc}; export without --merge to get the strategy state") from None


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
