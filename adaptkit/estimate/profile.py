"""What one forward pass on meta tensors saw: ``Profile`` (the bytes autograd saved for the
backward pass, by where they were made, the logits, the FLOPs) and the stack of profiles being
recorded, which the attention stand-in adds its FLOPs to."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Profile:
    """What one meta forward pass saw: saved bytes by place, the logits, FLOPs."""

    #: saved before the first block (embeddings)
    pre: int = 0
    #: saved inside each block (LoRA dropout apart)
    blocks: list[int] = field(default_factory=list)
    lora_dropout: list[int] = field(default_factory=list)
    #: saved after the blocks (final norm, head input)
    post: int = 0
    #: logits-sized tensors saved by the loss (log-probabilities)
    loss: int = 0
    #: each block's input, kept by checkpointing
    block_inputs: list[int] = field(default_factory=list)
    #: the logits the model returns, alive until the backward pass is over
    held: int = 0
    logits_numel: int = 0
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    #: forward FLOPs of blocks in the graph (recomputed under checkpointing)
    flops_blocks_fwd: float = 0.0
    #: half-precision copies of float32 weights kept by autocast
    autocast_copies: int = 0
    #: the device the pass stands for (attention with dropout differs)
    cpu: bool = True


#: The profiles being recorded, innermost last: the attention stand-in adds its FLOPs to the last.
ACTIVE_PROFILES: list[Profile] = []
