"""The forward pass on meta tensors that fills a ``Profile``: the adapted model runs once under
``torch.autograd.graph.saved_tensors_hooks``, and every tensor autograd saves for the backward
pass is sorted by where it was made (below the blocks, inside which block, inside a LoRA
dropout, in the loss); hooks on the linear layers count the FLOPs of their matrix products."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptkit.estimate.config import vocab_size
from adaptkit.estimate.inputs import INPUTS
from adaptkit.estimate.profile import ACTIVE_PROFILES, Profile

if TYPE_CHECKING:
    from adaptkit.estimate.prepare import Prepared


class _Recorder:
    """The hooks of one meta pass: where the pass is now, and what it saved there.

    Recorded tensors stay referenced (``keep``) until the pass is over, so that no storage
    address is reused and a tensor is never counted twice or mistaken for another.
    """

    def __init__(self, prep: Prepared, half: Any, device: str):
        model, nblocks = prep.model, len(prep.blocks)
        self.prof = Profile(
            blocks=[0] * nblocks,
            lora_dropout=[0] * nblocks,
            block_inputs=[0] * nblocks,
            cpu=device == "cpu",
        )
        self.weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
        self.block_of = {id(b): i for i, b in enumerate(prep.blocks)}
        self.vocab = vocab_size(prep.config)
        self.half = half
        self.cuda = device == "cuda"
        self.block: int | None = None  # the block the pass is in
        self.after = False  # past the last block
        self.inside = {"dropout": 0, "lora": 0}  # how deep in dropout and LoRA dropout modules
        self.lora_outputs: set[int] = set()  # storages LoRA's dropout made (saved later by the LoRA matmul)
        self.keep: list[Any] = []
        self.seen: set[int] = set()
        self.real_dtype: dict[int, Any] = {}  # a linear layer's weight dtype before the pass cast it

    def pack(self, t: Any) -> Any:
        """The saved-tensor hook: count ``t`` once, in the place the pass is in."""
        import torch

        key = t.untyped_storage()._cdata
        if key in self.weights or key in self.seen:
            return t
        self.seen.add(key)
        self.keep.append(t)
        nbytes = t.untyped_storage().nbytes()
        if self.cuda and self.inside["dropout"] and t.dtype != torch.bool:
            nbytes = t.numel()  # CUDA's fused dropout keeps a bool mask; the CPU keeps the scaled values
        prof, b = self.prof, self.block
        if b is not None:
            if self.inside["lora"] or key in self.lora_outputs:
                prof.lora_dropout[b] += nbytes
            else:
                prof.blocks[b] += nbytes
        elif not self.after:
            prof.pre += nbytes
        elif self.vocab > 1 and t.dim() >= 2 and t.shape[-1] == self.vocab:
            prof.loss += nbytes
        else:
            prof.post += nbytes
        return t

    def block_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Entering a block: note which, and the size of its input."""
        import torch

        i = self.block_of[id(module)]
        self.block = i
        hidden = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if isinstance(hidden, torch.Tensor):
            self.prof.block_inputs[i] = hidden.numel() * hidden.element_size()

    def block_post(self, module: Any, args: tuple, output: Any) -> None:
        """Leaving a block: whatever comes next is above the blocks, unless another block starts."""
        self.block, self.after = None, True

    def enter(self, kind: str) -> Any:
        """A pre-hook that counts entering a module of ``kind`` (``dropout`` or ``lora``)."""

        def hook(module, args):
            self.inside[kind] += 1

        return hook

    def leave(self, kind: str) -> Any:
        """A hook that counts leaving a module of ``kind``; a LoRA dropout's fresh output is noted,
        since the LoRA matmul saves it later, outside the dropout."""
        import torch

        def hook(module, args, output):
            self.inside[kind] -= 1
            if (
                kind == "lora"
                and isinstance(output, torch.Tensor)
                and args
                and output.untyped_storage()._cdata != args[0].untyped_storage()._cdata
            ):
                self.keep.append(output)
                self.lora_outputs.add(output.untyped_storage()._cdata)

        return hook

    def matmul(self, module: Any, args: tuple, output: Any) -> None:
        """A linear layer's hook: its FLOPs forward and backward, and autocast's copy of its weight."""
        import torch

        x, weight = (args[0] if args else None), getattr(module, "weight", None)
        if not isinstance(x, torch.Tensor) or weight is None:
            return
        prof = self.prof
        flops = 2 * (x.numel() // max(x.shape[-1], 1)) * weight.numel()
        prof.flops_fwd += flops
        prof.flops_bwd += flops * (int(x.requires_grad) + int(weight.requires_grad))
        if x.requires_grad or weight.requires_grad:
            if self.block is not None:
                prof.flops_blocks_fwd += flops
            if self.half is not None and self.real_dtype.get(id(module)) == torch.float32:
                prof.autocast_copies += 2 * weight.numel()  # autocast's half copy, kept for the backward

    def attach(self, model: Any, blocks: list[Any]) -> list[Any]:
        """Register every hook on ``model``; returns the handles to remove."""
        import torch

        hooks = []
        for b in blocks:
            hooks.append(b.register_forward_pre_hook(self.block_pre, with_kwargs=True))
            hooks.append(b.register_forward_hook(self.block_post))
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Dropout):
                hooks += [
                    module.register_forward_pre_hook(self.enter("dropout")),
                    module.register_forward_hook(self.leave("dropout")),
                ]
            if ".lora_dropout." in f".{name}" and not any(True for _ in module.children()):
                hooks += [
                    module.register_forward_pre_hook(self.enter("lora")),
                    module.register_forward_hook(self.leave("lora")),
                ]
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                hooks.append(module.register_forward_hook(self.matmul))
                self.real_dtype[id(module)] = module.weight.dtype
        return hooks


def _cast_float_weights(model: Any, half: Any) -> list[tuple[Any, Any]]:
    """Cast float32 parameters to ``half`` in place; returns (parameter, original data) to restore.

    autocast does not act on meta tensors, so a mixed-precision pass runs in the half dtype instead.
    """
    import torch

    casted = []
    if half is not None:
        for p in model.parameters():
            if type(p).__name__ == "Parameter" and p.dtype == torch.float32:
                casted.append((p, p.data))
                p.data = p.data.to(half)
    return casted


def _count_logits(
    prof: Profile, out: Any, vocab: int, prep: Prepared, device: str, distributed_type: str
) -> None:
    """Record the logits the model returned, and what the loss training computes keeps of them
    (under ``distributed_type`` FSDP, the model's own loss: see ``chunked_output_layer``)."""
    import torch

    from adaptkit.kernels.lm_loss import chunk_rows, chunked_output_layer

    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        prof.held = logits.numel() * logits.element_size()
        if logits.shape[-1] == vocab:
            prof.logits_numel = logits.numel()
    if prof.logits_numel == 0:  # a classifier's loss saves nothing logits-sized
        prof.post += prof.loss
        prof.loss = 0
    elif chunked_output_layer(prep.model, prep.auto_model, distributed_type) is not None:
        # training computes this loss a chunk of tokens at a time (adaptkit.kernels.lm_loss): no
        # logits are returned or kept, and a chunk's logits and their gradient are the largest blocks
        prof.held = prof.loss = 0
        prof.logits_numel = min(prof.logits_numel // vocab, chunk_rows(vocab, device)) * vocab


def run_profile(
    prep: Prepared, mixed_precision: str, micro: int, data: Any, device: str, distributed_type: str
) -> Profile:
    """Run one forward pass of ``prep``'s model on meta tensors (``micro`` examples as ``data``, the
    recipe's data section, sizes them) and sort every tensor autograd saves by where it was made.
    ``distributed_type`` is Accelerate's (``NO``, ``MULTI_GPU``, ``FSDP``): the loss training
    computes depends on it."""
    import torch

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    recorder = _Recorder(prep, half, device)
    hooks = recorder.attach(prep.model, prep.blocks)
    casted = _cast_float_weights(prep.model, half)
    ACTIVE_PROFILES.append(recorder.prof)
    try:
        inputs = INPUTS[prep.auto_model](prep.model.config, micro, data)  # as the task shaped it
        with torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
            out = prep.model(**inputs)
    finally:
        ACTIVE_PROFILES.pop()
        for h in hooks:
            h.remove()
        for p, data in casted:
            p.data = data
    _count_logits(recorder.prof, out, recorder.vocab, prep, device, distributed_type)
    return recorder.prof
