"""A few real training steps over the host's own pieces, for the conformance checks.

The optimizer is built from ``Adapted.param_groups`` and events go through ``Trainables`` (the
part of the training loop that gates pending parameters and refuses undeclared ones), so a
strategy is driven here as the real loop drives it: ``train_start``, ``epoch_start`` at every
epoch (and on resume), ``step_start`` before every optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adaptkit.adapt.stack import Adapted
from adaptkit.adapt.trainable import Trainables
from adaptkit.contract.strategy import Event, TrainState

STEPS_PER_EPOCH = 3
TOTAL_STEPS = 6
LR = 1e-2


@dataclass
class Record:
    """What a drive saw: per step, what trained and which weights changed."""

    trained: list[set[int]] = field(default_factory=list)  # ids trained at each step
    changed_while_frozen: list[tuple[int, str]] = field(default_factory=list)  # (step, name)
    with_gradient: set[int] = field(default_factory=set)  # ids that ever had a nonzero gradient


class Drive:
    """An adapted model, its optimizer and its events, stepped on fixed batches."""

    def __init__(self, adapted: Adapted, batches: list[dict[str, Any]], seed: int = 0):
        import torch

        self.adapted, self.batches, self.seed = adapted, batches, seed
        groups = adapted.param_groups(LR, weight_decay=0.01)
        self.trainables = Trainables(adapted, [p for g in groups for p in g["params"]], ddp=False)
        self.trainables.mark_pending()
        trains = any(g["params"] for g in groups)
        self.optimizer = torch.optim.AdamW(groups, lr=LR) if trains else None
        self.step = 0
        self.record = Record()

    def state(self) -> TrainState:
        """The ``TrainState`` events carry now."""
        return TrainState(
            step=self.step,
            epoch=self.step // STEPS_PER_EPOCH,
            steps_per_epoch=STEPS_PER_EPOCH,
            total_steps=TOTAL_STEPS,
            seed=self.seed,
        )

    def fire(self, event: Event) -> None:
        """Pass one event to the strategies, as the loop does."""
        self.trainables.fire(event, self.state(), self.optimizer)

    def run(self, until: int) -> None:
        """Train from the current step to step ``until`` (``train_start`` first, as a resumed run does)."""
        self.adapted.model.train()
        self.fire(Event.TRAIN_START)
        first = True
        while self.step < until:
            # from before this step's events: a strategy must not change frozen weights in on_event either
            before = {n: p.detach().clone() for n, p in self.adapted.model.named_parameters()}
            if first or self.step % STEPS_PER_EPOCH == 0:
                self.fire(Event.EPOCH_START)
            first = False
            self.fire(Event.STEP_START)
            self._one_step(before)
        self.adapted.model.eval()

    def _one_step(self, before: dict[str, Any]) -> None:
        model = self.adapted.model
        named = dict(model.named_parameters())
        trained = set(self.trainables.trained)
        self.record.trained.append(trained)
        if self.optimizer is not None:
            model(**self.batches[self.step % len(self.batches)]).loss.backward()
            for p in model.parameters():
                if id(p) in self.trainables.gated:
                    p.grad = None
                elif p.grad is not None and p.grad.count_nonzero():
                    self.record.with_gradient.add(id(p))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        for n, p in named.items():
            if id(p) not in trained and not _same(p, before[n]):
                self.record.changed_while_frozen.append((self.step, n))
        self.step += 1


def _same(a: Any, b: Any) -> bool:
    import torch

    return torch.equal(a.detach(), b)


def logits(model: Any, batch: dict[str, Any]) -> Any:
    """The model's logits on ``batch`` (labels left out), in eval mode, without gradients."""
    import torch

    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model.train(was)
    return out
