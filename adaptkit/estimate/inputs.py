"""The batches a meta forward pass is fed: one builder per model class the estimator supports."""

from __future__ import annotations

from typing import Any

from adaptkit.errors import ConfigError


def _causal_inputs(config: Any, micro: int, data: Any) -> dict[str, Any]:
    import torch

    seq = data.max_length
    ids = torch.zeros(micro, seq, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": ids, "attention_mask": _mask(micro, seq)}


def _mask(micro: int, seq: int) -> Any:
    """An attention mask, as training batches carry: without one, transformers looks for padding in
    the token ids (a model with a pad token), which a meta tensor cannot answer."""
    import torch

    return torch.ones(micro, seq, dtype=torch.long, device="meta")


def _classification_inputs(config: Any, micro: int, data: Any) -> dict[str, Any]:
    import torch

    seq = data.max_length
    ids = torch.zeros(micro, seq, dtype=torch.long, device="meta")
    labels = torch.zeros(micro, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": labels, "attention_mask": _mask(micro, seq)}


def _image_inputs(config: Any, micro: int, data: Any) -> dict[str, Any]:
    import torch

    size = getattr(config, "image_size", 224)
    pixels = torch.zeros(micro, getattr(config, "num_channels", 3), size, size, device="meta")
    return {"pixel_values": pixels, "labels": torch.zeros(micro, dtype=torch.long, device="meta")}


#: The sampling rate of the waveform models transformers ships (Wav2Vec2, HuBERT, WavLM).
WAVEFORM_RATE = 16000


def _reads_mel_features(config: Any) -> bool:
    """Whisper: a fixed window of log-mel features (as long as its encoder's positions), not a waveform."""
    return getattr(config, "model_type", None) == "whisper"


def _audio_inputs(config: Any, micro: int, data: Any) -> dict[str, Any]:
    """Whisper: log-mel features of its encoder's length (which ``data.max_seconds`` shortened when
    the task prepared the model); a waveform model: ``data.max_seconds`` of samples at 16 kHz,
    refused without it (each batch is then padded to its longest clip, which no estimate knows)."""
    import torch

    labels = torch.zeros(micro, dtype=torch.long, device="meta")
    if _reads_mel_features(config):
        frames = 2 * config.max_source_positions  # two mel frames per encoder position
        return {
            "input_features": torch.zeros(micro, config.num_mel_bins, frames, device="meta"),
            "labels": labels,
        }
    if data.max_seconds is None:
        raise ConfigError(
            "estimate: data.max_seconds: unset, so each batch is padded to its longest clip; "
            "set it to estimate"
        )
    samples = round(data.max_seconds * WAVEFORM_RATE)
    return {"input_values": torch.zeros(micro, samples, device="meta"), "labels": labels}


def describe_inputs(auto_model: str, config: Any, data: Any) -> str:
    """What one example of the estimated batch is, in the words of its kind."""
    if auto_model == "AutoModelForImageClassification":
        size = getattr(config, "image_size", 224)
        return f"{size}x{size} pixels"
    if auto_model == "AutoModelForAudioClassification":
        if _reads_mel_features(config):
            return f"{config.max_source_positions / 50:g} s of audio"  # 50 encoder positions a second
        return f"{data.max_seconds:g} s of audio"
    return f"{data.max_length} tokens"


#: The model classes the estimator can feed, and a batch for each (on meta tensors: no padding,
#: so every sequence is ``data.max_length`` long, every clip ``data.max_seconds``: the worst case
#: of dynamic padding).
INPUTS = {
    "AutoModelForCausalLM": _causal_inputs,
    "AutoModelForSequenceClassification": _classification_inputs,
    "AutoModelForImageClassification": _image_inputs,
    "AutoModelForAudioClassification": _audio_inputs,
}
