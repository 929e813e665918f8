"""The chunked causal-LM loss (adaptkit.kernels.lm_loss) against transformers' own, on every architecture it covers."""

from __future__ import annotations

import copy
import types
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import transformers as tf

from adaptkit.kernels import lm_loss
from adaptkit.kernels.lm_loss import MODEL_TYPES, causal_lm_loss, model_loss, output_layer, training_loss

V = 300
CAUSAL = types.SimpleNamespace(auto_model="AutoModelForCausalLM")
SMALL = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**SMALL),
    "mistral": lambda: tf.MistralConfig(**SMALL),
    "qwen2": lambda: tf.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "qwen3": lambda: tf.Qwen3Config(**SMALL),
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=V,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    ),
}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 tokens, so that a batch goes through the output layer in several pieces."""
    monkeypatch.setitem(lm_loss.CHUNK_BYTES, "cpu", 7 * 4 * V)


def batch(seed: int = 0) -> dict:
    """Three rows: a masked prompt, padding at the end, and one row fully supervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    labels = ids.clone()
    labels[0, :6] = -100
    labels[1, 11:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_covered_architectures_are_the_tested_ones():
    assert set(CONFIGS) == MODEL_TYPES


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_same_loss_and_gradients_as_transformers(family, small_chunks):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[family]()).train()
    ours = copy.deepcopy(model)
    b = batch()

    expected = model_loss(model, b)
    expected.backward()
    loss_fn = training_loss(ours, CAUSAL, "NO", nullcontext)
    assert loss_fn is not model_loss
    loss = loss_fn(ours, b)
    loss.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    want, got = grads(model), grads(ours)
    assert want.keys() == got.keys() and len(want) == len(
        list(model.parameters())
    )  # the head's weight included
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    # the output layer is itself again: evaluation gets real logits
    assert (
        output_layer(ours)(torch.zeros(1, model.config.hidden_size if family != "gpt2" else 32)).shape[-1]
        == V
    )


def test_with_lora_the_frozen_head_gets_no_gradient_and_lora_the_same(host, small_chunks):
    import adaptkit

    torch.manual_seed(0)
    lora = [{"name": "lora", "r": 4, "init": "random"}]  # B != 0: A gets gradients too
    model = adaptkit.apply(tf.AutoModelForCausalLM.from_config(CONFIGS["llama"]()), lora, host=host).model
    ours = copy.deepcopy(model)
    b = batch(1)
    model_loss(model, b).backward()
    loss_fn = training_loss(ours, CAUSAL, "NO", nullcontext)
    loss_fn(ours, b).backward()
    want, got = grads(model), grads(ours)
    assert want.keys() == got.keys() and all("lora_" in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)


def test_bf16_autocast_matches_the_models_loss_under_autocast():
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).train()
    ours = copy.deepcopy(model)
    b = batch(2)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with autocast():
        expected = model_loss(model, b)
    expected.backward()
    loss_fn = training_loss(ours, CAUSAL, "NO", autocast)
    with autocast():  # as Accelerate's wrapper runs the model's forward
        loss = loss_fn(ours, b)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    head = ours.lm_head.weight
    cos = torch.nn.functional.cosine_similarity(
        head.grad.flatten(), model.lm_head.weight.grad.flatten(), dim=0
    )
    assert cos > 0.99 and head.grad.dtype == torch.float32


def test_a_biased_head_and_a_scaled_backward_match_plain_cross_entropy(small_chunks):
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 32, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(32, V, dtype=torch.float64)
    labels = torch.randint(0, V, (2, 12))
    labels[1, :4] = -100
    loss = causal_lm_loss(hidden, labels, head.weight, head.bias)
    (3 * loss).backward()  # gradient accumulation and loss weighting scale what reaches the loss
    ours = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = head.weight.grad = head.bias.grad = None
    logits = head(hidden)[:, :-1].reshape(-1, V)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    (3 * expected).backward()
    torch.testing.assert_close(loss, expected)
    for got, want in zip(ours, [hidden.grad, head.weight.grad, head.bias.grad]):
        torch.testing.assert_close(got, want)


def test_no_supervised_token_gives_zero_and_no_gradient():
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    weight = torch.randn(V, 8, requires_grad=True)
    loss = causal_lm_loss(hidden, torch.full((1, 5), -100), weight)
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


def test_nothing_logits_sized_is_kept_for_the_backward(small_chunks):
    """transformers' loss keeps batch x seq x vocab log-probabilities; the chunked one keeps no such tensor."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).train()
    loss_fn = training_loss(model, CAUSAL, "NO", nullcontext)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: list[torch.Size] = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model_loss(model, batch())
    assert any(s[-1] == V for s in saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model, batch())
    assert saved and not any(len(s) and s[-1] == V for s in saved)


def test_where_the_models_own_loss_is_used(host):
    import adaptkit

    llama = lambda: tf.AutoModelForCausalLM.from_config(CONFIGS["llama"]())  # noqa: E731
    assert (
        training_loss(llama(), CAUSAL, "FSDP", nullcontext) is model_loss
    )  # weights sharded outside a layer's forward
    assert training_loss(llama(), CAUSAL, "DEEPSPEED", nullcontext) is model_loss
    assert (
        training_loss(
            llama(), types.SimpleNamespace(auto_model="AutoModelForSequenceClassification"), "NO", nullcontext
        )
        is model_loss
    )
    # soft-capped logits (Gemma 2) are not the output layer's
    gemma2 = tf.AutoModelForCausalLM.from_config(tf.Gemma2Config(**SMALL))
    assert output_layer(gemma2) is None
    # an adapted output layer computes more than its weight
    lora_head = adaptkit.apply(
        llama(), [{"name": "lora", "r": 4, "target_modules": ["q_proj", "lm_head"]}], host=host
    ).model
    assert output_layer(lora_head) is None
    # prompt tuning prepends virtual tokens inside peft's forward
    prompt = adaptkit.apply(
        llama(),
        [{"name": "peft", "method": "prompt_tuning", "options": {"num_virtual_tokens": 4}}],
        host=host,
    ).model
    assert output_layer(prompt) is None
    assert output_layer(adaptkit.apply(llama(), [{"name": "lora", "r": 4}], host=host).model) is not None


def test_evaluation_computes_the_models_loss_without_its_logits(monkeypatch):
    """adaptkit's evaluation of a causal LM goes through the chunked loss and reports transformers' loss."""
    from accelerate import Accelerator

    from adaptkit.train.context import Run
    from adaptkit.train.evaluate import evaluate
    from adaptkit_plugins.tasks import CausalLM

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    batches = [batch(0), batch(1)]
    with torch.no_grad():
        expected = sum(model_loss(model.eval(), b).double() * 3 for b in batches) / 6
    calls = []
    monkeypatch.setattr(lm_loss, "causal_lm_loss", lambda *a, **k: calls.append(1) or causal_lm_loss(*a, **k))
    run = Run(
        recipe=None, host=None, run_dir=Path("."), accelerator=Accelerator(cpu=True), task=CausalLM(None)
    )
    metrics = evaluate(run, model.train(), batches)
    assert len(calls) == 2 and model.training  # the chunked loss, once a batch; the mode restored
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-6)
