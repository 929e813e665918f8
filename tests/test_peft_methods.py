"""The ``peft`` strategy: other peft methods by name, with real peft on tiny CPU models."""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adaptkit  # noqa: E402
from adaptkit import Adapted, ConfigError, StrategyError  # noqa: E402
from adaptkit.errors import CheckpointError, NotMergeableError  # noqa: E402
from adaptkit.testing import tiny_inputs, tiny_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

#: (method, options, family, task). Prompt methods need a task peft knows; they run on both.
CASES = [
    ("ia3", {}, "bert", "classification"),
    ("ia3", {}, "vit", "classification"),  # no peft default for ViT: the blocks' linear layers
    ("loha", {"r": 4, "alpha": 8}, "llama", "classification"),
    ("lokr", {"r": 4, "alpha": 8}, "bert", "classification"),
    ("vera", {"r": 8}, "llama", "classification"),
    ("prompt_tuning", {"num_virtual_tokens": 4}, "bert", "classification"),
    ("prompt_tuning", {"num_virtual_tokens": 4}, "llama", "causal_lm"),
    ("prefix_tuning", {"num_virtual_tokens": 4}, "llama", "classification"),
    ("prefix_tuning", {"num_virtual_tokens": 4}, "gpt2", "causal_lm"),
]
HEAD = {"bert": "classifier", "gpt2": "score", "llama": "score", "vit": "classifier"}
ids = [f"{m}-{f}-{t}" for m, _, f, t in CASES]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def train_steps(adapted, batch, steps=3):
    opt = torch.optim.AdamW(adapted.param_groups(1e-2, 0.1))
    adapted.model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        adapted.model(**batch).loss.backward()
        opt.step()
    adapted.model.eval()


def fresh_base(base_state, family, task):
    """The same backbone with a head initialised from another seed (exposes an unsaved head)."""
    fresh = tiny_model(family, task=task, seed=1)
    if task == "classification":
        head = HEAD[family] + "."
        fresh.load_state_dict({k: v for k, v in base_state.items() if not k.startswith(head)}, strict=False)
    else:
        fresh.load_state_dict(base_state)
    return fresh


@pytest.mark.parametrize("method, options, family, task", CASES, ids=ids)
def test_method_applies_trains_and_round_trips(host, tmp_path, method, options, family, task):
    model = tiny_model(family, task=task)
    batch = tiny_inputs(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    if (
        method == "prefix_tuning"
        and task == "classification"
        and "past_key_values" not in inspect.signature(model.model.forward).parameters
    ):
        # transformers >= 5.24 renamed the argument peft passes the prefix through: refused before a step fails
        with pytest.raises(
            StrategyError,
            match="prefix_tuning cannot adapt LlamaForSequenceClassification .*use prompt_tuning",
        ):
            adaptkit.apply(model, "peft", host=host, method=method, options=options)
        return
    adapted = adaptkit.apply(model, "peft", host=host, method=method, options=options)
    assert not adapted.model.training  # peft builds dropout in training mode: eval stays eval
    trainable = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in adapted.trainable_parameters())
    frozen = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if not p.requires_grad}
    if task == "classification":  # the new head trains and is saved with the method
        assert any(f"{HEAD[family]}.modules_to_save" in n for n in trainable)

    train_steps(adapted, batch)
    for name, p in adapted.model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, trainable[name]), f"{name} did not train"
        else:
            assert torch.equal(p, frozen[name]), f"frozen {name} changed"

    expected = logits(adapted.model, batch)
    adapted.save(tmp_path / "run")
    again = Adapted.load(fresh_base(base_state, family, task), tmp_path / "run", host=host, check_base=False)
    assert torch.allclose(logits(again.model, batch), expected, atol=1e-6, rtol=0)
    plain = peft.PeftModel.from_pretrained(
        fresh_base(base_state, family, task), str(tmp_path / "run" / "peft")
    )
    assert torch.allclose(logits(plain, batch), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["ia3", "loha", "lokr"])
def test_mergeable_methods_merge(host, method):
    model = tiny_model("bert")
    batch = tiny_inputs(model)
    adapted = adaptkit.apply(model, "peft", host=host, method=method)
    train_steps(adapted, batch, steps=2)
    expected = logits(adapted.model, batch)
    merged = adapted.merge()
    assert not isinstance(merged, peft.PeftModel)
    assert torch.allclose(logits(merged, batch), expected, atol=1e-5, rtol=0)


def test_prompt_methods_do_not_merge(host):
    adapted = adaptkit.apply(
        tiny_model("bert"), "peft", host=host, method="prompt_tuning", options={"num_virtual_tokens": 2}
    )
    with pytest.raises(NotMergeableError, match="prompt_tuning"):
        adapted.merge()


def test_bad_option_is_a_config_error_naming_it(host):
    with pytest.raises(ConfigError, match="target_modulez"):
        adaptkit.apply(
            tiny_model("bert"), "peft", host=host, method="ia3", options={"target_modulez": ["query"]}
        )
    with pytest.raises(ConfigError, match="peft_type"):
        adaptkit.apply(tiny_model("bert"), "peft", host=host, method="ia3", options={"peft_type": "LORA"})


def test_bad_option_value_is_a_config_error(host):
    with pytest.raises(ConfigError, match="oft"):
        adaptkit.apply(
            tiny_model("bert"), "peft", host=host, method="oft", options={"r": 4, "oft_block_size": 8}
        )


def test_unknown_method_lists_the_known_ones(host):
    with pytest.raises(ConfigError, match="unknown peft method 'ia4'.*ia3"):
        adaptkit.apply(tiny_model("bert"), "peft", host=host, method="ia4")
    with pytest.raises(ConfigError, match="'lora' strategy"):
        adaptkit.apply(tiny_model("bert"), "peft", host=host, method="lora")


def test_unknown_target_repeats_the_value(host):
    with pytest.raises(StrategyError, match="'nope'"):
        adaptkit.apply(
            tiny_model("bert"), "peft", host=host, method="loha", options={"target_modules": ["nope"]}
        )


def test_unsupported_layer_is_a_strategy_error(host):
    """LoHa has no GPT-2 Conv1D layer: a clear error, not a TypeError from deep inside peft."""
    with pytest.raises(StrategyError, match="Conv1D"):
        adaptkit.apply(tiny_model("gpt2"), "peft", host=host, method="loha")


def test_prompt_method_on_an_image_model_is_refused(host):
    with pytest.raises(StrategyError, match="prompt_tuning"):
        adaptkit.apply(
            tiny_model("vit"), "peft", host=host, method="prompt_tuning", options={"num_virtual_tokens": 2}
        )


def test_p_tuning_adapter_does_not_silently_load_wrong(host, tmp_path):
    """peft saves p-tuning's encoded prompts; loading them into a trainable model would encode them twice."""
    model = tiny_model("bert")
    adapted = adaptkit.apply(
        model,
        "peft",
        host=host,
        method="p_tuning",
        options={"num_virtual_tokens": 2, "encoder_hidden_size": 8},
    )
    adapted.save(tmp_path / "run")
    with pytest.raises(CheckpointError, match="p_tuning"):
        Adapted.load(tiny_model("bert"), tmp_path / "run", host=host)


def test_freeze_then_peft_method_keeps_the_top_block(host, tmp_path):
    model = tiny_model("llama")
    batch = tiny_inputs(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = adaptkit.apply(
        model, [{"name": "freeze", "trainable_top_blocks": 1}, {"name": "peft", "method": "ia3"}], host=host
    )
    top = {n for n, p in adapted.model.named_parameters() if p.requires_grad and "layers.2." in n}
    assert top and all("modules_to_save" in n for n in top)
    train_steps(adapted, batch, steps=2)
    expected = logits(adapted.model, batch)
    adapted.save(tmp_path / "run")
    again = Adapted.load(
        fresh_base(base_state, "llama", "classification"), tmp_path / "run", host=host, check_base=False
    )
    assert torch.allclose(logits(again.model, batch), expected, atol=1e-6, rtol=0)
