"""The analytic terms of an estimate: the bytes a parameter takes as stored, optimizer states and
the optimizer step's scratch memory, the terms a profile's saved tensors make, where each
parameter sits in the order of the backward pass, and the peak of forward and backward."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adaptkit.estimate.profile import Profile
    from adaptkit.recipe.schema import Recipe

#: Optimizer state bytes per trainable value. bitsandbytes keeps 8-bit states only for tensors
#: of at least ``BNB_MIN_8BIT_SIZE`` values; smaller ones get 32-bit states.
OPTIMIZER_BYTES = {"adamw": 8, "paged_adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 4}
BNB_MIN_8BIT_SIZE = 4096
#: bitsandbytes 8-bit states are quantized blockwise: one float32 scale per block of each state.
BNB_STATE_BLOCK = 256
#: The kinds ``stored_bytes`` gives bitsandbytes' packed layers (quantized from float weights).
QUANTIZED_KINDS = ("nf4", "nf4+dq", "fp4", "fp4+dq", "int8")


def stored_bytes(p: Any) -> tuple[str, int]:
    """(kind, bytes) of a parameter as stored: bitsandbytes' packed layouts, else its dtype."""
    kind = type(p).__name__
    if kind == "Params4bit":
        n = p.numel()
        blocks = math.ceil(n / p.blocksize)
        quant = getattr(p, "quant_type", "nf4")
        code = 16 * 4  # the 4-bit code book, float32
        if p.compress_statistics:
            # double quantization: an 8-bit absmax per block, a float32 scale per 256 of them,
            # and the second level's own code book and offset
            absmax = blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4
            return f"{quant}+dq", math.ceil(n / 2) + absmax + code
        return quant, math.ceil(n / 2) + 4 * blocks + code
    if kind == "Int8Params":
        return "int8", p.numel() + 4 * p.shape[0]  # a float32 scale per row
    return str(p.dtype).replace("torch.", ""), p.numel() * p.element_size()


def optimizer_state_bytes(optimizer: str, numel: int) -> int:
    """Bytes of ``optimizer``'s states for one trainable tensor of ``numel`` values."""
    per = OPTIMIZER_BYTES[optimizer]
    if per == 2 and numel < BNB_MIN_8BIT_SIZE:
        per = 8
    elif per == 2:
        return 2 * numel + 2 * 4 * math.ceil(numel / BNB_STATE_BLOCK)
    return per * numel


def optimizer_temporaries(optimizer: str, numels: list[int], device: str) -> int:
    """Scratch memory of one optimizer step over trainable tensors of ``numels`` values each.

    Training runs torch's fused AdamW and bitsandbytes' optimizers, which update in place. torch's
    SGD on a CPU updates one tensor at a time and needs two temporaries the size of the largest;
    on CUDA its foreach implementation needs one the size of all of them.
    """
    if optimizer != "sgd" or not numels:
        return 0
    if device == "cuda":
        return 4 * sum(numels)
    return 2 * 4 * max(numels)


def saved_in_blocks(prof: Profile) -> list[int]:
    """What each block saves for the backward pass, its LoRA dropout included, bottom first."""
    return [b + d for b, d in zip(prof.blocks, prof.lora_dropout)]


def kept_block_inputs(prof: Profile, in_blocks: list[int]) -> list[int]:
    """Under gradient checkpointing, what each block keeps: its input, where it is in the graph."""
    return [inp if s else 0 for inp, s in zip(prof.block_inputs, in_blocks)]


def activation_terms(prof: Profile, checkpointing: bool) -> tuple[int, int]:
    """The ``activations`` and ``lora_dropout`` terms of an estimate.

    With gradient checkpointing each block in the graph keeps only its input, and its saved
    tensors come back one block at a time in the backward pass.
    """
    if checkpointing:
        kept = kept_block_inputs(prof, saved_in_blocks(prof))
        activations = prof.pre + prof.post + sum(kept) + max(prof.blocks, default=0)
        lora_dropout = max(prof.lora_dropout, default=0)
    else:
        activations = prof.pre + prof.post + sum(prof.blocks)
        lora_dropout = sum(prof.lora_dropout)
    return activations + prof.autocast_copies, lora_dropout


def logits_term(prof: Profile) -> int:
    """The ``logits`` term: the logits held, the loss' saved tensors, and two float32 gradients."""
    return prof.held + prof.loss + 2 * 4 * prof.logits_numel


def step_flops(prof: Profile, checkpointing: bool) -> float:
    """FLOPs of one micro-batch's forward and backward (checkpointing recomputes the blocks)."""
    return prof.flops_fwd + prof.flops_bwd + (prof.flops_blocks_fwd if checkpointing else 0)


def param_regions(model: Any, block_path: str, nblocks: int) -> dict[int, int]:
    """Where each parameter is used, for the order of the backward pass: -1 below the blocks,
    the block index, or ``nblocks`` above them. A tied parameter counts where it is used last."""
    region: dict[int, int] = {}
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    first_block = next((i for i, n in enumerate(names) if n.startswith(block_path + ".")), len(names))
    for i, (name, p) in enumerate(model.named_parameters(remove_duplicate=False)):
        if name.startswith(block_path + "."):
            r = int(name[len(block_path) + 1 :].split(".", 1)[0])
        else:
            r = -1 if i < first_block else nblocks
        region[id(p)] = max(region.get(id(p), -1), r)
    return region


def gradients_by_region(
    trainable: list[Any], numels: list[int], param_region: dict[int, int], nblocks: int
) -> list[int]:
    """float32 gradient bytes by region (``numels``: the values of each trainable parameter this
    process holds): index 0 below the blocks, 1..n the blocks, n+1 above."""
    grads = [0] * (nblocks + 2)
    for p, numel in zip(trainable, numels):
        grads[param_region.get(id(p), nblocks) + 1] += 4 * numel
    return grads


def transient_peak(
    prep: Any, profile: Profile, recipe: Recipe, numels: list[int], device: str, held: int = 0
) -> tuple[int, str]:
    """The highest memory of a step beyond the persistent terms, and the phase it is reached in:
    forward and backward (with ``held`` bytes kept throughout, as FSDP's gathered parameters), or
    the optimizer step. ``numels``: the values of each trainable parameter this process holds
    gradients and states for (all of them, or its FSDP shards). ``prep``: the estimate's
    ``Prepared`` model (not imported here: it is built from these terms)."""
    if prep.trainable:
        grads = gradients_by_region(prep.trainable, numels, prep.param_region, len(prep.blocks))
        fb_peak, phase = backward_peak(
            profile, saved_in_blocks(profile), grads, recipe.model.gradient_checkpointing
        )
    else:  # nothing trains: the run only evaluates, without a graph
        fb_peak, phase = profile.held, "evaluation only (nothing trains)"
    fb_peak += held
    # the step runs while the output (its logits) is still referenced by the training loop
    step_peak = 4 * sum(numels) + profile.held + optimizer_temporaries(recipe.train.optimizer, numels, device)
    return (fb_peak, phase) if fb_peak >= step_peak else (step_peak, "optimizer step")


def backward_peak(
    prof: Profile, in_blocks: list[int], grads: list[int], checkpointing: bool
) -> tuple[int, str]:
    """The highest live memory of forward + backward beyond the weights, and when it happens.

    After the forward pass every saved tensor and the logits are alive. The loss' backward adds
    two logits-sized float32 gradients; then each part of the model, from the top down, gets its
    parameters' gradients while its saved tensors are freed (with one more block-sized
    transient for the gradients flowing through it, and under checkpointing its recomputation).
    """
    n = len(in_blocks)
    kept = kept_block_inputs(prof, in_blocks) if checkpointing else in_blocks
    live = prof.pre + sum(kept) + prof.post + prof.loss + prof.held
    logits_grad = 4 * prof.logits_numel
    best, phase = live + 2 * logits_grad, "backward: loss"
    live += grads[n + 1] - prof.loss
    if live + logits_grad > best:
        best, phase = live + logits_grad, "backward: head"
    live -= prof.post
    for i in reversed(range(n)):
        rebuilt = in_blocks[i] if checkpointing else 0
        candidate = live + rebuilt + in_blocks[i] + grads[i + 1]
        if candidate > best:
            best, phase = candidate, f"backward: block {i}"
        live += grads[i + 1] - kept[i]
    live += grads[0]
    if live + prof.pre > best:
        best, phase = live + prof.pre, "backward: embeddings"
    return best, phase
