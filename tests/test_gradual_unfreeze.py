"""``gradual_unfreeze`` (ULMFiT): the schedule of trainable groups, discriminative learning rates,
an optimizer built once and scheduling groups unfrozen later, frozen groups untouched by AdamW, resuming, saving, ties and
composition with other strategies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaptkit
from adaptkit import Adapted, ConfigError, StrategyError, TrainState
from adaptkit.errors import SharedParameterError
from adaptkit.testing import tiny_inputs, tiny_model

FAMILIES = ("bert", "gpt2", "llama", "vit")
BASE_LR = 1e-2


def groups_of(family: str, model: nn.Module) -> list[dict[int, nn.Parameter]]:
    """The expected unfreezing groups, top first, written out per family (not via adaptkit.contract.anatomy)."""
    if family == "bert":
        top, blocks, bottom = (
            [model.classifier, model.bert.pooler],
            model.bert.encoder.layer,
            [model.bert.embeddings],
        )
    elif family == "gpt2":
        top, blocks, bottom = (
            [model.score, model.transformer.ln_f],
            model.transformer.h,
            [model.transformer.wte, model.transformer.wpe],
        )
    elif family == "llama":
        top, blocks, bottom = [model.score, model.model.norm], model.model.layers, [model.model.embed_tokens]
    elif family == "vit":
        top, blocks, bottom = (
            [model.classifier, model.vit.layernorm],
            model.vit.layers,
            [model.vit.embeddings],
        )
    else:
        raise AssertionError(family)
    parts = [top, *([b] for b in reversed(blocks)), bottom]
    return [{id(p): p for m in part for p in m.parameters()} for part in parts]


def union(groups) -> set[int]:
    return {i for g in groups for i in g}


def trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def numel(groups) -> int:
    return sum(p.numel() for g in groups for p in g.values())


def lr_of(optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


def run_epochs(
    adapted: Adapted, optimizer, epochs: range, steps_per_epoch: int = 2, scheduler=None, on_step=None
):
    """The host's loop in miniature: events from the TrainState, ``zero_grad(set_to_none=True)``."""
    model = adapted.model
    batch = tiny_inputs(model)
    adapted.on_event("train_start", TrainState(epoch=epochs.start, step=epochs.start * steps_per_epoch))
    for epoch in epochs:
        adapted.on_event(
            "epoch_start",
            TrainState(epoch=epoch, step=epoch * steps_per_epoch, steps_per_epoch=steps_per_epoch),
        )
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            adapted.on_event(
                "step_start", TrainState(epoch=epoch, step=step, steps_per_epoch=steps_per_epoch)
            )
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if on_step is not None:
                on_step(step)


# -- the schedule ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_one_more_group_unfreezes_every_epoch(host, family):
    adapted = adaptkit.apply(tiny_model(family), "gradual_unfreeze", host=host)
    model, strategy = adapted.model, adapted.strategies[0]
    groups = groups_of(family, model)
    assert len(groups) == 5
    assert strategy.group_names() == ["head", "block.2", "block.1", "block.0", "embeddings"]
    assert union(groups) == {id(p) for p in model.parameters()}  # every parameter is in some group
    assert trainable_ids(model) == set(groups[0])  # apply: the head group only
    for epoch in range(7):
        before = trainable_ids(model)
        adapted.on_event("epoch_start", TrainState(epoch=epoch))
        changed = trainable_ids(model) != before
        stage = min(epoch + 1, 5)
        assert changed == (1 <= epoch <= 4)
        assert trainable_ids(model) == union(groups[:stage])
        assert adapted.num_trainable() == numel(groups[:stage])
        assert {id(p) for p in adapted.pending_parameters()} == union(groups[stage:])
        adapted.on_event("step_start", TrainState(epoch=epoch, step=epoch * 10))
        assert trainable_ids(model) == union(groups[:stage])  # unit is epoch: steps change nothing


def test_unit_step_and_every(host):
    adapted = adaptkit.apply(tiny_model("bert"), "gradual_unfreeze", host=host, unit="step", every=3)
    groups = groups_of("bert", adapted.model)
    for step in range(16):
        # the stage follows the step count whichever event carries it
        event = "epoch_start" if step % 4 == 0 else "step_start"
        adapted.on_event(event, TrainState(step=step, epoch=step // 4))
        assert trainable_ids(adapted.model) == union(groups[: min(1 + step // 3, 5)]), step


def test_max_groups_stops_after_head_and_top_blocks(host):
    adapted = adaptkit.apply(tiny_model("llama"), "gradual_unfreeze", host=host, max_groups=3)
    model, strategy = adapted.model, adapted.strategies[0]
    groups = groups_of("llama", model)
    assert strategy.group_names() == ["head", "block.2", "block.1"]
    assert {id(p) for p in adapted.pending_parameters()} == union(groups[1:3])
    assert {id(p) for p in strategy.owned.values()} == union(groups[:3])
    optimizer = torch.optim.AdamW(adapted.param_groups(BASE_LR, weight_decay=0.1))
    assert set(lr_of(optimizer)) == union(groups[:3])  # the bottom block and embeddings never enter it
    for epoch in range(6):
        adapted.on_event("epoch_start", TrainState(epoch=epoch))
        assert trainable_ids(model) == union(groups[: min(epoch + 1, 3)])
    assert adapted.num_trainable() == numel(groups[:3])


def test_max_groups_larger_than_the_model_means_all(host):
    adapted = adaptkit.apply(tiny_model("gpt2"), "gradual_unfreeze", host=host, max_groups=50)
    adapted.on_event("train_start", TrainState(epoch=100))
    assert adapted.num_trainable() == adapted.num_total()


def test_bare_backbone_without_head_starts_at_the_top(host):
    """A BertModel without pooler has nothing above its blocks: the top block is group 0, at the full lr."""
    model = tiny_model("bert", "base")
    model.pooler = None
    adapted = adaptkit.apply(model, "gradual_unfreeze", host=host)
    assert adapted.strategies[0].group_names() == ["block.2", "block.1", "block.0", "embeddings"]
    assert trainable_ids(model) == {id(p) for p in model.encoder.layer[2].parameters()}
    lrs = lr_of(torch.optim.AdamW(adapted.param_groups(BASE_LR)))
    assert lrs[id(model.encoder.layer[2].output.dense.weight)] == BASE_LR


def test_invalid_configs_are_reported_with_their_path(host):
    with pytest.raises(ConfigError) as info:
        adaptkit.apply(
            tiny_model("bert"), "gradual_unfreeze", host=host, every=0, unit="batch", lr_decay=0, max_groups=0
        )
    paths = sorted(path for path, _ in info.value.problems)
    assert paths == [f"strategies[0].{f}" for f in ("every", "lr_decay", "max_groups", "unit")]


# -- the optimizer: built once, frozen groups untouched, discriminative and scheduled lrs ---


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_blocks_move_only_after_they_unfreeze_yet_sit_in_the_optimizer_from_the_start(host, family):
    adapted = adaptkit.apply(tiny_model(family), "gradual_unfreeze", host=host)
    model = adapted.model
    groups = groups_of(family, model)
    optimizer = torch.optim.AdamW(adapted.param_groups(BASE_LR, weight_decay=0.1))
    assert set(lr_of(optimizer)) == union(groups)  # every group, frozen ones included
    initial = {i: p.detach().clone() for i, p in ((i, p) for g in groups for i, p in g.items())}

    def unchanged(group):
        return [torch.equal(p, initial[i]) for i, p in group.items()]

    for epoch in range(5):
        run_epochs(adapted, optimizer, range(epoch, epoch + 1))
        stage = epoch + 1
        for k, group in enumerate(groups):
            if k < stage:
                assert not any(unchanged(group)), (epoch, k)  # trained, every parameter of it
            else:
                # weight decay 0.1 and a high lr, yet bitwise unchanged, with no AdamW state at all
                assert all(unchanged(group)), (epoch, k)
                assert all(p not in optimizer.state for p in group.values())
                assert all(p.grad is None for p in group.values())


def test_discriminative_learning_rates(host):
    for decay in (2.6, 1.5):
        options = {} if decay == 2.6 else {"lr_decay": decay}
        adapted = adaptkit.apply(tiny_model("bert"), "gradual_unfreeze", host=host, **options)
        groups = groups_of("bert", adapted.model)
        optimizer = torch.optim.AdamW(adapted.param_groups(BASE_LR, weight_decay=0.1))
        lrs = lr_of(optimizer)
        for k, group in enumerate(groups):
            assert {lrs[i] for i in group} == {BASE_LR / decay**k}, (decay, k)
        # decay stays off biases and norms whatever their group
        for g in optimizer.param_groups:
            assert g["weight_decay"] == (0.1 if all(p.ndim > 1 for p in g["params"]) else 0.0)


def test_a_linear_schedule_covers_groups_unfrozen_later(host):
    """transformers #20029: a group added after the scheduler was built is not scheduled."""
    steps_per_epoch, epochs = 2, 5
    total = steps_per_epoch * epochs
    adapted = adaptkit.apply(tiny_model("gpt2"), "gradual_unfreeze", host=host)
    groups = groups_of("gpt2", adapted.model)
    optimizer = torch.optim.AdamW(adapted.param_groups(BASE_LR, weight_decay=0.1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / total)
    embeddings = next(iter(groups[-1].values()))
    before = embeddings.detach().clone()
    seen = []

    def check(step):
        factor = 1 - (step + 1) / total
        lrs = lr_of(optimizer)
        for k, group in enumerate(groups):
            assert [lrs[i] for i in group] == pytest.approx([BASE_LR / 2.6**k * factor] * len(group)), (
                step,
                k,
            )
        seen.append(torch.equal(embeddings, before))

    run_epochs(adapted, optimizer, range(epochs), steps_per_epoch, scheduler=scheduler, on_step=check)
    # the embeddings unfroze in the last epoch, at the scheduled (decayed) rate, and trained
    assert seen == [True] * 8 + [False] * 2
    assert optimizer.param_groups[0]["initial_lr"] > 0


# -- resuming -------------------------------------------------------------------------------


def test_resuming_reproduces_the_stage_and_the_optimizer_groups(host):
    reference = adaptkit.apply(tiny_model("vit"), "gradual_unfreeze", host=host)
    structure = [
        (g["name"], g["lr"], [p.shape for p in g["params"]]) for g in reference.param_groups(BASE_LR, 0.1)
    ]
    stages = []
    for epoch in range(6):
        reference.on_event("epoch_start", TrainState(epoch=epoch))
        stages.append(trainable_ids(reference.model))
    for epoch in range(6):
        fresh = adaptkit.apply(tiny_model("vit"), "gradual_unfreeze", host=host)
        fresh.on_event("train_start", TrainState(epoch=epoch))
        names = {id(p): n for n, p in fresh.model.named_parameters()}
        ref_names = {id(p): n for n, p in reference.model.named_parameters()}
        expected = {ref_names[i] for i in stages[epoch]}
        assert {names[i] for i in trainable_ids(fresh.model)} == expected
        # same groups, same order, whatever the stage: a saved optimizer state loads back onto the same parameters
        groups = fresh.param_groups(BASE_LR, 0.1)
        assert [(g["name"], g["lr"], [p.shape for p in g["params"]]) for g in groups] == structure
    # the stage is a function of the state alone: going back re-freezes
    fresh.on_event("train_start", TrainState(epoch=0))
    assert fresh.num_trainable() == sum(p.numel() for p in reference.model.parameters() if id(p) in stages[0])


def test_an_interrupted_run_resumes_bitwise(host):
    def fresh():
        adapted = adaptkit.apply(tiny_model("bert"), "gradual_unfreeze", host=host)
        return adapted

    full = fresh()
    opt = torch.optim.AdamW(full.param_groups(BASE_LR, weight_decay=0.1))
    run_epochs(full, opt, range(4))
    expected = {n: p.detach().clone() for n, p in full.model.named_parameters()}

    first = fresh()
    opt = torch.optim.AdamW(first.param_groups(BASE_LR, weight_decay=0.1))
    run_epochs(first, opt, range(2))
    weights, opt_state = first.model.state_dict(), opt.state_dict()

    second = fresh()
    second.model.load_state_dict(weights)
    second.on_event("train_start", TrainState(epoch=2, step=4))  # restored before the optimizer is rebuilt
    opt = torch.optim.AdamW(second.param_groups(BASE_LR, weight_decay=0.1))
    opt.load_state_dict(opt_state)
    run_epochs(second, opt, range(2, 4))
    for n, p in second.model.named_parameters():
        assert torch.equal(p, expected[n]), n


# -- gradients, saving, ties, composition ----------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_trainable_parameter_gets_a_gradient_at_every_stage(host, family):
    adapted = adaptkit.apply(tiny_model(family), "gradual_unfreeze", host=host)
    model = adapted.model
    batch = tiny_inputs(model)
    for epoch in (0, 2, 4):
        adapted.on_event("epoch_start", TrainState(epoch=epoch))
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        assert [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
        ] == []
        assert [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None] == []


def test_save_load_roundtrip(host, tmp_path):
    adapted = adaptkit.apply(tiny_model("llama", seed=5), "gradual_unfreeze", host=host, max_groups=4)
    optimizer = torch.optim.AdamW(adapted.param_groups(BASE_LR, weight_decay=0.1))
    run_epochs(adapted, optimizer, range(3))
    batch = tiny_inputs(adapted.model)
    with torch.no_grad():
        expected = adapted.model(**batch).logits
    adapted.save(tmp_path / "ckpt")

    loaded = Adapted.load(tiny_model("llama", seed=5), tmp_path / "ckpt", host=host)
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, expected)
    loaded.on_event("train_start", TrainState(epoch=3))
    assert trainable_ids(loaded.model) == union(groups_of("llama", loaded.model)[:4])  # epoch 3: stage 4
    assert loaded.strategies[0].config.max_groups == 4


def tied_gpt2():
    model = tiny_model("gpt2", "causal_lm")
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def test_tied_head_is_refused_by_default(host):
    with pytest.raises(SharedParameterError, match="tied_head"):
        adaptkit.apply(tied_gpt2(), "gradual_unfreeze", host=host)


def test_tied_head_share_trains_the_shared_weight_with_the_head(host):
    adapted = adaptkit.apply(tied_gpt2(), "gradual_unfreeze", host=host, tied_head="share")
    model = adapted.model
    assert trainable_ids(model) == {
        id(p) for p in [model.lm_head.weight, *model.transformer.ln_f.parameters()]
    }
    lrs = lr_of(torch.optim.AdamW(adapted.param_groups(BASE_LR)))
    assert lrs[id(model.transformer.wte.weight)] == BASE_LR
    assert lrs[id(model.transformer.wpe.weight)] == BASE_LR / 2.6**4


def test_tied_head_untie_gives_the_head_its_own_weight(host, tmp_path):
    adapted = adaptkit.apply(tied_gpt2(), "gradual_unfreeze", host=host, tied_head="untie")
    model = adapted.model
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert not model.transformer.wte.weight.requires_grad and model.lm_head.weight.requires_grad
    wte = model.transformer.wte.weight.detach().clone()
    run_epochs(adapted, torch.optim.AdamW(adapted.param_groups(BASE_LR, 0.1)), range(1))
    assert torch.equal(model.transformer.wte.weight, wte) and not torch.equal(model.lm_head.weight, wte)
    adapted.save(tmp_path / "ckpt")
    loaded = Adapted.load(tied_gpt2(), tmp_path / "ckpt", host=host)
    assert torch.equal(loaded.model.lm_head.weight, model.lm_head.weight)


def test_after_freeze_it_keeps_what_freeze_trains_and_schedules_the_rest(host):
    """Placed after another strategy, it only unfreezes what that strategy left frozen."""
    adapted = adaptkit.apply(
        tiny_model("bert"),
        [
            {"name": "freeze", "train_head": False, "train_biases": True},
            {"name": "gradual_unfreeze", "max_groups": 2},
        ],
        host=host,
    )
    model = adapted.model
    freeze, gradual = adapted.strategies
    groups = groups_of("bert", model)
    biases = {id(p) for n, p in model.named_parameters() if n.endswith(".bias")}
    assert trainable_ids(model) == biases | set(groups[0])
    assert {id(p) for p in gradual.owned.values()} == union(groups[:2]) - biases
    adapted.on_event("epoch_start", TrainState(epoch=5))
    assert trainable_ids(model) == biases | union(groups[:2])
    lrs = lr_of(torch.optim.AdamW(adapted.param_groups(BASE_LR)))
    bias = model.bert.encoder.layer[2].output.dense.bias
    assert lrs[id(bias)] == BASE_LR  # freeze's parameter keeps the default group
    assert lrs[id(model.bert.encoder.layer[2].output.dense.weight)] == BASE_LR / 2.6
    assert id(model.bert.encoder.layer[0].output.dense.bias) in biases  # still trainable: freeze's choice


def test_after_lora_it_unfreezes_the_base_weights_of_the_top_blocks(host, tmp_path):
    """ "LoRA everywhere, plus full training of the head and then of the top blocks"."""
    if "lora" not in host.registries["strategies"]:
        pytest.skip("the lora plugin is not available")
    stack = [
        {"name": "lora", "init": "random", "dropout": 0.0},
        {"name": "gradual_unfreeze", "max_groups": 3},
    ]
    adapted = adaptkit.apply(tiny_model("bert", seed=2), stack, host=host)
    model, gradual = adapted.model, adapted.strategies[1]

    def trainable():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    lora = {n for n, _ in model.named_parameters() if ".lora_" in n or ".modules_to_save." in n}
    assert lora and lora <= trainable()  # lora's own parameters train from the start, untouched
    assert not any(".lora_" in n or "modules_to_save" in n or "original_module" in n for n in gradual.owned)
    assert trainable() - lora == {
        "base_model.model.bert.pooler.dense.weight",
        "base_model.model.bert.pooler.dense.bias",
    }

    def block(i):
        prefix = f"base_model.model.bert.encoder.layer.{i}."
        return {n for n, _ in model.named_parameters() if n.startswith(prefix)} - lora

    adapted.on_event("epoch_start", TrainState(epoch=1))
    assert trainable() - lora == block(2) | {
        "base_model.model.bert.pooler.dense.weight",
        "base_model.model.bert.pooler.dense.bias",
    }
    assert any(n.endswith("query.base_layer.weight") for n in block(2))

    optimizer = torch.optim.AdamW(adapted.param_groups(BASE_LR, weight_decay=0.1))
    run_epochs(adapted, optimizer, range(1, 3))
    assert trainable() == lora | block(2) | block(1) | {n for n in gradual.owned if ".pooler." in n}
    assert not block(0) & trainable() and not any(".embeddings." in n for n in trainable())
    model.zero_grad(set_to_none=True)
    batch = tiny_inputs(model)
    model(**batch).loss.backward()
    assert [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ] == []

    with torch.no_grad():
        expected = model(**batch).logits
    adapted.save(tmp_path / "ckpt")
    loaded = Adapted.load(tiny_model("bert", seed=2), tmp_path / "ckpt", host=host)
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, expected)
        # lora folds into base weights that gradual_unfreeze trained
        assert torch.allclose(loaded.merge()(**batch).logits, expected, atol=1e-5)


@pytest.mark.parametrize("later", ["freeze", "lora"])
def test_it_must_come_last_in_the_stack(host, later):
    if later not in host.registries["strategies"]:
        pytest.skip(f"the {later} plugin is not available")
    with pytest.raises(StrategyError, match="put 'gradual_unfreeze' last"):
        adaptkit.apply(tiny_model("bert"), ["gradual_unfreeze", later], host=host)
