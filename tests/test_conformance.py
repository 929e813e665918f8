"""The strategy conformance kit: every first-party strategy (and the example plugin) passes it,
and it catches the strategies that break the contract in the ways plugin authors do."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from adaptkit.host.manager import PluginInfo
from adaptkit.testing import check_strategy, check_two_processes, conformance_test, plugin_host
from adaptkit.testing.conformance import CheckFailed

# -- every first-party strategy, as a plugin author would write the test ---------------------------

test_full = conformance_test("full", two_processes=False)
test_freeze = conformance_test(
    "freeze", [{}, {"trainable_top_blocks": 1, "train_norms": True}], two_processes=False
)
LORAS = [{"r": 2}, {"r": 2, "quantize": "4bit"}, {"r": 2, "init": "pissa"}, {"r": 2, "init": "olora"}]
test_lora = conformance_test("lora", LORAS, two_processes=False)
# LoftQ on a LLaMA and on GPT-2 (whose Conv1D weights are stored transposed)
test_lora_loftq = conformance_test(
    "lora", [{"r": 2, "quantize": "4bit", "init": "loftq"}], families=("llama", "gpt2"), two_processes=False
)
test_adapters = conformance_test("adapters", two_processes=False)
test_gradual_unfreeze = conformance_test("gradual_unfreeze", [{"every": 2, "unit": "step"}])
PROMPT_TUNING = {"method": "prompt_tuning", "options": {"num_virtual_tokens": 4}}
test_peft = conformance_test("peft", [{"method": "ia3"}, PROMPT_TUNING], two_processes=False)
test_none = conformance_test("none", two_processes=False)
test_scratch = conformance_test("scratch", two_processes=False)
test_neftune = conformance_test("neftune", two_processes=False)
test_lisa = conformance_test("lisa", [{"active_layers": 1, "interval": 2}])
test_bitfit = conformance_test("bitfit", two_processes=False)  # the example third-party plugin


# -- strategies that break the contract: the kit must say so --------------------------------------

BROKEN = textwrap.dedent(
    '''
    """Strategies that each break one promise of the contract."""
    import os
    import random

    from adaptkit import Strategy, StrategyConfig, hookimpl
    from adaptkit.contract.anatomy import head_parameter_names
    from adaptkit_plugins.strategies.lisa import Lisa, LisaConfig


    class HeadOnly(Strategy):
        """Train the head only."""

        def apply(self, model):
            head = set(head_parameter_names(model))
            for name, p in model.named_parameters():
                p.requires_grad_(name in head)
            self.owned = {n: p for n, p in model.named_parameters() if n in head}
            return model


    class ForgetsOwnership(HeadOnly):
        """Trains the head but lists nothing in owned: nothing would be saved."""

        def apply(self, model):
            model = super().apply(model)
            self.owned = {}
            return model


    class ChangesFrozenWeights(HeadOnly):
        """Shrinks a frozen embedding matrix on every step."""

        def on_event(self, model, event, state):
            import torch

            if event == "step_start":
                with torch.no_grad():
                    model.get_input_embeddings().weight.mul_(0.5)


    class LosesATensor(HeadOnly):
        """Trains the head and the last norm, but saves (and loads) the head's weight only."""

        def apply(self, model):
            model = super().apply(model)
            norm = [(n, p) for n, p in model.named_parameters() if "LayerNorm" in n or "norm" in n][-1]
            norm[1].requires_grad_(True)
            self.owned[norm[0]] = norm[1]
            return model

        def save(self, model, directory):
            from adaptkit.files import save_tensors

            kept = {n: p.detach() for n, p in self.owned.items() if n.endswith("weight") and "orm" not in n}
            save_tensors(kept, directory / "weights.safetensors")

        def load(self, model, directory):
            from adaptkit.files import load_tensors

            for name, value in load_tensors(directory / "weights.safetensors").items():
                self.owned[name].data.copy_(value)
            return model


    class UndeclaredUnfreeze(HeadOnly):
        """Unfreezes the embeddings at step 2 without listing them in pending_parameters."""

        def on_event(self, model, event, state):
            if state.step >= 2:
                model.get_input_embeddings().weight.requires_grad_(True)


    class FlipsOnChange(Lisa):
        """LISA that sets the trainable set only when its draw changes."""

        def on_event(self, model, event, state):
            active = self.draw(state.seed, state.step)
            if active != self._active:
                self._set(active)


    class RankSeededDraws(Lisa):
        """LISA whose draws are seeded per process: every rank trains different blocks."""

        def draw(self, seed, step):
            rng = random.Random(f"{os.environ.get('RANK', '0')}:{step // self.config.interval}:x")
            return sorted(rng.sample(range(len(self._blocks)), 1))


    class Empty(StrategyConfig):
        pass


    @hookimpl
    def adaptkit_register_strategies(register):
        register("forgets_ownership", ForgetsOwnership, Empty)
        register("changes_frozen", ChangesFrozenWeights, Empty)
        register("loses_a_tensor", LosesATensor, Empty)
        register("undeclared_unfreeze", UndeclaredUnfreeze, Empty)
        register("flips_on_change", FlipsOnChange, LisaConfig)
        register("rank_seeded_draws", RankSeededDraws, LisaConfig)
    '''
)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """The broken strategies as an importable plugin module (child processes import it too)."""
    d = tmp_path_factory.mktemp("broken")
    (d / "broken_strategies.py").write_text(BROKEN)
    sys.path.insert(0, str(d))
    yield "broken_strategies"
    sys.path.remove(str(d))


def run_broken(name: str, broken: str, families=("bert", "llama")) -> dict[tuple[str, str], object]:
    host = plugin_host(broken)
    assert not host.broken, host.broken[0].error
    return {(r.family, r.check): r for r in check_strategy(name, families=families, host=host)}


def failed(results: dict, check: str) -> list[str]:
    return [r.message for (f, c), r in results.items() if c == check and r.outcome == "failed"]


def test_the_kit_catches_a_strategy_that_forgets_ownership(broken):
    results = run_broken("forgets_ownership", broken)
    messages = failed(results, "every trainable parameter owned")
    assert len(messages) == 2 and all("belong to no strategy" in m for m in messages), messages
    assert "classifier.weight" in messages[0] or "lm_head.weight" in messages[0]


def test_the_kit_catches_a_strategy_that_changes_weights_it_froze(broken):
    results = run_broken("changes_frozen", broken)
    messages = failed(results, "frozen unchanged, trained changed")
    assert len(messages) == 2 and all("frozen weights changed" in m for m in messages), messages
    assert "embeddings" in messages[0] or "embed_tokens" in messages[0]


def test_the_kit_catches_a_save_that_loses_a_tensor(broken):
    results = run_broken("loses_a_tensor", broken)
    messages = failed(results, "save then load: same model")
    assert len(messages) == 2 and all("after save and load" in m and "orm" in m for m in messages), messages
    assert failed(results, "resume: same weights")  # the resumed run lost the norm's training too


def test_an_undeclared_unfreeze_is_refused_by_the_host_naming_the_strategy(broken):
    results = run_broken("undeclared_unfreeze", broken, families=("bert",))
    (message,) = failed(results, "frozen unchanged, trained changed")
    assert "strategy 'undeclared_unfreeze' of plugin 'broken_strategies'" in message
    assert "did not list in pending_parameters" in message and "step 2" in message


def test_the_host_undoes_its_ddp_marking_so_flipping_only_on_change_is_safe(broken):
    """Under DDP the host marks pending parameters trainable; it unmarks them before every event, so
    a strategy that sets its trainable set only when its draw changes keeps training only its draw."""
    import adaptkit
    from adaptkit.adapt.trainable import Trainables
    from adaptkit.contract.strategy import TrainState
    from adaptkit.testing import tiny_model

    adapted = adaptkit.apply(
        tiny_model("bert"),
        {"name": "flips_on_change", "active_layers": 1, "interval": 2},
        host=plugin_host(broken),
    )
    strategy = adapted.strategies[0]
    trainables = Trainables(adapted, list(adapted.model.parameters()), ddp=True)
    trainables.mark_pending()
    blocks = strategy._blocks
    for step in range(8):
        trainables.fire("step_start", TrainState(step=step, seed=3))
        active = strategy.draw(3, step)
        for i, block in enumerate(blocks):
            assert all((id(p) in trainables.trained) == (i in active) for p in block), (step, i, active)
            # the host's marking for DDP: every block requires grad, the ones not drawn are gated
            assert all(p.requires_grad and (id(p) in trainables.gated) == (i not in active) for p in block)


@pytest.mark.distributed
def test_under_ddp_flip_on_change_trains_like_one_process_and_rank_seeded_draws_are_caught(broken):
    config = {"active_layers": 1, "interval": 2}
    summary = check_two_processes("flips_on_change", config, plugins=(broken,))
    assert summary["ranks_in_sync"] is True
    with pytest.raises(CheckFailed, match="the ranks ended with different weights"):
        check_two_processes("rank_seeded_draws", config, plugins=(broken,))


def test_check_plugin_prints_a_table_and_fails_for_a_broken_strategy(broken, tmp_path):
    env_path = {"PYTHONPATH": os.pathsep.join(sys.path)}
    ok = subprocess.run(
        [sys.executable, "-m", "adaptkit", "check-plugin", "bitfit", "--family", "bert"],
        capture_output=True, text=True, env={**os.environ, **env_path}, timeout=600,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "adaptkit-example-plugin" in ok.stdout  # the installed third-party package
    assert re.search(r"save then load: same model +passed", ok.stdout) and "0 failed" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "adaptkit", "-p", broken, "check-plugin", "loses_a_tensor", "--family", "llama"],
        capture_output=True, text=True, env={**os.environ, **env_path}, timeout=600,
    )  # fmt: skip
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "failed [llama] save then load: same model: after save and load" in bad.stdout


def test_check_plugin_refuses_an_unknown_strategy_or_option_with_exit_2():
    unknown = subprocess.run(
        [sys.executable, "-m", "adaptkit", "check-plugin", "nope"], capture_output=True, text=True
    )
    assert unknown.returncode == 2 and "unknown strategy 'nope'" in unknown.stderr
    option = subprocess.run(
        [sys.executable, "-m", "adaptkit", "check-plugin", "lora", "--config", "rank=2"],
        capture_output=True,
        text=True,
    )
    assert option.returncode == 2 and "unknown option of 'lora'" in option.stderr
    assert "Traceback" not in unknown.stderr + option.stderr


def test_the_broken_module_registers_every_strategy(broken):
    host = plugin_host(broken)
    assert {"forgets_ownership", "loses_a_tensor", "rank_seeded_draws"} <= set(host.registries["strategies"])
    assert host.plugins[-1] == next(p for p in host.plugins if p.name == broken)
    assert isinstance(host.plugins[-1], PluginInfo)


def test_the_example_plugins_one_line_suite_is_in_the_guide_and_passes():
    """docs/plugins.md shows the example plugin's test file whole, and that file, run by pytest as a
    plugin author would run it, passes."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shipped = root / "examples" / "adaptkit-example-plugin" / "test_adaptkit_example_plugin.py"
    guide = (root / "docs" / "plugins.md").read_text().split("## Testing a plugin", 1)[1]
    assert guide.split("```python\n", 1)[1].split("```", 1)[0] == shipped.read_text()
    res = subprocess.run(
        # one family: the file's own point is that the one line runs; every family runs in test_bitfit
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not distributed", "-k", "llama", str(shipped)],
        capture_output=True, text=True, cwd=shipped.parent, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:]
    assert re.search(r"\b[5-9] passed", res.stdout), res.stdout[-500:]
