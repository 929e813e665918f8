"""The strategy contract: what a fine-tuning strategy plugin implements.

A strategy is an object built from a validated config. The host applies the strategies of a
stack in the order given (``freeze`` then ``lora``), each to the model the previous one
returned, and later asks each of them for optimizer groups, reactions to training events,
what to save, how to load it back onto a fresh base model and how to merge it.

This module must not import torch: ``adaptkit strategies`` reads these classes without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from adaptkit.errors import NotMergeableError

if TYPE_CHECKING:
    import torch
    from torch import nn

WEIGHTS_FILE = "weights.safetensors"


class StrategyConfig(BaseModel):
    """Base class of strategy configs: a pydantic model that rejects unknown fields.

    Give every field a type, a default and a ``Field(description=...)``: ``adaptkit strategies``
    shows them, and recipe errors repeat them.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Event(str, Enum):
    """The training events a strategy's ``on_event`` receives, in the order they fire.

    A ``str`` enum: ``event == "step_start"`` holds, so a strategy may compare with plain strings.
    """

    #: once, before the first step of the run (and again, with the restored state, on resume)
    TRAIN_START = "train_start"
    #: at the start of every epoch, before its first step
    EPOCH_START = "epoch_start"
    #: before every optimizer step (``state.step`` steps already taken)
    STEP_START = "step_start"


@dataclass
class TrainState:
    """Where training stands when an event fires.

    ``step`` counts optimizer steps already taken; ``epoch`` counts epochs already finished
    (both start at 0). A resumed run fires ``train_start`` with the restored values, so a
    strategy whose behaviour depends only on this state resumes exactly. ``seed`` is the run's
    ``train.seed`` (a comparison gives each run its own): a strategy that draws at random (which
    layers to unfreeze next, say) seeds its draws from it and the step, so that another seed
    draws differently and a resumed run draws the same.
    """

    step: int = 0
    epoch: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    num_processes: int = 1
    seed: int = 0


class Strategy:
    """Base class of strategies. Subclasses implement ``apply`` and override what they need.

    The defaults describe a strategy that only changes which existing parameters train: it
    saves the parameters it made trainable (``self.owned``) and merges as a no-op.
    """

    # -- declared capabilities: the host checks them before anything loads, and
    # ``adaptkit strategies`` shows them ---------------------------------------------------------

    #: False when the strategy's effect cannot be folded into a plain model (``merge`` raises).
    #: A strategy whose mergeability depends on its config sets it on the instance in ``__init__``.
    mergeable: bool = True
    #: True when the strategy changes only how training runs (noise, sampling) and leaves no
    #: weights of its own: it saves nothing, merges as a no-op, and combines even with ``full``.
    training_only: ClassVar[bool] = False
    #: True when the strategy trains the whole model and so combines with nothing else
    #: (except training-only strategies).
    exclusive: ClassVar[bool] = False
    #: True when ``apply`` wraps the model in a ``peft.PeftModel``; a stack holds at most one.
    wraps_with_peft: ClassVar[bool] = False
    #: False when the strategy cannot work on a base an earlier strategy quantized (QLoRA).
    quantized_base: ClassVar[bool] = True
    #: Launches the strategy works under: one process, several (DDP), sharded (FSDP, DeepSpeed).
    #: A strategy that cannot work under one leaves it out, and such a launch is refused.
    launches: ClassVar[frozenset[str]] = frozenset({"single", "ddp", "sharded"})
    #: Why a launch is left out of ``launches``, said when such a launch is refused (optional).
    launches_note: str = ""
    #: False when the strategy cannot train on packed rows (it adds tokens to every sequence, as
    #: prompt tuning does): ``data.packing: true`` is refused and ``auto`` does not pack. A
    #: strategy for which it depends on the config sets it on the instance in ``__init__``.
    packs: bool = True
    #: Registered task names the strategy supports, or None for every task.
    tasks: ClassVar[tuple[str, ...] | None] = None
    #: What happens to the optimizer state (AdamW's moments) of a parameter this strategy freezes
    #: again: ``keep`` it (it resumes where it was when unfrozen later) or ``drop`` it (memory
    #: goes back; the parameter starts afresh when unfrozen).
    refrozen_state: ClassVar[Literal["keep", "drop"]] = "keep"
    #: The learning rates that suit the strategy, as (low, high), or None where it depends on the
    #: config. What trains sets it: a few new weights learn fast, a whole pretrained network slowly.
    #: A strategy whose range depends on its config sets it on the instance in ``__init__``.
    lr_range: tuple[float, float] | None = None
    #: The plugin that registered the strategy, as messages name it; set by the host.
    origin: str = ""

    @property
    def quantizes_base(self) -> bool:
        """True when ``apply`` quantizes the base (later strategies then see a quantized model)."""
        return False

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """The declared capabilities, as ``adaptkit strategies`` prints them."""
        return {
            "mergeable": cls.mergeable,
            "saves": "nothing (training-time only)" if cls.training_only else "its weights",
            "combines": "only with training-only strategies" if cls.exclusive else "with others",
            "quantized_base": cls.quantized_base,
            "launches": sorted(cls.launches),
            "packs": cls.packs,
            "tasks": list(cls.tasks) if cls.tasks is not None else "all",
            "learning_rates": list(cls.lr_range) if cls.lr_range else None,
        }

    def __init__(self, config: StrategyConfig, name: str | None = None):
        self.config = config
        self.name = name or type(self).__name__.lower()
        #: Parameters this strategy trains (now or later), keyed by their name in the model
        #: it was applied to. Filled by ``apply``; the default save and load use it.
        self.owned: dict[str, torch.nn.Parameter] = {}

    # -- building ----------------------------------------------------------------------------

    def check(self, stack: list[Strategy], position: int) -> None:
        """Refuse a combination that cannot work by raising ``StrategyError``.

        Called before anything is applied, with the whole stack and this strategy's index.
        """

    def apply(self, model: nn.Module) -> nn.Module:
        """Modify ``model`` (freeze, inject modules, replace the head) and return it.

        May return a different object (peft wraps the model). Must leave the model's
        train/eval mode as it found it and keep trainable parameters in float32.
        """
        raise NotImplementedError

    # -- training ----------------------------------------------------------------------------

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """Optimizer groups with their own learning rates, or None for the default group.

        Each group is ``{"params": [...], "lr": float, "name": str}`` and may list parameters
        that are still frozen (``pending_parameters``): the optimizer is built once, with
        every parameter that may ever train, so learning-rate schedules cover them all.
        """
        return None

    def pending_parameters(self, model: nn.Module) -> list[torch.nn.Parameter]:
        """Parameters this strategy will make trainable later, but not yet.

        The host keeps their gradients at None (so AdamW applies neither decay nor momentum)
        and, in multi-process runs, lets DDP synchronise them from the start.
        """
        return []

    def on_event(self, model: nn.Module, event: Event, state: TrainState) -> None:
        """React to a training ``event`` (see ``Event``): set ``requires_grad`` as this strategy wants now.

        Decide from ``state`` alone (not from what happened before), so that a resumed run lands on
        the same trainable set. The host undoes its own marking for DDP before every event, so
        setting the set only when it changes is enough; it notices changes by itself (any return
        value is ignored). A parameter made trainable here must be one ``pending_parameters``
        listed: the optimizer and DDP are built once, from what trains or is pending at the start.
        """

    def optimizer_state_parameters(self, model: nn.Module) -> list[torch.nn.Parameter] | None:
        """Parameters of this strategy that may hold optimizer state at the run's last step, for the
        memory estimate; None means those trainable then. A strategy that keeps state for parameters
        it froze again (``refrozen_state = "keep"``) lists them too."""
        return None

    # -- saving, loading, merging ------------------------------------------------------------

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write what this strategy changed (and only that) into ``directory``.

        Not called for a training-only strategy, which has nothing to save.
        """
        from adaptkit.files import save_tensors

        save_tensors({name: p.detach() for name, p in self.owned.items()}, directory / WEIGHTS_FILE)

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """Load what ``save`` wrote onto ``model``, a fresh base this strategy was just applied to.

        Not called for a training-only strategy.
        """
        from adaptkit.files import load_into

        load_into(self.owned, directory / WEIGHTS_FILE, owner=self.name)
        return model

    def export(self, model: nn.Module, directory: Path) -> None:
        """Write what a user of the strategy's own library loads without adaptkit (a peft adapter
        that applies to the untouched base, say); the default is what ``save`` writes."""
        self.save(model, directory)

    def held_bytes(self, model: nn.Module) -> int:
        """Memory the strategy holds besides the model's parameters (a copy of its initial state),
        for the memory estimate."""
        return 0

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold this strategy into a plain model for export and return it.

        The default fits strategies whose trained parameters already live in the model.
        """
        if not self.mergeable:
            raise NotMergeableError(f"strategy '{self.name}' cannot be merged into a plain model")
        return model
