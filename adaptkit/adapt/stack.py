"""Applying a stack of strategies to a model, and saving, loading and merging the result."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.adapt.statistics import hold_frozen_statistics, load_statistics, save_statistics
from adaptkit.contract.strategy import Event, Strategy, TrainState
from adaptkit.errors import (
    CheckpointError,
    ConfigError,
    StrategyError,
    UnownedParametersError,
)
from adaptkit.host.manager import default_host
from adaptkit.host.specs import StrategySpec, strategy_code

if TYPE_CHECKING:
    import torch
    from torch import nn

    from adaptkit.host.manager import PluginHost

MANIFEST = "adaptkit.json"
FORMAT_VERSION = 1


class Adapted:
    """A model with a stack of strategies applied, and everything needed to train, save and merge it."""

    def __init__(self, model: nn.Module, strategies: list[Strategy], base_fingerprint: str):
        self.model = model
        self.strategies = strategies
        self.base_fingerprint = base_fingerprint

    # -- training support --------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters that train now (shared ones once)."""
        return [p for p in _unique(self.model.parameters()) if p.requires_grad]

    def num_trainable(self) -> int:
        """Number of trainable parameter elements."""
        from adaptkit.contract.anatomy import count_parameters

        return count_parameters(self.model, trainable_only=True)

    def num_total(self) -> int:
        """Number of parameter elements in the whole model (4-bit weights counted unpacked)."""
        from adaptkit.contract.anatomy import count_parameters

        return count_parameters(self.model)

    def pending_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters some strategy will unfreeze later (kept out of updates until then)."""
        pending = {}
        for s in self.strategies:
            with strategy_code(s, "pending_parameters"):
                pending.update((id(p), p) for p in s.pending_parameters(self.model))
        return [p for p in pending.values() if not p.requires_grad]

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer groups covering every parameter that trains now or later.

        Later strategies in the stack override earlier ones for the same parameter. Biases and
        one-dimensional parameters (norms) get no weight decay, as in transformers' Trainer.
        """
        assigned: dict[int, tuple[torch.nn.Parameter, str, float]] = {}
        # In model order, whatever is frozen right now: a run resumed at a later unfreezing stage
        # must build the same groups in the same order, or the saved optimizer state lands on the
        # wrong parameters.
        pending = {id(p) for p in self.pending_parameters()}
        candidates = [p for p in _unique(self.model.parameters()) if p.requires_grad or id(p) in pending]
        for p in candidates:
            assigned[id(p)] = (p, "default", lr)
        for s in self.strategies:
            with strategy_code(s, "param_groups"):
                own = s.param_groups(self.model, lr) or []
            for group in own:
                for p in group["params"]:
                    if id(p) in assigned:
                        assigned[id(p)] = (p, f"{s.name}:{group.get('name', '')}", group.get("lr", lr))
        groups: dict[tuple[str, float, bool], list] = {}
        for p, name, group_lr in assigned.values():
            decays = p.ndim > 1
            groups.setdefault((name, group_lr, decays), []).append(p)
        return [
            {"params": ps, "lr": group_lr, "weight_decay": weight_decay if decays else 0.0, "name": name}
            for (name, group_lr, decays), ps in groups.items()
        ]

    def on_event(self, event: str, state: TrainState, strategies: list[Strategy] | None = None) -> None:
        """Pass a training event to every strategy (or to ``strategies``), in stack order."""
        event = Event(event)
        for s in self.strategies if strategies is None else strategies:
            with strategy_code(s, "on_event"):
                s.on_event(self.model, event, state)

    def owner_of(self, param: torch.nn.Parameter) -> Strategy | None:
        """The strategy that owns ``param`` (the last one in the stack, if several do), or None."""
        return next((s for s in reversed(self.strategies) if any(q is param for q in s.owned.values())), None)

    def check_ownership(self) -> None:
        """Refuse trainable (or pending) parameters that no strategy owns: they would train, yet no
        strategy would save them, so a reloaded model would differ from the trained one."""
        owned = {id(p) for s in self.strategies for p in s.owned.values()}
        pending = {id(p) for p in self.pending_parameters()}
        orphans = [
            name
            for name, p in self.model.named_parameters()  # a tied parameter is listed once
            if id(p) not in owned and (p.requires_grad or id(p) in pending)
        ]
        if orphans:
            shown = ", ".join(orphans[:4]) + (f" and {len(orphans) - 4} more" if len(orphans) > 4 else "")
            raise UnownedParametersError(
                f"{len(orphans)} trainable parameters belong to no strategy of "
                f"{[s.name for s in self.strategies]} "
                f"({shown}): they would train but not be saved. A strategy must list what it trains in its "
                "'owned'; or add one that owns them (freeze trains the head, full trains everything)"
            )

    # -- saving, loading, merging ------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Save what the strategies changed, atomically: a temporary directory, then a rename.

        ``directory/adaptkit.json`` names the stack and the base model's fingerprint; each
        strategy writes into ``directory/<strategy name>/`` (LoRA in peft's own format), except a
        training-only one, which has nothing to save; the running statistics of the batch norms
        that trained go beside them (``adaptkit.adapt.statistics``).
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            for s in self.saving:
                (tmp / s.name).mkdir()
                with strategy_code(s, "save"):
                    s.save(self.model, tmp / s.name)
            save_statistics(self.model, tmp)
            manifest = {
                "format": FORMAT_VERSION,
                "strategies": [
                    {"name": s.name, "config": s.config.model_dump(mode="json")} for s in self.strategies
                ],
                "base_fingerprint": self.base_fingerprint,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                directory.rename(old)
                tmp.rename(directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(
        cls, base: nn.Module, directory: str | Path, host: PluginHost | None = None, check_base: bool = True
    ) -> Adapted:
        """Re-apply a saved stack to a freshly loaded ``base`` and load the saved weights.

        With ``check_base``, a base whose weights differ from the one trained on is refused:
        an adapter on the wrong base gives wrong outputs without any other sign.
        """
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{directory}: no readable {MANIFEST} ({exc})") from None
        specs = [{"name": s["name"], **s["config"]} for s in manifest["strategies"]]
        fingerprint = fingerprint_model(base)
        if check_base and fingerprint != manifest["base_fingerprint"]:
            raise CheckpointError(
                f"{directory} was trained on a different base model (fingerprint {manifest['base_fingerprint'][:12]}, "
                f"this base {fingerprint[:12]}); load the same base, or pass check_base=False"
            )
        adapted = apply(base, specs, host=host)
        adapted.load_state(directory)
        return adapted

    def load_state(self, directory: str | Path) -> None:
        """Load what ``save`` wrote into this already adapted model (a fresh apply, or a resume)."""
        for s in self.saving:
            with strategy_code(s, "load"):
                self.model = s.load(self.model, Path(directory) / s.name)
        load_statistics(self.model, Path(directory))

    @property
    def saving(self) -> list[Strategy]:
        """The strategies that save weights (every one but the training-only ones)."""
        return [s for s in self.strategies if not s.training_only]

    def merge(self) -> nn.Module:
        """Fold every strategy into a plain model (outermost first) and return it.

        Raises ``NotMergeableError`` naming the strategy that cannot be merged. Merging works in
        place (peft folds LoRA into the base weights): use this ``Adapted`` for nothing else after.
        """
        model = self.model
        for s in reversed(self.strategies):
            with strategy_code(s, "merge"):
                model = s.merge(model)
        return model


def _unique(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    seen: dict[int, torch.nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def fingerprint_model(model: nn.Module) -> str:
    """A short hash of a model's architecture and a few of its backbone weights.

    Cheap (three tensors), yet it tells apart two bases with the same architecture but
    different pretrained weights; the task head is left out, since it is new on every load.
    """
    from adaptkit.contract.anatomy import head_parameter_names

    try:  # a new task head is random on every load: only the pretrained backbone identifies the base
        head = set(head_parameter_names(model))
    except StrategyError:
        head = set()
    h = hashlib.sha256()
    named = [(n, p) for n, p in model.named_parameters() if n not in head]
    h.update(type(model).__name__.encode())
    for name, p in named:
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    for _, p in [named[0], named[len(named) // 2], named[-1]] if named else []:
        h.update(p.detach().to("cpu").contiguous().view(-1)[:4096].float().numpy().tobytes())
    return h.hexdigest()


def apply(
    model: nn.Module,
    strategies: StrategySpec | list[StrategySpec],
    host: PluginHost | None = None,
    **options: Any,
) -> Adapted:
    """Apply one strategy or a stack of strategies to ``model``.

    ``apply(model, "lora", r=8)`` applies one strategy with options;
    ``apply(model, ["freeze", {"name": "lora", "r": 8}])`` applies a stack in order.
    Returns an ``Adapted`` holding the model (possibly a new wrapper object) and the strategies.
    """
    if isinstance(strategies, (str, dict, tuple)):
        strategies = [(strategies, options) if isinstance(strategies, str) else strategies]
    elif options:
        raise ConfigError("keyword options apply to a single strategy; give a stack as a list of mappings")
    host = host or default_host()
    stack = host.build_strategies(strategies)
    fingerprint = fingerprint_model(model)
    was_training = model.training
    for s in stack:
        with strategy_code(s, "apply"):
            model = s.apply(model)
    # peft creates its dropout modules in training mode even on a model in eval mode.
    model.train(was_training)
    hold_frozen_statistics(model)
    adapted = Adapted(model, stack, fingerprint)
    adapted.check_ownership()
    return adapted
