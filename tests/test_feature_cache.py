"""Head-only training on cached backbone features (``train.cache_features``), and frozen bottom
layers that build no autograd graph."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptkit.testing import save_tiny_pretrained, sentiment_rows, tiny_model


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    """A tiny BERT and a tiny Llama, and a sentiment set whose texts vary in length (so batches pad)."""
    d = tmp_path_factory.mktemp("probe")
    save_tiny_pretrained(d / "bert", "bert")
    save_tiny_pretrained(d / "llama", "llama")
    rows = sentiment_rows(56, lengths=(1, 8))  # distinct texts (exact cache counts) of many lengths (padding)
    (d / "data").mkdir()
    for name, part in (("train", rows[:44]), ("validation", rows[44:])):
        (d / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return d


def probe_recipe(d: Path, family: str, cache: bool, strategies: list | None = None) -> dict:
    """A linear probe (freeze: the head trains), without dropout so that cached and uncached runs can agree."""
    return {
        "name": f"{family}-{'cached' if cache else 'plain'}",
        "model": {"source": str(d / family), "task": "classification", "dropout": 0.0},
        "data": {"source": str(d / "data"), "max_length": 16},
        "strategies": strategies or ["freeze"],
        "train": {"epochs": 4, "micro_batch_size": 8, "lr": 0.05, "seed": 0, "cache_features": cache},
        "output": str(d / "runs" / "{name}"),
    }


def run(raw: dict, host):
    from adaptkit.recipe.schema import validate
    from adaptkit.train.loop import train

    return train(validate(raw, host=host), host, fresh=True)


def evaluations(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if "eval_loss" in e]


def head_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run_dir / "final").rglob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize(
    "family", ["bert", "llama"]
)  # pooled output (BERT) and last-token pooling over padded states (Llama)
def test_cached_probe_trains_like_the_uncached_one(probe_dir, host, family):
    import torch

    plain = run(probe_recipe(probe_dir, family, cache=False), host)
    cached = run(probe_recipe(probe_dir, family, cache=True), host)

    # 4 epochs over 44 training rows in batches of 8, and an evaluation of 12 rows after each epoch:
    # every distinct example runs through the backbone once, every later call is answered from the cache
    assert plain["feature_cache"] is None
    fc = cached["feature_cache"]
    assert fc["examples"] == 56 and fc["computed"] == 56
    assert fc["cached"] == 4 * 44 + 4 * 12 - 56
    assert fc["bytes"] > 0

    a, b = (
        head_weights(probe_dir / "runs" / f"{family}-plain"),
        head_weights(probe_dir / "runs" / f"{family}-cached"),
    )
    assert a.keys() == b.keys() and a
    for name in a:
        # the first epoch is computed exactly as without the cache; later epochs reuse rows computed in
        # other batches (other padding), which moves float32 rounding only
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    plain_evals, cached_evals = (
        evaluations(probe_dir / "runs" / f"{family}-{kind}") for kind in ("plain", "cached")
    )
    assert len(plain_evals) == len(cached_evals) == 4
    for p, c in zip(plain_evals, cached_evals):
        assert p["accuracy"] == c["accuracy"]
        assert c["eval_loss"] == pytest.approx(p["eval_loss"], rel=1e-5)
    # the agreement is not that of two heads that hardly moved: training took them far from where one step leaves them
    one_step = probe_recipe(probe_dir, family, cache=True)
    one_step["name"], one_step["train"]["max_steps"] = f"{family}-one-step", 1
    run(one_step, host)
    early = head_weights(probe_dir / "runs" / f"{family}-one-step")
    assert max((a[k] - early[k]).abs().max().item() for k in a) > 1e-2
    assert plain["trainable_parameters"] == cached["trainable_parameters"]


def test_cache_is_removed_after_training_and_the_backbone_is_untouched(probe_dir, host):
    """The caller's model gets its own forward back, and its frozen weights are bitwise unchanged."""
    import torch

    from adaptkit.recipe.schema import validate
    from adaptkit.testing import load_recipe_model
    from adaptkit.train.loop import train

    recipe = validate(probe_recipe(probe_dir, "bert", cache=True), host=host)
    loaded = load_recipe_model(recipe, host)
    backbone = loaded.model.bert
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    train(recipe, host, fresh=True, loaded_model=loaded)
    assert "forward" not in backbone.__dict__
    for n, p in backbone.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize(
    "strategies, says",
    [
        ([{"name": "freeze", "trainable_top_blocks": 1}], "backbone parameters train"),
        (["lora"], "backbone parameters train"),
        (["gradual_unfreeze"], "unfreezes backbone parameters later"),
    ],
)
def test_cache_features_is_refused_where_the_backbone_trains(probe_dir, tmp_path, strategies, says, capsys):
    from adaptkit.cli import main

    raw = probe_recipe(probe_dir, "bert", cache=True, strategies=strategies)
    raw["output"] = str(tmp_path / "runs")
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(raw))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.cache_features" in err and says in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


# -- frozen bottom layers build no graph --------------------------------------------------------


def saved_per_block(model, inputs) -> dict[int, int]:
    """How many tensors autograd keeps for backward while each block runs."""
    import torch

    from adaptkit.contract.anatomy import find_blocks

    _, blocks = find_blocks(model)
    current, saved = [None], {i: 0 for i in range(len(blocks))}
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))

    def pack(t):
        if current[0] is not None:
            saved[current[0]] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs).logits.sum().backward()
    return saved


def test_frozen_bottom_blocks_keep_nothing_for_backward(host):
    """freeze with the top block trainable: the blocks below it run as if under no_grad."""
    from adaptkit import apply
    from adaptkit.testing import tiny_inputs

    model = tiny_model("llama", "causal_lm", num_hidden_layers=3)
    adapted = apply(model, [{"name": "freeze", "trainable_top_blocks": 1}], host=host)
    saved = saved_per_block(adapted.model, tiny_inputs(adapted.model))
    assert saved[0] == saved[1] == 0
    assert saved[2] > 0


def test_gradual_unfreezing_early_phase_keeps_nothing_below_the_unfrozen_blocks(host):
    from adaptkit import apply
    from adaptkit.contract.strategy import TrainState
    from adaptkit.testing import tiny_inputs

    model = tiny_model("llama", "causal_lm", num_hidden_layers=3)
    adapted = apply(model, ["gradual_unfreeze"], host=host)
    adapted.on_event("train_start", TrainState(step=0, epoch=0, steps_per_epoch=10, total_steps=40))
    saved = saved_per_block(adapted.model, tiny_inputs(adapted.model))
    assert saved == {0: 0, 1: 0, 2: 0}  # the first phase trains the head only
    adapted.on_event("epoch_start", TrainState(step=10, epoch=1, steps_per_epoch=10, total_steps=40))
    saved = saved_per_block(adapted.model, tiny_inputs(adapted.model))
    assert saved[0] == saved[1] == 0 and saved[2] > 0
