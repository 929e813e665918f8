"""Batch-norm running statistics on a CNN: frozen layers keep theirs under every strategy, trained
ones are saved, so a reloaded or resumed run is the model that trained.

On a tiny random MobileNetV2 (the architecture of the packaged ``mobilenet-v2``), trained in
training mode, where batch norms update their statistics unless told otherwise.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import adaptkit
from adaptkit import Adapted, TrainState
from adaptkit.adapt.statistics import STATISTICS_FILE
from adaptkit.errors import CheckpointError

POINTWISE = ["expand_1x1.convolution", "reduce_1x1.convolution"]
STRATEGIES = {
    "freeze": "freeze",
    "lora": {"name": "lora", "r": 4, "target_modules": POINTWISE},
    # the head at step 0, then one inverted residual a step from the top
    "gradual_unfreeze": {"name": "gradual_unfreeze", "every": 1, "unit": "step"},
    "full": "full",
    "scratch": "scratch",
}
#: Strategies whose batch norms all stay frozen: every statistic must stay the base's, bitwise.
ALL_FROZEN = {"freeze", "lora"}


def tiny_mobilenet(num_labels: int = 3):
    import transformers

    # symmetric padding, as the packaged mobilenet-v2 (TensorFlow's reads the convolution's stride, which
    # peft's LoRA layer does not expose)
    config = transformers.MobileNetV2Config(
        image_size=32, depth_multiplier=0.35, num_labels=num_labels, tf_padding=False
    )
    torch.manual_seed(0)
    model = transformers.MobileNetV2ForImageClassification(config)
    for module in model.modules():  # PyTorch's momentum, as the loader sets it for MobileNets
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    return model


def statistics(model) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("base_model.model."): b.clone()
        for n, b in model.named_buffers()
        if "running_" in n or "num_batches" in n
    }


def batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(6, 3, 32, 32, generator=g) * 2 + 0.5, "labels": torch.arange(6) % 3}


def train_steps(adapted: Adapted, steps: int) -> None:
    """SGD steps in training mode, each on a new batch, with the events the host fires."""
    optimizer = torch.optim.SGD(adapted.param_groups(lr=0.05))
    adapted.model.train()
    adapted.on_event("train_start", TrainState(epoch=0, step=0))
    for step in range(steps):
        adapted.on_event("step_start", TrainState(epoch=0, step=step, steps_per_epoch=steps))
        optimizer.zero_grad(set_to_none=True)
        adapted.model(**batch(step)).loss.backward()
        optimizer.step()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_saved_and_reloaded_cnn_gives_the_logits_it_trained_to(host, tmp_path, strategy):
    """Save, then load onto a fresh base: the same evaluation logits. Frozen batch norms kept the
    base's statistics bitwise; where they trained, their statistics moved and were saved."""
    base = tiny_mobilenet()
    torch.manual_seed(1)  # scratch draws its initialisation from here
    adapted = adaptkit.apply(copy.deepcopy(base), STRATEGIES[strategy], host=host)
    train_steps(adapted, 4)
    adapted.save(tmp_path / "saved")
    after, before = statistics(adapted.model), statistics(base)
    moved = {n for n in before if not torch.equal(after[n], before[n])}
    if strategy in ALL_FROZEN:
        assert not moved and not (tmp_path / "saved" / STATISTICS_FILE).exists()
    else:
        assert moved and (tmp_path / "saved" / STATISTICS_FILE).is_file()

    reloaded = Adapted.load(copy.deepcopy(base), tmp_path / "saved", host=host)
    images = batch(99)["pixel_values"]
    with torch.no_grad():
        expected = adapted.model.eval()(pixel_values=images).logits
        got = reloaded.model.eval()(pixel_values=images).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_under_gradual_unfreezing_a_batch_norm_follows_the_batches_from_its_thaw(host):
    """Still-frozen blocks keep their statistics; thawed ones follow the batches; the layers are
    in the model's mode between calls; in evaluation, nothing moves."""
    base = tiny_mobilenet()
    adapted = adaptkit.apply(copy.deepcopy(base), STRATEGIES["gradual_unfreeze"], host=host)
    train_steps(adapted, 3)  # the head, then blocks 15 and 14
    model, before = adapted.model, statistics(base)
    moved = {n.rsplit(".", 1)[0] for n, b in statistics(model).items() if not torch.equal(b, before[n])}
    thawed = {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and m.weight.requires_grad
    }
    assert moved == thawed, sorted(moved ^ thawed)
    assert {n.split(".")[1] for n in thawed} == {"layer", "conv_1x1"}  # the top's 1x1 goes with the head
    assert {n.split(".")[2] for n in thawed if ".layer." in n} == {"14", "15"}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.training for m in norms)  # the model is in training mode, so are they
    model.eval()
    frozen_now = statistics(model)
    with torch.no_grad():
        model(**batch(7))
    assert all(torch.equal(b, frozen_now[n]) for n, b in statistics(model).items())
    assert not any(m.training for m in norms)


def test_a_frozen_batch_norm_whose_call_raises_is_left_in_the_models_mode(host):
    adapted = adaptkit.apply(tiny_mobilenet(), "freeze", host=host)
    model = adapted.model.train()
    norm = model.mobilenet_v2.conv_stem.first_conv.normalization  # frozen: held while it runs
    with pytest.raises(RuntimeError):
        norm(torch.randn(2, norm.num_features + 1, 4, 4))  # a channel too many: batch norm refuses
    assert norm.training and all(m.training for m in model.modules())


def test_statistics_that_match_no_batch_norm_are_refused(host, tmp_path):
    adapted = adaptkit.apply(tiny_mobilenet(), "full", host=host)
    train_steps(adapted, 1)
    adapted.save(tmp_path / "saved")
    from adaptkit.files import load_tensors, save_tensors

    tensors = load_tensors(tmp_path / "saved" / STATISTICS_FILE)
    tensors["classifier.running_mean"] = torch.zeros(3)
    save_tensors(tensors, tmp_path / "saved" / STATISTICS_FILE)
    with pytest.raises(CheckpointError, match="'classifier.running_mean' matches no batch-norm statistic"):
        Adapted.load(tiny_mobilenet(), tmp_path / "saved", host=host)


# -- through a recipe: the run's own checkpoints and final state -------------------------------


@pytest.fixture(scope="module")
def cnn_run_dir(tmp_path_factory):
    """A tiny MobileNetV2 saved as a model directory, and stripes to classify."""
    from test_image_task import write_image_set

    from adaptkit_plugins.loaders import mobilenet

    d = tmp_path_factory.mktemp("cnn")
    model = tiny_mobilenet(num_labels=2)
    model.config.adaptkit_batch_norm_momentum = 0.1
    model.save_pretrained(d / "cnn")
    processor = mobilenet.image_processor()
    processor.size = {"height": 32, "width": 32}
    processor.save_pretrained(d / "cnn")
    write_image_set(d / "data", n_train=48, n_val=16)
    return d


def cnn_recipe(d, name: str, strategies: str):
    path = d / f"{name}.yaml"
    path.write_text(
        f"model: {{source: {d / 'cnn'}, task: image_classification}}\n"
        f"data: {{source: {d / 'data'}}}\n"
        f"strategies: {strategies}\n"
        "train: {epochs: 2, lr: 1.0e-2, micro_batch_size: 8, save_every: 4, keep_checkpoints: 10}\n"
        f"output: {d / 'runs'}/{{name}}\n"
    )
    return path


@pytest.mark.parametrize(
    "strategies",
    ["[full]", "[{name: lora, r: 4, target_modules: [expand_1x1.convolution]}]"],
    ids=["full", "lora"],
)
def test_a_cnn_run_resumes_exactly_and_its_final_state_reproduces_its_metrics(cnn_run_dir, host, strategies):
    """Resumed from a checkpoint in its first epoch, the run ends with the uninterrupted run's
    weights and statistics; reopened from ``final``, it scores what it reported."""
    from adaptkit.recipe.schema import load_recipe
    from adaptkit.runs import evaluate_run, open_run
    from adaptkit.train.loop import train

    name = "full" if strategies == "[full]" else "lora"
    path = cnn_recipe(cnn_run_dir, name, strategies)
    expected = train(load_recipe(path, host=host), host, fresh=True)
    run_dir = cnn_run_dir / "runs" / name
    final_stats = (run_dir / "final" / STATISTICS_FILE).read_bytes() if name == "full" else None
    assert evaluate_run(open_run(run_dir, host))["eval_loss"] == pytest.approx(
        expected["final_metrics"]["eval_loss"], rel=1e-6
    )

    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == [f"step-{s:08d}" for s in (4, 8, 12)]
    for later in checkpoints[1:]:  # as if killed after step 5: step 4 is the newest checkpoint
        shutil.rmtree(later)
    shutil.rmtree(run_dir / "final")
    (run_dir / "summary.json").unlink()
    resumed = train(load_recipe(path, host=host), host)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 12
    assert resumed["param_digest"] == expected["param_digest"]
    if final_stats is not None:
        assert (run_dir / "final" / STATISTICS_FILE).read_bytes() == final_stats
    assert resumed["final_metrics"]["eval_loss"] == expected["final_metrics"]["eval_loss"]
