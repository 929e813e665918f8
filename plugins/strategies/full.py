"""``full``: every parameter trains. The baseline every other strategy is measured against."""

from __future__ import annotations

from adaptkit import Strategy, StrategyConfig, hookimpl


class FullConfig(StrategyConfig):
    """Full fine-tuning takes no options."""


class Full(Strategy):
    """Full fine-tuning: every parameter of the model trains."""

    exclusive = True
    # every pretrained weight moves: small steps keep what pretraining learned (BERT, ULMFiT)
    lr_range = (1e-5, 1e-4)

    def apply(self, model):
        """Make every parameter trainable."""
        for p in model.parameters():
            p.requires_grad_(True)
        self.owned = dict(model.named_parameters())
        return model


@hookimpl
def adaptkit_register_strategies(register):
    """Register the ``full`` strategy."""
    register("full", Full, FullConfig)
