"""The ``adapters`` strategy (bottleneck adapters) on real tiny transformers models, on CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import adaptkit
from adaptkit import Adapted, ConfigError, Strategy, StrategyError
from adaptkit.errors import NotMergeableError, SharedParameterError
from adaptkit.testing import tiny_inputs, tiny_model

FAMILIES = ("bert", "gpt2", "llama", "vit")
KINDS = ("houlsby", "pfeiffer")
# Where each family's adapters must land, relative to a block: (attention output, feed-forward output).
EXPECTED_TARGETS = {
    "bert": ("attention.output.dense", "output.dense"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "vit": ("attention.o_proj", "mlp.fc2"),
}
HEAD_HAS_BIAS = {"bert": True, "gpt2": False, "llama": False, "vit": True}
NUM_LABELS = 3


def expected_trainable(model, family: str, kind: str, reduction_factor: int) -> int:
    """Adapter and head sizes from the config alone: 2*h*b + b + h per adapter, plus the classifier."""
    cfg = model.config
    h, blocks = cfg.hidden_size, cfg.num_hidden_layers
    b = max(1, h // reduction_factor)
    per_adapter = 2 * h * b + b + h
    per_block = 2 if kind == "houlsby" else 1
    head = h * NUM_LABELS + (NUM_LABELS if HEAD_HAS_BIAS[family] else 0)
    return per_adapter * per_block * blocks + head


def logits(model, inputs):
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def train_steps(adapted: Adapted, inputs, steps: int = 3) -> None:
    opt = torch.optim.AdamW(adapted.param_groups(1e-2, 0.1))
    for _ in range(steps):
        opt.zero_grad()
        adapted.model(**inputs).loss.backward()
        opt.step()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_parameters_are_exactly_the_adapters_and_the_head(host, family, kind):
    model = tiny_model(family, num_labels=NUM_LABELS)
    adapted = adaptkit.apply(model, "adapters", host=host, kind=kind, reduction_factor=8)
    strategy = adapted.strategies[0]

    assert adapted.num_trainable() == expected_trainable(model, family, kind, 8)
    trainable = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert trainable == set(strategy.owned)
    assert all(p.dtype == torch.float32 for p in strategy.owned.values())

    attn, ffn = EXPECTED_TARGETS[family]
    path = {
        "bert": "bert.encoder.layer",
        "gpt2": "transformer.h",
        "llama": "model.layers",
        "vit": "vit.layers",
    }[family]
    adapter_modules = {n.rsplit(".adapter.", 1)[0] for n in trainable if ".adapter." in n}
    wanted = {f"{path}.{i}.{ffn}" for i in range(model.config.num_hidden_layers)}
    if kind == "houlsby":
        wanted |= {f"{path}.{i}.{attn}" for i in range(model.config.num_hidden_layers)}
    assert adapter_modules == wanted


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_unchanged_at_initialisation(host, family, kind):
    reference = tiny_model(family, seed=3)
    inputs = tiny_inputs(reference)
    before = logits(reference, inputs)

    model = tiny_model(family, seed=3)
    adapted = adaptkit.apply(model, "adapters", host=host, kind=kind, non_linearity="gelu")
    assert torch.equal(logits(adapted.model, inputs), before)


def test_init_scale_makes_the_adapters_start_non_zero(host):
    reference = tiny_model("llama", seed=3)
    inputs = tiny_inputs(reference)
    adapted = adaptkit.apply(tiny_model("llama", seed=3), "adapters", host=host, init_scale=0.5)
    assert not torch.equal(logits(adapted.model, inputs), logits(reference, inputs))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_moves_only_the_trainable_parameters(host, family):
    model = tiny_model(family).train()
    inputs = tiny_inputs(model)
    # gelu, not the default relu: in the top block of a classifier only the pooled token reaches the
    # loss, and a 2-unit relu bottleneck can be dead on all four of them, leaving its bias untouched.
    adapted = adaptkit.apply(model, "adapters", host=host, non_linearity="gelu")
    owned = adapted.strategies[0].owned
    before = {n: p.detach().clone() for n, p in adapted.model.named_parameters()}

    train_steps(adapted, inputs)

    for name, p in adapted.model.named_parameters():
        if name in owned:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


# transformers 5 renames gradient checkpointing to activation checkpointing; the old names still work.
@pytest.mark.filterwarnings("ignore:.*is deprecated.*activation_checkpointing:FutureWarning")
@pytest.mark.parametrize("checkpointing", [None, "non_reentrant", "reentrant"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_trainable_parameter_gets_a_gradient(host, family, checkpointing):
    model = tiny_model(family).train()
    inputs = tiny_inputs(model)
    # A zero up-projection gives the down-projection an exactly zero first gradient (its only path
    # to the loss goes through up.weight), so start the adapters slightly off identity here; gelu
    # for the reason given in test_training_moves_only_the_trainable_parameters.
    adapted = adaptkit.apply(
        model, "adapters", host=host, kind="houlsby", init_scale=1e-2, non_linearity="gelu"
    )
    if checkpointing:
        reentrant = checkpointing == "reentrant"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()
        assert model.is_gradient_checkpointing

    adapted.model(**inputs).loss.backward()

    for name, p in adapted.strategies[0].owned.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert all(p.grad is None for p in adapted.model.parameters() if not p.requires_grad)


def test_with_a_zero_up_projection_the_up_projection_learns_first(host):
    model = tiny_model("bert").train()
    adapted = adaptkit.apply(model, "adapters", host=host, non_linearity="gelu")
    adapted.model(**tiny_inputs(model)).loss.backward()
    for name, p in adapted.strategies[0].owned.items():
        if ".adapter.up." in name:
            assert p.grad.abs().sum() > 0, name
        elif ".adapter.down." in name:
            assert p.grad.abs().sum() == 0, name


@pytest.mark.parametrize("training", [True, False])
def test_apply_preserves_train_and_eval_mode(host, training):
    model = tiny_model("gpt2").train(training)
    adapted = adaptkit.apply(model, "adapters", host=host)
    assert all(m.training == training for m in adapted.model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_onto_a_fresh_base_reproduces_the_trained_model(host, family, tmp_path):
    model = tiny_model(family, seed=5)
    inputs = tiny_inputs(model)
    adapted = adaptkit.apply(model, "adapters", host=host, kind="houlsby", train_norms=True)
    train_steps(adapted, inputs)
    trained = logits(adapted.model, inputs)
    adapted.save(tmp_path / "ckpt")

    fresh = tiny_model(family, seed=5)
    untrained = logits(fresh, inputs)
    loaded = Adapted.load(fresh, tmp_path / "ckpt", host=host)
    assert not torch.equal(trained, untrained)
    assert torch.equal(logits(loaded.model, inputs), trained)

    with pytest.raises(NotMergeableError, match="adapters.*non-linear"):
        adapted.merge()


def test_train_norms_adds_every_norm(host):
    model = tiny_model("llama")
    cfg = model.config
    adapted = adaptkit.apply(model, "adapters", host=host, kind="pfeiffer", train_norms=True)
    # LLaMA has two RMSNorms per block plus the final one, each with a weight of hidden size.
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    assert adapted.num_trainable() == expected_trainable(model, "llama", "pfeiffer", 16) + norms


def test_train_head_false_trains_only_adapters(host):
    model = tiny_model("vit")
    adapted = adaptkit.apply(model, "adapters", host=host, kind="pfeiffer", train_head=False)
    assert all(".adapter." in n for n in adapted.strategies[0].owned)
    assert not model.classifier.weight.requires_grad


def test_wrapped_modules_keep_their_original_attributes(host):
    model = tiny_model("gpt2")
    adaptkit.apply(model, "adapters", host=host)
    c_proj = model.transformer.h[0].attn.c_proj
    assert c_proj.nf == model.config.n_embd  # transformers' Conv1D attribute, read through the wrapper
    assert c_proj.weight is c_proj.base_layer.weight
    assert model.get_parameter("transformer.h.0.attn.c_proj.weight") is c_proj.base_layer.weight


def test_bfloat16_model_keeps_float32_adapters(host):
    model = tiny_model("llama").to(torch.bfloat16)
    inputs = tiny_inputs(model)
    adapted = adaptkit.apply(model, "adapters", host=host, init_scale=1e-2)
    assert all(p.dtype == torch.float32 for n, p in adapted.strategies[0].owned.items() if ".adapter." in n)
    out = adapted.model(**inputs)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None for n, p in adapted.strategies[0].owned.items() if ".adapter." in n)


# -- stacking ---------------------------------------------------------------------------------


def test_after_freeze_the_head_stays_trainable_and_owned_by_freeze(host, tmp_path):
    model = tiny_model("bert", seed=1)
    inputs = tiny_inputs(model)
    adapted = adaptkit.apply(
        model, ["freeze", {"name": "adapters", "train_head": False, "kind": "pfeiffer"}], host=host
    )
    freeze, adapters = adapted.strategies
    assert set(freeze.owned) == {"classifier.weight", "classifier.bias"}
    assert all(".adapter." in n for n in adapters.owned)
    assert model.classifier.weight.requires_grad
    assert adapted.num_trainable() == expected_trainable(model, "bert", "pfeiffer", 16)

    train_steps(adapted, inputs)
    trained = logits(adapted.model, inputs)
    adapted.save(tmp_path / "ckpt")
    loaded = Adapted.load(tiny_model("bert", seed=1), tmp_path / "ckpt", host=host)
    assert torch.equal(logits(loaded.model, inputs), trained)


def test_after_freeze_its_trainable_blocks_stay_trainable(host):
    model = tiny_model("llama")
    adapted = adaptkit.apply(model, [{"name": "freeze", "trainable_top_blocks": 1}, "adapters"], host=host)
    freeze, adapters = adapted.strategies
    top = [n for n in freeze.owned if n.startswith("model.layers.2.")]
    assert top and all(p.requires_grad for n, p in freeze.owned.items())
    # The head is freeze's already: adapters trains it too, but does not save it a second time.
    assert not set(freeze.owned) & set(adapters.owned)


class _PeftWrapping(Strategy):
    """Stands for any strategy that wraps the model with peft (only the flag matters to check)."""

    wraps_with_peft = True


def test_refuses_to_follow_a_peft_wrapping_strategy():
    from adaptkit_plugins.strategies.adapters import Adapters, AdaptersConfig

    adapters = Adapters(AdaptersConfig(), name="adapters")
    stack = [_PeftWrapping(AdaptersConfig(), name="lora"), adapters]
    with pytest.raises(StrategyError, match="put 'adapters' before 'lora'"):
        adapters.check(stack, 1)
    adapters.check(list(reversed(stack)), 0)


def test_tied_head_is_refused_untied_or_left_frozen(host):
    with pytest.raises(SharedParameterError, match="tied_head"):
        adaptkit.apply(tiny_model("gpt2", task="causal_lm"), "adapters", host=host)

    model = tiny_model("gpt2", task="causal_lm")
    adaptkit.apply(model, "adapters", host=host, tied_head="untie")
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.lm_head.weight.requires_grad and not model.transformer.wte.weight.requires_grad

    model = tiny_model("gpt2", task="causal_lm")
    adapted = adaptkit.apply(model, "adapters", host=host, train_head=False)
    assert not model.lm_head.weight.requires_grad
    assert all(".adapter." in n for n in adapted.strategies[0].owned)


# -- models that need the overrides -----------------------------------------------------------


class _Mixer(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.proj = nn.Linear(h, h)

    def forward(self, x):
        return self.proj(x).tanh(), None  # a tuple, like a transformers attention module


class _Block(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.mix = _Mixer(h)
        self.ff = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Linear(2 * h, h))

    def forward(self, x):
        x = x + self.mix(self.norm(x))[0]
        return x + self.ff(x)


class _Body(nn.Module):
    def __init__(self, h, n):
        super().__init__()
        self.stack = nn.ModuleList(_Block(h) for _ in range(n))

    def forward(self, x):
        for block in self.stack:
            x = block(x)
        return x


class ToyNet(nn.Module):
    """A model adaptkit knows nothing about: no transformers names anywhere."""

    base_model_prefix = "body"

    def __init__(self, h=16, n=2, out=3):
        super().__init__()
        self.body = _Body(h, n)
        self.head = nn.Linear(h, out)

    def forward(self, x):
        return self.head(self.body(x))


def test_unknown_model_needs_overrides_and_the_error_names_them(host):
    torch.manual_seed(0)
    with pytest.raises(StrategyError, match=r"ToyNet.*'attention_output'"):
        adaptkit.apply(ToyNet(), "adapters", host=host)
    with pytest.raises(StrategyError, match=r"ToyNet.*'ffn_output'"):
        adaptkit.apply(ToyNet(), "adapters", host=host, kind="pfeiffer")


def test_overrides_place_the_adapters_where_named(host):
    torch.manual_seed(0)
    model = ToyNet()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = model(x)
    adapted = adaptkit.apply(
        model,
        "adapters",
        host=host,
        blocks="body.stack",
        attention_output="mix",
        ffn_output="ff.2",
        reduction_factor=4,
    )
    with torch.no_grad():
        assert torch.equal(adapted.model(x), before)
    # "mix" has no out_features and ToyNet no config: its width is that of its last projection.
    b, h = 4, 16
    assert adapted.num_trainable() == 2 * 2 * (2 * h * b + b + h) + (h * 3 + 3)
    assert isinstance(model.body.stack[1].ff[2].base_layer, nn.Linear)

    adapted.model(x).sum().backward()
    assert all(p.grad is not None for n, p in adapted.strategies[0].owned.items() if ".adapter.up." in n)


def test_explicit_names_on_a_transformers_model_match_the_generic_ones(host):
    generic = adaptkit.apply(tiny_model("llama"), "adapters", host=host)
    explicit = adaptkit.apply(
        tiny_model("llama"),
        "adapters",
        host=host,
        blocks="model.layers",
        attention_output="self_attn.o_proj",
        ffn_output="mlp.down_proj",
    )
    assert set(explicit.strategies[0].owned) == set(generic.strategies[0].owned)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"attention_output": "self_attn.nope"}, "attention_output"),
        ({"ffn_output": "mlp.nope"}, "ffn_output"),
        ({"blocks": "model.nope"}, "blocks"),
    ],
)
def test_unknown_override_names_its_field(host, options, field):
    model = tiny_model("llama")
    with pytest.raises((StrategyError, ConfigError), match=field):
        adaptkit.apply(model, "adapters", host=host, **options)
    assert all(p.requires_grad for p in model.parameters())  # refused before touching the model


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"reduction_factor": 0}, "reduction_factor"),
        ({"kind": "lora"}, "kind"),
        ({"non_linearity": "softmax"}, "non_linearity"),
        ({"init_scale": -1.0}, "init_scale"),
        ({"bottleneck": 8}, "bottleneck"),
        ({"kind": "pfeiffer", "attention_output": "attn.c_proj"}, "attention_output"),
    ],
)
def test_bad_config_is_a_config_error(host, options, path):
    with pytest.raises(ConfigError) as info:
        adaptkit.apply(tiny_model("gpt2"), "adapters", host=host, **options)
    assert path in str(info.value)


def test_every_config_field_is_described():
    from adaptkit_plugins.strategies.adapters import AdaptersConfig

    assert all(f.description for f in AdaptersConfig.model_fields.values())


def test_plugin_imports_without_torch():
    code = "import sys, adaptkit_plugins.strategies.adapters; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
