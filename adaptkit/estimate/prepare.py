"""The model an estimate is made for: built on PyTorch's ``meta`` device from its config alone,
with the recipe's strategy stack applied as training applies it (at the stage of the run's last
step), and what its parameters cost as stored."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adaptkit.errors import AdaptkitError
from adaptkit.estimate.config import checkpoint_dtype, load_config
from adaptkit.estimate.inputs import INPUTS
from adaptkit.estimate.meta_kernels import FUSED_ATTENTION_NAME, no_save_linear, register_fused_attention
from adaptkit.estimate.terms import QUANTIZED_KINDS, param_regions, stored_bytes

if TYPE_CHECKING:
    from adaptkit.host.manager import PluginHost
    from adaptkit.recipe.schema import Recipe


@dataclass
class Prepared:
    """A meta model with the strategies applied, and what its parameters cost."""

    model: Any
    adapted: Any
    model_type: str
    auto_model: str
    config: Any
    block_path: str
    blocks: list[Any]
    frozen_by_dtype: dict[str, int]
    #: trainable parameters at the run's last stage
    trainable: list[Any]
    #: parameters holding optimizer state then: those, and what strategies keep state for
    stateful: list[Any]
    total_parameters: int
    #: checkpoint bytes of the layers that were quantized
    replaced_float_bytes: int
    #: id(param) -> -1 (below the blocks), block index, or len(blocks) (above)
    param_region: dict[int, int]


def prepare_key(recipe: Recipe) -> str:
    """What a prepared model depends on: recipes with the same key share one meta model."""
    spec = recipe.train
    return json.dumps(
        recipe.model_dump(mode="json", include={"model", "strategies"})
        | {
            "task": recipe.model.task,
            "labels": recipe.data.labels,
            "schedule": (spec.max_steps, spec.epochs),
        },
        sort_keys=True,
    )


def final_stage(adapted: Any, spec: Any) -> None:
    """Move scheduled strategies (gradual unfreezing) to the stage of the run's last step.

    The last step is known when ``train.max_steps`` is set (steps) or it is not (epochs); the
    other count depends on the data size and is taken as unbounded, the worst case.
    """
    from adaptkit.contract.strategy import TrainState

    unbounded = 10**9
    if spec.max_steps is not None:
        state = TrainState(
            step=spec.max_steps - 1, epoch=unbounded, total_steps=spec.max_steps, seed=spec.seed
        )
    else:
        state = TrainState(step=unbounded, epoch=max(0, math.ceil(spec.epochs) - 1), seed=spec.seed)
    for event in ("train_start", "epoch_start", "step_start"):
        adapted.on_event(event, state)


def stateful_parameters(adapted: Any) -> list[Any]:
    """Parameters that may hold optimizer state at the last step: those trainable then, and those
    a strategy keeps state for after freezing them again (``Strategy.optimizer_state_parameters``)."""
    chosen = {id(p): p for p in adapted.model.parameters() if p.requires_grad}
    for s in adapted.strategies:
        chosen.update((id(p), p) for p in s.optimizer_state_parameters(adapted.model) or [])
    return list(chosen.values())


#: Config fields of the probability that training skips a layer (LayerDrop).
LAYERDROP_KEYS = ("layerdrop", "encoder_layerdrop", "decoder_layerdrop")


def _meta_model(spec: Any, task: Any, config: Any) -> Any:
    """The task's model class built from ``config`` on the meta device, with the attention stand-in."""
    import torch
    import transformers

    from adaptkit.contract.model import torch_dtype

    auto = getattr(transformers, task.auto_model, None)
    if auto is None or task.auto_model not in INPUTS:
        raise AdaptkitError(
            f"estimate: task '{spec.task}' (model class {task.auto_model}) is not supported; "
            f"supported: {', '.join(sorted(INPUTS))}"
        )
    register_fused_attention()
    config = copy.deepcopy(config)
    for key in LAYERDROP_KEYS:
        if getattr(config, key, 0):
            # training skips each layer at random (Wav2Vec2, HuBERT): a skipped layer keeps nothing,
            # and the estimate is of the step that skips none
            setattr(config, key, 0.0)
    with torch.device("meta"):
        model = auto.from_config(config, dtype=torch_dtype(spec.dtype))
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(FUSED_ATTENTION_NAME)
    return model


def _apply_strategies(model: Any, stack: list[Any]) -> Any:
    """Apply each strategy of ``stack`` on the meta device; one that needs real weights is named."""
    import torch

    for s in stack:
        try:
            # whatever a strategy creates (adapters, a fresh model) stays weightless
            with torch.device("meta"):
                model = s.apply(model)
        except AdaptkitError:
            raise
        except Exception as exc:  # a strategy that needs real weights: say which, and why
            raise AdaptkitError(
                f"estimate: strategy '{s.name}' cannot be applied to a model without weights "
                f"(meta device): {type(exc).__name__}: {exc}"
            ) from None
    return model


def _weight_bytes(params: list[Any], config: Any) -> tuple[dict[str, int], int]:
    """Frozen parameters' bytes by stored kind, and the checkpoint bytes of the quantized layers."""
    import torch

    frozen_by_dtype: dict[str, int] = {}
    replaced = 0
    ckpt_dtype = checkpoint_dtype(config)
    ckpt_size = (
        torch.empty((), dtype=getattr(torch, ckpt_dtype)).element_size()
        if ckpt_dtype in ("float32", "bfloat16", "float16")
        else 4
    )
    for p in params:
        kind, nbytes = stored_bytes(p)
        if kind in QUANTIZED_KINDS:
            replaced += p.numel() * ckpt_size
        if p.requires_grad:
            continue
        frozen_by_dtype[kind] = frozen_by_dtype.get(kind, 0) + nbytes
    return frozen_by_dtype, replaced


def _stub_bitsandbytes(model: Any) -> None:
    """Give bitsandbytes' layers a forward that runs on meta tensors (peft's wrappers can run)."""
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in (
            "Linear4bit",
            "Linear8bitLt",
        ):
            module.forward = no_save_linear(module)


def build_prepared(recipe: Recipe, host: PluginHost) -> Prepared:
    """Build ``recipe``'s model on the meta device, apply its strategies, and price its parameters."""
    from adaptkit.adapt.stack import Adapted
    from adaptkit.contract.anatomy import find_blocks

    spec = recipe.model
    task = host.lookup("tasks", spec.task).obj(recipe.data)
    config = load_config(spec, task, host)
    model = _meta_model(spec, task, config)
    # as training does before the strategies (Whisper's encoder cut to data.max_seconds), without
    # the processor, which a weightless model's preparation has no use for
    task.prepare_model(model, None)
    stack = host.build_strategies(recipe.strategies)
    model = _apply_strategies(model, stack)
    adapted = Adapted(model, stack, "")
    final_stage(adapted, recipe.train)
    model.train()

    path, blocks = find_blocks(model)
    region = param_regions(model, path, len(blocks))
    params = {id(p): p for p in model.parameters()}
    frozen_by_dtype, replaced = _weight_bytes(list(params.values()), config)
    _stub_bitsandbytes(model)
    return Prepared(
        model=model,
        adapted=adapted,
        model_type=getattr(config, "model_type", type(model).__name__),
        auto_model=task.auto_model,
        config=config,
        block_path=path,
        blocks=blocks,
        frozen_by_dtype=frozen_by_dtype,
        trainable=[p for p in params.values() if p.requires_grad],
        stateful=stateful_parameters(adapted),
        total_parameters=sum(p.numel() for p in params.values()),
        replaced_float_bytes=replaced,
        param_region={pid: r for pid, r in region.items() if pid in params},
    )
