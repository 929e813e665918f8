"""The strategy conformance kit: what every strategy must do, checked on tiny real models.

In the spirit of scikit-learn's ``check_estimator``. Each check applies the strategy (with a
given config) to a tiny randomly initialised BERT, GPT-2, LLaMA or ViT model and asserts a
promise of the strategy contract (``docs/plugins.md``). A plugin author runs them all with one
line of pytest::

    test_bitfit = adaptkit.testing.conformance_test("bitfit")

or from the command line: ``adaptkit check-plugin bitfit``. A strategy may refuse a model or a
combination with a ``StrategyError`` (a clear message is the contract too): the check then
reports ``refused`` with that message instead of passing or failing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from adaptkit.adapt.stack import Adapted, apply
from adaptkit.contract.strategy import Event
from adaptkit.errors import NotMergeableError, StrategyError, UnownedParametersError
from adaptkit.host.manager import PluginHost
from adaptkit.testing.drive import TOTAL_STEPS, Drive, logits
from adaptkit.testing.models import tiny_inputs, tiny_model

#: The model of each family, and the task name a strategy's declared ``tasks`` is matched against.
FAMILY_TASKS = {
    "bert": ("classification", "classification"),
    "gpt2": ("classification", "classification"),
    "llama": ("causal_lm", "causal_lm"),
    "vit": ("classification", "image_classification"),
}
#: Stop after this step and resume: past the first epoch boundary (``drive.STEPS_PER_EPOCH``).
RESUME_AT = 4
#: Logits of a merged model may differ from the unmerged one by float rounding of the fold.
MERGE_TOLERANCE = 1e-4


class CheckFailed(AssertionError):
    """A strategy broke a promise of the contract."""


class Refused(Exception):
    """The strategy refused this model or stack with a StrategyError (reported, not failed)."""


@dataclass
class Case:
    """One strategy configuration on one model family."""

    strategy: str
    config: dict[str, Any]
    family: str
    host: PluginHost
    seed: int = 0
    batches: list[dict[str, Any]] = field(default_factory=list)
    #: the stack to check, when not the strategy alone (the composition checks set it)
    stack: list[dict[str, Any]] | None = None

    @property
    def spec(self) -> dict[str, Any]:
        """The strategy as a stack entry."""
        return {"name": self.strategy, **self.config}

    @property
    def alone(self) -> list[dict[str, Any]]:
        """The stack the checks run (``stack_for``)."""
        return stack_for(self.host, self.strategy, self.config)

    def base(self) -> Any:
        """A fresh tiny base model (the same weights every time), in eval mode."""
        model_task = FAMILY_TASKS[self.family][0]
        return tiny_model(self.family, model_task, seed=self.seed)

    def build(self, stack: list[Any] | None = None, model: Any = None) -> Adapted:
        """Apply ``stack`` (default: the strategy alone) to a fresh base; a refusal becomes ``Refused``."""
        import torch

        model = model if model is not None else self.base()
        if not self.batches:
            self.batches = [tiny_inputs(model, seed=i) for i in range(TOTAL_STEPS)]
        torch.manual_seed(self.seed)  # strategies that draw (new heads, scratch) draw alike each time
        try:
            return apply(model, stack or self.stack or self.alone, host=self.host)
        except UnownedParametersError as exc:
            raise CheckFailed(str(exc)) from None
        except StrategyError as exc:
            raise Refused(str(exc)) from None

    def drive(self, adapted: Adapted, until: int = TOTAL_STEPS) -> Drive:
        """Train ``adapted`` to step ``until`` from a seeded RNG."""
        import torch

        torch.manual_seed(self.seed)
        drive = Drive(adapted, self.batches, seed=self.seed)
        drive.run(until)
        return drive


def stack_for(host: PluginHost, strategy: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The stack that checks ``strategy``: itself alone, or after ``full`` for a training-only
    strategy (which trains nothing by itself)."""
    spec = {"name": strategy, **config}
    return [{"name": "full"}, spec] if host.strategy(strategy).obj.training_only else [spec]


# -- the checks ---------------------------------------------------------------------------------


def check_apply_keeps_mode_and_float32(case: Case) -> None:
    """``apply`` leaves every module in the train/eval mode it found, and trainables in float32."""
    for training in (False, True):
        model = case.base().train(training)
        adapted = case.build(model=model)
        wrong = [n for n, m in adapted.model.named_modules() if m.training != training]
        if wrong:
            raise CheckFailed(
                f"apply on a model in {'train' if training else 'eval'} mode left {wrong[:3]} otherwise"
            )
        dtypes = {str(p.dtype) for p in adapted.model.parameters() if p.requires_grad}
        if dtypes - {"torch.float32"}:
            raise CheckFailed(f"trainable parameters are {sorted(dtypes)}, not float32")


def check_every_trainable_parameter_is_owned(case: Case) -> None:
    """Every parameter that trains now or later belongs to a strategy, and every owned parameter
    the model uses trains now or later (a later strategy did not freeze it behind its back)."""
    adapted = case.build()  # the host refuses unowned trainable parameters (a CheckFailed here)
    pending = {id(p) for p in adapted.pending_parameters()}
    for s in adapted.strategies:
        idle = {n: p for n, p in s.owned.items() if not p.requires_grad and id(p) not in pending}
        used = _used_by_forward(adapted.model, list(idle.values()), case.batches[0])
        if used:
            names = [n for n, p in idle.items() if id(p) in used]
            raise CheckFailed(
                f"strategy '{s.name}' owns {len(names)} parameters the model uses that neither train nor "
                f"are pending ({names[:3]}): a strategy after it froze them"
            )


def _used_by_forward(model: Any, params: list[Any], batch: dict[str, Any]) -> set[int]:
    """Which of ``params`` the loss depends on (peft's frozen bookkeeping copies, for one, it does not)."""
    if not params:
        return set()
    for p in params:
        p.requires_grad_(True)
    try:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return {id(p) for p in params if p.grad is not None}
    finally:
        for p in params:
            p.requires_grad_(False)
        model.zero_grad(set_to_none=True)


def check_frozen_weights_unchanged_and_trained_ones_changed(case: Case) -> None:
    """Over real optimizer steps (across an epoch boundary), a parameter not trained at a step is
    bitwise unchanged by it, and every trained parameter that had a gradient changed."""
    adapted = case.build()
    initial = {n: p.detach().clone() for n, p in adapted.model.named_parameters()}
    drive = case.drive(adapted)
    if drive.record.changed_while_frozen:
        step, name = drive.record.changed_while_frozen[0]
        raise CheckFailed(
            f"{len(drive.record.changed_while_frozen)} frozen weights changed, "
            f"first {name} at step {step + 1}"
        )
    ever = set().union(*drive.record.trained) & drive.record.with_gradient
    still = [n for n, p in adapted.model.named_parameters() if id(p) in ever and p.detach().equal(initial[n])]
    if still:
        raise CheckFailed(f"trained parameters with nonzero gradients did not change: {still[:3]}")


def check_save_then_load_gives_the_same_model(case: Case) -> None:
    """``save`` then ``load`` onto a fresh base gives every parameter back, and the same logits."""
    adapted = case.build()
    case.drive(adapted)
    with tempfile.TemporaryDirectory() as tmp:
        adapted.save(Path(tmp) / "saved")
        for s in adapted.strategies:
            if s.training_only and (Path(tmp) / "saved" / s.name).exists():
                raise CheckFailed(f"training-only strategy '{s.name}' saved a directory")
        loaded = Adapted.load(case.base(), Path(tmp) / "saved", host=case.host)
    theirs = dict(loaded.model.named_parameters())
    for name, p in adapted.model.named_parameters():
        if name not in theirs or not theirs[name].detach().equal(p.detach()):
            raise CheckFailed(f"after save and load, {name} differs from the trained model")
    batch = case.batches[0]
    if not logits(loaded.model, batch).equal(logits(adapted.model, batch)):
        raise CheckFailed("after save and load, the logits differ from the trained model's")


def check_merge_gives_the_same_logits_or_refuses(case: Case) -> None:
    """A ``mergeable`` strategy folds into a plain model with the same logits and no hooks left;
    one that is not raises ``NotMergeableError``."""
    adapted = case.build()
    case.drive(adapted)
    batch = case.batches[0]
    expected = logits(adapted.model, batch)
    declared = all(s.mergeable for s in adapted.strategies)
    try:
        merged = adapted.merge()
    except NotMergeableError:
        if declared:
            raise CheckFailed("merge raised NotMergeableError, but the strategy declares mergeable") from None
        return
    if not declared:
        raise CheckFailed("merge succeeded, but the strategy declares mergeable = False")
    if type(merged).__module__.startswith("peft"):
        raise CheckFailed(f"merge returned a {type(merged).__name__}, not a plain transformers model")
    hooked = [n for n, m in merged.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        raise CheckFailed(f"merge left forward hooks on {hooked[:3]}")
    gap = (logits(merged, batch) - expected).abs().max().item()
    if gap > MERGE_TOLERANCE:
        raise CheckFailed(f"merged logits differ by {gap:.2e} (more than {MERGE_TOLERANCE})")


def check_resume_gives_the_same_weights(case: Case) -> None:
    """Stopping after step 4 (past an epoch boundary), saving, and resuming on a fresh base with the
    optimizer state and RNG restored gives bitwise the weights of an uninterrupted run."""
    import torch

    straight = case.build()
    case.drive(straight)
    first = case.build()
    drive = case.drive(first, RESUME_AT)
    with tempfile.TemporaryDirectory() as tmp:
        first.save(Path(tmp) / "ckpt")
        optimizer_state = drive.optimizer.state_dict() if drive.optimizer else None
        rng = torch.get_rng_state()
        resumed = case.build()
        resumed.load_state(Path(tmp) / "ckpt")
    again = Drive(resumed, case.batches, seed=case.seed)
    again.step = RESUME_AT
    # the loop loads the optimizer state after the strategies re-applied, before train_start
    again.fire(Event.TRAIN_START)
    if optimizer_state is not None:
        again.optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(rng)
    again.run(TOTAL_STEPS)
    theirs = dict(resumed.model.named_parameters())
    for name, p in straight.model.named_parameters():
        if not theirs[name].detach().equal(p.detach()):
            raise CheckFailed(f"after resuming at step {RESUME_AT}, {name} differs from an uninterrupted run")


def check_composes_with_freeze(case: Case) -> None:
    """``[freeze, strategy]`` is refused with a clear message, or trains and saves correctly."""
    _compose(case, [{"name": "freeze"}, case.spec], "freeze")


def check_composes_with_lora(case: Case) -> None:
    """``[strategy, lora]`` and ``[lora, strategy]`` are each refused clearly, or train and save correctly."""
    refusals = []
    for stack in ([case.spec, {"name": "lora", "r": 2}], [{"name": "lora", "r": 2}, case.spec]):
        try:
            _compose(case, stack, "lora")
        except Refused as exc:
            refusals.append(str(exc))
    if len(refusals) == 2:
        raise Refused("; ".join(refusals))


def _compose(case: Case, stack: list[dict[str, Any]], partner: str) -> None:
    if case.strategy == partner:
        raise Refused(f"'{partner}' does not compose with itself")
    stacked = replace(case, stack=stack)
    stacked.build()  # refused here, or built
    check_every_trainable_parameter_is_owned(stacked)
    check_frozen_weights_unchanged_and_trained_ones_changed(stacked)
    check_save_then_load_gives_the_same_model(stacked)


#: Every check, by the name reports use.
CHECKS: dict[str, Callable[[Case], None]] = {
    "apply keeps mode and float32": check_apply_keeps_mode_and_float32,
    "every trainable parameter owned": check_every_trainable_parameter_is_owned,
    "frozen unchanged, trained changed": check_frozen_weights_unchanged_and_trained_ones_changed,
    "save then load: same model": check_save_then_load_gives_the_same_model,
    "merge: same logits or refused": check_merge_gives_the_same_logits_or_refuses,
    "resume: same weights": check_resume_gives_the_same_weights,
    "composes with freeze": check_composes_with_freeze,
    "composes with lora": check_composes_with_lora,
}


@dataclass
class Result:
    """One check of one case: ``passed``, ``failed``, ``refused`` (a StrategyError) or ``skipped``."""

    check: str
    family: str
    config: dict[str, Any]
    outcome: str
    message: str = ""


def run_case(case: Case, checks: list[str] | None = None) -> list[Result]:
    """Run the named checks (default: all) on one case; never raises for a strategy's failure."""
    results = []
    task = FAMILY_TASKS[case.family][1]
    declared = case.host.strategy(case.strategy).obj.tasks
    for name in checks or list(CHECKS):
        result = Result(name, case.family, case.config, "passed")
        if declared is not None and task not in declared:
            result.outcome, result.message = (
                "skipped",
                f"the strategy declares tasks {list(declared)}, not '{task}'",
            )
        else:
            try:
                CHECKS[name](case)
            except Refused as exc:
                result.outcome, result.message = "refused", str(exc)
            except Exception as exc:  # a bug in the strategy counts as a failure of the check
                kind = "" if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: "
                result.outcome, result.message = "failed", f"{kind}{exc}"
        results.append(result)
    return results


def check_strategy(
    strategy: str,
    configs: list[dict[str, Any]] | None = None,
    families: tuple[str, ...] = tuple(FAMILY_TASKS),
    host: PluginHost | None = None,
    checks: list[str] | None = None,
) -> list[Result]:
    """Run the conformance checks on ``strategy`` for each config and model family.

    ``host`` defaults to one with every installed plugin (entry points included), so an
    installed third-party strategy is checked as users would run it.
    """
    from adaptkit.host.manager import default_host

    host = host or default_host()
    host.strategy(strategy)  # an unknown name: one StrategyError listing what exists
    results = []
    for config in configs or [{}]:
        for family in families:
            results.extend(run_case(Case(strategy, dict(config), family, host), checks))
    return results
