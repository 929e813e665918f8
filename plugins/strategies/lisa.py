"""``lisa``: layerwise importance-sampled fine-tuning (Pan et al. 2024, "LISA: Layerwise Importance
Sampling for Memory-Efficient Large Language Model Fine-Tuning", https://arxiv.org/abs/2403.17919).

Everything outside the transformer blocks (embeddings, final norm, head) always trains. Of the
blocks, ``active_layers`` drawn uniformly at random train at a time, and are drawn again every
``interval`` optimizer steps. A block drawn out is frozen and its optimizer state dropped
(``refrozen_state = "drop"``), so gradients and AdamW state exist for the drawn blocks only:
the memory of training a few blocks, while every block gets its turn.

Each draw is a function of the run's seed and the period (``step // interval``) alone, so a
resumed run draws the same blocks and a comparison's seeds draw differently. The strategy sets
the trainable set on every event; the host keeps DDP consistent (the blocks not drawn are
pending parameters).
"""

from __future__ import annotations

import random

from pydantic import Field

from adaptkit import Strategy, StrategyConfig, StrategyError, hookimpl
from adaptkit.contract.anatomy import find_blocks


class LisaConfig(StrategyConfig):
    """How many blocks train at once, and how often they are drawn again."""

    active_layers: int = Field(2, ge=1, description="transformer blocks that train at a time")
    interval: int = Field(
        20, ge=1, description="draw the active blocks again every this many optimizer steps"
    )
    blocks: str | None = Field(
        None, description="dotted path of the block list, when it cannot be found automatically"
    )


class Lisa(Strategy):
    """LISA: train the embeddings and head, and a few randomly drawn blocks at a time (Pan et al., 2024)."""

    exclusive = True
    refrozen_state = "drop"
    # what trains changes mid-run: checked under DDP, never with sharded parameters and state
    launches = frozenset({"single", "ddp"})
    lr_range = (1e-5, 1e-4)  # whole pretrained blocks train, as in full fine-tuning

    def __init__(self, config, name=None):
        super().__init__(config, name)
        self._blocks: list[list] = []  # the float parameters of each block, bottom to top
        self._active: list[int] = []

    def apply(self, model):
        """Own every float parameter; train everything outside the blocks and the first draw."""
        path, blocks = find_blocks(model, self.config.blocks)
        params = dict(model.named_parameters())  # a tied parameter under its first name only
        floats = {n: p for n, p in params.items() if p.is_floating_point()}
        self._blocks = [
            [p for n, p in floats.items() if n.startswith(f"{path}.{i}.")] for i in range(len(blocks))
        ]
        if not all(self._blocks):
            raise StrategyError(f"{self.name}: some blocks at '{path}' have no float parameters")
        for p in params.values():
            p.requires_grad_(p.is_floating_point())
        self.owned = floats
        self._set(self.draw(seed=0, step=0))
        return model

    def draw(self, seed: int, step: int) -> list[int]:
        """The blocks that train at ``step`` of a run seeded ``seed``."""
        period = step // self.config.interval
        rng = random.Random(f"lisa:{seed}:{period}")
        return sorted(rng.sample(range(len(self._blocks)), min(self.config.active_layers, len(self._blocks))))

    def _set(self, active: list[int]) -> None:
        for i, block in enumerate(self._blocks):
            for p in block:
                p.requires_grad_(i in active)
        self._active = active

    def on_event(self, model, event, state):
        """Train the blocks drawn for ``state``'s period."""
        self._set(self.draw(state.seed, state.step))

    def pending_parameters(self, model):
        """The blocks not drawn now: each may be drawn later."""
        return [p for i, block in enumerate(self._blocks) if i not in self._active for p in block]


@hookimpl
def adaptkit_register_strategies(register):
    """Register the ``lisa`` strategy."""
    register("lisa", Lisa, LisaConfig)
