"""adaptkit's attention with dropout on the CPU (adaptkit/attention.py): the same function as
softmax, dropout and a product written out, less kept for the backward pass, and everything else
handed to transformers' SDPA attention."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from adaptkit.kernels.attention import (
    ATTENTION_NAME,
    DropoutAttention,
    attention_forward,
    dropout_attention,
    handled_here,
    use_cpu_dropout_attention,
)
from adaptkit.testing import tiny_inputs, tiny_model

B, HEADS, S, D = 3, 4, 10, 8


def qkv(kv_heads: int = HEADS, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, HEADS, S, D), (B, kv_heads, S, D), (B, kv_heads, S, D)]
    return [torch.randn(*s, generator=g, dtype=dtype, requires_grad=True) for s in shapes]


def written_out(q, k, v, mask, p, scale, groups=1, causal=False, seed=0):
    """Attention as plain autograd ops, with the keep mask drawn as adaptkit draws it after ``manual_seed(seed)``."""
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) * scale
    if causal:
        mask = torch.ones(S, S, dtype=torch.bool).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with every key masked attends to nothing
    torch.manual_seed(seed)
    keep = torch.rand(probs.shape) >= p
    return (probs * keep / (1 - p) @ v).transpose(1, 2)


def padding_mask():
    mask = torch.ones(B, 1, S, S, dtype=torch.bool)
    mask[0, :, :, -3:] = False  # right padding
    mask[1, :, 4] = False  # one query row that sees no key at all
    return mask


MASKS = {
    "padding (bool)": lambda: padding_mask(),
    "additive (float)": lambda: torch.randn(B, 1, S, S) * 3,
    "none": lambda: None,
}


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_it_is_the_written_out_attention_with_the_same_dropout_mask(mask_name):
    mask = MASKS[mask_name]()
    module = SimpleNamespace(is_causal=False)
    outs, grads = [], []
    for fn in (
        lambda q, k, v: dropout_attention(module, q, k, v, mask, 0.25, 0.3, None),
        lambda q, k, v: written_out(q, k, v, mask, 0.25, 0.3),
    ):
        q, k, v = qkv()
        torch.manual_seed(0)
        out = fn(q, k, v)
        out.pow(2).sum().backward()
        outs.append(out)
        grads.append([t.grad for t in (q, k, v)])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for mine, ref in zip(*grads):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)
    q, k, v = qkv()
    assert not torch.allclose(
        outs[0], written_out(q, k, v, mask, 0.0, 0.3)
    )  # some probabilities were dropped


def test_grouped_key_value_heads_and_is_causal_as_sdpa_reads_them():
    module = SimpleNamespace(is_causal=True, num_key_value_groups=2)
    q, k, v = qkv(kv_heads=HEADS // 2)
    torch.manual_seed(3)
    mine = dropout_attention(module, q, k, v, None, 0.1, None, None)
    mine.sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = written_out(q, k, v, None, 0.1, D**-0.5, groups=2, causal=True, seed=3)
    ref.sum().backward()
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    for a, t in zip(got, (q, k, v)):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-4)
    # a query sees no later key: changing the last value changes only the last position
    v2 = v.detach().clone()
    v2[:, :, -1] += 1
    torch.manual_seed(3)
    moved = dropout_attention(module, q.detach(), k.detach(), v2, None, 0.1, None, None)
    assert torch.equal(moved[:, :-1], mine.detach()[:, :-1]) and not torch.equal(
        moved[:, -1], mine.detach()[:, -1]
    )


def test_the_backward_formula_passes_gradcheck():
    q, k, v = (t.detach().double().requires_grad_() for t in qkv())
    mask = padding_mask()

    def f(q, k, v):
        torch.manual_seed(1)  # the same dropout mask on every evaluation
        return DropoutAttention.apply(q, k, v, mask, 0.3, 0.5)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_it_drops_a_fraction_p_and_rescales_the_rest():
    # uniform attention over 128 keys of value 1: a row's output is the fraction of keys kept / (1 - p)
    module = SimpleNamespace(is_causal=False)
    for p in (0.1, 0.5):
        q, k = torch.zeros(8, 8, 64, 16), torch.zeros(8, 8, 128, 16)
        v = torch.ones(8, 8, 128, 16)
        torch.manual_seed(0)
        rows = dropout_attention(module, q, k, v, None, p, None, False)[..., 0]
        kept = rows * (1 - p)
        assert abs(rows.mean().item() - 1) < 0.01  # unbiased
        # each key kept independently with probability 1 - p: the spread of a row's kept fraction
        assert kept.var().item() == pytest.approx(p * (1 - p) / 128, rel=0.15)


def saved_bytes(fn) -> tuple[torch.Tensor, dict[int, tuple[torch.dtype, int]]]:
    saved: dict[int, tuple[torch.dtype, int]] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_it_keeps_no_attention_sized_float_tensor_for_the_backward():
    q, k, v = qkv()
    mask = padding_mask()
    module = SimpleNamespace(is_causal=False)
    _, mine = saved_bytes(lambda: attention_forward(module, q, k, v, mask, dropout=0.1)[0])
    _, math = saved_bytes(lambda: sdpa_attention_forward(module, q, k, v, mask, dropout=0.1)[0])
    attention_sized = B * HEADS * S * S
    # q, k, v and the output (float32), a log-sum-exp per row, the mask given, and the keep mask as booleans
    assert (
        sum(n for _, n in mine.values())
        == 4 * 4 * B * HEADS * S * D + 4 * B * HEADS * S + mask.numel() + attention_sized
    )
    assert [n for dtype, n in mine.values() if dtype == torch.bool and n == attention_sized] == [
        attention_sized
    ]
    assert not [n for dtype, n in mine.values() if dtype != torch.bool and n >= 4 * attention_sized]
    # torch's math path (what SDPA runs on a CPU with dropout) keeps attention-sized floats
    assert (
        sum(n for dtype, n in math.values() if dtype != torch.bool and n >= 4 * attention_sized)
        >= 2 * 4 * attention_sized
    )


def test_every_other_call_goes_to_sdpa():
    q, k, v = qkv()
    module = SimpleNamespace(is_causal=False)
    mask = padding_mask()
    # no dropout (evaluation): bitwise what transformers' SDPA attention gives
    assert torch.equal(
        attention_forward(module, q, k, v, mask, dropout=0.0)[0],
        sdpa_attention_forward(module, q, k, v, mask)[0],
    )
    assert not handled_here(module, q, k, mask, 0.0, None)
    assert handled_here(module, q, k, mask, 0.1, None)
    # half precision, a position bias, a soft cap, a mask that trains, a prefill with more keys than queries
    assert not handled_here(module, q.bfloat16(), k, mask, 0.1, None)
    assert not handled_here(module, q, k, mask, 0.1, None, position_bias=torch.zeros(1, HEADS, S, S))
    assert not handled_here(module, q, k, mask, 0.1, None, softcap=30.0)
    assert not handled_here(module, q, k, mask.float().requires_grad_(), 0.1, None)
    assert not handled_here(module, q, torch.cat([k, k], 2), None, 0.1, True)
    bf = [t.detach().bfloat16() for t in (q, k, v)]
    torch.manual_seed(0)
    got = attention_forward(module, *bf, mask, dropout=0.1)[0]
    torch.manual_seed(0)
    assert torch.equal(got, sdpa_attention_forward(module, *bf, mask, dropout=0.1)[0])


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_model_switched_to_it_trains_and_evaluates_as_before(family, tmp_path):
    import transformers

    model = tiny_model(family, "classification")
    reference = tiny_model(family, "classification")
    inputs = tiny_inputs(model)
    assert use_cpu_dropout_attention(model)
    assert model.config._attn_implementation == ATTENTION_NAME
    # evaluation has no dropout: the same logits, bit for bit
    assert torch.equal(model(**inputs).logits, reference(**inputs).logits)
    # training: the attention dropout is adaptkit's, and nothing attention-sized is kept in float32
    model.train()
    _, saved = saved_bytes(lambda: model(**inputs).loss.backward())
    attention_sized = 4 * 2 * 8 * 8  # batch x heads x sequence x sequence
    assert [n for dtype, n in saved.values() if dtype == torch.bool and n == attention_sized]
    assert not [n for dtype, n in saved.values() if dtype != torch.bool and n == 4 * attention_sized]
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
    )
    # what it saves names no attention function of adaptkit's: plain transformers loads it
    model.save_pretrained(tmp_path)
    assert ATTENTION_NAME not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    model.eval()
    assert torch.equal(again(**inputs).logits, model(**inputs).logits)


def test_a_model_without_dropout_or_on_another_attention_is_left_alone():
    model = tiny_model("bert", "classification")
    model.set_attn_implementation("eager")
    assert not use_cpu_dropout_attention(model)
    assert model.config._attn_implementation == "eager"
    llama = tiny_model("llama", "causal_lm")  # attention_dropout 0.0: nothing to gain
    assert not use_cpu_dropout_attention(llama)
    assert llama.config._attn_implementation == "sdpa"
    llama = tiny_model("llama", "causal_lm", attention_dropout=0.1)
    assert use_cpu_dropout_attention(llama)


def test_training_switches_a_model_with_dropout_and_learns(tmp_path, host):
    """adaptkit's training runs BERT (attention dropout 0.1) on this attention; the run learns, and
    what it saves reloads in plain transformers with SDPA."""
    from adaptkit.recipe.schema import validate
    from adaptkit.runs import evaluate_run, open_run
    from adaptkit.testing import load_recipe_model, save_tiny_pretrained, write_sentiment
    from adaptkit.train.loop import train

    save_tiny_pretrained(tmp_path / "bert", "bert")
    write_sentiment(tmp_path / "train.jsonl", 160, seed=0)
    recipe = validate(
        {
            "model": {"source": str(tmp_path / "bert"), "task": "classification"},
            "data": {"source": str(tmp_path / "train.jsonl"), "max_length": 16},
            "strategies": ["full"],
            "train": {"epochs": 4, "micro_batch_size": 16, "lr": 3e-3, "seed": 0},
            "name": "bert-dropout",
            "output": str(tmp_path / "runs" / "{name}"),
        },
        host=host,
    )
    loaded = load_recipe_model(recipe, host)
    assert loaded.model.config.attention_probs_dropout_prob == 0.1
    summary = train(recipe, host, fresh=True, loaded_model=loaded)
    assert loaded.model.config._attn_implementation == ATTENTION_NAME
    assert summary["final_metrics"]["accuracy"] >= 0.8, summary["final_metrics"]
    # the run reopened (a fresh load, transformers' own attention) evaluates the same
    run = open_run(tmp_path / "runs" / recipe.name, host)
    assert run.adapted.model.config._attn_implementation == "sdpa"
    again = evaluate_run(run)
    assert again["accuracy"] == pytest.approx(summary["final_metrics"]["accuracy"])
    assert again["eval_loss"] == pytest.approx(summary["final_metrics"]["eval_loss"], rel=1e-5)
