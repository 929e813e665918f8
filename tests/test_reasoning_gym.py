"""The reasoning_gym data source and evaluation by generation, scored by each task's own verifier."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from adaptkit.errors import AdaptkitError, ConfigError, DataError
from adaptkit.recipe.schema import DataSpec
from adaptkit.testing import save_tiny_pretrained

reasoning_gym = pytest.importorskip("reasoning_gym")

from adaptkit_plugins.data_sources.reasoning_gym import load, score, split_seed  # noqa: E402

OPTIONS = {"task": "spell_backward", "size": 40, "eval_size": 20, "config": {"max_word_len": 5}}


def test_rows_are_deterministic_for_a_seed_and_splits_are_disjoint():
    """Same seed, same rows; another seed, other rows; no validation question is in train or repeated."""
    a, b, other = load(OPTIONS, 0), load(OPTIONS, 0), load(OPTIONS, 1)
    for split in ("train", "validation"):
        assert a[split].to_list() == b[split].to_list()
        assert list(a[split]["prompt"]) != list(other[split]["prompt"])
    assert len(a["train"]) == 40 and len(a["validation"]) == 20
    val = list(a["validation"]["prompt"])
    assert not set(val) & set(a["train"]["prompt"])
    assert len(set(val)) == len(val)
    assert {n: f.dtype for n, f in a["train"].features.items()} == {
        "prompt": "string",
        "response": "string",
        "scorer": "string",
        "reference": "string",
        "max_new_tokens": "int64",
    }


def test_rows_are_the_entries_reasoning_gym_generates():
    """Each row's reference names the reasoning-gym entry whose question and answer the row holds."""
    splits = load(OPTIONS, 7)
    assert split_seed(7, "train") != split_seed(7, "validation")
    for split in ("train", "validation"):
        for row in splits[split].select(range(5)):
            ref = json.loads(row["reference"])
            entry = reasoning_gym.create_dataset(
                ref["task"], seed=ref["seed"], size=ref["size"], **ref["config"]
            )[ref["index"]]
            assert (row["prompt"], row["response"]) == (entry["question"], entry["answer"])
            assert row["scorer"] == "reasoning_gym" and row["max_new_tokens"] == 16


def test_validation_drops_questions_seen_in_training():
    """A task with few distinct questions: validation keeps only the new ones (and none at all is an error)."""
    opts = {
        "task": "chain_sum",
        "size": 300,
        "eval_size": 50,
        "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    }
    splits = load(opts, 0)
    train = set(splits["train"]["prompt"])
    val = list(splits["validation"]["prompt"])
    assert not set(val) & train and len(set(val)) == len(val)
    # 2 one-digit terms and +/-: at most 200 questions, most of them drawn into 300 training rows
    assert 0 < len(val) < 50
    opts.update(size=3000, eval_size=5)  # 20 candidates, every one of them already in training
    with pytest.raises(
        DataError, match="every validation question of reasoning-gym task 'chain_sum' also appears"
    ):
        load(opts, 0)


def test_gold_answers_score_one_and_wrong_answers_less():
    """The verifier is the dataset's own: gold answers score 1.0, altered ones less, matching score_answer."""
    for opts in (
        OPTIONS,
        {
            "task": "basic_arithmetic",
            "size": 10,
            "eval_size": 10,
            "config": {"max_terms": 3, "max_digits": 2},
        },
    ):
        val = load(opts, 3)["validation"]
        refs, gold = list(val["reference"]), list(val["response"])
        assert score(gold, refs) == 1.0
        for answer, ref in zip(gold, refs):
            wrong = answer[::-1] + "9" if answer[::-1] != answer else answer + "9"
            assert score([wrong], [ref]) < 1.0
            r = json.loads(ref)
            ds = reasoning_gym.create_dataset(r["task"], seed=r["seed"], size=r["size"], **r["config"])
            assert score([wrong], [ref]) == ds.score_answer(wrong, ds[r["index"]])
        assert score(["", *gold[1:]], refs) == pytest.approx((len(gold) - 1) / len(gold))


def test_generated_text_is_reduced_to_its_first_line_before_scoring():
    """What a model writes after the answer (a new line, an explanation) does not count against it."""
    from adaptkit_plugins.tasks import extract_answer

    val = load(OPTIONS, 0)["validation"]
    generated = [f"  {answer} \nbecause I reversed the letters" for answer in val["response"]]
    assert score([extract_answer(t) for t in generated], list(val["reference"])) == 1.0
    assert score(generated, list(val["reference"])) < 1.0
    assert (
        extract_answer("\n\n  42 \n7") == "42" and extract_answer("") == "" and extract_answer(" \n ") == ""
    )


@pytest.mark.parametrize(
    ("options", "path", "words"),
    [
        (
            {"task": "spell_backwards"},
            "data.options.task",
            ["did you mean spell_backward", "basic_arithmetic"],
        ),
        ({"task": "no_such_task_at_all"}, "data.options.task", ["tasks exist, e.g.", "ab, acre"]),
        ({}, "data.options.task", ["Field required"]),
        ({"task": "spell_backward", "size": 0}, "data.options.size", ["greater than or equal to 1"]),
        (
            {"task": "spell_backward", "eval_sizes": 3},
            "data.options.eval_sizes",
            ["unknown option", "eval_size"],
        ),
        ({"task": "spell_backward", "config": {"seed": 3}}, "data.options.config.seed", ["train.seed"]),
        (
            {"task": "spell_backward", "config": {"max_len": 3}},
            "data.options.config.max_len",
            ["min_word_len", "max_word_len"],
        ),
        (
            {"task": "spell_backward", "config": {"min_word_len": 9, "max_word_len": 3}},
            "data.options.config",
            ["max_word_len must be >= min_word_len"],
        ),
    ],
)
def test_bad_options_name_the_field(options, path, words):
    with pytest.raises(ConfigError) as info:
        load(options, 0)
    message = str(info.value)
    assert message.startswith(f"{path}:") or f"\n  {path}:" in message, message
    for word in words:
        assert word in message, message


def test_through_the_recipe_and_load_data(host):
    """``data.source: reasoning_gym`` in a recipe; data.max_eval_examples still caps validation."""
    from adaptkit.data.load import load_data

    spec = DataSpec(source="reasoning_gym", options=OPTIONS, max_eval_examples=5)
    splits, files = load_data(spec, host, seed=0)
    assert len(splits["train"]) == 40 and len(splits["validation"]) == 5
    assert files["validation"] == "reasoning_gym (validation)"
    assert list(splits["validation"]["prompt"]) == list(load(OPTIONS, 0)["validation"]["prompt"])[:5]


def test_without_reasoning_gym_installed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # what a missing package looks like to import
    with pytest.raises(AdaptkitError, match=r"pip install 'adaptkit\[reasoning\]'"):
        load(OPTIONS, 0)


def test_greedy_generation_with_left_padding_matches_one_prompt_at_a_time():
    """Batched prompts of different lengths (left-padded) get exactly the continuations they get alone."""
    import torch

    from adaptkit.testing import tiny_model, tiny_tokenizer
    from adaptkit_plugins.tasks import generate_texts

    tok = tiny_tokenizer("llama")
    model = tiny_model("llama", "causal_lm", seed=1, pad_token_id=0, eos_token_id=tok.eos_token_id)
    prompts = [
        tok(t)["input_ids"]
        for t in ("one two", "the movie was good and fun", "add three", "what is five plus four minus")
    ]
    torch.manual_seed(0)
    batched = generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=4)
    alone = [generate_texts(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone
    assert all(
        t.strip() for t in batched
    )  # the random model says something, so the comparison means something


def write_recipe(tmp: Path, name: str, data: str, strategy: str, train: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(
        f"model: {{source: {tmp / 'llama'}, task: causal_lm}}\n"
        f"data: {data}\n"
        f"strategies: [{strategy}]\n"
        f"train: {{{train}}}\n"
        f"output: {tmp / 'runs'}/{{name}}\n"
    )
    return path


def test_answer_accuracy_of_a_tiny_llama_trained_end_to_end(tmp_path, host):
    """A run on reasoning_gym data logs answer_accuracy at every evaluation; it decides the best one."""
    from adaptkit.recipe.schema import load_recipe
    from adaptkit.train.loop import train

    save_tiny_pretrained(tmp_path / "llama", "llama", "causal_lm", chat=True)
    data = "{source: reasoning_gym, max_length: 48, options: {task: spell_backward, size: 24, eval_size: 6, max_new_tokens: 4, config: {max_word_len: 4}}}"
    path = write_recipe(
        tmp_path,
        "rg",
        data,
        "{name: lora, r: 4}",
        "max_steps: 4, eval_every: 2, micro_batch_size: 8, lr: 1.0e-3",
    )
    summary = train(load_recipe(path, host=host), host, fresh=True)
    run = tmp_path / "runs" / "rg"
    evals = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 4]
    accs = [m["answer_accuracy"] for m in evals]
    assert all(0.0 <= a <= 1.0 for a in accs)
    saved = json.loads((run / "summary.json").read_text())
    assert (
        saved["final_metrics"]["answer_accuracy"] == accs[-1] == summary["final_metrics"]["answer_accuracy"]
    )
    assert saved["best_metric"] == max(accs) and saved["best_metrics"]["answer_accuracy"] == max(accs)


def write_yes_no(path: Path, n: int, seed: int) -> Path:
    """Prompts whose answer is yes or no by their first word, with an exact-match scorer."""
    rng = random.Random(seed)
    words = "the a movie film story plot actor scene".split()
    with open(path, "w") as f:
        for _ in range(n):
            answer = rng.choice(["yes", "no"])
            cue = rng.choice(["good", "great", "fun"] if answer == "yes" else ["bad", "awful", "dull"])
            prompt = " ".join([cue, *rng.sample(words, 3)])
            f.write(
                json.dumps(
                    {
                        "prompt": prompt,
                        "response": answer,
                        "scorer": "accuracy",
                        "reference": answer,
                        "max_new_tokens": 3,
                    }
                )
                + "\n"
            )
    return path


@pytest.mark.parametrize("chat", [True, False])
def test_a_model_that_learned_the_answers_scores_one_and_an_untrained_one_zero(tmp_path, host, chat):
    """The scoring is real: generation, template, EOS and extraction give 1.0 only when the answers are right."""
    from adaptkit.recipe.schema import load_recipe
    from adaptkit.train.loop import train

    save_tiny_pretrained(tmp_path / "llama", "llama", "causal_lm", chat=chat)
    (tmp_path / "data").mkdir()
    write_yes_no(tmp_path / "data" / "train.jsonl", 64, seed=0)
    write_yes_no(tmp_path / "data" / "validation.jsonl", 16, seed=1)
    data = f"{{source: {tmp_path / 'data'}, max_length: 16}}"
    recipe = load_recipe(
        write_recipe(tmp_path, "full", data, "{name: full}", "epochs: 12, micro_batch_size: 8, lr: 1.0e-2"),
        host=host,
    )
    trained = train(recipe, host, fresh=True)
    assert trained["final_metrics"]["answer_accuracy"] == 1.0
    assert trained["best_metric"] == 1.0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptkit.data.load import load_data

    splits, files = load_data(recipe.data, host, seed=0)
    task = host.lookup("tasks", "causal_lm").obj(recipe.data)
    task.setup(splits, files)
    assert (task.metric, task.greater_is_better) == ("answer_accuracy", True)
    metrics = {name: reg.obj for name, reg in host.registries["metrics"].items()}
    untrained = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    tok = AutoTokenizer.from_pretrained(tmp_path / "llama")
    assert task.generation_metrics(untrained, tok, splits["validation"], metrics) == {"answer_accuracy": 0.0}


def test_rows_without_a_scorer_are_judged_by_loss_and_an_unknown_scorer_is_named(tmp_path, host):
    """No ``scorer`` column: no generation, eval_loss decides. A scorer that is no metric: a DataError naming it."""
    import datasets

    from adaptkit.testing import tiny_model, tiny_tokenizer
    from adaptkit_plugins.tasks import CausalLM

    plain = datasets.Dataset.from_dict({"prompt": ["one two"], "response": ["three"]})
    task = CausalLM(DataSpec(source="x"))
    task.setup({"train": plain, "validation": plain}, {"train": "t", "validation": "v"})
    assert (task.metric, task.greater_is_better) == ("eval_loss", False)
    model, tok = tiny_model("llama", "causal_lm"), tiny_tokenizer("llama")
    assert task.generation_metrics(model, tok, plain, {}) == {}
    scored = plain.add_column("scorer", ["exact"]).add_column("reference", ["three"])
    with pytest.raises(
        DataError,
        match="column 'scorer' names 'exact', which is no registered metric; the metrics are accuracy",
    ):
        task.generation_metrics(model, tok, scored, {"accuracy": None})
