"""The plugin host with real pluggy and real entry points.

Throwaway distributions are written to a folder on sys.path (see ``fake_dists.py``), so
importlib.metadata discovers them exactly as it discovers pip-installed plugins.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import itertools
from pathlib import Path

import pytest
from fake_dists import BROKEN, GOOD, FakeSite

import adaptkit
from adaptkit import Strategy, StrategyConfig, hookimpl
from adaptkit.contract import hookspecs
from adaptkit.errors import PluginError
from adaptkit.host.manager import PluginHost, PluginInfo, get_plugin_host
from adaptkit.testing import plugin_host

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIST = "adaptkit-example-plugin"


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    s = FakeSite(tmp_path / "site", monkeypatch)
    yield s
    s.cleanup()


def warning_lines(err: str, plugin: str) -> list[str]:
    return [line for line in err.splitlines() if f"plugin '{plugin}'" in line]


def snapshot(host: PluginHost) -> dict:
    """Everything observable about a host's outcome."""
    return {
        "plugins": [(p.name, p.distribution, p.error) for p in host.plugins],
        "registries": {
            kind: {name: (r.plugin.name, r.plugin.distribution) for name, r in sorted(entries.items())}
            for kind, entries in host.registries.items()
        },
    }


def assert_fully_gone(host: PluginHost, name: str) -> None:
    """A refused plugin leaves nothing behind in pluggy."""
    assert host.pm.get_plugin(name) is None
    assert name not in dict(host.pm.list_name_plugin())
    for caller in vars(host.pm.hook).values():
        assert all(impl.plugin_name != name for impl in caller.get_hookimpls()), caller.name


# -- the example third-party plugin, installed for real ----------------------------------------


def test_example_plugin_is_discovered_through_its_entry_point(monkeypatch):
    monkeypatch.delenv("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    eps = [
        ep
        for ep in importlib.metadata.entry_points(group="adaptkit")
        if ep.dist and ep.dist.name == EXAMPLE_DIST
    ]
    assert [(ep.name, ep.value) for ep in eps] == [("bitfit", "adaptkit_example_plugin")], (
        "run scripts/setup.sh"
    )

    host = get_plugin_host()
    entry = host.registries["strategies"]["bitfit"]
    assert entry.plugin.name == "bitfit"
    assert entry.plugin.source == "entry point"
    assert entry.plugin.distribution == EXAMPLE_DIST
    assert entry.plugin.version == importlib.metadata.version(EXAMPLE_DIST)
    assert entry.plugin.hooks == ["adaptkit_register_strategies"]
    assert entry.description.startswith("BitFit: train only the bias terms")
    assert issubclass(entry.obj, Strategy) and issubclass(entry.extra["config_class"], StrategyConfig)
    # builtins come from adaptkit itself, through the same hook
    assert host.registries["strategies"]["freeze"].plugin.source == "builtin"
    assert host.registries["strategies"]["freeze"].plugin.distribution == "adaptkit"


def test_autoload_env_hides_entry_points_and_p_brings_one_back(monkeypatch):
    monkeypatch.setenv("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "bitfit" not in get_plugin_host().registries["strategies"]
    host = get_plugin_host(["adaptkit_example_plugin"])
    entry = host.registries["strategies"]["bitfit"]
    assert (entry.plugin.name, entry.plugin.source) == ("adaptkit_example_plugin", "-p")
    assert {"freeze", "full"} <= set(host.registries["strategies"])
    # adaptkit.testing's helper is autoload-off, like the env var
    assert "bitfit" not in plugin_host().registries["strategies"]
    assert "bitfit" in plugin_host("adaptkit_example_plugin").registries["strategies"]


def test_p_of_an_already_autoloaded_module_is_harmless(monkeypatch, capsys):
    monkeypatch.delenv("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    host = get_plugin_host(["adaptkit_example_plugin", "adaptkit_plugins.strategies.freeze"])
    assert host.registries["strategies"]["bitfit"].plugin.name == "bitfit"
    assert host.registries["strategies"]["freeze"].plugin.source == "builtin"
    assert not [
        p for p in host.broken if p.name in ("adaptkit_example_plugin", "adaptkit_plugins.strategies.freeze")
    ]
    assert "adaptkit_example_plugin" not in capsys.readouterr().err


@pytest.mark.parametrize("blocked", ["freeze", "full", "lora", "bitfit"])
def test_p_no_blocks_a_plugin(monkeypatch, capsys, blocked):
    monkeypatch.delenv("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    host = get_plugin_host([f"no:{blocked}"])
    assert blocked not in host.registries["strategies"]
    assert blocked not in [p.name for p in host.plugins]
    assert f"plugin '{blocked}'" not in capsys.readouterr().err
    others = {"freeze", "full", "bitfit"} - {blocked}
    assert others <= set(host.registries["strategies"])


def test_bitfit_trains_only_biases_and_the_head():
    import torch

    from adaptkit.testing import tiny_inputs, tiny_model

    host = plugin_host("adaptkit_example_plugin")
    model = tiny_model("bert")
    # computed independently of the plugin: every module's bias, plus the classifier
    biases = {
        f"{m}.bias"
        for m, mod in model.named_modules()
        if isinstance(getattr(mod, "bias", None), torch.nn.Parameter)
    }
    expected = biases | {"classifier.weight"}
    expected_count = (
        sum(
            mod.bias.numel()
            for mod in model.modules()
            if isinstance(getattr(mod, "bias", None), torch.nn.Parameter)
        )
        + model.classifier.weight.numel()
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert (
        "bert.encoder.layer.0.attention.self.query.bias" in expected
        and "bert.pooler.dense.weight" not in expected
    )

    adapted = adaptkit.apply(model, "bitfit", host=host)
    assert adapted.model is model and not model.training
    assert adapted.num_trainable() == expected_count
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert set(adapted.strategies[0].owned) == expected

    model.train()
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    batch = tiny_inputs(model)
    for _ in range(3):
        model(**batch).loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if n in expected)
        opt.step()
        opt.zero_grad(set_to_none=True)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= expected
    # a key bias shifts every attention score of a row equally, so softmax gives it no gradient
    assert {n for n in expected - changed if not n.endswith("attention.self.key.bias")} == set()
    assert "classifier.weight" in changed and "bert.embeddings.LayerNorm.bias" in changed


def test_bitfit_options_and_edge_cases():
    import torch

    from adaptkit import StrategyError
    from adaptkit.testing import tiny_model

    host = plugin_host("adaptkit_example_plugin")
    bert = adaptkit.apply(tiny_model("bert"), "bitfit", host=host, train_head=False)
    assert {n for n, p in bert.model.named_parameters() if p.requires_grad} == {
        n for n, _ in bert.model.named_parameters() if n.endswith(".bias")
    }
    # gpt2 ties lm_head to the input embeddings: the pretrained embedding must stay frozen
    gpt2 = adaptkit.apply(tiny_model("gpt2", task="causal_lm"), "bitfit", host=host)
    assert not gpt2.model.lm_head.weight.requires_grad
    assert gpt2.model.lm_head.weight is gpt2.model.transformer.wte.weight
    # llama has no biases: only the classification head trains, and without it nothing would
    llama = adaptkit.apply(tiny_model("llama"), "bitfit", host=host)
    assert {n for n, p in llama.model.named_parameters() if p.requires_grad} == {"score.weight"}
    with pytest.raises(StrategyError, match="no bias and no head"):
        adaptkit.apply(tiny_model("llama"), "bitfit", host=host, train_head=False)
    with pytest.raises(adaptkit.ConfigError, match="train_hed"):
        adaptkit.apply(tiny_model("llama"), "bitfit", host=host, train_hed=False)
    assert torch.is_grad_enabled()


def test_bitfit_saves_only_what_it_trained_and_loads_back(tmp_path):
    import torch

    from adaptkit.testing import tiny_inputs, tiny_model

    host = plugin_host("adaptkit_example_plugin")
    adapted = adaptkit.apply(tiny_model("bert"), "bitfit", host=host)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.add_(0.5)
    adapted.save(tmp_path / "ckpt")
    reloaded = adaptkit.Adapted.load(tiny_model("bert"), tmp_path / "ckpt", host=host)
    batch = tiny_inputs(adapted.model)
    with torch.no_grad():
        assert torch.equal(adapted.model(**batch).logits, reloaded.model(**batch).logits)
        assert not torch.equal(tiny_model("bert")(**batch).logits, reloaded.model(**batch).logits)


# -- broken plugins: one line each, nothing left behind, everything else works -----------------


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_entry_point_plugin_is_isolated(site, capsys, kind):
    source, fragment = BROKEN[kind]
    module, name, dist = f"adaptkit_fake_{kind}", f"fake_{kind}", f"fake-{kind.replace('_', '-')}"
    site.add(dist, {name: module}, {module: source}, version="1.0")

    host = get_plugin_host()
    info = next(p for p in host.plugins if p.name == name)
    assert (info.distribution, info.version, info.source) == (dist, "1.0", "entry point")
    assert info.error and fragment in info.error, info.error
    assert "\n" not in info.error
    assert info in host.broken
    assert_fully_gone(host, name)
    assert {"freeze", "full", "bitfit"} <= set(host.registries["strategies"])
    # a builtin wins over a plugin of the same name
    assert host.registries["strategies"]["freeze"].plugin.source == "builtin"
    for registered in ("typo_owner", "from_the_future", "unmarked", "notstrat"):
        assert registered not in host.registries["strategies"]

    err = capsys.readouterr().err
    lines = warning_lines(err, name)
    assert len(lines) == 1, err
    assert f"plugin '{name}' ({dist} 1.0) failed to load" in lines[0] and fragment in lines[0]
    assert "Traceback" not in err


def test_duplicate_strategy_names_both_plugins_and_the_first_wins(site, capsys):
    site.add("dup-b", {"twin_b": "adaptkit_fake_twin_b"}, {"adaptkit_fake_twin_b": GOOD.format(name="twin")})
    site.add("dup-a", {"twin_a": "adaptkit_fake_twin_a"}, {"adaptkit_fake_twin_a": GOOD.format(name="twin")})
    host = get_plugin_host()
    assert host.registries["strategies"]["twin"].plugin.name == "twin_a"  # sorted by distribution
    (loser,) = [p for p in host.broken if p.name.startswith("twin")]
    assert loser.name == "twin_b"
    assert "plugin 'twin_a' (dup-a 1.0)" in loser.error and "plugin 'twin_b' (dup-b 1.0)" in loser.error
    assert_fully_gone(host, "twin_b")
    assert len([line for line in capsys.readouterr().err.splitlines() if "twin" in line]) == 1


def test_an_entry_point_named_like_a_builtin_is_refused_without_running_it(site, tmp_path):
    sentinel = tmp_path / "imported"
    evil = f"open({str(sentinel)!r}, 'w').close()\n" + GOOD.format(name="evil")
    site.add("evil-dist", {"freeze": "adaptkit_fake_evil"}, {"adaptkit_fake_evil": evil})
    host = get_plugin_host()
    info = next(p for p in host.plugins if p.distribution == "evil-dist")
    assert "plugin name 'freeze' is already taken by plugin 'freeze' (adaptkit" in info.error
    assert not sentinel.exists()
    assert host.registries["strategies"]["freeze"].plugin.source == "builtin"
    assert "evil" not in host.registries["strategies"]


def test_two_distributions_claiming_one_plugin_name_are_both_named(site):
    site.add(
        "same-a", {"samename": "adaptkit_fake_same_a"}, {"adaptkit_fake_same_a": GOOD.format(name="same_a")}
    )
    site.add(
        "same-b", {"samename": "adaptkit_fake_same_b"}, {"adaptkit_fake_same_b": GOOD.format(name="same_b")}
    )
    host = get_plugin_host()
    (loser,) = [p for p in host.broken if p.name == "samename"]
    assert loser.distribution == "same-b"
    assert "already taken by plugin 'samename' (same-a 1.0)" in loser.error
    assert "same_a" in host.registries["strategies"] and "same_b" not in host.registries["strategies"]


def test_load_order_does_not_depend_on_discovery_order(site, monkeypatch):
    """importlib.metadata's order follows sys.path and the filesystem; the host sorts."""
    for letter in "zyxa":
        site.add(
            f"order-{letter}",
            {f"order_{letter}": f"adaptkit_fake_order_{letter}"},
            {f"adaptkit_fake_order_{letter}": GOOD.format(name="contested")},
        )
    site.add(
        "order-m", {"order_m": "adaptkit_fake_order_m"}, {"adaptkit_fake_order_m": GOOD.format(name="solo")}
    )
    baseline = snapshot(get_plugin_host())
    assert baseline["registries"]["strategies"]["contested"] == ("order_a", "order-a")

    original = importlib.metadata.entry_points
    discovered = [ep.name for ep in original(group="adaptkit")]

    def reversed_entry_points(**kwargs):
        return importlib.metadata.EntryPoints(reversed(list(original(**kwargs))))

    monkeypatch.setattr(importlib.metadata, "entry_points", reversed_entry_points)
    assert [ep.name for ep in importlib.metadata.entry_points(group="adaptkit")] == discovered[::-1]
    assert snapshot(get_plugin_host()) == baseline
    third_party = [p.distribution for p in get_plugin_host().plugins if p.source == "entry point"]
    assert third_party == sorted(third_party)


# -- registering plugin objects directly --------------------------------------------------------


class _Good:
    @hookimpl
    def adaptkit_register_strategies(self, register):
        register("good", _Noop, StrategyConfig)


class _Noop(Strategy):
    """Does nothing."""

    def apply(self, model):
        return model


class _BadArgument:
    @hookimpl
    def adaptkit_register_strategies(self, register, path):
        register("bad", _Noop, StrategyConfig)


class _SpecnameTypo:
    @hookimpl(specname="adaptkit_on_sav")
    def on_save(self, run):
        pass


class _MarkedNonHook:
    @hookimpl
    def on_save(self, run):
        pass


def test_validation_failure_rolls_back_and_the_name_can_be_reused():
    """pluggy must not keep a plugin that failed validation."""
    host = PluginHost()
    bad = _BadArgument()
    assert not host.add(bad, PluginInfo("bad", "tests", "-p"))
    assert "invalid hook implementation" in host.broken[0].error and "'path'" in host.broken[0].error
    assert not host.pm.is_registered(bad) and bad not in host.pm.get_plugins()
    assert_fully_gone(host, "bad")
    assert "bad" not in host.registries["strategies"]
    assert host.add(_Good(), PluginInfo("bad", "tests", "-p"))
    assert host.registries["strategies"]["good"].plugin.name == "bad"


@pytest.mark.parametrize("plugin", [_SpecnameTypo, _MarkedNonHook])
def test_hookimpls_of_unknown_hooks_are_refused_whatever_their_name(plugin):
    """Implementations of hooks that do not exist: pluggy would accept them silently; they would never run."""
    host = PluginHost()
    assert not host.add(plugin(), PluginInfo("typo", "tests", "-p"))
    assert "not an adaptkit hook" in host.broken[0].error
    assert_fully_gone(host, "typo")


class _Wrapper:
    @hookimpl(wrapper=True)
    def adaptkit_on_step_end(self, run, step, logs):
        return (yield)


class _OldStyleWrapper:
    @hookimpl(hookwrapper=True)
    def adaptkit_on_train_end(self, run, summary):
        yield


@pytest.mark.parametrize("plugin", [_Wrapper, _OldStyleWrapper])
def test_wrapper_hookimpls_are_refused_since_they_would_never_run(plugin):
    """adaptkit calls each plugin's notification on its own: a wrapper's body would never execute."""
    host = PluginHost()
    assert not host.add(plugin(), PluginInfo("wrapping", "tests", "-p"))
    assert "wrapper=True" in host.broken[0].error and "plain @hookimpl" in host.broken[0].error
    assert_fully_gone(host, "wrapping")


def test_a_register_hook_without_the_register_argument_is_fine():
    class TakesNothing:
        @hookimpl
        def adaptkit_register_strategies(self):
            pass

    host = PluginHost()
    assert host.add(TakesNothing(), PluginInfo("nothing", "tests", "-p")), host.broken


def test_notify_isolates_a_raising_plugin():
    """One failing notification hook names itself and the others still run."""
    for order in itertools.permutations(["first", "raiser", "last"]):
        calls = []

        class Recorder:
            def __init__(self, tag):
                self.tag = tag

            @hookimpl
            def adaptkit_on_step_end(self, step, logs):
                calls.append((self.tag, step, logs["loss"]))  # noqa: B023 (checked inside the same iteration)

        class Raiser:
            @hookimpl
            def adaptkit_on_step_end(self, run, step, logs):
                raise RuntimeError("disk full")

        host = PluginHost()
        for tag in order:
            plugin = Raiser() if tag == "raiser" else Recorder(tag)
            assert host.add(plugin, PluginInfo(tag, "tests", "entry point", "raiser-dist", "2.0"))
        errors = host.notify("adaptkit_on_step_end", run=None, step=7, logs={"loss": 0.5})
        assert sorted(calls) == [("first", 7, 0.5), ("last", 7, 0.5)], order
        assert len(errors) == 1 and isinstance(errors[0], PluginError)
        assert (
            "plugin 'raiser' (raiser-dist 2.0) failed in adaptkit_on_step_end: RuntimeError: disk full"
            in str(errors[0])
        )
        calls.clear()
        with pytest.raises(PluginError, match="plugin 'raiser'"):
            host.call_strict("adaptkit_on_step_end", run=None, step=8, logs={"loss": 0.25})
        assert len(calls) == 2  # the strict call also ran everyone before raising


def test_firstresult_load_model_a_plugin_wins_over_the_trylast_loader():
    """The trylast builtin loader only answers when no other plugin does, in any order."""

    class BuiltinLoader:
        @hookimpl(trylast=True)
        def adaptkit_load_model(self, spec):
            return "builtin"

        @hookimpl
        def adaptkit_register_strategies(self, register):
            pass

    class Declines:
        @hookimpl
        def adaptkit_load_model(self, spec):
            return None

    class Custom:
        @hookimpl
        def adaptkit_load_model(self, spec):
            return "custom" if spec == "custom:model" else None

    argnames = PluginHost().pm.hook.adaptkit_load_model.spec.argnames
    assert "spec" in argnames
    for order in itertools.permutations([BuiltinLoader, Declines, Custom]):
        host = PluginHost()
        for cls in order:
            assert host.add(cls(), PluginInfo(cls.__name__.lower(), "tests", "-p")), host.broken
        call = host.pm.hook.adaptkit_load_model
        assert call(**{a: "custom:model" if a == "spec" else None for a in argnames}) == "custom", order
        assert call(**{a: "hub/model" if a == "spec" else None for a in argnames}) == "builtin", order


# -- the hook specifications and their call sites -----------------------------------------------


def _specs() -> dict[str, tuple[str, ...]]:
    host = PluginHost()
    return {
        name: getattr(host.pm.hook, name).spec.argnames
        for name, fn in vars(hookspecs).items()
        if inspect.isfunction(fn) and hasattr(fn, "adaptkit_spec")
    }


def test_every_hookspec_is_documented_prefixed_and_default_free():
    specs = _specs()
    assert "adaptkit_register_strategies" in specs and "adaptkit_load_model" in specs
    for name, fn in vars(hookspecs).items():
        if not inspect.isfunction(fn) or fn.__module__ != hookspecs.__name__:
            continue
        assert hasattr(fn, "adaptkit_spec"), f"{name} in hookspecs.py is not a @hookspec"
        assert name.startswith("adaptkit_"), name
        doc = inspect.getdoc(fn) or ""
        assert len(doc.split()) >= 5, f"{name} needs a docstring: it is the plugin author's reference"
        defaults = [p for p in inspect.signature(fn).parameters.values() if p.default is not p.empty]
        assert not defaults, f"{name}: pluggy never passes a parameter with a default"


def hook_call_problems(source: str, filename: str, specs: dict[str, tuple[str, ...]]) -> list[str]:
    """``*.hook.<name>(...)``, ``host.notify/call_strict("<name>", ...)`` and
    ``run.notify_plugins("<name>", ...)`` calls must pass every spec argument by keyword, and
    nothing else (``notify_plugins`` passes ``run`` itself and may take ``strict``)."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        func, args = node.func, node.args
        if isinstance(func.value, ast.Attribute) and func.value.attr == "hook":
            name = func.attr
        elif (
            func.attr in ("notify", "call_strict", "notify_plugins")
            and args
            and isinstance(args[0], ast.Constant)
            and isinstance(args[0].value, str)
        ):
            name, args = args[0].value, args[1:]
        else:
            continue
        implied = {"run"} if func.attr == "notify_plugins" else set()  # Run.notify_plugins passes itself
        where = f"{filename}:{node.lineno} {name}"
        if name not in specs:
            problems.append(f"{where}: not a hook in adaptkit.contract.hookspecs")
            continue
        if args:
            problems.append(f"{where}: positional arguments")
        keywords = [k.arg for k in node.keywords if not (implied and k.arg == "strict")]
        if None in keywords:
            problems.append(f"{where}: **kwargs cannot be checked; name every argument")
        elif set(keywords) | implied != set(specs[name]):
            problems.append(f"{where}: passes {sorted(keywords)}, the spec takes {sorted(specs[name])}")
    return problems


def test_hook_call_checker_catches_bad_calls():
    specs = _specs()
    bad = (
        "pm.hook.adaptkit_on_step_end(run, 1, {})\n"
        "self.pm.hook.adaptkit_on_step_end(run=run, step=1)\n"
        "host.pm.hook.adaptkit_on_sav(run=run)\n"
        "host.notify('adaptkit_on_train_end', run)\n"
        "host.pm.hook.adaptkit_on_train_end(**kw)\n"
    )
    flagged = {problem.split()[0] for problem in hook_call_problems(bad, "bad.py", specs)}
    assert flagged == {f"bad.py:{line}" for line in range(1, 6)}
    good = "host.notify('adaptkit_on_train_end', run=r, summary={})\npm.hook.adaptkit_register_metrics(register=f)\n"
    assert hook_call_problems(good, "good.py", specs) == []


def test_every_hook_call_in_adaptkit_uses_keywords_covering_the_spec():
    specs = _specs()
    problems = []
    for folder in ("adaptkit", "plugins"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            problems += hook_call_problems(path.read_text(), str(path.relative_to(ROOT)), specs)
    assert problems == []


@pytest.mark.parametrize("name", ["loaders", "tasks"])
def test_an_essential_plugin_cannot_be_blocked(name, capsys):
    """As pytest refuses ``-p no:main``: without loaders or tasks no recipe can run."""
    from adaptkit.cli import main
    from adaptkit.errors import PluginError

    with pytest.raises(PluginError, match=f"plugin '{name}' is essential and cannot be blocked"):
        get_plugin_host([f"no:{name}"])
    assert main(["-p", f"no:{name}", "strategies"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"adaptkit: error: plugin '{name}' is essential and cannot be blocked (-p no:{name})"]


def test_other_builtin_plugins_can_be_blocked():
    host = get_plugin_host(["no:lora", "no:packaged"], autoload=False)
    assert "lora" not in host.registries["strategies"]
    assert "full" in host.registries["strategies"]
    assert host.registries["models"] == {}


SEED_RECORDER = '''
from adaptkit import Strategy, StrategyConfig, hookimpl
from adaptkit.contract.anatomy import head_parameter_names

SEEN = []


class SeedRecorder(Strategy):
    """Train the head; note the seed every event carries."""

    def apply(self, model):
        heads = set(head_parameter_names(model))
        for name, p in model.named_parameters():
            p.requires_grad_(name in heads)
        self.owned = {n: p for n, p in model.named_parameters() if n in heads}
        return model

    def on_event(self, model, event, state):
        SEEN.append((event, state.seed))
        return False


@hookimpl
def adaptkit_register_strategies(register):
    register("seed_recorder", SeedRecorder, StrategyConfig)
'''


def test_every_event_carries_the_runs_seed(tmp_path, monkeypatch):
    """A strategy that draws at random seeds its draws from ``TrainState.seed``: the run's
    ``train.seed``, on every event."""
    import importlib

    from adaptkit.recipe.schema import validate
    from adaptkit.testing import save_tiny_pretrained, write_sentiment
    from adaptkit.train.loop import train

    (tmp_path / "seed_recorder_plugin.py").write_text(SEED_RECORDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    host = get_plugin_host(["seed_recorder_plugin"], autoload=False)
    save_tiny_pretrained(tmp_path / "bert", "bert")
    write_sentiment(tmp_path / "train.jsonl", 32, seed=0)
    raw = {
        "model": {"source": str(tmp_path / "bert"), "task": "classification"},
        "data": {"source": str(tmp_path / "train.jsonl"), "max_length": 16},
        "strategies": ["seed_recorder"],
        "train": {"max_steps": 2, "micro_batch_size": 8, "seed": 7},
        "output": str(tmp_path / "runs" / "{name}"),
        "name": "seeded",
    }
    train(validate(raw, host=host), host, fresh=True)
    seen = importlib.import_module("seed_recorder_plugin").SEEN
    assert {event for event, _ in seen} >= {"train_start", "step_start"}
    assert {seed for _, seed in seen} == {7}


def test_p_no_with_a_name_no_plugin_has_is_refused(capsys):
    """A typo in ``-p no:NAME`` would block nothing: it is refused, naming the plugins there are."""
    from adaptkit.cli import main
    from adaptkit.errors import PluginError

    with pytest.raises(PluginError, match="-p no:lroa: no plugin is called 'lroa'"):
        get_plugin_host(["no:lroa"], autoload=False)
    assert main(["-p", "no:lroa", "strategies"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adaptkit: error: -p no:lroa: no plugin is called 'lroa'")
    assert "lora" in err[0]  # the plugins there are, to pick the right name from


def test_the_plugin_guides_complete_strategy_is_the_shipped_file():
    """docs/plugins.md shows the example plugin whole: the very file the example package ships,
    so what a reader copies has every check the tested plugin has."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    guide = (root / "docs" / "plugins.md").read_text()
    section = guide.split("## A complete strategy", 1)[1]
    shown = section.split("```python\n", 1)[1].split("```", 1)[0]
    shipped = (root / "examples" / "adaptkit-example-plugin" / "adaptkit_example_plugin.py").read_text()
    assert shown == shipped


BROKEN_APPLY = '''
from adaptkit import Strategy, StrategyConfig, hookimpl


class Broken(Strategy):
    """A strategy with a bug in apply."""

    def apply(self, model):
        return {}["missing key"]


@hookimpl
def adaptkit_register_strategies(register):
    register("broken", Broken, StrategyConfig)
'''


def test_a_bug_in_a_strategy_is_one_message_naming_the_strategy_and_its_plugin(tmp_path, monkeypatch, capsys):
    """Not a traceback that names neither: the strategy, its plugin and the error, in one line."""
    import adaptkit
    from adaptkit.errors import PluginError
    from adaptkit.testing import tiny_model

    (tmp_path / "broken_plugin.py").write_text(BROKEN_APPLY)
    monkeypatch.syspath_prepend(str(tmp_path))
    host = get_plugin_host(["broken_plugin"], autoload=False)
    with pytest.raises(PluginError) as caught:
        adaptkit.apply(tiny_model("bert"), "broken", host=host)
    message = str(caught.value)
    assert message.startswith("strategy 'broken' of plugin 'broken_plugin' (broken_plugin) failed in apply")
    assert message.endswith("KeyError: 'missing key'")
    assert isinstance(caught.value.__cause__, KeyError)  # the original, for a debugger


BUGGY_LATER = '''
from adaptkit import Strategy, StrategyConfig, hookimpl
from adaptkit.contract.anatomy import head_parameter_names


class BuggyLater(Strategy):
    """Applies fine; its check, save and merge each have a bug."""

    def apply(self, model):
        head = set(head_parameter_names(model))
        for name, p in model.named_parameters():
            p.requires_grad_(name in head)
        self.owned = {n: p for n, p in model.named_parameters() if n in head}
        return model

    def save(self, model, directory):
        raise OSError("disk on fire")

    def merge(self, model):
        return model.no_such_attribute


@hookimpl
def adaptkit_register_strategies(register):
    register("buggy_later", BuggyLater, StrategyConfig)
'''


def test_a_bug_in_save_or_merge_also_names_the_strategy_and_its_plugin(tmp_path, monkeypatch):
    import adaptkit
    from adaptkit.errors import PluginError
    from adaptkit.testing import tiny_model

    (tmp_path / "buggy_later.py").write_text(BUGGY_LATER)
    monkeypatch.syspath_prepend(str(tmp_path))
    adapted = adaptkit.apply(
        tiny_model("bert"), "buggy_later", host=get_plugin_host(["buggy_later"], autoload=False)
    )
    with pytest.raises(
        PluginError, match=r"^strategy 'buggy_later' of plugin .* failed in save: OSError: disk on fire"
    ):
        adapted.save(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()  # nothing half-written
    with pytest.raises(PluginError, match=r"failed in merge: AttributeError"):
        adapted.merge()
