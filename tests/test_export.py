"""Exports that travel: an adapter names its base by public id (or the recipe's source, with a
warning for a local path), carries its labels, task and tokenizer, and a model card generated from
the run; ``load_adapter`` loads it back from the export alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptkit.cli import main
from adaptkit.testing import plugin_host, save_tiny_pretrained, write_sentiment


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("export")
    save_tiny_pretrained(d / "bert", "bert")
    write_sentiment(d / "train.jsonl", 64, seed=0)
    (d / "r.yaml").write_text(
        f"model: {{source: {d / 'bert'}, task: classification}}\n"
        f"data: {{source: {d / 'train.jsonl'}, max_length: 16}}\n"
        "strategies: [{name: lora, r: 4}, neftune]\n"
        "train: {max_steps: 4, lr: 1.0e-2, micro_batch_size: 8}\n"
        f"output: {d / 'runs'}/{{name}}\n"
    )
    assert main(["train", str(d / "r.yaml")]) == 0
    return d / "runs" / "r"


def test_an_adapter_export_carries_its_base_labels_task_tokenizer_and_a_card(lora_run, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["export", str(lora_run), str(out)]) == 0
    err = capsys.readouterr().err
    base = str(lora_run.parent.parent / "bert")
    # a local directory has no public name: the path stays, and the user is told
    assert f"the base model is the local path {base}" in err
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    record = json.loads((out / "adaptkit_export.json").read_text())
    assert record["task"] == "classification" and record["auto_model"] == "AutoModelForSequenceClassification"
    assert record["model_kwargs"]["id2label"] == {"0": "neg", "1": "pos"}
    assert [s["name"] for s in record["strategies"]] == ["lora", "neftune"]  # neftune saved nothing
    assert {"tokenizer.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "[More Information Needed]" not in card  # not peft's empty template
    for expected in (
        f"base_model: {base}",
        "library_name: peft",
        "name: lora",
        "name: neftune",
        "(train 57, validation 7 rows; columns text, label;",
        "4 steps, learning rate 0.01",
        "| accuracy |",
        'peft.PeftModel.from_pretrained(base, "adapter")',
        "num_labels=2",
        "Trained with python",
    ):
        assert expected in card, expected


def test_load_adapter_gives_the_runs_logits_from_the_export_alone(lora_run, tmp_path):
    import torch

    from adaptkit.export import export
    from adaptkit.export.loading import load_adapter
    from adaptkit.runs import open_run

    opened = open_run(lora_run, plugin_host())
    batch = opened.processor(["the movie was great", "awful and dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = opened.adapted.model(**batch).logits
    out = export(opened, tmp_path / "adapter", "peft")
    with torch.no_grad():
        got = load_adapter(out)(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_a_merged_export_has_a_card_and_bad_export_flags_are_refused(lora_run, tmp_path, capsys):
    assert main(["export", str(lora_run), str(tmp_path / "merged"), "--merge"]) == 0
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "library_name: transformers" in card and "AutoModel.from_pretrained" in card
    assert main(["export", str(lora_run), str(tmp_path / "m2"), "--merge", "--format", "gguf"]) == 2
    assert "--merge is --format transformers" in capsys.readouterr().err
    assert main(["export", str(lora_run), str(tmp_path / "bert.gguf"), "--format", "gguf"]) == 2
    assert "GGUF export supports causal LMs of model type llama, qwen2" in capsys.readouterr().err
    assert not (tmp_path / "bert.gguf").exists()
