"""Padding-free packing (``data.packing``): packed rows train exactly as the same sequences padded.

Every model here is a real tiny transformers model in float32. A packed batch gives each sequence
the per-token losses and the gradients it gets unpacked; no sequence sees another; a model that
would let packed sequences see each other is refused before it trains.
"""

from __future__ import annotations

import copy
import json
import random
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_packing_classification import write_rows as write_labelled_rows

import adaptkit
from adaptkit.errors import ConfigError
from adaptkit.kernels import lm_loss
from adaptkit.kernels.lm_loss import check_packing, packed_model_inputs, training_loss
from adaptkit.recipe.schema import DataSpec
from adaptkit.testing import save_tiny_pretrained, tiny_model, tiny_tokenizer
from adaptkit_plugins.tasks.causal_lm import CausalLM, LanguageModeling
from adaptkit_plugins.tasks.packing import collate_packed, pack_lengths, pack_rows

V = 128
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


MODELS = {
    "llama": lambda: tiny_model("llama", "causal_lm"),
    "qwen2": lambda: tiny_model("qwen2", "causal_lm"),
    "gpt2": lambda: tiny_model("gpt2", "causal_lm", **NO_DROPOUT),
}


def task(packing: bool = True, **data) -> CausalLM:
    out = CausalLM(DataSpec(source="x", packing=packing, **data))
    out.packing = packing  # what the host decides for a run (adaptkit.adapt.packing)
    return out


def sequences(seed: int = 0, n: int = 7) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of ``n`` sequences of 3 to 14 tokens, a masked prompt before each response."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length, prompt = rng.randint(3, 14), rng.randint(0, 2)
        ids = [rng.randrange(1, V) for _ in range(length)]
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def batches(seqs, capacity: int = 24) -> tuple[dict, dict, list[list[int]]]:
    """The sequences padded one a row, and packed (two or more rows); and which sequences each row holds."""
    unpacked = task(False).collate(tiny_tokenizer("llama"))(
        [{"input_ids": i, "labels": label} for i, label in seqs]
    )
    cols = pack_rows([s[0] for s in seqs], [s[1] for s in seqs], capacity)
    rows = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
    members = pack_lengths([len(s[0]) for s in seqs], capacity)
    assert 1 < len(rows) < len(seqs)
    return unpacked, collate_packed(rows, pad_id=0), members


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of predicting ``labels[r, t]`` at position t - 1, at [r, t] (0 where not learned)."""
    out = torch.zeros(labels.shape, dtype=logits.dtype)
    targets = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none"
    )
    out[:, 1:] = ce * (targets != -100)
    return out


def per_sequence(values: torch.Tensor, lengths: list[int], members: list[list[int]] | None) -> list:
    """The per-token values of each sequence, in sequence order, from padded rows or packed ones."""
    if members is None:
        return [values[i, :n] for i, n in enumerate(lengths)]
    found = {}
    for r, row in enumerate(members):
        start = 0
        for i in row:
            found[i] = values[r, start : start + lengths[i]]
            start += lengths[i]
    return [found[i] for i in range(len(lengths))]


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_rows_fit_keep_sequences_whole_and_are_the_same_every_time():
    rng = random.Random(3)
    lengths = [rng.randint(1, 40) for _ in range(200)] + [40, 40]
    bins = pack_lengths(lengths, 40)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 40 for b in bins)
    assert bins == pack_lengths(list(lengths), 40)
    # a sequence opens a row only where it fits in none: no two rows would fit in one
    fills = sorted(sum(lengths[i] for i in b) for b in bins)
    assert fills[0] + fills[1] > 40


def test_packing_keeps_sequences_whole_and_counts_the_same_supervised_tokens():
    tok = tiny_tokenizer("llama")
    rows = [
        {"text": " ".join(random.Random(i).choices(["good", "bad", "movie", "the"], k=i % 9 + 1))}
        for i in range(30)
    ]
    ds = __import__("datasets").Dataset.from_list(rows)
    spec = dict(source="x", max_length=16, text="text")
    packed_task, plain = LanguageModeling(DataSpec(packing=True, **spec)), LanguageModeling(DataSpec(**spec))
    for t in (packed_task, plain):
        t.setup({"train": ds, "validation": ds}, {"train": "t.jsonl", "validation": "v.jsonl"})
    packed, unpacked = (
        packed_task.pack(packed_task.encode(ds, tok, "t.jsonl")),
        plain.encode(ds, tok, "t.jsonl"),
    )
    assert len(packed) < len(unpacked) and all(len(r) <= 16 for r in packed["input_ids"])
    assert packed["input_ids"] == packed_task.pack(packed_task.encode(ds, tok, "t.jsonl"))["input_ids"]
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][s] == -100 for s in starts)
        assert all(b - a == 1 for a, b in zip(row["position_ids"], row["position_ids"][1:]) if b)

    def supervised(t, data):
        collate = t.collate(tok)
        return sum(
            int(t.loss_items(collate([data[i] for i in range(s, min(s + 4, len(data)))])))
            for s in range(0, len(data), 4)
        )

    assert supervised(packed_task, packed) == supervised(plain, unpacked) > 0


def close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """``got`` within ``rel`` of ``want`` in norm: float32 sums rows in another order when packed."""
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))
    assert err <= rel, f"relative error {err:.3g} > {rel:g}"


@pytest.mark.parametrize(
    "family, strategy, dtype",
    [(f, s, torch.float32) for f in sorted(MODELS) for s in ("full", "lora")]
    + [("llama", "lora", torch.float64)],
)
def test_packed_losses_and_gradients_equal_unpacked(family, strategy, dtype, host, monkeypatch):
    """Per-token losses and every gradient; in float64 they agree to rounding, so nothing leaks."""
    monkeypatch.setitem(lm_loss.CHUNK_BYTES, "cpu", 7 * 4 * V)  # several chunks through the output layer
    model = MODELS[family]().train()
    if strategy == "lora":
        model = adaptkit.apply(model, [{"name": "lora", "r": 4, "init": "random"}], host=host).model
    model = model.to(dtype)
    other = copy.deepcopy(model)
    seqs = sequences(1)
    unpacked, packed, members = batches(seqs)
    lengths = [len(s[0]) for s in seqs]
    rel = 5e-5 if dtype == torch.float32 else 1e-13

    with torch.no_grad():
        want = token_losses(model(**unpacked).logits, unpacked["labels"])
        got = token_losses(model(**packed_model_inputs(packed)).logits, packed["labels"])
    for a, b in zip(per_sequence(got, lengths, members), per_sequence(want, lengths, None)):
        close(a, b, rel)

    packing = task()
    assert packing.loss_items(packed) == packing.loss_items(unpacked)
    training_loss(model, task(False), "NO", nullcontext)(model, unpacked).backward()
    training_loss(other, packing, "NO", nullcontext)(other, packed).backward()
    want_g, got_g = grads(model), grads(other)
    assert want_g.keys() == got_g.keys() and want_g
    for name in want_g:
        close(got_g[name], want_g[name], rel)


def test_flattened_for_other_attention_gives_the_same_losses():
    """Flash attention reads packing from one flattened row; the flattening itself is exact."""
    model = tiny_model("llama", "causal_lm")
    seqs = sequences(2)
    unpacked, packed, members = batches(seqs)
    flat = packed_model_inputs(packed, attention="flash_attention_2")
    assert (
        flat["input_ids"].shape == (1, int(packed["attention_mask"].sum())) and "attention_mask" not in flat
    )
    with torch.no_grad():
        want = token_losses(model(**unpacked).logits, unpacked["labels"])
        got = token_losses(model(**flat).logits, flat["labels"])
    lengths = [len(s[0]) for s in seqs]
    order = [i for row in members for i in row]
    flat_seqs = per_sequence(got, [lengths[i] for i in order], [list(range(len(order)))])
    for k, i in enumerate(order):
        torch.testing.assert_close(flat_seqs[k], want[i, : lengths[i]], rtol=1e-5, atol=1e-6)


def logits_of_second(model, first: list[int], second: list[int], inputs=packed_model_inputs) -> torch.Tensor:
    """The logits of ``second`` packed after ``first`` in one row; a longer second row pads the first."""
    ids = [first + second, [5] * (len(first) + len(second) + 3)]
    positions = [[*range(len(first)), *range(len(second))], list(range(len(ids[1])))]
    batch = collate_packed(
        [{"input_ids": i, "labels": i, "position_ids": p} for i, p in zip(ids, positions)], pad_id=0
    )
    given = {k: v for k, v in inputs(batch).items() if k != "labels"}
    torch.manual_seed(0)  # the same dropout masks for every call
    return model(**given).logits[0, len(first) : len(first) + len(second)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_changing_one_packed_sequence_leaves_the_next_ones_logits_alone(family):
    """Cross-contamination (a): sequence B packed after A gets the same logits whatever A holds.

    GPT-2 trains with dropout here, through adaptkit's CPU dropout attention: the packed mask
    reaches that kernel too.
    """
    model = tiny_model(family, "causal_lm").train()
    if family == "gpt2":
        from adaptkit.kernels.attention import use_cpu_dropout_attention

        assert use_cpu_dropout_attention(model)
    second = [9, 8, 7, 6, 5]
    with torch.no_grad():
        base = logits_of_second(model, [3, 4, 5, 6, 7, 8], second)
        changed = logits_of_second(model, [40, 41, 42, 43, 44, 45], second)
        torch.testing.assert_close(changed, base, rtol=0, atol=1e-6)

        # the bug users hit: with the 2-D mask (or the config's cache) left in, transformers
        # ignores the position ids and B attends to A; the test above would see it
        leaky = logits_of_second(model, [3, 4, 5, 6, 7, 8], second, dict)
        leaky_changed = logits_of_second(model, [40, 41, 42, 43, 44, 45], second, dict)
        assert (leaky - leaky_changed).abs().max() > 1e-3


def ignore_positions(module, query, key, value, attention_mask, **kwargs):
    """An attention that takes no mask: plain causal attention over the whole row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def test_a_model_that_would_ignore_the_packed_mask_is_refused():
    """Cross-contamination (b): packing with an attention that ignores the mask fails before training."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("ignores_positions", ignore_positions)
    AttentionMaskInterface.register("ignores_positions", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model = tiny_model("llama", "causal_lm").train()
    check_packing(model)  # sdpa keeps them apart
    model = tiny_model("llama", "causal_lm").train()
    model.set_attn_implementation("ignores_positions")
    with pytest.raises(ConfigError, match=r"data\.packing: llama with attention 'ignores_positions'"):
        training_loss(model, task(), "NO", nullcontext)
    assert model.training  # the probe leaves the mode as it found it
    with pytest.raises(ConfigError, match=r"data\.packing: .*sharded"):
        check_packing(model, "FSDP")
    assert training_loss(model, task(False), "NO", nullcontext) is not None  # unpacked: no probe


def write_rows(path: Path, n: int) -> None:
    rng = random.Random(0)
    words = "the a movie film story plot actor scene good bad".split()
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choices(words, k=rng.randint(1, 12)))
            f.write(
                json.dumps({"prompt": prompt, "response": " ".join(rng.choices(words, k=rng.randint(1, 6)))})
                + "\n"
            )


def test_a_packed_recipe_trains_end_to_end_on_the_same_supervised_tokens(tmp_path, host, monkeypatch):
    from adaptkit.recipe.schema import load_recipe
    from adaptkit.train.loop import train

    save_tiny_pretrained(tmp_path / "llama", "llama", "causal_lm")
    write_rows(tmp_path / "rows.jsonl", 48)
    seen: list[int] = []
    original = CausalLM.loss_items

    def counted(self, batch):  # a spy: the count the loop weights each micro-batch by
        n = original(self, batch)
        seen.append(int(n))
        return n

    monkeypatch.setattr(CausalLM, "loss_items", counted)
    runs = {}
    for packing in (False, True):
        path = tmp_path / f"p{packing}.yaml"
        path.write_text(
            f"model: {{source: {tmp_path / 'llama'}, task: causal_lm}}\n"
            f"data: {{source: {tmp_path / 'rows.jsonl'}, max_length: 32, packing: {str(packing).lower()}}}\n"
            "strategies: [{name: lora, r: 4}]\n"
            "train: {epochs: 1, micro_batch_size: 4, lr: 1.0e-3, preflight: false}\n"
            f"output: {tmp_path / 'runs'}/{{name}}\n"
        )
        seen.clear()
        train(load_recipe(path, host=host), host, fresh=True)
        lines = (tmp_path / "runs" / path.stem / "metrics.jsonl").read_text().splitlines()
        runs[packing] = (sum(seen), [json.loads(x) for x in lines])
    (plain_items, plain_log), (packed_items, packed_log) = runs[False], runs[True]
    assert packed_items == plain_items > 0
    last = [m for m in packed_log if "eval_loss" in m][-1]
    assert last["tokens"] == [m for m in plain_log if "eval_loss" in m][-1]["tokens"]
    steps = [m["step"] for m in packed_log if "loss" in m]
    assert max(steps) < max(m["step"] for m in plain_log if "loss" in m)
    assert all(m["loss"] == m["loss"] for m in packed_log if "loss" in m)
    # the validation rows come from the same file, and stay one sequence a row
    from adaptkit.adapt.pipeline import encode_for_training, load_base

    recipe = load_recipe(tmp_path / "pTrue.yaml", host=host)
    base = load_base(recipe, host)
    train_rows, validation_rows = encode_for_training(base, recipe, host, pack=True)
    assert len(validation_rows) == len(base.splits["validation"]) > 0
    assert len(train_rows) < len(base.splits["train"])


KILLER = """
import os, signal
from adaptkit import hookimpl


@hookimpl
def adaptkit_on_step_end(run, step, logs):
    if step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
# two processes only: each rank resumes as one process does, and the split between ranks is what
# one process cannot show
@pytest.mark.parametrize("processes", [pytest.param(2, marks=pytest.mark.distributed)], ids=["ddp-gloo"])
def test_a_packed_run_killed_and_resumed_gives_the_uninterrupted_weights(tmp_path, processes):
    """Packing happens before the seeded sampler, so resume needs nothing new; under DDP too."""
    import os
    import signal
    import subprocess

    from adaptkit.testing.kit import adaptkit_command

    save_tiny_pretrained(tmp_path / "llama", "llama", "causal_lm")
    write_rows(tmp_path / "rows.jsonl", 96)
    (tmp_path / "killer.py").write_text(KILLER)
    env = {**os.environ, "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(tmp_path)}
    env["OMP_NUM_THREADS"] = "1"

    def launch(name: str, plugins: list[str], fresh: bool, **extra: str) -> subprocess.CompletedProcess:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"model: {{source: {tmp_path / 'llama'}, task: causal_lm}}\n"
            f"data: {{source: {tmp_path / 'rows.jsonl'}, max_length: 32, packing: true}}\n"
            "strategies: [{name: lora, r: 4}]\n"
            "train: {epochs: 2, micro_batch_size: 2, lr: 1.0e-3, save_every: 2, seed: 3}\n"
            f"output: {tmp_path / 'runs'}/{{name}}\n"
        )
        cmd = adaptkit_command([*plugins, "train", str(path), *(["--fresh"] if fresh else [])], processes)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, **extra})

    straight = launch("straight", [], True)
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = json.loads((tmp_path / "runs" / "straight" / "summary.json").read_text())
    kill_at = expected["steps"] // 2 + 1  # past the first epoch's end: the resume crosses it
    killed = launch("killed", ["-p", "killer"], True, KILL_AT_STEP=str(kill_at))
    assert killed.returncode != 0
    if processes == 1:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = launch("killed", [], False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {(kill_at - 1) // 2 * 2})" in resumed.stderr  # the last checkpoint before the kill
    got = json.loads((tmp_path / "runs" / "killed" / "summary.json").read_text())
    assert got["steps"] == expected["steps"] and got["param_digest"] == expected["param_digest"]
    if processes == 2:
        assert got["ranks_in_sync"] is True


def test_packing_asked_of_a_task_that_cannot_pack_is_refused_naming_the_field(tmp_path, capsys):
    from adaptkit.cli import main
    from adaptkit.testing import save_tiny_pretrained, write_sentiment

    save_tiny_pretrained(tmp_path / "vit", "vit")
    write_sentiment(tmp_path / "train.jsonl", 16, seed=0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{source: {tmp_path / 'vit'}, task: image_classification}}\n"
        f"data: {{source: {tmp_path / 'train.jsonl'}, packing: true}}\nstrategies: [full]\n"
    )
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "data.packing" in err and "task 'image_classification' does not pack sequences" in err
    assert "causal_lm" in err and "language_modeling" in err and "classification," in err


#: family, task, strategy, the writer of its rows and model keys of each DDP case: the decoder families as
#: language models, a BERT encoder as a classifier pooled per sequence (dropout off: the same
#: sequences must meet the same computation, packed or not)
DDP_CASES = {
    "llama-full": ("llama", "causal_lm", "full", write_rows, {}),
    "qwen2-lora": ("qwen2", "causal_lm", "lora", write_rows, {}),
    "bert-classification-full": ("bert", "classification", "full", write_labelled_rows, {"pooling": "mean"}),
}


@pytest.mark.slow
@pytest.mark.distributed
def test_under_ddp_a_packed_step_updates_the_weights_as_the_same_sequences_padded(tmp_path, host):
    """One SGD step over every training sequence: packed rows on two processes give the weights of
    the same sequences padded one a row in one process (the loss weighs each micro-batch by its
    supervised tokens or labels, across ranks), for Llama and Qwen2 language models and a BERT
    classifier, full and LoRA."""
    import os
    import subprocess

    from adaptkit.recipe.schema import validate
    from adaptkit.testing.kit import adaptkit_command
    from adaptkit.train.loop import train

    env = {**os.environ, "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    for case, (family, task_name, strategy, write, keys) in DDP_CASES.items():
        base = tmp_path / family
        no_dropout = (
            {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if family == "bert" else {}
        )
        save_tiny_pretrained(base, family, task_name, **no_dropout)
        model = {"source": str(base), "task": task_name, **keys}
        data, counts = even_rows(tmp_path / case, model, write, host)
        out = {p: tmp_path / "runs" / f"{case}-{p}" for p in (True, False)}
        packed = tmp_path / f"{case}.yaml"
        packed.write_text(json.dumps(one_sgd_step(model, data, strategy, True, counts[True] // 2, out[True])))
        # a launch a run: a process group torn down and started again in one process can hang
        done = subprocess.run(
            adaptkit_command(["train", str(packed)], 2), capture_output=True, text=True, timeout=600, env=env
        )
        assert done.returncode == 0, done.stderr[-3000:]
        train(
            validate(one_sgd_step(model, data, strategy, False, counts[False], out[False]), host=host), host
        )
        weights = {}
        for packing in (True, False):
            assert json.loads((out[packing] / "summary.json").read_text())["packed"] is packing, case
            weights[packing] = saved_weights(out[packing] / "final")
        assert trained(weights[False], load_file(base / "model.safetensors"), strategy), case
        assert weights[True].keys() == weights[False].keys()
        for key, value in weights[False].items():
            torch.testing.assert_close(weights[True][key], value, rtol=1e-5, atol=1e-6, msg=f"{case} {key}")


def saved_weights(final: Path) -> dict[str, torch.Tensor]:
    """Every tensor a run saved under ``final``, keyed by file and name."""
    return {
        f"{f.relative_to(final)}:{k}": v
        for f in sorted(final.rglob("*.safetensors"))
        for k, v in load_file(f).items()
    }


def trained(weights: dict[str, torch.Tensor], start: dict[str, torch.Tensor], strategy: str) -> bool:
    """The step was not a no-op: full moved the base's weights; LoRA moved every B off its zeros."""
    if strategy == "lora":
        b = [v for k, v in weights.items() if "lora_B" in k]
        return len(b) > 4 and all(bool(v.abs().max() > 0) for v in b)
    names = {k: k.split(":", 1)[1] for k in weights}
    names |= {k: n.split(".", 1)[1] for k, n in names.items() if n not in start}  # a base under its head
    common = [(v, start[names[k]]) for k, v in weights.items() if names[k] in start]
    return len(common) > 10 and max(float((v - s).abs().max()) for v, s in common) > 1e-3


def one_sgd_step(model: dict, data: Path, strategy: str, packing: bool, accumulation: int, out: Path) -> dict:
    """A recipe of one SGD step (lr 1) over every row, one row a micro-batch."""
    return {
        "model": model,
        "data": {"source": str(data), "max_length": 32, "packing": packing},
        "strategies": [strategy],
        "train": {
            "max_steps": 1, "micro_batch_size": 1, "gradient_accumulation": accumulation,
            "optimizer": "sgd", "lr": 1.0, "weight_decay": 0.0, "preflight": False, "scheduler": "constant",
        },
        "output": str(out),
    }  # fmt: skip


def even_rows(stem: Path, model: dict, write, host) -> tuple[Path, dict[bool, int]]:
    """Rows (a file per count tried: datasets caches a file by name) until two ranks get whole
    micro-batches of packed rows and packing saves rows; the file and its row counts, packed and not."""
    from adaptkit.adapt.pipeline import encode_for_training, load_base
    from adaptkit.recipe.schema import validate

    for n in range(16, 64, 2):
        data = stem.with_name(f"{stem.name}-{n}.jsonl")
        write(data, n)
        recipe = validate(one_sgd_step(model, data, "full", True, 1, stem.parent / "unused"), host=host)
        base = load_base(recipe, host)
        counts = {p: len(encode_for_training(base, recipe, host, pack=p)[0]) for p in (True, False)}
        if counts[True] % 2 == 0 and counts[True] < counts[False]:
            return data, counts
    raise AssertionError(f"no row count in 16..62 packs into an even number of rows for {model}")
