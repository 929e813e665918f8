"""The ``lora`` strategy with real peft and transformers on tiny CPU models (QLoRA: test_qlora.py).

Each test names the failure mode it guards against (see the project's failure-modes notes).
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import adaptkit  # noqa: E402
from adaptkit import Adapted, ConfigError, StrategyError  # noqa: E402
from adaptkit.errors import CheckpointError, SharedParameterError  # noqa: E402
from adaptkit.testing import tiny_inputs, tiny_model  # noqa: E402

FAMILIES = ("bert", "gpt2", "llama", "vit")
#: Written out here rather than found by adaptkit.contract.anatomy, so the counts are checked independently.
BLOCKS = {"bert": "bert.encoder.layer", "gpt2": "transformer.h", "llama": "model.layers", "vit": "vit.layers"}
HEAD = {"bert": "classifier", "gpt2": "score", "llama": "score", "vit": "classifier"}
R = 4

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


# -- helpers -----------------------------------------------------------------------------------


def linear_shapes(model, family, skip_blocks=()):
    """(in, out) of every Linear / Conv1D inside the blocks, read straight off the modules."""
    shapes = []
    for i, block in enumerate(model.get_submodule(BLOCKS[family])):
        if i in skip_blocks:
            continue
        for module in block.modules():
            if isinstance(module, torch.nn.Linear):
                shapes.append((module.in_features, module.out_features))
            elif type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
                shapes.append(tuple(module.weight.shape))
    return shapes


def same_backbone_new_head(base_state, family, task="classification", **cfg):
    """A fresh base as from_pretrained gives it: the same pretrained backbone, a head initialised
    with another seed. Loading an adapter onto it exposes a head that was not saved."""
    fresh = tiny_model(family, task=task, seed=1, **cfg)
    head = HEAD[family] + "."
    fresh.load_state_dict({k: v for k, v in base_state.items() if not k.startswith(head)}, strict=False)
    assert not torch.equal(fresh.state_dict()[head + "weight"], base_state[head + "weight"])
    return fresh


def train_steps(adapted, batch, steps=3, lr=1e-2, weight_decay=0.1):
    opt = torch.optim.AdamW(adapted.param_groups(lr, weight_decay))
    was_training = adapted.model.training
    adapted.model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        adapted.model(**batch).loss.backward()
        opt.step()
    adapted.model.train(was_training)
    return opt


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def quantized_weight_bytes(model, family):
    """Bytes of the block linear layers' weights, 4-bit ones with their per-block scales.

    The shared lookup tables of a quant state (16 or 256 constants) are left out: they do not
    grow with the layer, and would dominate in layers this small.
    """
    total = 0
    for block in model.get_submodule(BLOCKS[family]):
        for name, module in block.named_modules():
            if "lora_" in name or not (
                isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
            ):
                continue
            if hasattr(module, "base_layer"):  # a LoRA wrapper: its base layer is counted on its own
                continue
            w = module.weight
            total += w.numel() * w.element_size()
            qs = getattr(w, "quant_state", None)
            if qs is not None:
                total += qs.absmax.numel() * qs.absmax.element_size()
                if qs.state2 is not None:
                    total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
            scb = getattr(w, "SCB", None)
            if scb is not None:
                total += scb.numel() * scb.element_size()
    return total


# -- shape of the adapted model ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_count_is_lora_plus_head(host, family):
    model = tiny_model(family)
    expected = sum(R * (i + o) for i, o in linear_shapes(model, family))
    expected += sum(p.numel() for p in model.get_submodule(HEAD[family]).parameters())
    adapted = adaptkit.apply(model, "lora", host=host, r=R)
    assert adapted.num_trainable() == expected
    names = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or f"{HEAD[family]}.modules_to_save" in n for n in names), names
    assert all(p.dtype == torch.float32 for p in adapted.trainable_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_at_init_leaves_outputs_unchanged(host, family):
    model = tiny_model(family)
    batch = tiny_inputs(model)
    before = logits(model, batch)
    adapted = adaptkit.apply(model, "lora", host=host, r=R)
    assert torch.equal(logits(adapted.model, batch), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_adamw_with_decay_moves_only_trainable_parameters(host, family):
    """Frozen weights bitwise unchanged under AdamW weight decay; every trainable one moves."""
    model = tiny_model(family)
    batch = tiny_inputs(model)
    adapted = adaptkit.apply(model, "lora", host=host, r=R)
    before = {n: p.detach().clone() for n, p in adapted.model.named_parameters()}
    opt = train_steps(adapted, batch)
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])
    for name, p in adapted.model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "checkpointing", [None, True, False], ids=["no-gc", "gc-reentrant", "gc-nonreentrant"]
)
def test_every_trainable_parameter_gets_a_gradient(host, family, checkpointing):
    """With reentrant checkpointing and frozen embeddings, LoRA gets no gradient unless
    an input requires grad; the strategy makes sure one does, even when checkpointing is
    switched on after it ran."""
    model = tiny_model(family)
    batch = tiny_inputs(model)
    # B != 0, so lora_A gets a gradient too (with B = 0 its gradient is exactly zero)
    adapted = adaptkit.apply(model, "lora", host=host, r=R, init="random")
    adapted.model.train()
    if checkpointing is not None:
        adapted.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing}
        )
    adapted.model(**batch).loss.backward()
    missing = [
        n
        for n, p in adapted.model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert missing == []


def test_default_init_gives_lora_b_a_gradient_under_reentrant_checkpointing(host):
    model = tiny_model("llama")
    adapted = adaptkit.apply(model, "lora", host=host, r=R)
    adapted.model.train()
    adapted.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    adapted.model(**tiny_inputs(model)).loss.backward()
    lora_b = [p for n, p in adapted.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


@pytest.mark.parametrize("start_training", [False, True])
def test_train_eval_mode_is_preserved(host, start_training):
    """peft builds its dropout in training mode; an eval model must stay in eval."""
    model = tiny_model("bert").train(start_training)
    adapted = adaptkit.apply(model, "lora", host=host, r=R, dropout=0.5)
    assert {m.training for m in adapted.model.modules()} == {start_training}
    if not start_training:
        batch = tiny_inputs(model)
        assert torch.equal(logits(adapted.model, batch), logits(adapted.model, batch))


# -- saving and loading ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_adapter_loads_with_plain_peft_on_a_fresh_base(host, family, tmp_path):
    """The trained head is saved, every key loads, and plain peft reproduces the logits."""
    model = tiny_model(family)
    batch = tiny_inputs(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = adaptkit.apply(model, "lora", host=host, r=R)
    train_steps(adapted, batch)
    expected = logits(adapted.model, batch)
    adapted.save(tmp_path / "run")
    saved = tmp_path / "run" / "lora"
    assert (saved / "adapter_model.safetensors").is_file() and not list(saved.glob("*.bin"))

    fresh = same_backbone_new_head(base_state, family)
    reloaded = peft.PeftModel.from_pretrained(fresh, str(saved))
    from safetensors.torch import load_file

    assert set(load_file(saved / "adapter_model.safetensors")) == set(
        peft.get_peft_model_state_dict(reloaded)
    )
    assert torch.allclose(logits(reloaded, batch), expected, atol=1e-6, rtol=0)

    again = Adapted.load(
        same_backbone_new_head(base_state, family), tmp_path / "run", host=host, check_base=False
    )
    assert torch.allclose(logits(again.model, batch), expected, atol=1e-6, rtol=0)
    assert again.num_trainable() == adapted.num_trainable()  # comes back trainable


def test_load_on_another_base_is_refused_by_default(host, tmp_path):
    """The manifest's base fingerprint catches an adapter loaded onto different weights."""
    model = tiny_model("llama")
    adaptkit.apply(model, "lora", host=host, r=R).save(tmp_path / "run")
    with pytest.raises(CheckpointError, match="different base"):
        Adapted.load(tiny_model("llama", seed=1), tmp_path / "run", host=host)
    Adapted.load(tiny_model("llama", seed=0), tmp_path / "run", host=host)  # the same base loads


def test_load_is_strict_and_refuses_pickle(host, tmp_path):
    """A missing key is an error, not a warning; a .bin adapter is never unpickled."""
    from safetensors.torch import load_file, save_file

    model = tiny_model("bert")
    adaptkit.apply(model, "lora", host=host, r=R).save(tmp_path / "run")
    weights = tmp_path / "run" / "lora" / "adapter_model.safetensors"
    tensors = load_file(weights)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights)
    with pytest.raises(CheckpointError, match="missing"):
        Adapted.load(tiny_model("bert"), tmp_path / "run", host=host)
    save_file({**tensors, "base_model.model.extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(CheckpointError, match="unexpected"):
        Adapted.load(tiny_model("bert"), tmp_path / "run", host=host)
    weights.rename(weights.with_name("adapter_model.bin"))
    with pytest.raises(CheckpointError, match="pickle"):
        Adapted.load(tiny_model("bert"), tmp_path / "run", host=host)


# -- merging -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_gives_the_same_logits(host, family):
    """merge_and_unload in float32 reproduces the adapted model."""
    model = tiny_model(family)
    batch = tiny_inputs(model)
    adapted = adaptkit.apply(model, "lora", host=host, r=R, init="random")
    expected = logits(adapted.model, batch)
    assert not torch.allclose(
        expected, logits(tiny_model(family), batch), atol=1e-3
    )  # the adapter does something
    merged = adapted.merge()
    assert not isinstance(merged, peft.PeftModel)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(logits(merged, batch), expected, atol=1e-5, rtol=0)


def _tied_llama(seed=0):
    model = tiny_model("llama", task="causal_lm", seed=seed, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize(
    "modules_to_save", [[], ["embed_tokens", "lm_head"]], ids=["blocks-only", "train-tied-embeddings"]
)
def test_tied_embeddings_survive_merge_save_and_reload(host, tmp_path, modules_to_save):
    """Tied embeddings: the tie holds after merge, save_pretrained and from_pretrained."""
    model = _tied_llama()
    batch = tiny_inputs(model)
    adapted = adaptkit.apply(model, "lora", host=host, r=R, init="random", modules_to_save=modules_to_save)
    train_steps(adapted, batch, steps=2)
    if modules_to_save:  # the shared matrix trains, as one matrix
        trained = [n for n, p in adapted.model.named_parameters() if p.requires_grad and "lora_" not in n]
        assert len(trained) == 1 and "embed_tokens" in trained[0]
    expected = logits(adapted.model, batch)
    merged = adapted.merge()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert torch.allclose(logits(merged, batch), expected, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.allclose(logits(reloaded, batch), expected, atol=1e-5, rtol=0)


def test_lora_on_a_tied_lm_head_is_refused(host):
    with pytest.raises(SharedParameterError, match="lm_head"):
        adaptkit.apply(_tied_llama(), "lora", host=host, target_modules=["q_proj", "lm_head"])


def test_causal_lm_head_stays_frozen(host):
    """A language-model head is pretrained; LoRA leaves it (and the tied embeddings) alone."""
    model = _tied_llama()
    adapted = adaptkit.apply(model, "lora", host=host, r=R)
    assert all("lora_" in n for n, p in adapted.model.named_parameters() if p.requires_grad)
    assert isinstance(adapted.model, peft.PeftModelForCausalLM)


# -- stacking --------------------------------------------------------------------------------------


def test_freeze_then_lora_keeps_and_saves_what_freeze_chose(host, tmp_path):
    family = "bert"
    model = tiny_model(family)
    batch = tiny_inputs(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    top = len(model.get_submodule(BLOCKS[family])) - 1
    expected_count = sum(R * (i + o) for i, o in linear_shapes(model, family, skip_blocks=(top,)))
    expected_count += sum(p.numel() for p in model.get_submodule(HEAD[family]).parameters())
    expected_count += sum(p.numel() for p in model.get_submodule(f"{BLOCKS[family]}.{top}").parameters())

    adapted = adaptkit.apply(
        model, [{"name": "freeze", "trainable_top_blocks": 1}, {"name": "lora", "r": R}], host=host
    )
    assert adapted.num_trainable() == expected_count
    assert not any(
        "lora_" in n for n, _ in adapted.model.named_parameters() if f".{top}." in n
    )  # trained in full instead
    train_steps(adapted, batch)
    expected = logits(adapted.model, batch)
    adapted.save(tmp_path / "run")

    fresh = same_backbone_new_head(base_state, family)
    plain = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "run" / "lora"))
    assert torch.allclose(logits(plain, batch), expected, atol=1e-6, rtol=0)
    again = Adapted.load(
        same_backbone_new_head(base_state, family), tmp_path / "run", host=host, check_base=False
    )
    assert torch.allclose(logits(again.model, batch), expected, atol=1e-6, rtol=0)


def test_freeze_without_head_then_lora_trains_only_lora(host):
    model = tiny_model("llama")
    adapted = adaptkit.apply(
        model,
        [{"name": "freeze", "train_head": False, "trainable_top_blocks": 0}, {"name": "lora", "r": R}],
        host=host,
    )
    assert all("lora_" in n for n, p in adapted.model.named_parameters() if p.requires_grad)


def test_lora_before_freeze_is_refused(host):
    with pytest.raises(StrategyError, match="before"):
        adaptkit.apply(tiny_model("bert"), ["lora", "freeze"], host=host)


def test_partially_trainable_module_is_refused(host):
    """BitFit then LoRA: peft saves whole modules, so a Linear whose bias alone trains cannot be kept."""
    with pytest.raises(StrategyError, match="whole modules"):
        adaptkit.apply(tiny_model("bert"), [{"name": "freeze", "train_biases": True}, "lora"], host=host)


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, where",
    [
        ({"r": 0}, "r"),
        ({"dropout": 2}, "dropout"),
        ({"lora_dropuot": 0.1}, "lora_dropuot"),
        ({"quantize": "3bit"}, "quantize"),
        ({"init": "eva"}, "init"),  # needs data: not offered
    ],
)
def test_bad_config_is_a_config_error(host, options, where):
    with pytest.raises(ConfigError, match=where):
        adaptkit.apply(tiny_model("bert"), "lora", host=host, **options)


def test_target_modules_matching_nothing_repeat_the_value(host):
    with pytest.raises(StrategyError, match="'nope'"):
        adaptkit.apply(tiny_model("bert"), "lora", host=host, target_modules=["query", "nope"])


def test_target_modules_given_are_the_only_ones_adapted(host):
    model = tiny_model("llama")
    adapted = adaptkit.apply(model, "lora", host=host, r=R, target_modules=["q_proj", "v_proj"])
    adapted_layers = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in adapted.model.named_parameters() if "lora_A" in n
    }
    assert adapted_layers == {"q_proj", "v_proj"}
    assert adapted.num_trainable() == 3 * 2 * R * (32 + 32) + 32 * 3


def test_rslora_and_dora_reach_peft(host):
    adapted = adaptkit.apply(tiny_model("llama"), "lora", host=host, r=R, use_rslora=True, use_dora=True)
    cfg = adapted.model.peft_config["default"]
    assert cfg.use_rslora and cfg.use_dora
    assert any("lora_magnitude_vector" in n for n, p in adapted.model.named_parameters() if p.requires_grad)
