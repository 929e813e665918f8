"""Baselines that a comparison measures fine-tuning against, written as ordinary strategies.

``none`` evaluates the pretrained model as it is (zero-shot for causal LMs, an untrained head
for classifiers); ``scratch`` trains the same architecture from a random initialisation. A
comparison table with both shows what pretraining and fine-tuning each buy.
"""

from __future__ import annotations

from adaptkit import Strategy, StrategyConfig, hookimpl


class NoneConfig(StrategyConfig):
    """The ``none`` baseline takes no options."""


class NoTraining(Strategy):
    """Baseline: freeze everything; the run only evaluates the pretrained model (training takes no steps)."""

    exclusive = True

    def apply(self, model):
        """Freeze every parameter."""
        for p in model.parameters():
            p.requires_grad_(False)
        return model


class ScratchConfig(StrategyConfig):
    """The ``scratch`` baseline takes no options; its initialisation follows ``train.seed``."""


class Scratch(Strategy):
    """Baseline: re-initialise every weight as the architecture's own initialiser does, then train everything."""

    exclusive = True
    lr_range = (1e-4, 1e-3)  # random weights: nothing to preserve, the usual pre-training rates

    def apply(self, model):
        """Re-initialise every weight from the architecture's initialiser and make all of them trainable."""
        # A model built from the config alone carries the architecture's initialisation (drawn
        # from the global RNG, which the training run has seeded); copying it in keeps the
        # model object, and so any tie between embeddings and output layer, intact.
        fresh = type(model)(model.config)
        model.load_state_dict(fresh.state_dict())
        del fresh
        for p in model.parameters():
            p.requires_grad_(True)
        self.owned = dict(model.named_parameters())
        return model


@hookimpl
def adaptkit_register_strategies(register):
    """Register the ``none`` and ``scratch`` baselines."""
    register("none", NoTraining, NoneConfig)
    register("scratch", Scratch, ScratchConfig)
