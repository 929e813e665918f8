"""LoRA initialisations that rewrite the base (PiSSA, OLoRA, LoftQ). PiSSA and OLoRA: the base keeps the residual, a
checkpoint holds the adapter only (re-applying rebuilds the residual), and an export is peft's own
conversion to a plain LoRA of rank 2r that applies to the untouched base."""

from __future__ import annotations

import pytest
import torch

import adaptkit
from adaptkit.errors import ConfigError, StrategyError
from adaptkit.testing import tiny_inputs, tiny_model
from adaptkit.testing.drive import Drive, logits

INITS = ["pissa", "olora"]


@pytest.mark.parametrize("init", INITS)
def test_the_initialised_model_computes_what_the_base_does(host, init):
    base = tiny_model("llama", "causal_lm")
    batch = tiny_inputs(base)
    expected = logits(base, batch)
    adapted = adaptkit.apply(
        tiny_model("llama", "causal_lm"), {"name": "lora", "r": 4, "init": init}, host=host
    )
    torch.testing.assert_close(logits(adapted.model, batch), expected, atol=1e-5, rtol=1e-5)
    # and the base weights were rewritten: the residual is not the original weight
    q = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert not torch.equal(
        dict(adapted.model.named_parameters())[q], base.model.layers[0].self_attn.q_proj.weight
    )


@pytest.mark.parametrize("init", INITS)
def test_an_export_is_a_plain_lora_of_rank_2r_on_the_untouched_base(host, init, tmp_path):
    import json

    import peft

    model = tiny_model("llama", "causal_lm")
    batch = tiny_inputs(model)
    adapted = adaptkit.apply(model, {"name": "lora", "r": 4, "init": init}, host=host)
    Drive(adapted, [tiny_inputs(model, seed=i) for i in range(4)]).run(4)
    expected = logits(adapted.model, batch)
    adapted.strategies[0].export(adapted.model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8  # a plain LoRA, rank 2r
    plain = peft.PeftModel.from_pretrained(tiny_model("llama", "causal_lm"), tmp_path)  # the untouched base
    torch.testing.assert_close(logits(plain, batch), expected, atol=1e-4, rtol=1e-4)
    merged = adapted.merge()  # the residual base plus the trained adapter
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-4, rtol=1e-4)


def test_a_base_rewriting_init_on_a_quantized_base_is_refused(host):
    with pytest.raises(
        (StrategyError, ConfigError), match="init pissa decomposes full-precision base weights"
    ):
        host.build_strategies([{"name": "lora", "init": "pissa", "quantize": "4bit"}])


# -- LoftQ: a 4-bit base and its adapter fitted together ------------------------------------------


def quantization_error(adapted, base, name: str) -> float:
    """How far the adapted layer (dequantized base plus scaled adapter) is from the float weight."""
    import bitsandbytes.functional as bnbf

    layer = adapted.model.get_base_model().get_submodule(name)
    weight = layer.base_layer.weight
    approx = bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    approx = (
        approx + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    return float((approx - base.get_submodule(name).weight).norm())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loftq_starts_nearer_the_float_model_than_plain_qlora_and_iterating_helps(host, family):
    """Plain QLoRA starts from the quantized weight (its adapter adds nothing); LoftQ's adapter
    holds the best rank-r part of what quantization lost, layer by layer and in the logits."""
    base = tiny_model(family, "causal_lm")
    batch = tiny_inputs(base)
    expected = logits(base, batch)
    qlora = {"name": "lora", "r": 4, "quantize": "4bit"}
    plain = adaptkit.apply(tiny_model(family, "causal_lm"), qlora, host=host)
    one = adaptkit.apply(tiny_model(family, "causal_lm"), qlora | {"init": "loftq"}, host=host)
    three = adaptkit.apply(
        tiny_model(family, "causal_lm"), qlora | {"init": "loftq", "loftq_iterations": 3}, host=host
    )
    layer = "model.layers.0.self_attn.q_proj" if family == "llama" else None
    if layer:  # GPT-2's Conv1D weights are stored transposed: compared through the logits alone
        errors = [quantization_error(a, base, layer) for a in (plain, one, three)]
        assert errors[1] < 0.9 * errors[0] and errors[2] <= errors[1] * 1.0001, errors
    gaps = [float((logits(a.model, batch) - expected).pow(2).mean()) for a in (plain, one)]
    assert gaps[1] < 0.8 * gaps[0], gaps


@pytest.mark.parametrize(
    "config",
    [
        {"init": "loftq"},
        {"init": "loftq", "quantize": "8bit"},
        {"init": "loftq", "quantize": "4bit", "use_dora": True},
    ],
    ids=["no-quantize", "8bit", "dora"],
)
def test_loftq_needs_a_4bit_base_without_dora(host, config):
    with pytest.raises((StrategyError, ConfigError), match="init loftq fits the adapter to a 4-bit base"):
        host.build_strategies([{"name": "lora", **config}])


def test_a_loftq_adapter_exports_only_merged(host, tmp_path):
    model = tiny_model("llama", "causal_lm")
    adapted = adaptkit.apply(model, {"name": "lora", "r": 4, "quantize": "4bit", "init": "loftq"}, host=host)
    with pytest.raises(StrategyError, match="export the merged model"):
        adapted.strategies[0].export(adapted.model, tmp_path)
