"""What trains at each moment of a run: the host's side of the strategies' training events.

The optimizer (and DDP, under several processes) is built once, from every parameter that trains
at the start or that a strategy lists as pending. Strategies then flip ``requires_grad`` on
events; this module keeps the rest consistent, so no strategy has to:

- under DDP, pending parameters must require grad from the start for DDP to synchronise them;
  they are marked so, their gradients dropped, and the marking undone before each event, so a
  strategy always sees (and sets) only its own choice;
- a parameter made trainable that the optimizer does not hold would get gradients but never
  change: it is refused, naming the strategy;
- a strategy that declares ``refrozen_state = "drop"`` gets the optimizer state of the
  parameters it freezes again dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from adaptkit.contract.strategy import Event, Strategy, TrainState
from adaptkit.errors import StrategyError

if TYPE_CHECKING:
    from adaptkit.adapt.stack import Adapted


class Trainables:
    """The trainable set of an adapted model over a run, kept in step with its optimizer."""

    def __init__(self, adapted: Adapted, registered: Iterable[Any], ddp: bool):
        """``registered``: the parameters the optimizer holds; ``ddp``: several processes."""
        self.adapted = adapted
        self.registered = {id(p) for p in registered}
        self.ddp = ddp
        self.marked: list[Any] = []  # pending parameters marked trainable only for DDP
        self.trained: set[int] = self._now()  # ids of what the strategies train now
        self.gated: set[int] = set()  # ids of pending parameters: their gradients are dropped

    def mark_pending(self) -> None:
        """Under DDP, mark pending parameters trainable (before DDP wraps the model) and gate them."""
        pending = self.adapted.pending_parameters()
        self.marked = pending if self.ddp else []
        for p in self.marked:
            p.requires_grad_(True)
        self.gated = {id(p) for p in pending}

    def fire(self, event: str, state: TrainState, optimizer: Any = None) -> None:
        """Pass ``event`` to the strategies, then check and record what they train."""
        for p in self.marked:
            p.requires_grad_(False)
        before = self.trained
        for strategy in self.adapted.strategies:  # one at a time, to name the one that breaks a rule
            self.adapted.on_event(event, state, [strategy])
            self.trained = self._now()
            self._refuse_unregistered(strategy, self.trained - self.registered, event, state)
        if optimizer is not None:
            self._drop_state(before - self.trained, optimizer)
        self.mark_pending()

    def _now(self) -> set[int]:
        return {id(p) for p in self.adapted.model.parameters() if p.requires_grad}

    def _refuse_unregistered(self, strategy: Strategy, ids: set[int], event: str, state: TrainState) -> None:
        if not ids:
            return
        who = f"strategy '{strategy.name}'" + (f" of {strategy.origin}" if strategy.origin else "")
        raise StrategyError(
            f"{who} made {len(ids)} parameters trainable at {Event(event).value} (step {state.step}) "
            "that it did not list in pending_parameters: the optimizer (and DDP) were built without them, "
            "so they would never "
            "change; list every parameter the strategy unfreezes later in pending_parameters"
        )

    def _drop_state(self, refrozen: set[int], optimizer: Any) -> None:
        """Drop the optimizer state of refrozen parameters whose strategy asks for it."""
        if not refrozen:
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        for p in self.adapted.model.parameters():
            if id(p) in refrozen:
                owner = self.adapted.owner_of(p)
                if owner is not None and owner.refrozen_state == "drop":
                    inner.state.pop(p, None)
