"""The training run end to end on tiny models: what trains, what is saved, resume, DDP on 2 CPUs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaptkit.recipe.schema import load_recipe
from adaptkit.testing import save_tiny_pretrained, write_sentiment

ADAPTKIT = [sys.executable, "-m", "adaptkit"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    save_tiny_pretrained(d / "bert", "bert")
    write_sentiment(d / "train.jsonl", 160, seed=0)
    return d


def recipe_file(workdir: Path, name: str, strategies: str, train: str, extra: str = "") -> Path:
    path = workdir / f"{name}.yaml"
    path.write_text(
        f"model: {{source: {workdir / 'bert'}, task: classification}}\n"
        f"data: {{source: {workdir / 'train.jsonl'}, max_length: 16}}\n"
        f"strategies: {strategies}\n"
        f"train: {{{train}}}\n"
        f"output: {workdir / 'runs'}/{{name}}\n{extra}"
    )
    return path


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ADAPTKIT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1", **(env or {})},
    )


def base_weights(workdir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(workdir / "bert" / "model.safetensors"))


def test_freeze_trains_only_what_it_should_and_learns(workdir, host):
    """Frozen weights bitwise unchanged, trained ones changed; the task is learned; final state reloads."""
    import torch

    from adaptkit.runs import evaluate_run, open_run
    from adaptkit.train.loop import train

    path = recipe_file(
        workdir,
        "probe",
        "[{name: freeze, trainable_top_blocks: 1}]",
        "epochs: 4, lr: 1.0e-2, micro_batch_size: 16, weight_decay: 0.1, seed: 0",
    )
    summary = train(load_recipe(path, host=host), host, fresh=True)
    run_dir = workdir / "runs" / "probe"
    assert summary["final_metrics"]["accuracy"] >= 0.8, summary["final_metrics"]
    assert summary["steps"] == 4 * 9  # 144 training rows (10% held out), 16 a batch
    for f in ("summary.json", "metrics.jsonl", "recipe.yaml", "versions.json", "final/adaptkit.json"):
        assert (run_dir / f).is_file(), f
    evals = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "eval_loss" in line
    ]
    assert len(evals) == 4 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]

    opened = open_run(run_dir, host)
    trained = dict(opened.adapted.model.named_parameters())
    base = base_weights(workdir)
    for name, before in base.items():
        key = "bert." + name if "bert." + name in trained else name
        if key not in trained:
            continue
        if ".layer.2." in key:  # the top block; the pooler belongs to the frozen backbone
            assert not torch.equal(trained[key], before), f"{key} should have trained"
        else:
            assert torch.equal(trained[key], before), f"{key} is frozen but changed"
    # the saved final state reproduces the run's own final metrics
    again = evaluate_run(opened)
    assert again["accuracy"] == pytest.approx(summary["final_metrics"]["accuracy"])
    assert again["eval_loss"] == pytest.approx(summary["final_metrics"]["eval_loss"], rel=1e-5)


def test_resume_after_sigkill_matches_uninterrupted_run(workdir):
    """Kill -9 mid-run, resume: same final weights (dropout RNG, data order, optimizer, scheduler restored)."""
    train = "max_steps: 12, lr: 1.0e-3, micro_batch_size: 8, save_every: 3, keep_checkpoints: 2, seed: 1, warmup_ratio: 0.2"
    straight = recipe_file(workdir, "straight", "[full]", train)
    res = run_cli("train", str(straight), "--fresh")
    assert res.returncode == 0, res.stderr[-3000:]
    expected = json.loads((workdir / "runs" / "straight" / "summary.json").read_text())

    killed = recipe_file(workdir, "killed", "[full]", train)
    shutil.rmtree(workdir / "runs" / "killed", ignore_errors=True)
    env = {**os.environ, "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.Popen(
        [*ADAPTKIT, "train", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = workdir / "runs" / "killed" / "checkpoints" / "step-00000006"
    deadline = time.time() + 240
    while not (ckpt / "manifest.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "runs" / "killed" / "summary.json").exists(), (
        "the run finished before it was killed"
    )

    res = run_cli("train", str(killed))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr
    resumed = json.loads((workdir / "runs" / "killed" / "summary.json").read_text())
    assert resumed["param_digest"] == expected["param_digest"]
    assert resumed["final_metrics"] == pytest.approx(expected["final_metrics"])

    def losses(d):
        return [
            h["loss"]
            for h in map(json.loads, (workdir / "runs" / d / "metrics.jsonl").read_text().splitlines())
            if "loss" in h
        ]

    assert losses("killed")[-1] == pytest.approx(losses("straight")[-1])


def test_corrupted_checkpoint_is_skipped_and_rotation_keeps_newest(workdir, host):
    from adaptkit.errors import CheckpointError
    from adaptkit.train.checkpoint import checkpoint_dirs, verify
    from adaptkit.train.loop import train

    path = recipe_file(
        workdir,
        "ckpt",
        "[{name: freeze}]",
        "max_steps: 6, lr: 1.0e-3, micro_batch_size: 8, save_every: 2, keep_checkpoints: 2",
    )
    first = train(load_recipe(path, host=host), host, fresh=True)
    root = workdir / "runs" / "ckpt" / "checkpoints"
    assert [p.name for p in checkpoint_dirs(root)] == ["step-00000004", "step-00000006"]
    newest = root / "step-00000006"
    opt = newest / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        verify(newest)
    # resuming ignores the corrupted step 6, goes back to step 4 and ends where the first run did
    (workdir / "runs" / "ckpt" / "summary.json").unlink()
    second = train(load_recipe(path, host=host), host)
    assert second["param_digest"] == first["param_digest"]


@pytest.mark.distributed
@pytest.mark.parametrize("strategies", ["[lora]", "[{name: gradual_unfreeze, every: 3, unit: step}]"])
def test_two_processes_end_in_sync(workdir, strategies):
    """accelerate launch on 2 CPU processes (gloo): trained weights identical on both ranks,
    including blocks gradual unfreezing thaws after DDP wrapped the model."""
    name = "ddp_lora" if "lora" in strategies else "ddp_gradual"
    # gradual unfreezing with an auto micro-batch: each rank's trial steps thaw the blocks and must give them back unchanged
    batch = (
        "micro_batch_size: auto, effective_batch_size: 8"
        if "gradual" in strategies
        else "micro_batch_size: 8"
    )
    path = recipe_file(workdir, name, strategies, f"max_steps: 8, lr: 1.0e-3, {batch}, weight_decay: 0.1")
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
        str(path),
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
    summary = json.loads((workdir / "runs" / name / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["ranks_in_sync"] is True
    if "gradual" in strategies:
        assert summary["memory_plan"]["tried"] == [8] and summary["micro_batch_size"] == 8
        import torch
        from safetensors.torch import load_file

        saved = load_file(str(workdir / "runs" / name / "final" / "gradual_unfreeze" / "weights.safetensors"))
        base = base_weights(workdir)
        # stage 3 from step 6 on: head, then blocks 2 and 1 thawed after DDP wrapped the model; block 0 never
        assert not torch.equal(
            saved["bert.encoder.layer.1.output.dense.weight"], base["encoder.layer.1.output.dense.weight"]
        )
        assert torch.equal(
            saved["bert.encoder.layer.0.output.dense.weight"], base["encoder.layer.0.output.dense.weight"]
        )


POISON = {
    # NaN weights: every later forward pass gives a NaN loss
    "nan": "        with torch.no_grad():\n"
    "            for p in run.adapted.model.parameters():\n"
    "                if p.requires_grad:\n"
    "                    p.fill_(float('nan'))\n",
    # an infinite loss (an overflow) from the next forward pass on
    "inf": "        model, forward = run.adapted.model, run.adapted.model.forward\n"
    "        def infinite(*args, **kwargs):\n"
    "            out = forward(*args, **kwargs)\n"
    "            out.loss = out.loss * float('inf')\n"
    "            return out\n"
    "        model.forward = infinite\n",
}


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_a_non_finite_loss_stops_with_a_message(workdir, tmp_path, kind):
    """A plugin poisons the model after step 2: the run stops at step 3, exit 2, checkpoint kept."""
    (tmp_path / "poison_plugin.py").write_text(
        "import torch\nfrom adaptkit import hookimpl\n\n"
        "@hookimpl\ndef adaptkit_on_step_end(run, step, logs):\n"
        "    if step == 2:\n" + POISON[kind]
    )
    path = recipe_file(
        workdir, kind, "[full]", "max_steps: 6, lr: 1.0e-3, micro_batch_size: 8, save_every: 1"
    )
    res = run_cli("-p", "poison_plugin", "train", str(path), "--fresh", env={"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"loss is {kind} at step 3" in res.stderr and "Traceback" not in res.stderr
    assert (workdir / "runs" / kind / "checkpoints" / "step-00000002" / "manifest.json").is_file()
    assert not (workdir / "runs" / kind / "checkpoints" / "step-00000003").exists()


def test_an_infinite_loss_changes_no_weight(workdir, host):
    """The loss overflows in the second micro-batch of step 3's window: the run stops before the
    optimizer steps, so every weight is bitwise what step 2 left (the check reads the whole window)."""
    import torch

    from adaptkit import hookimpl
    from adaptkit.errors import TrainingError
    from adaptkit.train.loop import train

    class Poison:
        run, after_step_2 = None, None

        @hookimpl
        def adaptkit_on_step_end(self, run, step, logs):
            if step != 2:
                return
            self.run = run
            self.after_step_2 = {n: p.detach().clone() for n, p in run.adapted.model.named_parameters()}
            model, forward, calls = run.adapted.model, run.adapted.model.forward, []

            def overflow_from_the_second_call(*args, **kwargs):
                out = forward(*args, **kwargs)
                calls.append(1)
                if len(calls) >= 2:
                    out.loss = out.loss * float("inf")
                return out

            model.forward = overflow_from_the_second_call

    poison = Poison()
    host.pm.register(poison, name="poison")
    path = recipe_file(
        workdir,
        "inf_weights",
        "[full]",
        "max_steps: 6, lr: 1.0e-2, micro_batch_size: 4, gradient_accumulation: 2",
    )
    with pytest.raises(TrainingError, match="loss is inf at step 3"):
        train(load_recipe(path, host=host), host, fresh=True)
    now = dict(poison.run.adapted.model.named_parameters())
    assert len(now) == len(poison.after_step_2) > 0
    changed = [n for n, before in poison.after_step_2.items() if not torch.equal(now[n].detach(), before)]
    assert changed == []
    assert all(p.requires_grad for p in now.values())  # full fine-tuning: every one of them would have moved


def test_reload_of_a_classifier_with_a_new_random_head_is_accepted(tmp_path, host):
    """from_pretrained gives a new random head each time; the base check must look at the backbone only."""
    import torch
    import transformers

    import adaptkit
    from adaptkit.errors import CheckpointError
    from adaptkit.testing import save_tiny_pretrained

    save_tiny_pretrained(tmp_path / "base", "bert")
    torch.manual_seed(1)
    first = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    adapted = adaptkit.apply(first, "freeze", host=host)
    adapted.save(tmp_path / "saved")
    torch.manual_seed(2)
    second = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    assert not torch.equal(second.classifier.weight, first.classifier.weight)
    adaptkit.Adapted.load(second, tmp_path / "saved", host=host)  # no CheckpointError
    save_tiny_pretrained(tmp_path / "other", "bert", seed=5)
    third = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "other", num_labels=2)
    with pytest.raises(CheckpointError, match="different base model"):
        adaptkit.Adapted.load(third, tmp_path / "saved", host=host)


@pytest.mark.parametrize("strategies", ["[{name: freeze, trainable_top_blocks: 1}]", "[lora]"])
def test_export_merged_reproduces_the_run_and_predict_works(workdir, host, tmp_path, strategies):
    """`adaptkit export --merge` writes a plain transformers directory with the fine-tuned outputs."""
    import torch
    import transformers

    from adaptkit.export import export
    from adaptkit.runs import open_run, predict
    from adaptkit.train.loop import train

    name = "exp_lora" if "lora" in strategies else "exp_freeze"
    path = recipe_file(workdir, name, strategies, "max_steps: 6, lr: 1.0e-2, micro_batch_size: 16")
    train(load_recipe(path, host=host), host, fresh=True)
    opened = open_run(workdir / "runs" / name, host)
    batch = opened.processor(["the movie was great", "awful and dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = opened.adapted.model(**batch).logits
    out = export(opened, tmp_path / "merged", "transformers")
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        got = plain(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    rows = predict(open_run(workdir / "runs" / name, host), ["the movie was great"])
    assert rows[0]["label"] in ("neg", "pos") and 0.5 <= rows[0]["score"] <= 1.0
    if "lora" in strategies:  # without --merge: the adapter in peft's own format
        import peft

        # merging folded the adapter into the weights of `opened`: export from a fresh open
        adapter = export(open_run(workdir / "runs" / name, host), tmp_path / "adapter", "peft")
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            workdir / "bert", num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}
        )
        reloaded = peft.PeftModel.from_pretrained(base, adapter).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_early_stopping_ends_the_run_after_patience_evaluations(workdir, host):
    """With a learning rate too small to change accuracy, no evaluation improves on the first one."""
    from adaptkit.train.loop import train

    path = recipe_file(
        workdir,
        "early",
        "[freeze]",
        "max_steps: 20, lr: 1.0e-12, micro_batch_size: 8, eval_every: 1, early_stopping_patience: 2",
    )
    summary = train(load_recipe(path, host=host), host, fresh=True)
    assert summary["steps"] == 3  # best at step 1, then two evaluations without improvement
    assert summary["best_step"] == 1
    evals = [
        json.loads(x)
        for x in (workdir / "runs" / "early" / "metrics.jsonl").read_text().splitlines()
        if "eval_loss" in x
    ]
    assert [e["step"] for e in evals] == [1, 2, 3]
