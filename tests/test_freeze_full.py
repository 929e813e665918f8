"""``freeze`` and ``full`` on every tiny family: what trains, that frozen weights never move,
that every trainable weight gets a gradient (with and without gradient checkpointing), tied
embeddings, saving and loading, and the combinations that are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adaptkit
from adaptkit import Adapted, StrategyError, TrainState
from adaptkit.contract.anatomy import tied_groups
from adaptkit.errors import CheckpointError, SharedParameterError
from adaptkit.testing import tiny_inputs, tiny_model

FAMILIES = ("bert", "gpt2", "llama", "vit")

# Written out per family rather than derived with adaptkit.contract.anatomy, so the expected counts are
# computed independently of the code under test.
HEAD = {
    "bert": lambda m: m.classifier,
    "gpt2": lambda m: m.score,
    "llama": lambda m: m.score,
    "vit": lambda m: m.classifier,
}
BLOCKS = {
    "bert": lambda m: m.bert.encoder.layer,
    "gpt2": lambda m: m.transformer.h,
    "llama": lambda m: m.model.layers,
    "vit": lambda m: m.vit.layers,
}
# (trainable_modules entry, the modules it must select)
MODULES = {
    "bert": ("query", lambda m: [b.attention.self.query for b in m.bert.encoder.layer]),
    "gpt2": ("c_attn", lambda m: [b.attn.c_attn for b in m.transformer.h]),
    "llama": ("q_proj", lambda m: [b.self_attn.q_proj for b in m.model.layers]),
    "vit": ("q_proj", lambda m: [b.attention.q_proj for b in m.vit.layers]),
}


def params_of(*modules: nn.Module) -> dict[int, nn.Parameter]:
    return {id(p): p for m in modules for p in m.parameters()}


def numel(params: dict[int, nn.Parameter]) -> int:
    return sum(p.numel() for p in params.values())


def trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def train(
    adapted: Adapted, steps: int = 3, lr: float = 1e-2, weight_decay: float = 0.1, set_to_none: bool = True
):
    """The host's loop in miniature: one optimizer over ``param_groups``, events, ``set_to_none``."""
    model = adapted.model
    optimizer = torch.optim.AdamW(adapted.param_groups(lr, weight_decay=weight_decay))
    batch = tiny_inputs(model)
    adapted.on_event("train_start", TrainState())
    for step in range(steps):
        adapted.on_event("step_start", TrainState(step=step))
        optimizer.zero_grad(set_to_none=set_to_none)
        model(**batch).loss.backward()
        optimizer.step()
    return optimizer


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- what trains ---------------------------------------------------------------------------


def expected_trainable(family: str, model: nn.Module, option: str) -> tuple[dict, dict[int, nn.Parameter]]:
    head = params_of(HEAD[family](model))
    if option == "head":
        return {}, head
    if option == "top_blocks":
        return {"trainable_top_blocks": 2}, {**head, **params_of(*BLOCKS[family](model)[-2:])}
    if option == "norms":
        norms = [
            m for m in model.modules() if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")
        ]
        assert norms
        return {"train_head": False, "train_norms": True}, params_of(*norms)
    if option == "biases":
        biases = {id(p): p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
        return {"train_biases": True}, {**head, **biases}
    if option == "modules":
        suffix, modules = MODULES[family]
        return {"train_head": False, "trainable_modules": [suffix]}, params_of(*modules(model))
    raise AssertionError(option)


@pytest.mark.parametrize("option", ["head", "top_blocks", "norms", "biases", "modules"])
@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_trains_exactly_what_is_configured(host, family, option):
    model = tiny_model(family)
    total = sum(p.numel() for p in model.parameters())
    options, expected = expected_trainable(family, model, option)
    adapted = adaptkit.apply(model, "freeze", host=host, **options)
    assert trainable_ids(adapted.model) == set(expected)
    assert adapted.num_trainable() == numel(expected)
    assert 0 < adapted.num_trainable() < total
    assert adapted.num_total() == total
    # the default save writes exactly what trains
    assert {id(p) for p in adapted.strategies[0].owned.values()} == set(expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_trains_everything(host, family):
    model = tiny_model(family)
    for p in model.parameters():
        p.requires_grad_(False)  # full must switch them all on, whatever the loader left
    adapted = adaptkit.apply(model, "full", host=host)
    assert adapted.num_trainable() == adapted.num_total() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["freeze", "full"])
def test_frozen_weights_stay_bitwise_equal_and_trainable_ones_move(host, family, strategy):
    options = {"trainable_top_blocks": 1} if strategy == "freeze" else {}
    adapted = adaptkit.apply(tiny_model(family), strategy, host=host, **options)
    before = snapshot(adapted.model)
    train(adapted, steps=3, weight_decay=0.1)
    frozen = [n for n, p in adapted.model.named_parameters() if not p.requires_grad]
    moved = [
        n for n, p in adapted.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert all(torch.equal(dict(adapted.model.named_parameters())[n], before[n]) for n in frozen)
    assert sorted(moved) == sorted(n for n, p in adapted.model.named_parameters() if p.requires_grad)
    assert bool(frozen) == (strategy == "freeze")


def test_frozen_batch_norms_keep_their_running_statistics_in_training(host):
    """A probe on a CNN: the frozen batch norms normalise as in evaluation and their buffers stay
    bitwise; with ``train_norms`` they train and follow the batches as usual."""
    import transformers

    config = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=3)
    torch.manual_seed(0)
    base = transformers.MobileNetV2ForImageClassification(config)
    pixels, labels = torch.randn(4, 3, 32, 32) * 3 + 1, torch.tensor([0, 1, 2, 0])

    def stats(model) -> dict:
        return {n: b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n}

    for options, follows in (({}, False), ({"train_norms": True}, True)):
        adapted = adaptkit.apply(copy.deepcopy(base), "freeze", host=host, **options)
        model, before = adapted.model.train(), stats(adapted.model)
        model(pixel_values=pixels, labels=labels).loss.backward()
        changed = [n for n, b in stats(model).items() if not torch.equal(b, before[n])]
        assert bool(changed) == follows, changed
        assert model.classifier.weight.grad is not None  # the head still learns
        assert model.training  # the model as a whole stays in training mode
    # applied twice (a resume), each layer is kept once
    twice = adaptkit.apply(
        adaptkit.apply(copy.deepcopy(base), "freeze", host=host).model, "freeze", host=host
    )
    assert all(len(m._forward_pre_hooks) <= 1 for m in twice.model.modules())


def test_a_parameter_frozen_after_it_had_a_grad_is_not_decayed(host):
    """AdamW skips a parameter whose grad is None, but not one holding a stale zero grad."""
    results = {}
    for set_to_none in (True, False):
        adapted = adaptkit.apply(tiny_model("bert"), "freeze", host=host, trainable_top_blocks=1)
        optimizer = train(adapted, steps=2)
        weight = adapted.model.bert.encoder.layer[-1].intermediate.dense.weight
        assert optimizer.state[weight]["exp_avg"].abs().sum() > 0  # it did train, with momentum
        weight.requires_grad_(False)  # frozen now, e.g. by a schedule
        before = weight.detach().clone()
        batch = tiny_inputs(adapted.model)
        for _ in range(2):
            optimizer.zero_grad(set_to_none=set_to_none)
            adapted.model(**batch).loss.backward()
            optimizer.step()
        results[set_to_none] = torch.equal(weight, before)
    # the host's way (set_to_none=True) keeps it exactly; the other way shows the trap is real
    assert results == {True: True, False: False}


# -- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
@pytest.mark.parametrize("strategy", ["freeze", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_trainable_parameter_gets_a_gradient(host, family, strategy, checkpointing):
    """Preflight, with and without reentrant checkpointing: one backward reaches every trainable parameter with a non-zero grad."""
    options = {"trainable_top_blocks": 1} if strategy == "freeze" else {}
    adapted = adaptkit.apply(tiny_model(family), strategy, host=host, **options)
    model = adapted.model
    if checkpointing:
        reentrant = checkpointing == "reentrant"
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            # frozen embeddings give the checkpointed blocks no input that requires grad
            model.enable_input_require_grads()
        assert model.is_activation_checkpointing
    model.train()  # transformers only checkpoints in training mode
    model(**tiny_inputs(model)).loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert missing == []
    assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)


def test_reentrant_checkpointing_without_input_grads_loses_the_block_gradients(host):
    """The control for the test above: the trap it guards against is real (ViT, frozen patch embeddings)."""
    adapted = adaptkit.apply(tiny_model("vit"), "freeze", host=host, trainable_top_blocks=1)
    model = adapted.model
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        model(**tiny_inputs(model)).loss.backward()
    assert model.vit.layers[-1].attention.q_proj.weight.grad is None
    assert model.classifier.weight.grad is not None


# -- tied embeddings ------------------------------------------------------------------------


def tied_llama():
    model = tiny_model("llama", "causal_lm", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_freeze_refuses_a_trainable_head_tied_to_frozen_embeddings(host):
    with pytest.raises(SharedParameterError, match="tied_head"):
        adaptkit.apply(tied_llama(), "freeze", host=host)


def test_freeze_untie_trains_a_separate_head(host):
    adapted = adaptkit.apply(tied_llama(), "freeze", host=host, tied_head="untie")
    model = adapted.model
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert tied_groups(model) == [] and model.config.tie_word_embeddings is False
    assert trainable_ids(model) == {id(model.lm_head.weight)}
    embed = model.model.embed_tokens.weight.detach().clone()
    train(adapted)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert not torch.equal(model.lm_head.weight, embed)


def test_freeze_share_trains_the_shared_weight(host):
    adapted = adaptkit.apply(tied_llama(), "freeze", host=host, tied_head="share")
    model = adapted.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert trainable_ids(model) == {id(model.lm_head.weight)}
    assert adapted.num_trainable() == model.lm_head.weight.numel()
    embed = model.model.embed_tokens.weight.detach().clone()
    train(adapted)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(model.model.embed_tokens.weight, embed)


def test_trainable_modules_matching_nothing_names_it(host):
    with pytest.raises(StrategyError, match="'no_such_module'"):
        adaptkit.apply(tiny_model("bert"), "freeze", host=host, trainable_modules=["query", "no_such_module"])


# -- saving and loading ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("strategy", ["freeze", "full"])
def test_save_load_roundtrip_gives_identical_logits(host, tmp_path, family, strategy):
    options = {"trainable_top_blocks": 1, "train_norms": True} if strategy == "freeze" else {}
    adapted = adaptkit.apply(tiny_model(family, seed=3), strategy, host=host, **options)
    untrained = adapted.model(**tiny_inputs(adapted.model)).logits.detach()
    train(adapted, steps=2)
    batch = tiny_inputs(adapted.model)
    with torch.no_grad():
        expected = adapted.model(**batch).logits
    assert not torch.allclose(expected, untrained)
    adapted.save(tmp_path / "ckpt")

    loaded = Adapted.load(tiny_model(family, seed=3), tmp_path / "ckpt", host=host)
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, expected)
    assert loaded.num_trainable() == adapted.num_trainable()

    with pytest.raises(CheckpointError, match="different base"):
        Adapted.load(tiny_model(family, seed=4), tmp_path / "ckpt", host=host)


# -- combinations ---------------------------------------------------------------------------


@pytest.mark.parametrize("stack", [["full", "freeze"], ["freeze", "full"], ["gradual_unfreeze", "full"]])
def test_full_combines_with_nothing(host, stack):
    with pytest.raises(StrategyError, match="'full' trains the whole model"):
        adaptkit.apply(tiny_model("bert"), stack, host=host)


def test_freeze_after_a_peft_strategy_is_refused(host):
    if "lora" not in host.registries["strategies"]:
        pytest.skip("the lora plugin is not available")
    with pytest.raises(StrategyError, match="put 'freeze' before 'lora'"):
        adaptkit.apply(tiny_model("bert"), ["lora", "freeze"], host=host)
