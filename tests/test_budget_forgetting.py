"""Training budgets (tokens, wall time), the `none` and `scratch` baselines, and the forgetting measure."""

from __future__ import annotations

import json

import pytest

from adaptkit.errors import DataError
from adaptkit.recipe.schema import load_recipe
from adaptkit.testing import save_tiny_pretrained, write_sentiment
from adaptkit.train.forgetting import general_texts, measure


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget")
    save_tiny_pretrained(d / "bert", "bert")
    save_tiny_pretrained(d / "gpt2", "gpt2", task="causal_lm")
    write_sentiment(d / "train.jsonl", 160, seed=0)
    return d


def run(
    workdir,
    host,
    strategies: str,
    train: str,
    extra: str = "",
    model: str = "bert",
    task: str = "classification",
):
    from adaptkit.train.loop import train as train_run

    path = workdir / "r.yaml"
    data = (
        f"{{source: {workdir / 'train.jsonl'}, max_length: 16}}"
        if task == "classification"
        else f"{{source: {workdir / 'lm.jsonl'}, max_length: 24}}"
    )
    path.write_text(
        f"model: {{source: {workdir / model}, task: {task}}}\ndata: {data}\nstrategies: {strategies}\n"
        f"train: {{{train}}}\noutput: {workdir / 'runs'}/{{name}}\n{extra}"
    )
    return train_run(load_recipe(path, host=host), host, fresh=True)


def write_lm_text(workdir) -> None:
    """Text far from general prose (``lm.jsonl``): training on it makes a model forget."""
    with open(workdir / "lm.jsonl", "w") as f:
        for _i in range(64):
            f.write(json.dumps({"text": "good great fine nice fun " * 3}) + "\n")


def test_token_budget_stops_training_once_spent(workdir, host):
    summary = run(workdir, host, "[full]", "epochs: 5, micro_batch_size: 8, max_tokens: 200")
    rows = [json.loads(x) for x in (workdir / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] < summary["total_steps"]
    # every example here is 10-12 tokens: 8 of them make at least 80, so the third step crosses 200
    assert summary["steps"] == 3, rows


def test_time_budget_stops_training(workdir, host):
    summary = run(workdir, host, "[full]", "epochs: 50, micro_batch_size: 8, max_time: 0.5")
    assert 1 <= summary["steps"] < summary["total_steps"]
    assert summary["wall_time_s"] < 20


def test_none_baseline_takes_no_step_and_changes_nothing(workdir, host):
    import torch

    from adaptkit.runs import open_run

    summary = run(workdir, host, "[none]", "epochs: 1")
    assert summary["steps"] == 0 and summary["trainable_parameters"] == 0
    assert summary["final_metrics"]["accuracy"] is not None and summary["best_metric"] is not None
    assert not (workdir / "runs" / "r" / "checkpoints").exists()
    # the backbone is the pretrained one, bit for bit
    from safetensors.torch import load_file

    base = load_file(str(workdir / "bert" / "model.safetensors"))
    model = dict(open_run(workdir / "runs" / "r", host).adapted.model.named_parameters())
    for name, tensor in base.items():
        if ("bert." + name) in model:
            assert torch.equal(model["bert." + name], tensor), name


def test_scratch_reinitialises_every_backbone_weight_and_trains_all(workdir, host):
    import torch
    from safetensors.torch import load_file

    from adaptkit.runs import open_run

    summary = run(workdir, host, "[scratch]", "max_steps: 2, lr: 1.0e-3")
    assert summary["trainable_parameters"] == summary["total_parameters"]
    base = load_file(str(workdir / "bert" / "model.safetensors"))
    model = dict(open_run(workdir / "runs" / "r", host).adapted.model.named_parameters())
    matrices = [n for n, t in base.items() if t.ndim == 2 and "bert." + n in model]
    assert matrices and all(not torch.equal(model["bert." + n], base[n]) for n in matrices)


def test_general_texts_are_prose_from_python_docs(tmp_path):
    texts = general_texts("pydoc", 8)
    assert len(texts) == 8 and all(len(t) >= 200 for t in texts)
    assert not any(t.startswith(">>>") for t in texts)
    assert general_texts("pydoc", 8) == texts  # the same sample every time
    f = tmp_path / "prose.txt"
    f.write_text(("A paragraph of plain English prose, long enough to count. " * 5 + "\n\n") * 3)
    assert len(general_texts(str(f), 16)) == 3
    with pytest.raises(DataError, match="no such file"):
        general_texts(str(tmp_path / "missing.txt"), 4)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(DataError, match="200 characters"):
        general_texts(str(tmp_path / "short.txt"), 4)


def test_forgetting_is_zero_for_an_untouched_model_and_grows_with_training(workdir, host):
    """LM loss on general text: exactly the same before and after `none`; up after full training on other text."""
    write_lm_text(workdir)
    untouched = run(
        workdir,
        host,
        "[none]",
        "epochs: 1",
        extra="forgetting: {max_texts: 4, max_length: 24}",
        model="gpt2",
        task="language_modeling",
    )
    assert untouched["forgetting"]["value"] == 0.0 and untouched["forgetting"]["perplexity_ratio"] == 1.0
    tuned = run(
        workdir,
        host,
        "[full]",
        "epochs: 3, lr: 1.0e-2",
        extra="forgetting: {max_texts: 4, max_length: 24}",
        model="gpt2",
        task="language_modeling",
    )
    assert tuned["forgetting"]["loss_before"] == pytest.approx(untouched["forgetting"]["loss_before"])
    assert tuned["forgetting"]["value"] > 0.1, tuned["forgetting"]


def test_measure_skips_models_without_a_tokenizer():
    assert measure(object(), object(), ["text"], 16, causal=True) is None


def test_forgetting_at_every_evaluation_ends_at_the_runs_own(workdir, host):
    """``forgetting.every_evaluation`` logs the forgetting of each evaluation's model; the last
    one is the run's final forgetting, measured on the same weights, and it grows as full
    training on other text goes on."""
    write_lm_text(workdir)
    summary = run(
        workdir,
        host,
        "[full]",
        "max_steps: 6, eval_every: 2, save_every: 2, keep_checkpoints: 2, lr: 1.0e-2",
        extra="forgetting: {max_texts: 4, max_length: 24, every_evaluation: true}",
        model="gpt2",
        task="language_modeling",
    )
    lines = (workdir / "runs" / "r" / "metrics.jsonl").read_text().splitlines()
    evaluations = [e for e in map(json.loads, lines) if "eval_loss" in e]
    assert [e["step"] for e in evaluations] == [2, 4, 6]
    forgetting = [e["forgetting"] for e in evaluations]
    assert forgetting[-1] == pytest.approx(summary["forgetting"]["value"], abs=1e-6)
    assert 0 < forgetting[0] < forgetting[-1], forgetting
    assert "forgetting" not in summary["final_metrics"]  # the summary has its own, for the final model
    # what the comparison report reads back for the balanced checkpoint
    from adaptkit.compare.child import row_from_run

    row = row_from_run(workdir / "runs" / "r", "full", 0, workdir)
    assert [h["step"] for h in row["forgetting_history"]] == [2, 4, 6]
    assert [h["forgetting"] for h in row["forgetting_history"]] == forgetting
    assert row["checkpoint_steps"] == [4, 6]  # the two kept
