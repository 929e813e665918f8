"""The rest of the training run on tiny models: gradient accumulation, data transforms, trackers,
bitsandbytes optimizers on CPU, dropout settings and ``adaptkit generate``."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from adaptkit.recipe.schema import load_recipe
from adaptkit.testing import WORDS, save_tiny_pretrained, sentiment_rows

ADAPTKIT = [sys.executable, "-m", "adaptkit"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_rows(n: int, seed: int, response: str | None = None) -> list[dict]:
    """Prompt/response pairs over the tiny vocabulary; responses of 1 to 10 words unless given."""
    rng = random.Random(seed)
    vocab = WORDS[:60]
    return [
        {
            "prompt": " ".join(rng.choices(vocab, k=rng.randint(2, 6))),
            "response": response or " ".join(rng.choices(vocab, k=rng.randint(1, 10))),
        }
        for _ in range(n)
    ]


def write_recipe(d: Path, name: str, model: str, data: str, train: str, strategies: str = "[full]") -> Path:
    path = d / f"{name}.yaml"
    path.write_text(
        f"model: {{{model}}}\ndata: {{{data}}}\nstrategies: {strategies}\ntrain: {{{train}}}\noutput: {d / 'runs'}/{{name}}\n"
    )
    return path


def saved_weights(run_dir: Path) -> dict:
    """Every tensor a run saved in final/ (the full strategy saves all of them)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run_dir / "final").rglob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ADAPTKIT, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1", **(env or {})},
    )


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny GPT-2 and a tiny Llama (with a chat template), and a folder of SFT data."""
    d = tmp_path_factory.mktemp("lm")
    save_tiny_pretrained(d / "gpt2", "gpt2", task="causal_lm")
    save_tiny_pretrained(d / "llama", "llama", task="causal_lm")
    save_tiny_pretrained(d / "llama-chat", "llama", task="causal_lm", chat=True)
    return d


# -- gradient accumulation: the mean over the whole accumulated batch -----------------------------------------------------------------


@pytest.mark.parametrize("micro, accumulation", [(1, 4), (2, 2)])
def test_accumulation_gives_the_update_of_one_big_batch(lm, host, tmp_path, micro, accumulation):
    """Unequal supervised-token counts: micro x accumulation must train exactly like one batch of 4.

    Six examples: a full window of 4, then a tail of 2, so the tail's normalisation is checked too.
    SGD (not Adam, which hides the gradient's scale) without clipping and with no dropout.
    """
    import torch

    from adaptkit.train.loop import train

    data = tmp_path / "data"
    data.mkdir()
    rows = sft_rows(8, seed=3)
    rows[0]["response"], rows[1]["response"] = "yes", " ".join(WORDS[:12])  # 2 vs 13 supervised tokens
    write_jsonl(data / "train.jsonl", rows[:6])
    write_jsonl(data / "validation.jsonl", rows[6:])
    common = "epochs: 1, optimizer: sgd, lr: 0.5, max_grad_norm: null, scheduler: constant, seed: 0"
    model = f"source: {lm / 'gpt2'}, task: causal_lm, dropout: 0.0"
    summaries, weights = {}, {}
    for name, (mb, ga) in {"big": (4, 1), "accum": (micro, accumulation)}.items():
        path = write_recipe(
            tmp_path,
            name,
            model,
            f"source: {data}, max_length: 48, packing: false",
            f"{common}, micro_batch_size: {mb}, gradient_accumulation: {ga}",
        )
        summaries[name] = train(load_recipe(path, host=host), host, fresh=True)
        weights[name] = saved_weights(tmp_path / "runs" / name)
    assert summaries["big"]["steps"] == summaries["accum"]["steps"] == 2
    base = saved_weights_of_base(lm / "gpt2")
    moved = max((v - base[k]).abs().max().item() for k, v in weights["big"].items() if k in base)
    assert moved > 1e-2  # the comparison below is not vacuous
    for key, value in weights["big"].items():
        torch.testing.assert_close(weights["accum"][key], value, atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.distributed
@pytest.mark.parametrize("micro, accumulation", [(2, 1), (1, 2)])
def test_two_processes_give_the_update_of_one_big_batch(lm, host, tmp_path, micro, accumulation):
    """2 CPU processes (gloo) x micro x accumulation = one batch of 4 on one process, with unequal token
    counts across ranks: the normalisation is over the tokens of all ranks, not a mean of rank means."""
    import torch

    from adaptkit.train.loop import train

    data = tmp_path / "data"
    data.mkdir()
    rows = sft_rows(10, seed=4)
    rows[0]["response"], rows[1]["response"] = "yes", " ".join(WORDS[:12])
    write_jsonl(data / "train.jsonl", rows[:8])
    write_jsonl(data / "validation.jsonl", rows[8:])
    common = "epochs: 1, optimizer: sgd, lr: 0.5, max_grad_norm: null, scheduler: constant, seed: 0"
    model = f"source: {lm / 'gpt2'}, task: causal_lm, dropout: 0.0"
    big = write_recipe(
        tmp_path,
        "big",
        model,
        f"source: {data}, max_length: 48, packing: false",
        f"{common}, micro_batch_size: 4",
    )
    assert train(load_recipe(big, host=host), host, fresh=True)["steps"] == 2
    ddp = write_recipe(
        tmp_path,
        "ddp",
        model,
        f"source: {data}, max_length: 48, packing: false",
        f"{common}, micro_batch_size: {micro}, gradient_accumulation: {accumulation}",
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "adaptkit",
        "train",
        str(ddp),
        "--fresh",
    ]
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "ddp" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 2 and summary["ranks_in_sync"]
    expected, got = saved_weights(tmp_path / "runs" / "big"), saved_weights(tmp_path / "runs" / "ddp")
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5, msg=key)


def saved_weights_of_base(path: Path) -> dict:
    """The pretrained weights as a run's ``full`` strategy names them."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- shared tiny classifier ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    """A tiny BERT and a separable sentiment set (train and validation files)."""
    d = tmp_path_factory.mktemp("clf")
    save_tiny_pretrained(d / "bert", "bert")
    rows = sentiment_rows(48)
    (d / "data").mkdir()
    write_jsonl(d / "data" / "train.jsonl", rows[:40])
    write_jsonl(d / "data" / "validation.jsonl", rows[40:])
    return d


def clf_recipe(d: Path, name: str, train: str, data: str = "", strategies: str = "[full]") -> Path:
    return write_recipe(
        d,
        name,
        f"source: {d / 'bert'}, task: classification",
        f"source: {d / 'data'}, max_length: 16{data}",
        train,
        strategies,
    )


# -- data transforms ------------------------------------------------------------------------------


def test_word_dropout_is_deterministic_per_example_and_keeps_word_order(clf, host):
    from adaptkit.data.load import apply_transforms, load_data
    from adaptkit.recipe.schema import DataSpec

    spec = DataSpec(source=str(clf / "data"), transforms=[{"name": "word_dropout", "p": 0.3, "seed": 1}])
    splits, _ = load_data(spec, host, 0)
    train = splits["train"]
    once, again = apply_transforms(train, spec, host), apply_transforms(train, spec, host)
    assert once["text"] == again["text"]
    # per example index, not a stream: the first rows come out the same from a shorter dataset
    assert apply_transforms(train.select(range(5)), spec, host)["text"] == once["text"][:5]
    dropped = total = 0
    for before, after in zip(train["text"], once["text"]):
        words, kept = before.split(), after.split()
        assert kept and is_subsequence(kept, words), (before, after)
        dropped, total = dropped + len(words) - len(kept), total + len(words)
    assert 0.2 < dropped / total < 0.4  # p = 0.3 over 360 words
    assert once["label"] == train["label"]
    other = DataSpec(source=str(clf / "data"), transforms=[{"name": "word_dropout", "p": 0.3, "seed": 2}])
    assert apply_transforms(train, other, host)["text"] != once["text"]


def is_subsequence(part: list[str], whole: list[str]) -> bool:
    it = iter(whole)
    return all(word in it for word in part)


def test_transforms_change_the_training_split_only(clf, host):
    """Through the training run's own data preparation: validation tokens are untouched."""
    from adaptkit.train.context import Run
    from adaptkit.train.prepare import prepare_model_and_data

    def prepared(transforms: str):
        recipe = load_recipe(
            clf_recipe(clf, "prep", "max_steps: 1", f", transforms: {transforms}"), host=host
        )
        _, train_ds, eval_ds = prepare_model_and_data(
            Run(recipe=recipe, host=host, run_dir=clf / "runs" / "prep")
        )
        return train_ds, eval_ds

    plain_train, plain_eval = prepared("[]")
    train_ds, eval_ds = prepared("[{name: lowercase}, {name: word_dropout, p: 0.5}]")
    assert eval_ds["input_ids"] == plain_eval["input_ids"]
    assert train_ds["labels"] == plain_train["labels"]
    shorter = [len(a) < len(b) for a, b in zip(train_ds["input_ids"], plain_train["input_ids"])]
    assert sum(shorter) >= 30, sum(shorter)  # p = 0.5 over 7-word texts: nearly every row loses words


def test_lowercase_and_bad_transform_options(clf, host):
    import datasets

    from adaptkit.data.load import apply_transforms
    from adaptkit.errors import ConfigError, DataError
    from adaptkit.recipe.schema import DataSpec

    ds = datasets.Dataset.from_dict({"text": ["Hello World", None], "label": [0, 1]})

    def run(*transforms):
        return apply_transforms(ds, DataSpec(source="x", transforms=list(transforms)), host)

    assert run({"name": "lowercase"})["text"] == ["hello world", None]
    with pytest.raises(ConfigError) as err:
        run({"name": "lowercase"}, {"name": "word_dropout", "prob": 0.2})
    assert (
        str(err.value)
        == "data.transforms[1]: word_dropout: unknown option 'prob'; the options are p, column, seed"
    )
    with pytest.raises(
        ConfigError,
        match=r"^data.transforms\[0\]: word_dropout: p must be at least 0 and less than 1, got 1.5$",
    ):
        run({"name": "word_dropout", "p": 1.5})
    with pytest.raises(
        ConfigError,
        match=r"^data.transforms\[0\]: unknown transform 'shuffle'; available: image_augment, lowercase, word_dropout",
    ):
        run({"name": "shuffle"})
    with pytest.raises(ConfigError, match=r"^data.transforms\[0\]: give the transform a name$"):
        run({"p": 0.1})
    with pytest.raises(
        DataError,
        match=r"^data.transforms\[0\] \(lowercase\): no column 'sentence'; the columns are \['label', 'text'\]",
    ):
        run({"name": "lowercase", "column": "sentence"})


def test_a_bad_transform_option_stops_train_with_one_line(clf):
    path = clf_recipe(clf, "badopt", "max_steps: 1", ", transforms: [{name: word_dropout, rate: 0.1}]")
    res = run_cli("train", str(path))
    assert res.returncode == 2, res.stderr[-2000:]
    assert (
        "data.transforms[0]: word_dropout: unknown option 'rate'; the options are p, column, seed"
        in res.stderr
    )
    assert "Traceback" not in res.stderr


# -- trackers ---------------------------------------------------------------------------------------


def test_tensorboard_gets_the_logged_metrics(clf, host):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from adaptkit.train.loop import train

    path = clf_recipe(
        clf,
        "tb",
        "max_steps: 4, lr: 1.0e-3, micro_batch_size: 8, log_every: 1, eval_every: 2, report_to: [tensorboard]",
    )
    train(load_recipe(path, host=host), host, fresh=True)
    run_dir = clf / "runs" / "tb"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run_dir / "tracking" / "tb"))
    events.Reload()
    assert {"loss", "lr", "eval_loss", "accuracy"} <= set(events.Tags()["scalars"])
    for tag in ("loss", "eval_loss", "accuracy"):
        expected = [(h["step"], h[tag]) for h in logged if tag in h]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    assert [s for s, _ in expected] == [2, 4]  # accuracy: evaluated every 2 steps


def test_a_tracker_that_is_not_installed_is_a_config_error(clf):
    """tensorboard made unimportable (None in sys.modules): exit 2, a message naming train.report_to."""
    path = clf_recipe(clf, "notb", "max_steps: 1, report_to: tensorboard")
    code = (
        "import sys; sys.modules['tensorboard'] = sys.modules['tensorboardX'] = None; "
        f"from adaptkit.cli import main; sys.exit(main(['train', {str(path)!r}]))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "adaptkit: error: train.report_to: 'tensorboard' is not installed; pip install tensorboard, or leave it out"
    )
    assert not (clf / "runs" / "notb").exists()  # refused before anything ran


def test_report_to_accepts_only_known_trackers(clf, host):
    from adaptkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.report_to\[0\]: Input should be 'tensorboard'"):
        load_recipe(clf_recipe(clf, "wandb", "report_to: [wandb]"), host=host)
    assert load_recipe(clf_recipe(clf, "none", "max_steps: 1"), host=host).train.report_to == []


# -- optimizers ------------------------------------------------------------------------------------


def test_adamw_is_torchs_fused_kernel_and_steps_as_the_plain_one_does():
    """Fused AdamW (no temporaries, one kernel per dtype) on the CPU: the same update as torch's loop."""
    import torch

    from adaptkit.recipe.schema import TrainSpec
    from adaptkit.train.optim import build_optimizer

    torch.manual_seed(0)
    shapes = [(8, 576), (576, 8), (576, 1536), (576,)]
    fused = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    spec = TrainSpec(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer([{"params": fused, "weight_decay": 0.1}], spec)
    ref = torch.optim.AdamW([{"params": plain, "weight_decay": 0.1}], lr=1e-2, foreach=False)
    assert opt.defaults["fused"] is True
    for _step in range(3):
        for a, b in zip(fused, plain):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, torch.zeros_like(a))


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_train_on_cpu_and_resume(clf, host, optimizer):
    """A short run trains; stopping at step 2 and resuming to step 4 ends where a straight run does,
    so the optimizer's (8-bit) state round-trips through the safetensors checkpoint."""
    import torch

    from adaptkit.train.loop import train

    common = f"optimizer: {optimizer}, lr: 1.0e-3, micro_batch_size: 8, scheduler: constant, save_every: 2"
    straight = train(
        load_recipe(clf_recipe(clf, f"{optimizer}-straight", f"max_steps: 4, {common}"), host=host),
        host,
        fresh=True,
    )
    weights = saved_weights(clf / "runs" / f"{optimizer}-straight")
    base = saved_weights_of_classifier(clf / "bert")
    changed = [k for k, v in base.items() if k in weights and not torch.equal(weights[k], v)]
    assert len(changed) >= len(base) // 2, changed

    name = f"{optimizer}-resumed"
    train(load_recipe(clf_recipe(clf, name, f"max_steps: 2, {common}"), host=host), host, fresh=True)
    resumed = train(load_recipe(clf_recipe(clf, name, f"max_steps: 4, {common}"), host=host), host)
    assert resumed["steps"] == 4
    assert resumed["param_digest"] == straight["param_digest"]
    from safetensors.torch import load_file

    state = load_file(str(clf / "runs" / name / "checkpoints" / "step-00000004" / "optimizer.safetensors"))
    dtypes = {v.dtype for k, v in state.items() if k.endswith("state1")}
    # 8-bit state for large tensors (bitsandbytes keeps 32-bit state below 4096 elements)
    assert (torch.uint8 in dtypes) == ("8bit" in optimizer) and torch.float32 in dtypes, dtypes


def saved_weights_of_classifier(path: Path) -> dict:
    """The pretrained backbone under the names a classifier gives it."""
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}


# -- dropout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, task", [("bert", "classification"), ("gpt2", "causal_lm"), ("llama", "causal_lm")]
)
def test_model_dropout_reaches_config_and_modules(tmp_path, host, family, task):
    """model.dropout sets every dropout probability of the config, every nn.Dropout and attention dropout."""
    import torch

    from adaptkit.train.context import Run
    from adaptkit.train.prepare import prepare_model_and_data

    save_tiny_pretrained(tmp_path / family, family, task=task)
    write_jsonl(
        tmp_path / "d.jsonl", [{"text": "good", "label": "a", "prompt": "good", "response": "fun"}] * 4
    )
    for p in (0.0, 0.37):
        recipe = load_recipe(
            write_recipe(
                tmp_path,
                f"p{p}",
                f"source: {tmp_path / family}, task: {task}, dropout: {p}",
                f"source: {tmp_path / 'd.jsonl'}, validation_size: 0.5",
                "max_steps: 1",
            ),
            host=host,
        )
        model = prepare_model_and_data(Run(recipe=recipe, host=host, run_dir=tmp_path / "r"))[0].model
        probs = {
            k: v
            for k, v in model.config.to_dict().items()
            if isinstance(v, float) and ("dropout" in k or k.endswith("_pdrop"))
        }
        assert probs and set(probs.values()) == {p}, probs
        layers = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        # attention kernels (sdpa) take the probability as a float attribute instead of a module
        attention = [
            m.attention_dropout
            for m in model.modules()
            if isinstance(getattr(m, "attention_dropout", None), float)
        ]
        assert layers + attention and set(layers + attention) == {p}, (layers, attention)


# -- adaptkit generate ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_runs(lm, tmp_path_factory):
    """Two finished causal-LM runs that learned to answer "good movie": plain prompt/response, and chat."""
    from adaptkit.testing import plugin_host
    from adaptkit.train.loop import train

    host = plugin_host()
    d = tmp_path_factory.mktemp("lm_runs")
    write_jsonl(d / "sft.jsonl", sft_rows(32, seed=5, response="good movie"))
    for name, model in (("plain", "llama"), ("chat", "llama-chat")):
        path = write_recipe(
            d,
            name,
            f"source: {lm / model}, task: causal_lm",
            f"source: {d / 'sft.jsonl'}, max_length: 32",
            "epochs: 12, lr: 1.0e-2, micro_batch_size: 8, seed: 0",
        )
        train(load_recipe(path, host=host), host, fresh=True)
    return d / "runs"


def reference_generation(run_dir: Path, tmp_path: Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy generation with plain transformers on the run exported as a merged model."""
    import torch
    import transformers

    from adaptkit.export import export
    from adaptkit.runs import open_run
    from adaptkit.testing import plugin_host

    out = export(open_run(run_dir, plugin_host()), tmp_path / f"{run_dir.name}-merged", "transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    if tok.chat_template:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    ids = torch.tensor([list(ids)])
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
    return tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("name", ["plain", "chat"])
def test_generate_is_deterministic_and_matches_transformers(lm_runs, tmp_path, name):
    """`adaptkit generate RUN PROMPT` twice: the same text, equal to generate() on the exported model."""
    prompt = "is the movie good"
    outputs = [run_cli("generate", str(lm_runs / name), prompt, "--max-new-tokens", "12") for _ in range(2)]
    for res in outputs:
        assert res.returncode == 0, res.stderr[-2000:]
    text = outputs[0].stdout.removesuffix("\n")
    assert outputs[1].stdout == outputs[0].stdout
    assert text == reference_generation(lm_runs / name, tmp_path, prompt, 12)
    if name == "chat":  # the template marks where the answer starts: the run learned it, EOS included
        assert text == "good movie"
    else:  # no template: nothing separates prompt and answer, but the answer's words were learned
        assert text and "movie" in text.split()


def test_generate_stops_at_the_models_context(lm, tmp_path, host):
    """GPT-2 has 64 learned positions: generation stops there; a longer prompt is a one-line error."""
    from adaptkit.errors import AdaptkitError
    from adaptkit.runs import generate, open_run
    from adaptkit.train.loop import train

    write_jsonl(tmp_path / "sft.jsonl", sft_rows(8, seed=1))
    path = write_recipe(
        tmp_path,
        "g",
        f"source: {lm / 'gpt2'}, task: causal_lm",
        f"source: {tmp_path / 'sft.jsonl'}, max_length: 32",
        "max_steps: 1",
    )
    train(load_recipe(path, host=host), host, fresh=True)
    opened = open_run(tmp_path / "runs" / "g", host)
    text = generate(opened, "the movie was", max_new_tokens=200)
    assert len(opened.processor(text, add_special_tokens=False)["input_ids"]) == 64 - 3, (
        text
    )  # no EOS drawn: it ran to the end
    with pytest.raises(AdaptkitError, match="the prompt has 70 tokens; this model reads at most 64"):
        generate(opened, " ".join(["good"] * 70))


PEAK_CHILD = """
import gc, torch
from adaptkit.train.measure import peak_memory_mb, reset_peak_memory
cpu = torch.device("cpu")
t = torch.ones(64 * 2**18)  # 64 MiB, written: resident
del t
gc.collect()
high = peak_memory_mb(cpu)
reset_peak_memory(cpu)
print(high, peak_memory_mb(cpu))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's VmHWM")
def test_the_peak_starts_over_after_the_auto_micro_batch_trials():
    """The trials run the longest rows near the memory limit; the run reports its training's peak, not theirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    high, after = map(
        float,
        subprocess.run(
            [sys.executable, "-c", PEAK_CHILD], capture_output=True, text=True, env=env, check=True
        ).stdout.split(),
    )
    assert high - after > 48  # the 64 MiB tensor was unmapped when freed: it no longer counts
