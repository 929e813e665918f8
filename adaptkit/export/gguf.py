"""Export a merged LLaMA-family causal LM and its tokenizer to one GGUF file.

The file follows llama.cpp's own converter (``convert_hf_to_gguf.py``): the same metadata keys, tensor
names, Q/K row order and tokenizer encoding, so llama.cpp and transformers' GGUF loader
(``from_pretrained(..., gguf_file=...)``) both read it.

Supported: ``LlamaForCausalLM`` (architecture ``llama``) and ``Qwen2ForCausalLM`` (``qwen2``), with a
byte-level BPE tokenizer (GPT-2, Llama-3 or Qwen2 pre-tokenization). Weights are written as ``f32``,
``f16`` or ``q8_0``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.errors import ConfigError
from adaptkit.files import atomic_path

if TYPE_CHECKING:
    import gguf
    import numpy as np
    import torch

QUANTS = ("f16", "f32", "q8_0")

# model_type -> (GGUF architecture, whether llama.cpp permutes the Q/K rows for its interleaved RoPE).
# Qwen2 uses NeoX-style RoPE in llama.cpp, which matches transformers' layout, so nothing is permuted.
_ARCHS = {"llama": ("llama", True), "qwen2": ("qwen2", False)}
SUPPORTED_MODEL_TYPES = tuple(sorted(_ARCHS))

# Pre-tokenizer split regexes llama.cpp knows by name (``tokenizer.ggml.pre``); the loader re-creates
# the split from the name, so a tokenizer whose split is not one of these would encode differently.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_Q8_BLOCK = 32  # elements per Q8_0 block: a row must be a whole number of blocks


@dataclass
class _Tensor:
    """One tensor to write: its GGUF name, source tensor, storage type and Q/K head count to permute by."""

    name: str
    source: Any  # torch.Tensor
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int | None = None


def write_gguf(model: Any, tokenizer: Any, path: str | Path, quant: str = "f16") -> Path:
    """Write ``model`` and ``tokenizer`` to a single GGUF file at ``path`` and return the path.

    ``model`` must be a plain, merged ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` (no adapters left on
    it) and ``tokenizer`` a byte-level BPE tokenizer. ``quant`` is ``"f16"``, ``"f32"`` or ``"q8_0"``;
    with ``q8_0`` every 2-D weight whose rows are a multiple of 32 long is quantized and everything else
    (norms, biases) stays f32. The file is written to a temporary file beside ``path`` and renamed into
    place, so ``path`` never holds half a file. Raises ``ConfigError`` for an unsupported model, tokenizer
    or ``quant``, before anything is written.
    """
    import gguf

    if quant not in QUANTS:
        raise ConfigError(
            f"GGUF export: quant {quant!r} is not supported; choose one of {', '.join(QUANTS)}."
        )
    config = model.config
    arch = check_model(model)
    # Everything that can fail is worked out before the file is opened.
    tensors = _tensor_plan(model, arch, quant)
    vocab = _vocab(tokenizer, config.vocab_size)
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _add_hparams(writer, config, quant)
            _add_tokenizer(writer, vocab)
            _stream_tensors(writer, tensors)
        finally:
            writer.close()  # before atomic_path renames (or removes) the file
    return path


def check_model(model: Any) -> str:
    """The GGUF architecture for ``model``, or a ``ConfigError`` saying why it cannot be exported."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHS or model.get_output_embeddings() is None:
        raise ConfigError(
            f"GGUF export supports causal LMs of model type {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(LlamaForCausalLM, Qwen2ForCausalLM); got {type(model).__name__} (model_type {model_type!r})."
        )
    # transformers' GGUF loader has no key for these, so a file with them would load as a different model.
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ConfigError("GGUF export: Llama models with attention_bias or mlp_bias are not supported.")
    if getattr(config, "use_sliding_window", False):
        raise ConfigError("GGUF export: Qwen2 models with use_sliding_window are not supported.")
    _rope_scaling(model)  # raises for a RoPE type GGUF cannot describe
    return _ARCHS[model_type][0]


def _rope_params(config: Any) -> dict:
    """The RoPE settings as one dict, from transformers 5's ``rope_parameters`` or 4's ``rope_*``."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    params.update(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _rope_scaling(model: Any) -> tuple[str, Any]:
    """``("default", None)``, ``("linear", factor)`` or ``("llama3", per-frequency factors)``.

    llama.cpp describes Llama-3 scaling as a ``rope_freqs`` tensor of divisors of the base frequencies;
    they are read off the model's own rotary embedding so they match what transformers computes.
    """
    params = _rope_params(model.config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        return "default", None
    if rope_type == "linear":
        return "linear", float(params["factor"])
    if rope_type == "llama3" and model.config.model_type == "llama":
        import torch

        head_dim = _head_dim(model.config)
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        base = 1.0 / (params["rope_theta"] ** exponents)
        scaled = model.model.rotary_emb.inv_freq.detach().to("cpu", torch.float32)
        return "llama3", base / scaled
    raise ConfigError(
        f"GGUF export: RoPE type {rope_type!r} is not supported for {model.config.model_type}; "
        "supported: default, linear, and llama3 (Llama only)."
    )


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hparams(writer: gguf.GGUFWriter, config: Any, quant: str) -> None:
    """The model's hyperparameters under llama.cpp's keys (the ones transformers' loader maps back)."""
    import gguf

    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[quant])
    if quant == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = _head_dim(config)
    # transformers reads the Llama head size from the rotary width; llama.cpp from the key/value lengths.
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    params = _rope_params(config)
    writer.add_rope_freq_base(float(params["rope_theta"]))
    if params["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))


def _tensor_plan(model: Any, arch: str, quant: str) -> list[_Tensor]:
    """Every tensor of the file, in order, with its GGUF name and storage type.

    Fails with ``ConfigError`` on a parameter llama.cpp has no name for (an adapter left unmerged).
    """
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    # A tied output layer is the embedding; llama.cpp omits `output.weight` and reuses `token_embd`.
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    permute = _ARCHS[config.model_type][1]
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    plan, unknown = [], []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(hf_name)
            continue
        role = name.split(".")[-2]
        permute_heads = heads.get(role) if permute else None
        plan.append(_Tensor(name, tensor, _storage_type(tensor, quant), permute_heads))
    if unknown:
        raise ConfigError(
            f"GGUF export: {len(unknown)} parameter(s) have no GGUF name, e.g. {unknown[:3]}; "
            "merge adapters into the base model (a plain transformers model) before exporting."
        )
    kind, factors = _rope_scaling(model)
    if kind == "llama3":
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(_Tensor(name, factors, gguf.GGMLQuantizationType.F32))
    return plan


def _storage_type(tensor: torch.Tensor, quant: str) -> gguf.GGMLQuantizationType:
    """How one tensor is stored: norms and biases (1-D) always f32, as llama.cpp keeps them."""
    import gguf

    types = gguf.GGMLQuantizationType
    if tensor.dim() != 2 or quant == "f32":
        return types.F32
    if quant == "f16":
        return types.F16
    return types.Q8_0 if tensor.shape[-1] % _Q8_BLOCK == 0 else types.F32


def _stream_tensors(writer: gguf.GGUFWriter, plan: list[_Tensor]) -> None:
    """Write the header, then each tensor converted one at a time, so memory holds one tensor, not all."""
    import gguf
    import numpy as np

    for item in plan:
        rows, cols = (1, item.source.shape[0]) if item.source.dim() == 1 else tuple(item.source.shape)
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[item.qtype]
        nbytes = rows * (cols // block_elems) * block_bytes
        writer.add_tensor_info(item.name, tuple(item.source.shape), np.float32, nbytes, raw_dtype=item.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for item in plan:
        writer.write_tensor_data(_stored(item))


def _stored(item: _Tensor) -> np.ndarray:
    """The tensor as its bytes in the file: Q/K rows in llama.cpp's order, then cast or quantized."""
    import gguf
    import torch

    data = item.source.detach().to("cpu", torch.float32).numpy()
    if item.permute_heads:
        data = _permute_qk(data, item.permute_heads)
    return gguf.quants.quantize(data, item.qtype)


def _permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K permutation: each head's rotary halves ``[x0..x(d/2), y0..]`` interleaved to pairs.

    transformers rotates the first half of a head against the second; llama.cpp (GPT-J style) rotates
    adjacent pairs. The loader undoes this with the inverse reshape, giving back the original rows.
    """
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@dataclass
class _Vocab:
    """A byte-level BPE tokenizer as GGUF stores it."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: Any


def _vocab(tokenizer: Any, vocab_size: int) -> _Vocab:
    """Read the tokens, merges and special tokens of a byte-level BPE tokenizer, or raise ``ConfigError``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        kind = model.get("type") or f"{type(tokenizer).__name__} (no fast backend)"
        pre_kind = (spec.get("pre_tokenizer") or {}).get("type")
        raise ConfigError(
            "GGUF export supports byte-level BPE tokenizers only (GPT-2, Llama-3 or Qwen2 pre-tokenization, "
            f"written as tokenizer.ggml.model 'gpt2'); this tokenizer's model is {kind} with pre-tokenizer "
            f"{pre_kind}. SentencePiece, Unigram and WordPiece tokenizers are not supported."
        )
    tokens, types = _tokens_and_types(tokenizer, vocab_size)
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    extra = len(with_special) > len(plain)
    return _Vocab(
        tokens=tokens,
        types=types,
        # tokenizers >= 0.20 stores merges as pairs; GGUF as "left right" strings like older tokenizer.json.
        merges=[m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
        pre=pre,
        special_ids=_special_ids(tokenizer),
        # Whether encoding adds BOS/EOS is read off the tokenizer's behaviour, since v4 and v5 spell it differently.
        add_bos=extra and with_special[0] == tokenizer.bos_token_id and plain[:1] != with_special[:1],
        add_eos=extra and with_special[-1] == tokenizer.eos_token_id and plain[-1:] != with_special[-1:],
        chat_template=getattr(tokenizer, "chat_template", None),
    )


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer, or ``None`` if it is not one it knows."""
    if not pre:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel":
        byte_level = steps[0]
        # GPT-2's own split is built into ByteLevel when use_regex is on (the default).
        plain = not byte_level.get("add_prefix_space", False) and byte_level.get("use_regex", True)
        return "gpt-2" if plain else None
    if len(steps) == 2 and [s.get("type") for s in steps] == ["Split", "ByteLevel"]:
        split, byte_level = steps
        regex = (split.get("pattern") or {}).get("Regex")
        if byte_level.get("use_regex", True) or byte_level.get("add_prefix_space", False):
            return None
        return _SPLIT_NAMES.get(regex)
    return None


def _tokens_and_types(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """All ``vocab_size`` tokens by id, with llama.cpp's token types.

    Added special tokens are CONTROL, other added tokens USER_DEFINED; ids the tokenizer does not use
    (an embedding padded past the vocabulary) get ``[PAD<id>]`` placeholders marked UNUSED, as llama.cpp does.
    """
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ConfigError(
            f"GGUF export: the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}."
        )
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
    }
    return {role: int(index) for role, index in ids.items() if index is not None}


def _add_tokenizer(writer: gguf.GGUFWriter, vocab: _Vocab) -> None:
    """The tokenizer keys llama.cpp writes for a BPE vocabulary."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "pad": writer.add_pad_token_id,
        "unk": writer.add_unk_token_id,
    }
    for role, index in vocab.special_ids.items():
        adders[role](index)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    template = vocab.chat_template
    if isinstance(template, dict):  # several named templates: GGUF keeps the "default" one plus named ones
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)
