"""``freeze``: freeze the pretrained backbone and train the task head (a linear probe), or
keep chosen parts trainable: the top N blocks, norms, biases or named modules."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adaptkit import Strategy, StrategyConfig, StrategyError, hookimpl
from adaptkit.contract.anatomy import find_blocks, head_parameter_names, is_norm, resolve_ties


class FreezeConfig(StrategyConfig):
    """Which parts of a frozen model stay trainable."""

    train_head: bool = Field(
        True, description="keep the task head (everything outside the backbone) trainable"
    )
    trainable_top_blocks: int = Field(
        0, ge=0, description="number of top transformer blocks that stay trainable"
    )
    train_norms: bool = Field(False, description="keep every normalisation layer trainable")
    train_biases: bool = Field(False, description="keep every bias trainable (BitFit)")
    trainable_modules: list[str] = Field(
        default_factory=list, description="module names (or name suffixes) that stay trainable"
    )
    blocks: str | None = Field(
        None, description="dotted path of the block list, when it cannot be found automatically"
    )
    tied_head: Literal["error", "untie", "share"] = Field(
        "error",
        description="when the trainable head shares its weight with the frozen input embeddings: "
        "error, untie (give the head its own copy) or share (train both on purpose)",
    )


class Freeze(Strategy):
    """Freeze the backbone; train the head and whatever else the config names."""

    # a head-only probe: a new linear layer on fixed features learns fast
    lr_range = (1e-3, 1e-1)

    def __init__(self, config, name=None):
        super().__init__(config, name)
        if config.trainable_top_blocks or config.trainable_modules:
            self.lr_range = (1e-5, 1e-3)  # pretrained blocks train too: nearer full fine-tuning

    def check(self, stack, position):
        """Refuse to follow a peft strategy, whose adapters freezing would freeze."""
        for earlier in stack[:position]:
            if earlier.wraps_with_peft:
                raise StrategyError(
                    f"put 'freeze' before '{earlier.name}' in the stack: freezing after peft would freeze its adapters"
                )

    def apply(self, model):
        """Freeze every parameter, then make the head and the parts the config names trainable."""
        cfg = self.config
        names = set(head_parameter_names(model)) if cfg.train_head else set()
        if cfg.trainable_top_blocks:
            path, blocks = find_blocks(model, cfg.blocks)
            if cfg.trainable_top_blocks > len(blocks):
                raise StrategyError(
                    f"freeze.trainable_top_blocks is {cfg.trainable_top_blocks}, but the model has {len(blocks)} blocks"
                )
            for i in range(len(blocks) - cfg.trainable_top_blocks, len(blocks)):
                names |= {f"{path}.{i}.{n}" for n, _ in blocks[i].named_parameters()}
        modules = dict(model.named_modules())
        if cfg.train_norms:
            names |= {
                f"{m}.{n}" if m else n
                for m, mod in modules.items()
                if is_norm(mod)
                for n, _ in mod.named_parameters(recurse=False)
            }
        all_params = dict(model.named_parameters(remove_duplicate=False))
        if cfg.train_biases:
            names |= {n for n in all_params if n.endswith(".bias")}
        for wanted in cfg.trainable_modules:
            matched = [m for m in modules if m and (m == wanted or m.endswith("." + wanted))]
            if not matched:
                raise StrategyError(
                    f"freeze.trainable_modules: no module of {type(model).__name__} is named '{wanted}'"
                )
            for m in matched:
                names |= {f"{m}.{n}" for n, _ in modules[m].named_parameters()}

        resolve_ties(model, names, cfg.tied_head, self.name)
        all_params = dict(model.named_parameters(remove_duplicate=False))
        for p in model.parameters():
            p.requires_grad_(False)
        owned = {}
        for name in sorted(names):
            param = all_params[name]
            param.requires_grad_(True)
            if all(param is not q for q in owned.values()):
                owned[name] = param
        self.owned = owned
        return model


@hookimpl
def adaptkit_register_strategies(register):
    """Register the ``freeze`` strategy."""
    register("freeze", Freeze, FreezeConfig)
