"""The two strategies written through the public plugin API only, as proof of the contract:
NEFTune (training-time only) and LISA (freezes blocks again). Their conformance is in
``test_conformance.py``; here, what each method itself promises."""

from __future__ import annotations

import math

import pytest
import torch

import adaptkit
from adaptkit.contract.strategy import TrainState
from adaptkit.errors import ConfigError, StrategyError
from adaptkit.host.specs import Setting, check_stack
from adaptkit.recipe.schema import validate
from adaptkit.testing import tiny_inputs, tiny_model
from adaptkit.testing.drive import Drive


def embeddings_output(model, batch):
    captured = {}
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()  # runs after NEFTune's hook: it sees the noisy output
    return captured["out"]


def test_neftune_adds_bounded_uniform_noise_in_training_only(host):
    base = tiny_model("llama", "causal_lm")
    batch = tiny_inputs(base)
    clean = embeddings_output(base, batch)
    adapted = adaptkit.apply(base, [{"name": "full"}, {"name": "neftune", "noise_alpha": 5.0}], host=host)
    assert torch.equal(embeddings_output(adapted.model.eval(), batch), clean)  # evaluation: untouched
    noise = embeddings_output(adapted.model.train(), batch) - clean
    bound = 5.0 / math.sqrt(batch["input_ids"].shape[1] * base.config.hidden_size)
    assert 0.5 * bound < noise.abs().max().item() <= bound
    assert abs(noise.mean().item()) < bound / 10  # centred
    merged = adapted.merge()
    assert torch.equal(embeddings_output(merged.train(), batch), embeddings_output(merged.train(), batch))


def test_neftune_saves_nothing_and_combines_with_full_but_not_alone(host, tmp_path):
    adapted = adaptkit.apply(tiny_model("bert"), ["full", "neftune"], host=host)
    adapted.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["adaptkit.json", "full"]
    with pytest.raises(StrategyError, match="only change how training runs"):
        adaptkit.apply(tiny_model("bert"), "neftune", host=host)


def test_declared_tasks_are_checked_before_anything_loads(host):
    """NEFTune perturbs token embeddings: an image task is refused from the recipe alone."""
    with pytest.raises(StrategyError, match="supports the tasks .* not 'image_classification'"):
        host.build_strategies(["full", "neftune"], setting=Setting(task="image_classification"))
    raw = {
        "model": {"source": "unused", "task": "image_classification"},
        "data": {"source": "unused"},
        "strategies": ["full", "neftune"],
    }
    with pytest.raises(ConfigError, match="not 'image_classification'"):
        validate(raw, host=host)


def test_declared_launches_are_checked(host):
    with pytest.raises(StrategyError, match="does not run under a sharded launch"):
        host.build_strategies(["lisa"], setting=Setting(task="classification", launch="sharded"))
    # QLoRA under FSDP or DeepSpeed: refused, saying why; plain LoRA is not
    qlora = [{"name": "lora", "quantize": "4bit"}]
    with pytest.raises(StrategyError, match=r"does not run under a sharded launch.*bnb_4bit_quant_storage"):
        host.build_strategies(qlora, setting=Setting(task="classification", launch="sharded"))
    host.build_strategies(qlora, setting=Setting(task="classification", launch="ddp"))
    host.build_strategies(["lora"], setting=Setting(task="classification", launch="sharded"))


def test_a_strategy_that_cannot_work_on_a_quantized_base_is_refused_after_qlora(host):
    class NoQuant(adaptkit.Strategy):
        quantized_base = False

    stack = host.build_strategies([{"name": "lora", "quantize": "4bit"}, "neftune"])
    stack[1].__class__ = type("NoQuantNEFTune", (type(stack[1]),), {"quantized_base": False})
    with pytest.raises(
        StrategyError, match="does not work on a quantized base, and 'lora' before it quantizes"
    ):
        check_stack(stack)
    check_stack(host.build_strategies([{"name": "lora"}, "neftune"]))  # no quantization: fine
    assert NoQuant.capabilities()["quantized_base"] is False


def test_lisa_trains_the_drawn_blocks_and_everything_outside_them(host):
    adapted = adaptkit.apply(
        tiny_model("llama", "causal_lm"), {"name": "lisa", "active_layers": 1, "interval": 2}, host=host
    )
    lisa, model = adapted.strategies[0], adapted.model
    blocks = [
        {n for n, _ in model.named_parameters() if n.startswith(f"model.layers.{i}.")} for i in range(3)
    ]
    draws = []
    for step in range(12):
        adapted.on_event("step_start", TrainState(step=step, seed=7))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        (active,) = lisa.draw(7, step)
        drawn_out = set().union(*(b for i, b in enumerate(blocks) if i != active))
        assert trainable == {n for n, _ in model.named_parameters()} - drawn_out
        draws.append(active)
    assert all(draws[i] == draws[i + 1] for i in range(0, 12, 2))  # one draw per interval
    assert len(set(draws)) > 1
    assert [lisa.draw(8, s) for s in range(0, 40, 2)] != [
        lisa.draw(7, s) for s in range(0, 40, 2)
    ]  # seeds differ


def test_lisa_drops_the_optimizer_state_of_blocks_drawn_out(host):
    model = tiny_model("llama", "causal_lm")
    adapted = adaptkit.apply(model, {"name": "lisa", "active_layers": 1, "interval": 2}, host=host)
    batches = [tiny_inputs(model, seed=i) for i in range(6)]
    drive = Drive(adapted, batches, seed=0)
    drive.run(6)
    with_state = {id(p) for p in drive.optimizer.state}
    trainable = {id(p) for p in adapted.model.parameters() if p.requires_grad}
    assert with_state == trainable  # the blocks drawn out before hold no state
    draws = {tuple(adapted.strategies[0].draw(0, s)) for s in range(6)}
    assert len(draws) > 1, "the test needs the draw to change within 6 steps"


def test_adaptkit_strategies_shows_the_declared_capabilities(capsys):
    import json

    from adaptkit.cli import main

    assert main(["strategies", "--json"]) == 0
    rows = {row["name"]: row["capabilities"] for row in json.loads(capsys.readouterr().out)}
    assert rows["neftune"]["saves"] == "nothing (training-time only)"
    assert rows["neftune"]["tasks"] == ["classification", "causal_lm", "language_modeling"]
    assert rows["full"]["combines"] == "only with training-only strategies"
    assert rows["adapters"]["mergeable"] is False and rows["lora"]["mergeable"] is True
    assert rows["lisa"]["launches"] == ["ddp", "single"]
    assert rows["lora"]["launches"] == ["ddp", "sharded", "single"]
    assert main(["strategies"]) == 0
    assert "not mergeable; saves its weights; combines with others" in capsys.readouterr().out


def test_strategies_declare_the_learning_rates_that_suit_them(host):
    """What trains decides the range: a probe's head learns at rates that would wreck full fine-tuning."""
    probe, partial = (
        host.build_strategies(["freeze"]),
        host.build_strategies([{"name": "freeze", "trainable_top_blocks": 1}]),
    )
    assert probe[0].lr_range == (1e-3, 1e-1) and partial[0].lr_range == (1e-5, 1e-3)
    full, lora = host.strategy("full").obj, host.strategy("lora").obj
    assert full.lr_range[1] < lora.lr_range[1] < probe[0].lr_range[1]
    assert full.capabilities()["learning_rates"] == [1e-5, 1e-4]
    assert host.strategy("neftune").obj.capabilities()["learning_rates"] is None  # trains nothing itself
