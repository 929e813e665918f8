"""An example third-party adaptkit plugin: the ``bitfit`` strategy.

BitFit (Ben Zaken, Ravfogel and Goldberg, 2021, https://arxiv.org/abs/2106.10199) freezes a
pretrained model except for its bias terms, and trains those plus the new task head.
Written only against adaptkit's public API; torch is never imported at module level.
"""

from __future__ import annotations

from pydantic import Field

from adaptkit import Strategy, StrategyConfig, StrategyError, hookimpl
from adaptkit.contract.anatomy import head_parameter_names

ADAPTKIT_API = 1  # the plugin API version this plugin needs (see adaptkit.contract.hookspecs)


class BitFitConfig(StrategyConfig):
    """Options of the ``bitfit`` strategy."""

    train_head: bool = Field(True, description="also train the task head (everything outside the backbone)")


class BitFit(Strategy):
    """BitFit: train only the bias terms, plus the task head (Ben Zaken et al., 2021)."""

    def check(self, stack, position):
        if any(s.wraps_with_peft for s in stack[:position]):
            raise StrategyError("put 'bitfit' before any peft strategy: it would freeze the adapters")

    def apply(self, model):
        params = dict(model.named_parameters())  # a tied LM head appears under its embedding name only
        names = {n for n in params if n.endswith(".bias")}
        if self.config.train_head:
            names |= set(head_parameter_names(model)) & params.keys()
        if not names:
            raise StrategyError(f"bitfit: {type(model).__name__} has no bias and no head to train")
        for name, param in params.items():
            param.requires_grad_(name in names)
        self.owned = {n: params[n] for n in sorted(names)}  # what the default save/load write
        return model


@hookimpl
def adaptkit_register_strategies(register):
    register("bitfit", BitFit, BitFitConfig)
