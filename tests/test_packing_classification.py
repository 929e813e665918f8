"""Padding-free packing for ``classification`` (``data.packing``): BERT-style encoders pooling by cls or mean.

Every model is a real tiny BERT (or GPT-2) in float32. A packed batch gives each sequence the
logits it gets unpacked, the same loss and every parameter the same gradient; no sequence sees
another; a head that cannot pool each packed sequence, or an attention that would let packed
sequences see each other, is refused before training.
"""

from __future__ import annotations

import copy
import json
import random
from contextlib import nullcontext

import pytest
import torch

import adaptkit
from adaptkit.errors import ConfigError
from adaptkit.kernels.lm_loss import check_packing, packed_model_inputs, training_loss
from adaptkit.recipe.schema import DataSpec, ModelSpec
from adaptkit.testing import save_tiny_pretrained, tiny_model, tiny_tokenizer
from adaptkit_plugins.tasks.classification import Classification
from adaptkit_plugins.tasks.packing import (
    pack_lengths,
    pack_sequence_rows,
    padding_position,
)

V = 128
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def task(packing: bool = True, pooling: str = "auto") -> Classification:
    out = Classification(DataSpec(source="x", packing=packing, max_length=24))
    out.model_spec = ModelSpec(source="x", pooling=pooling)
    out.names, out.ids = ["0", "1", "2"], {"0": 0, "1": 1, "2": 2}
    out.packing = packing  # what the host decides for a run (adaptkit.adapt.packing)
    return out


def bert(pooling: str, dropout: bool = False, attention: str = "sdpa"):
    model = tiny_model("bert", **({} if dropout else NO_DROPOUT))
    model.set_attn_implementation(attention)
    task(pooling=pooling).prepare_model(model, tiny_tokenizer("bert"))
    return model


def sequences(seed: int = 0, n: int = 7) -> list[dict]:
    """``n`` encoded text pairs of 3 to 16 tokens ([CLS] first, token types 0 then 1), labels 0..2."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 7), rng.randint(0, 7)
        ids = [2] + [rng.randrange(5, V) for _ in range(a)] + [3] + [rng.randrange(5, V) for _ in range(b)]
        types = [0] * (a + 2) + [1] * b
        out.append({"input_ids": ids, "token_type_ids": types, "labels": rng.randrange(3)})
    return out


def batches(seqs: list[dict], capacity: int = 24) -> tuple[dict, dict, list[int]]:
    """The sequences padded one a row, packed (several rows); and the sequences' order in the packed batch."""
    collate = task(False).collate(tiny_tokenizer("bert"))
    unpacked = collate([{**s, "attention_mask": [1] * len(s["input_ids"])} for s in seqs])
    cols = pack_sequence_rows({k: [s[k] for s in seqs] for k in seqs[0]}, capacity)
    rows = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
    packed = collate(rows)
    order = [i for row in pack_lengths([len(s["input_ids"]) for s in seqs], capacity) for i in row]
    assert 1 < len(rows) < len(seqs)
    return unpacked, packed, order


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 5e-5, floor: float = 1e-10) -> None:
    """``got`` within ``rel`` of ``want`` in norm: float32 sums in another order when packed.

    ``floor`` is for gradients that are 0 in exact arithmetic and rounding alone (about 1e-12) in
    float32: the attention's key biases (softmax ignores a shift shared by all keys).
    """
    diff = float((got.double() - want.double()).norm())
    assert diff <= rel * float(want.double().norm()) + floor, (
        f"{diff:.3g} off a norm of {float(want.norm()):.3g}"
    )


def test_packed_rows_keep_sequences_whole_with_one_label_per_sequence():
    seqs = sequences(0, 12)
    unpacked, packed, order = batches(seqs)
    lengths = [len(s["input_ids"]) for s in seqs]
    assert packed["labels"].tolist() == [seqs[i]["labels"] for i in order]
    assert int(packed["attention_mask"].sum()) == sum(lengths) == int(unpacked["attention_mask"].sum())
    # the loop weights a micro-batch by its sequences, packed or not
    assert task().loss_items(packed) == task(False).loss_items(unpacked) == len(seqs)
    flat = {k: packed[k][packed["attention_mask"].bool()].tolist() for k in ("input_ids", "token_type_ids")}
    assert flat["input_ids"] == [t for i in order for t in seqs[i]["input_ids"]]
    assert flat["token_type_ids"] == [t for i in order for t in seqs[i]["token_type_ids"]]
    for r, row in enumerate(packed["position_ids"].tolist()):
        real = int(packed["attention_mask"][r].sum())
        # every sequence a run 0, 1, 2, ...; the padding one position, never 0, never continuing
        assert set(row[real:]) <= {padding_position(row[:real])} and 0 not in row[real:]
        if real < len(row):
            assert row[real] != row[real - 1] + 1
    assert padding_position([0, 1, 0]) == 2 and padding_position([0, 1]) == 1


def test_a_task_packs_text_pairs_encoded_by_the_tokenizer():
    import datasets

    tok = tiny_tokenizer("bert")
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]  # as BERT's own tokenizer
    rng = random.Random(1)
    words = ["good", "bad", "movie", "the", "plot"]
    rows = [
        {"a": " ".join(rng.choices(words, k=rng.randint(1, 6))), "b": "the plot", "label": rng.choice("xy")}
        for _ in range(20)
    ]
    ds = datasets.Dataset.from_list(rows)
    t = Classification(DataSpec(source="x", text="a", text_pair="b", packing=True, max_length=32))
    t.setup({"train": ds, "validation": ds}, {"train": "t.jsonl", "validation": "v.jsonl"})
    encoded = t.encode(ds, tok, "t.jsonl")
    packed = t.pack(encoded)
    assert len(packed) < len(encoded) and all(len(r) <= 32 for r in packed["input_ids"])
    assert sum(len(r) for r in packed["labels"]) == len(encoded)
    assert sorted(x for r in packed["labels"] for x in r) == sorted(encoded["labels"])
    assert packed["input_ids"] == t.pack(t.encode(ds, tok, "t.jsonl"))["input_ids"]  # the same every time
    batch = t.collate(tok)([packed[i] for i in range(len(packed))])
    assert batch["labels"].shape == (len(encoded),) and "token_type_ids" in batch
    assert int(batch["token_type_ids"].sum()) == sum(sum(r) for r in encoded["token_type_ids"]) > 0


@pytest.mark.parametrize(
    "pooling, strategy, attention",
    [(p, s, "sdpa") for p in ("cls", "mean") for s in ("full", "lora")] + [("mean", "full", "eager")],
)
def test_packed_logits_loss_and_gradients_equal_unpacked(pooling, strategy, attention, host):
    model = bert(pooling, attention=attention).train()
    assert model.config._attn_implementation == attention
    if strategy == "lora":
        model = adaptkit.apply(model, [{"name": "lora", "r": 4, "init": "random"}], host=host).model
    other = copy.deepcopy(model)
    unpacked, packed, order = batches(sequences(1))

    with torch.no_grad():
        want = model(**unpacked).logits[order]
        got = model(**packed_model_inputs(packed)).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    loss = training_loss(model, task(False), "NO", nullcontext)(model, unpacked)
    packed_loss = training_loss(other, task(), "NO", nullcontext)(other, packed)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-6, atol=1e-7)
    loss.backward()
    packed_loss.backward()
    want_g, got_g = grads(model), grads(other)
    assert want_g.keys() == got_g.keys() and len(want_g) > 4
    for name in want_g:
        close(got_g[name], want_g[name])


def test_flattened_for_flash_attention_gives_the_same_logits():
    """Flash attention reads packing from one flattened row; the flattening keeps one label per sequence."""
    model = bert("mean")
    unpacked, packed, order = batches(sequences(2))
    flat = packed_model_inputs(packed, attention="flash_attention_2")
    n = int(packed["attention_mask"].sum())
    assert "attention_mask" not in flat
    assert all(flat[k].shape == (1, n) for k in ("input_ids", "token_type_ids", "position_ids"))
    assert torch.equal(flat["labels"], packed["labels"])
    with torch.no_grad():
        torch.testing.assert_close(
            model(**flat).logits, model(**unpacked).logits[order], rtol=1e-5, atol=1e-6
        )


def logits_of_others(model, seqs: list[dict], inputs=packed_model_inputs) -> torch.Tensor:
    """The logits of every sequence but the first, all packed into rows with it."""
    _, packed, order = batches(seqs, capacity=48)
    given = {k: v for k, v in inputs(packed).items() if k != "labels"}
    torch.manual_seed(0)  # the same dropout masks for every call
    logits = model(**given).logits
    return logits[[k for k, i in enumerate(order) if i != 0]]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_changing_one_packed_sequence_leaves_the_others_logits_alone(pooling):
    """Cross-contamination (a): the others' logits do not move whatever the first sequence holds.

    The model trains with dropout, through adaptkit's CPU dropout attention: the packed mask
    reaches that kernel too.
    """
    from adaptkit.kernels.attention import use_cpu_dropout_attention

    model = bert(pooling, dropout=True).train()
    assert use_cpu_dropout_attention(model)
    seqs = sequences(3)
    changed = copy.deepcopy(seqs)
    changed[0]["input_ids"] = [2] + [(t * 7 + 1) % (V - 5) + 5 for t in seqs[0]["input_ids"][1:]]
    assert changed[0]["input_ids"] != seqs[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            logits_of_others(model, changed), logits_of_others(model, seqs), rtol=0, atol=1e-6
        )


def test_a_packed_batch_with_its_mask_left_in_fails_loudly():
    """Cross-contamination (b): with the 2-D mask left in, transformers ignores the position ids
    (packed sequences would attend to each other); the pooling then gives one vector per row, and
    the head's loss refuses the labels, one per sequence, instead of training across sequences."""
    model = bert("cls")
    _, packed, _ = batches(sequences(4))
    with torch.no_grad():
        assert model(**{k: v for k, v in packed.items() if k != "labels"}).logits.shape[0] == len(
            packed["input_ids"]
        )
        with pytest.raises(ValueError, match="batch_size"):
            model(**packed)


def decide(model, t: Classification, packing) -> tuple[bool, str]:
    """What the host decides for a run of ``t`` on ``model`` with ``data.packing: packing``."""
    from adaptkit.adapt.packing import decide_packing
    from adaptkit.adapt.stack import Adapted
    from adaptkit.recipe.schema import Recipe

    recipe = Recipe(model={"source": "x"}, data={"source": "x", "packing": packing}, strategies=["full"])
    return decide_packing(recipe, t, Adapted(model, [], ""), "NO")


def test_a_pooler_that_cannot_pack_is_refused_naming_both_fields():
    model = tiny_model("bert")
    t = task(pooling="pooler")
    t.prepare_model(model, tiny_tokenizer("bert"))
    with pytest.raises(ConfigError) as caught:
        decide(model, t, True)
    assert [p for p, _ in caught.value.problems] == ["data.packing", "model.pooling"]
    assert "cls or mean" in str(caught.value)
    packed, why = decide(model, t, "auto")  # auto: unpacked, saying why
    assert packed is False and "cls or mean" in why
    # the host's probe refuses it too, whatever the task says
    with pytest.raises(ConfigError, match=r"data\.packing: BertForSequenceClassification gives 1 output"):
        training_loss(model, task(), "NO", nullcontext)


def test_a_last_token_head_is_refused():
    model = tiny_model("gpt2", **dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    with pytest.raises(ConfigError, match=r"data\.packing: GPT2ForSequenceClassification gives 1 output"):
        check_packing(model)
    t = task()
    t.prepare_model(model, tiny_tokenizer("gpt2"))
    with pytest.raises(ConfigError) as caught:
        decide(model, t, True)
    assert [p for p, _ in caught.value.problems] == ["data.packing"]  # no pooling to choose: not named
    assert "GPT2ForSequenceClassification's head reads each row as a whole" in str(caught.value)


def ignore_mask(module, query, key, value, attention_mask, **kwargs):
    """An attention that takes no mask: every token attends to the whole row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, is_causal=False, **kwargs)


def test_an_attention_that_ignores_the_packed_mask_is_refused():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("ignores_mask", ignore_mask)
    AttentionMaskInterface.register("ignores_mask", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    check_packing(bert("mean"))  # sdpa keeps them apart
    model = bert("mean").train()
    model.set_attn_implementation("ignores_mask")
    with pytest.raises(ConfigError, match=r"data\.packing: bert with attention 'ignores_mask' lets packed"):
        training_loss(model, task(), "NO", nullcontext)
    assert model.training  # the probe leaves the mode as it found it


def write_rows(path, n: int) -> None:
    rng = random.Random(0)
    words = "the a movie film story plot actor scene good bad".split()
    with open(path, "w") as f:
        for _ in range(n):
            text = " ".join(rng.choices(words, k=rng.randint(1, 12)))
            f.write(json.dumps({"text": text, "label": rng.choice(["pos", "neg"])}) + "\n")


def test_a_packed_recipe_trains_through_the_cli_and_resumes_exactly(tmp_path, capsys):
    from adaptkit.cli import main

    save_tiny_pretrained(tmp_path / "bert", "bert")
    write_rows(tmp_path / "rows.jsonl", 40)

    def run(name: str, packing: bool, steps: str = "epochs: 2", fresh: bool = True) -> dict:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"model: {{source: {tmp_path / 'bert'}, pooling: mean}}\n"
            f"data: {{source: {tmp_path / 'rows.jsonl'}, max_length: 32, packing: {str(packing).lower()}}}\n"
            "strategies: [full]\n"
            f"train: {{{steps}, micro_batch_size: 2, lr: 1.0e-3, scheduler: constant, save_every: 2, "
            "preflight: false}\n"
            f"output: {tmp_path / 'runs'}/{{name}}\n"
        )
        assert main(["train", str(path), *(["--fresh"] if fresh else [])]) == 0
        out = tmp_path / "runs" / name
        logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {**json.loads((out / "summary.json").read_text()), "logs": logs}

    plain, packed = run("plain", False), run("packed", True)
    assert packed["packed"] is True and plain["packed"] is False
    assert packed["steps"] < plain["steps"]
    assert all(m["loss"] == m["loss"] for m in packed["logs"] if "loss" in m)
    # the same tokens trained on, and the validation rows evaluated unpacked, alike
    evals = [[m for m in r["logs"] if "eval_loss" in m][-1] for r in (plain, packed)]
    assert evals[0]["tokens"] == evals[1]["tokens"]
    # stopped past the first epoch's end and resumed: the weights of the uninterrupted run
    per_epoch = packed["steps"] // 2
    run("resumed", True, f"max_steps: {per_epoch + 1}")
    capsys.readouterr()
    resumed = run("resumed", True, fresh=False)
    assert f"resuming from {tmp_path / 'runs' / 'resumed'}" in capsys.readouterr().err
    assert resumed["steps"] == packed["steps"] and resumed["param_digest"] == packed["param_digest"]
