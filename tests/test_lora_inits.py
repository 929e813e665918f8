"""LoRA initialisations that rewrite the base (PiSSA, OLoRA): the base keeps the residual, a
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
