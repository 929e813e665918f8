"""Audio classification: clips from wav/flac files, their bytes or sample arrays, labelled like text classification.

Audio is decoded with soundfile (libsndfile; no torchaudio), mixed to mono and resampled with
scipy to the feature extractor's rate. Wav2Vec2, HuBERT and their kin read the normalised
waveform; Whisper reads log-mel features of its encoder's fixed length, which ``data.max_seconds``
shortens (see ``fit_whisper``).
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

from adaptkit.errors import ConfigError, DataError

from .classification import LabelledFiles

#: The column that carries each row's position, for error messages raised while training reads it.
_ROW = "__adaptkit_row__"
#: What a value of the audio column may be, for the message about a value of another kind.
_EXPECTED = (
    "a wav or flac file path, the file's bytes, {'array': ..., 'sampling_rate': N} or an array of samples"
)


class AudioClassification(LabelledFiles):
    """Audio classification: an audio column (see ``data.audio``) and a label.

    Relative paths are resolved against the data file's folder. The feature extractor comes with
    the model. Every clip is checked when the data is encoded (file headers only); samples are
    decoded batch by batch as training reads them, so a large set never sits in memory. Clips
    are cut to ``data.max_seconds`` and padded to it, or without it to the longest of the batch
    (Whisper: to its encoder's length, 30 s unless shortened).
    """

    auto_model = "AutoModelForAudioClassification"
    column_field = "audio"

    def load_processor(self, path, common):
        """The model's feature extractor (waveform normalisation, or Whisper's log-mel spectrogram)."""
        from transformers import AutoFeatureExtractor

        return AutoFeatureExtractor.from_pretrained(path, **common)

    def prepare_model(self, model, processor):
        """Let adaptkit's strategies find the backbone, and fit Whisper's encoder to ``data.max_seconds``."""
        name_the_encoder(model)
        if is_whisper(model):
            # a task made without a data section (an export's loader) keeps the encoder's own length
            fit_whisper(model, processor, getattr(self.data, "max_seconds", None))

    # -- reading clips ---------------------------------------------------------------------------

    def read_audio(
        self, value: Any, row: int, file: str, rate: int, cut: int | None = None, decode: bool = True
    ) -> Any:
        """One row's clip: float32 mono samples at ``rate`` Hz, at most ``cut`` of them.

        ``decode=False`` only checks the value (a file's header, an array's shape). A missing,
        unreadable or empty clip, or a value of another kind, is a DataError naming the file, the
        row and the column.
        """
        import numpy as np

        where = f"{file}: row {row + 1}, column '{self.data.audio}'"
        if isinstance(value, dict) and "array" in value:  # a decoded clip: datasets' Audio feature
            samples = _samples(value["array"], where)
            given = value.get("sampling_rate")
            rate_in = rate if given is None else _sampling_rate(given, where)
        elif isinstance(value, (list, tuple, np.ndarray)):  # bare samples, at the extractor's rate
            samples, rate_in = _samples(value, where), rate
        else:
            if isinstance(value, dict):  # datasets' undecoded Audio feature: {"bytes": ..., "path": ...}
                value = value.get("bytes") or value.get("path")
            if isinstance(value, str) and value:
                source = self.folders.get(file, Path.cwd()) / value
                what = f"the audio file {source}"
            elif isinstance(value, (bytes, bytearray)):
                source, what = bytes(value), "the audio bytes"
            else:
                raise DataError(
                    f"{where}: expected {_EXPECTED}, got {type(value).__name__} {repr(value)[:60]}"
                )
            samples, rate_in = _decode_file(source, where, what, rate, cut, decode)
        if not decode:
            return None
        samples = _resample(samples[: _frames_for(cut, rate_in, rate)], rate_in, rate)
        return samples[:cut] if cut else samples

    def encode(self, split, processor, file):
        """The audio and label columns, every row checked now; samples are decoded as training reads each batch."""
        import datasets

        col, label = self.data.audio, self.data.label
        rate, cut = clip_length(processor, self.data.max_seconds)
        if isinstance(split.features.get(col), datasets.Audio):
            split = split.cast_column(col, datasets.Audio(decode=False))  # decoded below, a batch at a time
        split = split.select_columns([col, label]).add_column(_ROW, list(range(len(split))))
        # fail before training, naming the row
        for row, (value, name) in enumerate(zip(split[col], split[label])):
            self._label_id(name, row, file)
            self.read_audio(value, row, file, rate, cut, decode=False)
        key = processor.model_input_names[0]

        def transform(batch):
            rows = batch[_ROW]
            clips = [self.read_audio(v, r, file, rate, cut) for v, r in zip(batch[col], rows)]
            # each clip alone: normalisation never sees another clip's padding (Whisper pads to its length here)
            features = processor(clips, sampling_rate=rate)[key]
            return {
                key: [_float32(f) for f in features],
                "labels": [self._label_id(v, r, file) for v, r in zip(batch[label], rows)],
            }

        return split.with_transform(transform)

    def collate(self, processor):
        """A collate function padding waveforms (with attention masks where the extractor makes them) or
        stacking fixed-size features (Whisper's log-mel), and stacking the labels."""
        key = processor.model_input_names[0]
        pad_to = clip_length(processor, self.data.max_seconds)[1]

        def collate(rows):
            import numpy as np
            import torch

            values = [r[key] for r in rows]
            if values[0].ndim == 1:  # raw waveforms of different lengths
                batch = processor.pad(
                    {key: values},
                    padding="max_length" if pad_to else "longest",
                    max_length=pad_to,
                    return_attention_mask=bool(processor.return_attention_mask),
                    return_tensors="pt",
                )
                batch = {k: v for k, v in batch.items() if k == key or k == "attention_mask"}
            else:
                batch = {key: torch.from_numpy(np.stack(values))}
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
            return batch

        return collate


# -- the model -----------------------------------------------------------------------------------


def is_whisper(model: Any) -> bool:
    """True for a Whisper encoder with a classification head (a fixed count of absolute positions)."""
    encoder = getattr(model, "encoder", None)
    return getattr(model.config, "model_type", None) == "whisper" and hasattr(encoder, "embed_positions")


def name_the_encoder(model: Any) -> None:
    """Point ``base_model_prefix`` at the encoder where the inherited one names no submodule.

    ``WhisperForAudioClassification`` inherits Whisper's prefix ``model`` but holds its backbone as
    ``encoder``: without this, adaptkit (``contract.anatomy``) finds no head, so ``freeze`` would
    train nothing and ``lora`` would not save the new head. (A bare backbone such as ``BertModel``
    also has an ``encoder`` and no prefix attribute, so the host cannot tell the two apart.)
    """
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and getattr(model, prefix, None) is None and getattr(model, "encoder", None) is not None:
        model.base_model_prefix = "encoder"


def fit_whisper(model: Any, processor: Any, max_seconds: float | None) -> int:
    """Shorten Whisper's encoder to ``max_seconds`` rounded up to whole seconds; the seconds it reads.

    Transformers' Whisper encoder refuses features of any length but its own (1500 positions,
    3000 mel frames: 30 s), and 30 s of mostly padding per one-second keyword makes training
    crawl. Its position embeddings are absolute: position i always meant the i-th 20 ms of the
    window, so the first N of them are exactly what it used for the first N x 20 ms of a clip.
    Keeping those N, and making the feature extractor produce 2N frames, gives an encoder that
    reads a short window as the full one read its start (attention then spans only the window,
    where the full encoder also attended to the silence padding after it).

    Whole seconds, because the extractor derives its length from an integer ``chunk_length``
    (``n_samples = chunk_length x sampling_rate``, a float breaks it): a saved extractor then
    reloads to the same length. The shortened model saves as such (``config.max_source_positions``),
    so a merged export reloads as it trained; adaptkit re-applies this to the base on every load,
    an adapter export's too (``load_adapter`` lets the task prepare the base; plain
    ``PeftModel.from_pretrained`` does not: see docs/speech.md).
    Without ``max_seconds`` the encoder keeps its length and the extractor is matched to it.
    """
    encoder = model.encoder
    rate = int(getattr(processor, "sampling_rate", 16000))
    hop = int(getattr(processor, "hop_length", 160))
    # samples per encoder position: one mel frame per hop, two frames per position (conv2's stride)
    step = hop * encoder.conv1.stride[0] * encoder.conv2.stride[0]
    have = encoder.embed_positions.num_embeddings
    if max_seconds is None:
        keep, seconds = have, have * step / rate
    else:
        seconds = math.ceil(max_seconds)
        keep = seconds * rate // step
        if keep > have:
            raise ConfigError(
                [
                    (
                        "data.max_seconds",
                        f"{max_seconds:g} s is longer than this Whisper encoder reads "
                        f"({have * step / rate:g} s, {have} positions)",
                    )
                ]
            )
    if keep < have:
        _keep_positions(model, keep)
    if processor is not None:
        processor.n_samples = keep * step
        processor.nb_max_frames = processor.n_samples // hop
        processor.chunk_length = int(seconds) if float(seconds).is_integer() else seconds
    return int(math.ceil(seconds))


def _keep_positions(model: Any, keep: int) -> None:
    """Cut the encoder's position embeddings to the first ``keep`` rows, and its config to match."""
    import torch

    encoder = model.encoder
    old = encoder.embed_positions
    new = torch.nn.Embedding(keep, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight[:keep])
    new.weight.requires_grad_(old.weight.requires_grad)
    encoder.embed_positions = new
    encoder.max_source_positions = keep
    for config in {id(c): c for c in (model.config, encoder.config)}.values():
        config.max_source_positions = keep  # the encoder checks its input length against it


def clip_length(processor: Any, max_seconds: float | None) -> tuple[int, int | None]:
    """The extractor's sampling rate and the samples a clip is cut and padded to (None: uncut, padded per batch).

    A fixed-length extractor (Whisper's ``n_samples``) pads to its length itself: clips are cut at
    ``max_seconds`` (else at that length), never beyond it.
    """
    rate = int(processor.sampling_rate)
    cut = round(max_seconds * rate) if max_seconds else None
    fixed = getattr(processor, "n_samples", None)
    if fixed:
        cut = min(cut or fixed, int(fixed))
    return rate, cut


# -- decoding ------------------------------------------------------------------------------------


def _decode_file(
    source: Path | bytes, where: str, what: str, rate: int, cut: int | None, decode: bool
) -> tuple[Any, int]:
    """A file's (or its bytes') samples mixed to mono and its sampling rate; only its header when not ``decode``.

    Reads no more frames than ``cut`` samples at ``rate`` need.
    """
    import io

    import soundfile

    try:
        with open(source, "rb") if isinstance(source, Path) else io.BytesIO(source) as f:
            with soundfile.SoundFile(f) as sound:
                if sound.frames == 0:
                    raise ValueError("it holds no samples")
                if not decode:
                    return None, sound.samplerate
                frames = _frames_for(cut, sound.samplerate, rate) or -1
                data = sound.read(frames=frames, dtype="float32", always_2d=True)
                return data.mean(axis=1), sound.samplerate
    except (OSError, RuntimeError, ValueError) as exc:  # a missing file; libsndfile's errors; an empty one
        raise DataError(f"{where}: cannot read {what}: {type(exc).__name__}: {exc}") from None


def _samples(value: Any, where: str) -> Any:
    """A 1-D float32 array of finite samples from a list or array, else a DataError."""
    import numpy as np

    try:
        samples = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: expected an array of numbers (samples), but {exc}") from None
    if samples.ndim != 1 or samples.size == 0:
        raise DataError(
            f"{where}: expected a non-empty 1-D (mono) array of samples, got shape {tuple(samples.shape)}"
        )
    if not np.isfinite(samples).all():
        raise DataError(f"{where}: the samples include NaN or infinite values")
    return samples


def _sampling_rate(value: Any, where: str) -> int:
    """A positive whole sampling rate, else a DataError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0 or value != int(value):
        raise DataError(f"{where}: 'sampling_rate' must be a positive whole number of Hz, got {value!r}")
    return int(value)


def _frames_for(cut: int | None, rate_in: int, rate: int) -> int | None:
    """How many samples at ``rate_in`` give the first ``cut`` samples at ``rate`` (None: all of them).

    Resampling reads past each sample by half its filter (scipy's ``resample_poly``: 10 x max(up,
    down) upsampled samples): those frames are read too, so a cut clip ends as the whole one would.
    """
    if cut is None or rate_in == rate:
        return cut
    g = math.gcd(rate_in, rate)
    up, down = rate // g, rate_in // g
    return math.ceil(cut * rate_in / rate) + math.ceil(10 * max(up, down) / up) + 1


def _resample(samples: Any, rate_in: int, rate: int) -> Any:
    """``samples`` resampled from ``rate_in`` to ``rate`` Hz with a polyphase filter (scipy), as float32."""
    import numpy as np

    if rate_in == rate:
        return samples
    from scipy.signal import resample_poly

    g = math.gcd(rate_in, rate)
    return resample_poly(samples, rate // g, rate_in // g).astype(np.float32)


def _float32(features: Any) -> Any:
    """One clip's features as a float32 array."""
    import numpy as np

    return np.asarray(features, dtype=np.float32)
