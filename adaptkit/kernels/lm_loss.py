"""A causal LM's training loss without its logits tensor.

The usual loss (``model(**batch).loss``) holds batch x sequence x vocabulary floats several times
over: the logits, their log-probabilities (kept for the backward) and two gradients of that size
at the backward's start. For SmolLM2's 49,152-token vocabulary and 2 x 256 tokens that is four
96 MiB blocks, and a model with a 128k vocabulary holds gigabytes this way. Here the model's
output layer is skipped, and the output layer and cross-entropy run a chunk of supervised tokens
at a time, with the gradients of the hidden states (and of the output layer, where it trains)
computed in the same pass: nothing logits-sized outlives a chunk, nothing is computed twice, and
prompt tokens (label -100) never go through the output layer at all.

It applies where the logits are exactly the output layer applied to the last hidden state, which
is checked per architecture (``MODEL_TYPES``); everything else keeps ``model(**batch).loss``.

Packed batches (``data.packing``: rows of several sequences with ``position_ids`` restarting at
0 for each) reach the model through ``packed_model_inputs``, and a run that packs first proves,
with ``check_packing``, that its model keeps packed sequences apart (a causal LM, or a sequence
classifier whose pooling gives one output per packed sequence).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from adaptkit.errors import ConfigError

# Accelerate's distributed types where each process holds whole weights: a trial step on each
# process needs no collective. FSDP and DeepSpeed shard
# the model: one process alone cannot try a step (the estimate stands), and a layer's weight is
# gathered only inside its own forward.
UNSHARDED = ("NO", "MULTI_CPU", "MULTI_GPU")


IGNORE = -100  # transformers' ignore_index: prompt and padding positions
# Architectures whose causal-LM head is `logits = lm_head(last_hidden_state)`, nothing after it
# (no soft-capping as in Gemma 2, no logit scale as in Cohere or Granite); each is tested
# against transformers' own loss in tests/test_lm_loss.py.
MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})
# A chunk's logits are at most this many bytes (float32). Larger chunks make fewer, larger matrix
# products, and each product re-reads the whole output layer, so chunks too small cost more than
# the unchunked loss; on the CPU 32 MiB is glibc's largest block that it serves from the heap
# rather than mapping it afresh (and faulting its pages in again) every step. A GPU gets larger
# chunks: its matrix products need more rows to run at rate.
CHUNK_BYTES = {"cpu": 32 * 2**20}
DEFAULT_CHUNK_BYTES = 256 * 2**20

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]

# Attention implementations whose mask transformers builds from packed position ids row by row
# (masking_utils.find_packed_sequence_indices); any other (flash attention's varlen path) gets
# the batch flattened into one row, the only packed form it reads.
ROW_PACKED_ATTENTION = frozenset({"sdpa", "eager", "adaptkit_sdpa"})
# Models already shown to keep packed sequences apart (check_packing runs once per model).
_PACKING_CHECKED: weakref.WeakSet = weakref.WeakSet()


def model_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The model's own loss for ``batch``: what transformers computes from ``labels``."""
    return model(**batch).loss


def output_layer(model: Any) -> torch.nn.Linear | None:
    """The output layer the chunked loss can stand in for, or None where the model's own loss must be used.

    ``model`` is the plain or peft-wrapped causal LM (not an Accelerate/DDP wrapper).
    """
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return None  # virtual tokens are prepended inside peft's forward: the labels no longer line up
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "model_type", None) not in MODEL_TYPES:
        return None
    head = base.get_output_embeddings()
    # exactly nn.Linear: a LoRA-wrapped or quantized head computes something else
    if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    return head


def chunked_output_layer(model: Any, auto_model: str, distributed_type: str = "NO") -> torch.nn.Linear | None:
    """The output layer when training computes the loss in chunks (a causal LM, unsharded weights), else None."""
    if auto_model != "AutoModelForCausalLM" or distributed_type not in UNSHARDED:
        return None
    return output_layer(model)


def chunk_rows(vocab: int, device_type: str) -> int:
    """How many tokens go through the output layer at once."""
    return max(1, CHUNK_BYTES.get(device_type, DEFAULT_CHUNK_BYTES) // (4 * vocab))


def training_loss(model: Any, task: Any, distributed_type: str, autocast: Callable[[], Any]) -> LossFn:
    """The function training calls as ``loss_fn(wrapped_model, batch)`` for one micro-batch's mean loss.

    ``model`` is the unwrapped model, ``task`` the run's task, ``distributed_type`` Accelerate's
    (its ``.value``), ``autocast`` Accelerate's ``autocast`` context (the output layer runs in the
    precision the model's forward runs in).
    """
    if getattr(task, "packing", False):
        check_packing(model, distributed_type)
        return _packed(_loss_fn(model, task, distributed_type, autocast), _attention(model))
    return _loss_fn(model, task, distributed_type, autocast)


def _loss_fn(model: Any, task: Any, distributed_type: str, autocast: Callable[[], Any]) -> LossFn:
    head = chunked_output_layer(model, task.auto_model, distributed_type)
    if head is None:
        return model_loss

    def loss_fn(wrapped: torch.nn.Module, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        head.forward = _hidden_states  # the model returns its last hidden state as "logits"
        try:
            hidden = wrapped(**inputs).logits
        finally:
            del head.forward
        with autocast():
            return causal_lm_loss(hidden, batch["labels"], head.weight, head.bias)

    return loss_fn


def _hidden_states(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def _attention(model: Any) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(base.config, "_attn_implementation", None))


def _packed(loss_fn: LossFn, attention: str) -> LossFn:
    def packed_loss(wrapped: torch.nn.Module, batch: dict) -> torch.Tensor:
        return loss_fn(wrapped, packed_model_inputs(batch, attention))

    return packed_loss


def packed_model_inputs(batch: dict, attention: str = "sdpa") -> dict:
    """The model's inputs (and labels) for a batch; a packed one is made to keep its sequences apart.

    A packed batch (one with ``position_ids``: each sequence a run 0, 1, 2, ... of them, the
    padding after a row's last sequence never at 0; ``adaptkit_plugins.tasks.packing``) loses
    its 2-D ``attention_mask``: transformers builds the block-diagonal mask (causal, or
    bidirectional for an encoder) from the position ids only when no 2-D mask is given and no
    cache is, so ``use_cache`` is off too (a model's config turns it on even in training, and
    with a cache the position ids are silently ignored). Rows stay rows for the attention
    implementations in ``ROW_PACKED_ATTENTION`` (each padding token, its position id neither 0
    nor the next one, is a sequence of its own, seen by no real token); for any other the real
    tokens of all rows become one row, the form flash attention's varlen path reads: every
    per-token tensor (the mask's shape: ids, position and token type ids, per-token labels) is
    flattened, and per-sequence ones (a classifier's labels) stay as they are.
    Other batches are returned as they are.
    """
    if "position_ids" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k != "attention_mask"}
    out["use_cache"] = False
    mask = batch.get("attention_mask")
    if attention not in ROW_PACKED_ATTENTION and mask is not None:
        keep = mask.bool()
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                out[key] = value[keep].unsqueeze(0)
    return out


def check_packing(model: Any, distributed_type: str = "NO") -> None:
    """Refuse (ConfigError naming ``data.packing``) a model that does not keep packed sequences apart.

    A probe: two short sequences packed into one row (with padding after them) must each get the
    outputs they get alone. A model with per-token outputs (a causal LM) is compared token by
    token; one with an output per sequence (a sequence classifier) must give one per packed
    sequence, not one per row (a head that reads a row's first or last token, or a pooler over
    it, cannot pack), each equal to the sequence's output alone. An attention implementation
    or architecture that ignores packed position ids lets the second attend to the first, and
    training would silently learn across sequences. Sharded weights (FSDP, DeepSpeed) cannot
    run a forward pass on one process: there only the attention implementations known to
    honour packing are accepted.
    """
    if model in _PACKING_CHECKED:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = _attention(model)
    name = f"{getattr(base.config, 'model_type', type(base).__name__)} with attention '{attention}'"
    if distributed_type not in UNSHARDED:
        if attention not in ROW_PACKED_ATTENTION:
            raise ConfigError(
                f"data.packing: not supported for {name} with sharded weights; set data.packing: false"
            )
        return
    try:
        diff, scale = _probe_difference(model, attention)
    except _Unpackable as exc:
        raise ConfigError(f"data.packing: {type(base).__name__} {exc}; set data.packing: false") from None
    # a forward that takes no position ids, or a head that breaks on a packed row
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ConfigError(
            f"data.packing: {name} cannot take a packed row ({type(exc).__name__}: {exc}); "
            "set data.packing: false"
        ) from None
    exact = next(model.parameters()).dtype == torch.float32
    if not diff <= (1e-4 if exact else 2e-2) * (1 + scale):
        raise ConfigError(
            f"data.packing: {name} lets packed sequences attend to each other (a packed probe's outputs "
            f"moved by {diff:.3g}); set data.packing: false, or model attention sdpa or eager"
        )
    _PACKING_CHECKED.add(model)


class _Unpackable(Exception):
    """The probe's outputs do not line up with the packed sequences (the message says how)."""


def _probe_difference(model: Any, attention: str) -> tuple[float, float]:
    """The largest change of a sequence's outputs when packed with another, and their scale.

    Raises ``_Unpackable`` where the outputs do not line up with the packed tokens or sequences.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vocab = int(getattr(base.config, "vocab_size", None) or 32)
    device = next(model.parameters()).device
    first = [(7 * i + 3) % vocab for i in range(6)]
    second = [(5 * i + 11) % vocab for i in range(5)]
    ids = torch.tensor([first + second + [0, 0]], device=device)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1] * 11 + [0, 0]], device=device),
        # the packed form: each sequence a run from 0; the padding after them one position, not 0
        "position_ids": torch.tensor([[*range(6), *range(5), 1, 1]], device=device),
    }
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(**packed_model_inputs(batch, attention)).logits.float()
            alone = [
                model(input_ids=ids[:, a:b], use_cache=False).logits.float() for a, b in ((0, 6), (6, 11))
            ]
    finally:
        model.train(was_training)
    tokens = 11 if attention not in ROW_PACKED_ATTENTION else 13  # flattened to its real tokens, or not
    if packed.dim() == 3 and packed.shape[:2] == (1, tokens):  # one output per token
        pairs = [(packed[0, :6], alone[0][0]), (packed[0, 6:11], alone[1][0])]
    elif packed.dim() == 3:
        raise _Unpackable(
            f"gives {packed.shape[1]} outputs for a packed row of {tokens} tokens: it adds or drops "
            "positions (as prompt tuning's virtual tokens do), so packed sequences would not stay apart"
        )
    elif packed.shape[0] == 2:  # one output per sequence
        pairs = [(packed[0], alone[0][0]), (packed[1], alone[1][0])]
    else:
        raise _Unpackable(
            f"gives {packed.shape[0]} output(s) for a row of two packed sequences, not one per sequence: "
            "its head reads the row as a whole (its first or last token, or a pooler over it), so packed "
            "sequences would share a prediction (a sequence classifier packs where model.pooling cls or "
            "mean pools each sequence, on BERT-style encoders)"
        )
    diff = max(float((a - b).abs().max()) for a, b in pairs)
    return diff, max(float(b.abs().max()) for _, b in pairs)


def causal_lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction, as transformers' ``ForCausalLMLoss`` computes it.

    ``hidden`` (batch, seq, hidden) are the states the output layer (``weight``, ``bias``) would
    turn into logits; position t predicts ``labels[:, t + 1]``; labels of -100 are not predicted.
    With no supervised token the loss is 0 (transformers gives NaN).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows = chunk_rows(weight.shape[0], hidden.device.type)
    return _LinearCrossEntropy.apply(hidden[:, :-1][keep], weight, bias, targets[keep], rows)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i @ weight.T + bias, target_i), a chunk of rows at a time; gradients made in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        exact = torch.promote_types(
            dtype, torch.float32
        )  # half logits are upcast for the loss, as transformers does
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            total = torch.zeros((), dtype=exact, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=exact, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=exact, device=bias.device) if need_b else None
            buffer = (
                torch.empty((min(chunk, n), w.shape[0]), dtype=exact, device=hidden.device) if n else None
            )
            for start in range(0, n, chunk):
                h, t = hidden[start : start + chunk].to(dtype), targets[start : start + chunk]
                # one logits buffer for all chunks: a fresh block per chunk costs its page faults again
                logits = buffer[: len(t)]
                if dtype == exact:
                    torch.mm(h, w.t(), out=logits)
                    if b is not None:
                        logits += b
                else:
                    logits.copy_(torch.nn.functional.linear(h, w, b))
                lse = logits.logsumexp(-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                # d(sum of the chunk's losses)/d logits = softmax - one-hot, made in the logits' memory
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(t), device=g.device), t] -= 1
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(dtype)
                if need_h:
                    if grad_h.dtype == dtype:
                        torch.mm(g, w, out=grad_h[start : start + chunk])
                    else:
                        grad_h[start : start + chunk] = g @ w
                if need_w:
                    if dtype == exact:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += g.t() @ h
        ctx.rows = max(n, 1)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total / ctx.rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        scale = grad_out / ctx.rows
        grads, ctx.grads = (
            ctx.grads,
            None,
        )  # released as they are handed over: autograd may keep them as .grad
        out = [
            None if g is None else g.mul_(scale.to(g.dtype)).to(dtype) for g, dtype in zip(grads, ctx.dtypes)
        ]
        return (*out, None, None)
