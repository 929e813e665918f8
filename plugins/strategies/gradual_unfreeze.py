"""``gradual_unfreeze``: ULMFiT's gradual unfreezing with discriminative learning rates
(Howard & Ruder 2018, "Universal Language Model Fine-tuning for Text Classification").

The model is cut into groups from the top down::

    group 0      the task head and whatever sits above the blocks (final norm, pooler)
    group 1      the top transformer block
    ...
    group n      the bottom block
    group n + 1  the embeddings and whatever sits below the blocks

Training starts with group 0 only; every ``every`` epochs (or steps) the next group down
unfreezes, until ``max_groups`` groups (or all of them) train. Group ``i`` learns at
``lr / lr_decay ** i``. Groups without parameters (a bare backbone has no head) are dropped, so
group 0 is always the topmost part that has parameters.

How the host is expected to drive it: build the optimizer **once** from
``Adapted.param_groups`` (which lists the still-frozen groups too, so a learning-rate schedule
covers all of them), keep gradients of frozen parameters at None
(``zero_grad(set_to_none=True)``: AdamW then applies neither decay nor momentum to them), and
fire ``train_start`` / ``epoch_start`` / ``step_start``. The stage is computed from the
``TrainState`` alone, so a resumed run lands on the same trainable set as an uninterrupted one.

Composition. It must come last in a stack. Placed first (alone), the strategy owns the whole
model: it freezes everything except group 0. Placed after other strategies (``lora``, ``freeze``), it keeps whatever they made
trainable exactly as they left it -- those parameters train from the start, at their own
strategy's learning rate, and are saved by that strategy -- and schedules only the parameters
they left frozen. After ``lora`` this means "LoRA everywhere, plus full training of the head and
then of the top blocks": unfreezing a LoRA-wrapped block trains its base weights (its LoRA
weights were already training). peft's frozen bookkeeping copies (the ``original_module`` that
``modules_to_save`` keeps) and non-float (quantized) weights are never unfrozen: the first is
not used by the forward pass, the second cannot be trained.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adaptkit import Strategy, StrategyConfig, StrategyError, hookimpl
from adaptkit.contract.anatomy import (
    find_blocks,
    head_parameter_names,
    tied_groups,
    untie_output_embeddings,
    unwrap,
)
from adaptkit.errors import SharedParameterError


class GradualUnfreezeConfig(StrategyConfig):
    """When the next group unfreezes, and how the learning rate falls from the top group down."""

    every: int = Field(
        1, ge=1, description="unfreeze the next group down every this many epochs (or steps, see 'unit')"
    )
    unit: Literal["epoch", "step"] = Field(
        "epoch", description="what 'every' counts: finished epochs or optimizer steps taken"
    )
    lr_decay: float = Field(
        2.6,
        gt=0,
        description="discriminative fine-tuning: group i (0 = head) learns at lr / lr_decay**i; 1 disables it",
    )
    max_groups: int | None = Field(
        None,
        ge=1,
        description="stop after this many groups (e.g. 3 = head and the top 2 blocks); none: eventually train every group",
    )
    blocks: str | None = Field(
        None, description="dotted path of the block list, when it cannot be found automatically"
    )
    tied_head: Literal["error", "untie", "share"] = Field(
        "error",
        description="when the head shares its weight with the input embeddings: error, untie (give the head its own "
        "copy) or share (the shared weight trains from the start, with the head)",
    )


class _Group:
    """One unfreezing group: a name, and the parameters this strategy schedules in it."""

    def __init__(self, name: str):
        self.name = name
        self.params: dict[str, object] = {}  # name -> Parameter, each Parameter once


class GradualUnfreeze(Strategy):
    """Train the head first, then unfreeze one block at a time from the top, each at a lower learning rate."""

    # what trains changes mid-run: checked under DDP, never with sharded parameters and state
    launches = frozenset({"single", "ddp"})
    # the rate of the top group (the head); lower groups get it divided by lr_decay (ULMFiT)
    lr_range = (1e-4, 1e-2)

    def __init__(self, config, name=None):
        super().__init__(config, name)
        self._groups: list[_Group] = []
        self._stage = 1
        # Placed after another strategy, respect what it made trainable (see the module docstring).
        self._after_others = False

    def check(self, stack, position):
        """Refuse a strategy after this one: it would change the model (freeze it, or wrap it with
        peft and copy the head) under a schedule that keeps flipping ``requires_grad``."""
        later = [s.name for s in stack[position + 1 :]]
        if later:
            raise StrategyError(
                f"put '{self.name}' last in the stack (after {later}): it schedules what the strategies before it "
                "left frozen, and a strategy applied after it would freeze or replace the parameters it schedules"
            )
        self._after_others = position > 0

    # -- building ----------------------------------------------------------------------------

    def apply(self, model):
        """Sort the parameters into groups, take ownership of the schedulable ones, train group 0."""
        cfg = self.config
        groups = self._structure(model)
        if cfg.max_groups is not None:
            # An upper bound: a recipe may say "head and top 6 blocks" and still run on a smaller model.
            groups = groups[: cfg.max_groups]
        all_params = dict(model.named_parameters(remove_duplicate=False))
        trainable_before = {id(p) for p in all_params.values() if p.requires_grad}
        skipped = _peft_bookkeeping(model)
        seen: set[int] = set()
        for group, names in groups:
            for name in names:
                param = all_params[name]
                if id(param) in seen or name in skipped or not param.is_floating_point():
                    continue
                if self._after_others and id(param) in trainable_before:
                    continue  # an earlier strategy trains it; leave it to that strategy
                seen.add(id(param))
                group.params[name] = param
        self._groups = [g for g, _ in groups]
        if not self._after_others:
            for p in model.parameters():
                p.requires_grad_(False)
        self.owned = {n: p for g in self._groups for n, p in g.params.items()}
        self._stage = 0
        self._set_stage(1)
        return model

    def _structure(self, model) -> list[tuple[_Group, list[str]]]:
        """Every parameter name of the (unwrapped) model, sorted into groups from the top down."""
        cfg = self.config
        path, blocks = find_blocks(model, cfg.blocks)
        prefix, _ = unwrap(model)
        head = set(head_parameter_names(model))
        names = [n for n, _ in model.named_parameters(remove_duplicate=False) if n.startswith(prefix)]
        block_of: dict[str, int] = {}
        for i in range(len(blocks)):
            start = f"{path}.{i}."
            for n in names:
                if n.startswith(start):
                    block_of[n] = i
        if not block_of:
            raise StrategyError(f"gradual_unfreeze: the blocks at '{path}' have no parameters")
        # transformers registers modules in forward order (embeddings, blocks, final norm, pooler),
        # so a backbone parameter listed before the first block parameter sits below the blocks.
        first_block = min(i for i, n in enumerate(names) if n in block_of)
        top = _Group("head")
        by_block = [_Group(f"block.{i}") for i in range(len(blocks))]
        bottom = _Group("embeddings")
        members: dict[int, list[str]] = {}
        order = [top, *reversed(by_block), bottom]
        for i, n in enumerate(names):
            if n in head:
                g = top
            elif n in block_of:
                g = by_block[block_of[n]]
            elif i < first_block:
                g = bottom
            else:
                g = top
            members.setdefault(id(g), []).append(n)
        self._resolve_ties(model, names, members, top)
        return [(g, members[id(g)]) for g in order if members.get(id(g))]

    def _resolve_ties(self, model, names: list[str], members: dict[int, list[str]], top: _Group) -> None:
        """A tied weight is one Parameter: it cannot train with the head but stay frozen with the embeddings."""
        group_of = {n: gid for gid, ns in members.items() for n in ns}
        for tied in tied_groups(model):
            tied = [n for n in tied if n in group_of]
            if len({group_of[n] for n in tied}) < 2:
                continue
            if self.config.tied_head == "error":
                raise SharedParameterError(
                    f"gradual_unfreeze: {tied} are one parameter (tied embeddings) but fall in different groups, so the "
                    "embeddings would train with the head; set gradual_unfreeze.tied_head to 'untie' (the head gets "
                    "its own copy) or 'share' (the shared weight trains from the start)"
                )
            if self.config.tied_head == "untie":
                untie_output_embeddings(model)
            else:  # share: the weight belongs to the earliest group it appears in, the head's
                for n in tied:
                    if group_of[n] != id(top):
                        members[group_of[n]].remove(n)
                members[id(top)] = sorted(set(members.get(id(top), [])) | set(tied), key=names.index)

    # -- training ----------------------------------------------------------------------------

    @property
    def stage(self) -> int:
        """How many groups (from the top) are unfrozen now."""
        return self._stage

    def stage_for(self, state) -> int:
        """The number of unfrozen groups at ``state``: 1 + elapsed epochs (or steps) // every, capped."""
        elapsed = state.epoch if self.config.unit == "epoch" else state.step
        return min(1 + elapsed // self.config.every, len(self._groups))

    def on_event(self, model, event, state):
        """Set the trainable groups from ``state`` alone (so resuming lands on the same stage)."""
        self._set_stage(self.stage_for(state))

    def _set_stage(self, stage: int) -> None:
        for i, group in enumerate(self._groups):
            for p in group.params.values():
                p.requires_grad_(i < stage)
        self._stage = stage

    def pending_parameters(self, model):
        """Parameters of the groups that will unfreeze later (within ``max_groups``)."""
        return [p for g in self._groups[self._stage :] for p in g.params.values()]

    def param_groups(self, model, lr):
        """One optimizer group per unfreezing group, frozen ones included, at lr / lr_decay**i."""
        return [
            {"params": list(g.params.values()), "lr": lr / self.config.lr_decay**i, "name": g.name}
            for i, g in enumerate(self._groups)
            if g.params
        ]

    def group_names(self) -> list[str]:
        """The groups in unfreezing order (``head``, ``block.<index>``..., ``embeddings``)."""
        return [g.name for g in self._groups]


def _peft_bookkeeping(model) -> set[str]:
    """Names of parameters peft keeps only as a frozen copy (``modules_to_save``'s ``original_module``).

    Detected by shape rather than by importing peft, so this plugin works with or without it.
    """
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        original = getattr(module, "original_module", None)
        if original is not None and hasattr(module, "modules_to_save"):
            head = f"{mod_name}.original_module." if mod_name else "original_module."
            names |= {head + n for n, _ in original.named_parameters(remove_duplicate=False)}
    return names


@hookimpl
def adaptkit_register_strategies(register):
    """Register ``gradual_unfreeze``."""
    register("gradual_unfreeze", GradualUnfreeze, GradualUnfreezeConfig)
