"""``model.pooling``: a classification head reads an encoder as the encoder was trained (mean pooling
for sentence-transformers models), padding never counts, and the pooling survives checkpoints,
merged and adapter exports, and plain-transformers loading through the model card's code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adaptkit.cli import main
from adaptkit.testing import plugin_host, save_tiny_pretrained, tiny_model, write_sentiment

TEXTS = ["the movie was great", "awful and dull, the worst film of the year", "a sentence to classify"]


def as_sentence_transformer(directory: Path, mode: str = "mean") -> None:
    """Give a saved model the pooling files sentence-transformers writes (as all-MiniLM-L6-v2 has)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    config = {"pooling_mode_cls_token": mode == "cls", "pooling_mode_mean_tokens": mode == "mean"}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(config))


def test_auto_reads_the_sentence_transformers_config_and_falls_back_to_the_pooler(tmp_path):
    from adaptkit_plugins.tasks.pooling import resolve, sentence_transformers_pooling

    model = tiny_model("bert")
    assert sentence_transformers_pooling(tmp_path) is None
    model.config._name_or_path = str(tmp_path)
    assert resolve("auto", model) == "pooler"
    for mode in ("mean", "cls"):
        as_sentence_transformer(tmp_path, mode)
        assert sentence_transformers_pooling(tmp_path) == mode
        assert resolve("auto", model) == mode
    assert resolve("pooler", model) == "pooler"  # an explicit choice wins over the files
    model.config.update({"adaptkit_pooling": "mean"})  # an exported model says how it pooled
    assert resolve("auto", model) == "mean"


def test_auto_reads_the_pooling_of_a_hub_model_from_the_hub_cache(tmp_path, monkeypatch):
    """A model loaded by hub id: its sentence-transformers files come from the same cache."""
    import huggingface_hub.constants

    from adaptkit_plugins.tasks.pooling import sentence_transformers_pooling

    snapshot = tmp_path / "models--acme--minilm" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--acme--minilm" / "refs").mkdir()
    (tmp_path / "models--acme--minilm" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert sentence_transformers_pooling("acme/minilm") is None
    as_sentence_transformer(snapshot, "mean")
    assert sentence_transformers_pooling("acme/minilm") == "mean"
    assert sentence_transformers_pooling("acme/other") is None


def test_mean_pooling_ignores_padding_and_replaces_the_pooler():
    import torch

    from adaptkit_plugins.tasks.pooling import apply_pooling

    model = tiny_model("bert").eval()
    assert apply_pooling(model, "mean") == "mean"
    assert apply_pooling(model, "mean") == "mean"  # idempotent: one module, one hook
    assert len(model.bert._forward_pre_hooks) == 1
    assert not any(name.startswith("bert.pooler.") for name, _ in model.named_parameters())
    torch.manual_seed(0)
    short = torch.randint(5, 90, (1, 5))
    long = torch.randint(5, 90, (1, 9))
    padded = torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    batch = {
        "input_ids": torch.cat([padded, long]),
        "attention_mask": torch.tensor([[1] * 5 + [0] * 4, [1] * 9]),
    }
    with torch.no_grad():
        alone = model(input_ids=short).logits
        together = model(**batch).logits
        hidden = model.bert(**batch).last_hidden_state
        pooled = model.bert(**batch).pooler_output
    torch.testing.assert_close(together[:1], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled[0], hidden[0, :5].mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled[1], hidden[1].mean(0), atol=1e-6, rtol=0)
    with torch.no_grad():  # positional attention mask, as some callers pass it
        torch.testing.assert_close(
            model.bert(batch["input_ids"], batch["attention_mask"]).pooler_output, pooled
        )


def test_cls_pooling_reads_the_first_token_without_the_pooler_layers():
    import torch

    from adaptkit_plugins.tasks.pooling import apply_pooling

    model = tiny_model("bert").eval()
    apply_pooling(model, "cls")
    ids = torch.randint(5, 90, (2, 7))
    with torch.no_grad():
        out = model.bert(input_ids=ids)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])


def test_a_head_without_a_pooler_keeps_its_own_under_auto_and_refuses_an_explicit_mode():
    from adaptkit.errors import ConfigError
    from adaptkit_plugins.tasks.pooling import apply_pooling

    model = tiny_model("gpt2")  # GPT-2's classification head reads the last token itself
    assert apply_pooling(model, "auto") == "pooler"
    with pytest.raises(ConfigError) as caught:
        apply_pooling(model, "mean")
    assert "model.pooling" in str(caught.value) and "use auto or pooler" in str(caught.value)


def test_a_bad_pooling_in_a_recipe_is_refused_naming_the_field(tmp_path, capsys):
    save_tiny_pretrained(tmp_path / "bert", "bert")
    write_sentiment(tmp_path / "train.jsonl", 16, seed=0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{source: {tmp_path / 'bert'}, task: classification, pooling: max}}\n"
        f"data: {{source: {tmp_path / 'train.jsonl'}}}\nstrategies: [full]\n"
    )
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "model.pooling" in err and "'auto', 'pooler', 'cls' or 'mean'" in err


@pytest.fixture(scope="module")
def mean_pooled_runs(tmp_path_factory) -> Path:
    """A sentence-transformers-style tiny BERT trained with LoRA and with full fine-tuning (pooling auto)."""
    d = tmp_path_factory.mktemp("pooling")
    save_tiny_pretrained(d / "bert", "bert")
    as_sentence_transformer(d / "bert")
    write_sentiment(d / "train.jsonl", 64, seed=0)
    for name, strategy in (("lora", "{name: lora, r: 4}"), ("full", "full")):
        (d / f"{name}.yaml").write_text(
            f"model: {{source: {d / 'bert'}, task: classification}}\n"
            f"data: {{source: {d / 'train.jsonl'}, max_length: 16}}\n"
            f"strategies: [{strategy}]\n"
            "train: {max_steps: 4, lr: 1.0e-2, micro_batch_size: 8}\n"
            f"output: {d / 'runs'}/{{name}}\n"
        )
        assert main(["train", str(d / f"{name}.yaml")]) == 0
    return d


def run_logits(run_dir: Path, texts: list[str]):
    import torch

    from adaptkit.runs import open_run

    opened = open_run(run_dir, plugin_host())
    assert opened.adapted.model.config.adaptkit_pooling == "mean"
    batch = opened.processor(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return opened, opened.adapted.model(**batch).logits


def card_code(export_dir: Path) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", (export_dir / "README.md").read_text(), re.S)[:1]
    return code


def run_without_adaptkit(code: str, cwd: Path) -> list:
    """Run a model card's code in a fresh interpreter where importing adaptkit fails; its logits."""
    guard = (
        "import importlib.abc, sys\n"
        "class NoAdaptkit(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('adaptkit', 'adaptkit_plugins'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, NoAdaptkit())\n"
    )
    script = guard + code + "\nimport json; print(json.dumps(logits.tolist()))\n"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_mean_pooled_run_exports_merged_and_the_cards_code_gives_its_logits(mean_pooled_runs, tmp_path):
    import torch

    _, expected = run_logits(mean_pooled_runs / "runs" / "full", TEXTS[2:])
    out = tmp_path / "merged"
    assert main(["export", str(mean_pooled_runs / "runs" / "full"), str(out), "--merge"]) == 0
    assert json.loads((out / "config.json").read_text())["adaptkit_pooling"] == "mean"
    code = card_code(out)
    assert "mean of the encoder's token states" in (out / "README.md").read_text()
    torch.testing.assert_close(
        torch.tensor(run_without_adaptkit(code, tmp_path)), expected, atol=1e-5, rtol=0
    )


@pytest.mark.slow
def test_a_mean_pooled_lora_adapter_loads_pooled_through_adaptkit_and_through_its_card(
    mean_pooled_runs, tmp_path
):
    import torch

    from adaptkit.export import export
    from adaptkit.export.loading import load_adapter

    opened, expected = run_logits(mean_pooled_runs / "runs" / "lora", TEXTS)
    out = export(opened, tmp_path / "adapter", "peft")
    assert json.loads((out / "adaptkit_export.json").read_text())["pooling"] == "mean"
    batch = opened.processor(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = load_adapter(out)(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    from_card = run_without_adaptkit(card_code(out), tmp_path)
    torch.testing.assert_close(torch.tensor(from_card), expected[2:], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_merged_mean_pooled_model_used_as_a_base_pools_the_same_way(mean_pooled_runs, tmp_path):
    """An exported model records its pooling, so training on from it (pooling auto) keeps it."""
    import torch

    from adaptkit.adapt.pipeline import load_base
    from adaptkit.recipe.schema import validate

    _, expected = run_logits(mean_pooled_runs / "runs" / "full", TEXTS)
    out = tmp_path / "merged"
    assert main(["export", str(mean_pooled_runs / "runs" / "full"), str(out), "--merge"]) == 0
    host = plugin_host()
    raw = {
        "model": {"source": str(out), "task": "classification"},
        "data": {"source": str(mean_pooled_runs / "train.jsonl"), "max_length": 16},
        "strategies": ["full"],
    }
    base = load_base(validate(raw, host=host), host)
    model = base.loaded.model.eval()
    batch = base.loaded.processor(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-6, rtol=0)
