"""``data.packing: auto`` (the default): packing wherever it is safe, the same for every variant.

A run packs unless the task, the batching, a strategy or the model itself rules it out, and then
it says why; ``true`` refuses what ``auto`` quietly leaves unpacked. A comparison packs all the
variants left to ``auto`` or none, so a budget in steps means the same for each.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from adaptkit.adapt.packing import decide_packing
from adaptkit.adapt.stack import apply
from adaptkit.errors import ConfigError
from adaptkit.kernels.lm_loss import check_packing
from adaptkit.recipe.schema import load_recipe, validate
from adaptkit.testing import save_tiny_pretrained, tiny_model

PROMPT_TUNING = "{name: peft, method: prompt_tuning, options: {num_virtual_tokens: 4}}"


def write_chat_rows(path: Path, n: int = 24) -> None:
    """Prompt/response rows of mixed lengths, short enough that several share a packed row."""
    rng = random.Random(0)
    words = "the a sum of two and three makes five four one".split()
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choices(words, k=rng.randint(1, 8)))
            f.write(json.dumps({"prompt": prompt, "response": " ".join(rng.choices(words, k=3))}) + "\n")


@pytest.fixture
def llama_recipe(tmp_path):
    """Write a causal-LM recipe on a tiny LLaMA with ``strategies`` and ``extra`` train settings."""
    save_tiny_pretrained(tmp_path / "llama", "llama", "causal_lm")
    write_chat_rows(tmp_path / "rows.jsonl")

    def write(name: str, strategies: str = "[{name: lora, r: 4}]", data: str = "", train: str = "") -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"model: {{source: {tmp_path / 'llama'}, task: causal_lm}}\n"
            f"data: {{source: {tmp_path / 'rows.jsonl'}, max_length: 48{data}}}\n"
            f"strategies: {strategies}\n"
            f"train: {{max_steps: 2, micro_batch_size: 4, lr: 1.0e-3, preflight: false{train}}}\n"
            f"output: {tmp_path / 'runs'}/{{name}}\n"
        )
        return path

    return write


def test_auto_packs_a_causal_lm_run_and_unpacks_where_a_strategy_or_the_batching_rules_it_out(
    llama_recipe, host, capsys
):
    from adaptkit.train.loop import train

    cases = {
        "default": (llama_recipe("default"), True, None),
        "prompt": (llama_recipe("prompt", f"[{PROMPT_TUNING}]"), False, "strategies ['peft'] cannot"),
        "by_length": (
            llama_recipe("by_length", train=", batching: by_length"),
            False,
            "train.batching: by_length needs unpacked rows",
        ),
        "off": (llama_recipe("off", data=", packing: false"), False, None),
    }
    for name, (path, packed, reason) in cases.items():
        recipe = load_recipe(path, host=host)
        assert recipe.data.packing == ("auto" if name != "off" else False)
        summary = train(recipe, host, fresh=True)
        err = capsys.readouterr().err
        assert summary["packed"] is packed, name
        assert json.loads((path.parent / "runs" / path.stem / "summary.json").read_text())["packed"] is packed
        if reason:
            assert f"training rows are not packed: {reason}" in err, err
        else:
            assert "not packed" not in err


def test_packing_true_is_refused_for_a_strategy_that_adds_tokens(llama_recipe, capsys):
    from adaptkit.cli import main

    path = llama_recipe("prompt-true", f"[{PROMPT_TUNING}]", data=", packing: true")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.packing" in err and "strategies ['peft'] cannot train on packed rows" in err
    assert "Traceback" not in err


def test_the_declaration_is_needed_prompt_tuning_breaks_packed_rows(host):
    """Not a guess: peft puts virtual tokens before every row (and drops its position ids), so the probe fails."""
    from adaptkit.recipe.schema import Recipe

    model = tiny_model("llama", "causal_lm").train()
    adapted = apply(
        model, [{"name": "peft", "method": "prompt_tuning", "options": {"num_virtual_tokens": 4}}], host=host
    )
    with pytest.raises(ConfigError, match=r"data\.packing: .*gives 17 outputs for a packed row of 13 tokens"):
        check_packing(adapted.model)
    recipe = Recipe(model={"source": "x", "task": "causal_lm"}, data={"source": "x"}, strategies=["full"])
    task = host.lookup("tasks", "causal_lm").obj(recipe.data)
    adapted.strategies[0].packs = True  # pretend it declared nothing: auto falls back on the probe
    packed, why = decide_packing(recipe, task, adapted, "NO")
    assert packed is False and "adds or drops positions" in why
    recipe.data.packing = True
    with pytest.raises(ConfigError, match="adds or drops positions"):
        decide_packing(recipe, task, adapted, "NO")


def comparison(tmp_path: Path, variants: str) -> Path:
    save_tiny_pretrained(tmp_path / "llama", "llama", "causal_lm")
    write_chat_rows(tmp_path / "rows.jsonl")
    path = tmp_path / "cmp.yaml"
    path.write_text(
        f"model: {{source: {tmp_path / 'llama'}, task: causal_lm}}\n"
        f"data: {{source: {tmp_path / 'rows.jsonl'}}}\n"
        "strategies: [full]\ntrain: {lr: 1.0e-3}\n"
        f"output: {tmp_path / 'out'}\n"
        f"compare:\n  budget: {{steps: 4}}\n  lr: fixed\n  variants:\n{variants}"
    )
    return path


def test_a_comparison_packs_all_variants_or_none(tmp_path, host):
    from adaptkit.compare import plan

    lora = "    - {name: lora, strategies: [{name: lora, r: 4}]}\n"
    full = "    - {name: full, strategies: [full]}\n"
    prompt = f"    - {{name: prompt, strategies: [{PROMPT_TUNING}]}}\n"
    chosen = "    - {name: unpacked, strategies: [full], overrides: {data.packing: false}}\n"

    both = plan(comparison(tmp_path / "a", lora + full + chosen), host=host)
    packing = {label: jobs[0].raw["data"].get("packing", "auto") for label, jobs in both.variants.items()}
    assert packing == {"lora": "auto", "full": "auto", "unpacked": False} and not both.notes

    mixed = plan(comparison(tmp_path / "b", lora + full + prompt), host=host)
    assert {jobs[0].raw["data"]["packing"] for jobs in mixed.variants.values()} == {False}
    assert mixed.notes == [
        "no variant packs its training rows, because some strategies cannot (prompt: ['peft'])"
    ]
    for jobs in mixed.variants.values():  # what the children run is still a valid recipe
        validate(jobs[0].raw, host=host)


def test_cached_features_are_never_packed(llama_recipe, host, capsys):
    """The feature cache keeps one row of backbone outputs per example: packed rows would mix them."""
    from adaptkit.adapt.packing import static_reason
    from adaptkit.cli import main

    path = llama_recipe(
        "cached-true", "[{name: freeze}]", data=", packing: true", train=", cache_features: true"
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.cache_features" in err and "set data.packing: false" in err
    recipe = load_recipe(
        llama_recipe("cached-auto", "[{name: freeze}]", train=", cache_features: true"), host=host
    )
    task = host.lookup("tasks", "causal_lm").obj(recipe.data)
    assert static_reason(recipe, task, []) == (
        "train.cache_features: keeps one feature row per example, so it needs unpacked rows"
    )
