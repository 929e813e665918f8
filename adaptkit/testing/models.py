"""Tiny models built from configs, tokenizers and inputs, for tests of adaptkit and its plugins.

No download happens here: every model is randomly initialised from a small config, so a test
runs in seconds on a CPU. Plugin authors can use these in their own test suites.
"""

from __future__ import annotations

from typing import Any

from adaptkit.host.manager import PluginHost, get_plugin_host

FAMILIES = ("bert", "gpt2", "llama", "vit")
#: Speech encoders for audio classification: raw 16 kHz waveforms (wav2vec2 with group norm,
#: hubert with layer norm and attention masks) or Whisper's log-mel features.
AUDIO_FAMILIES = ("wav2vec2", "hubert", "whisper")
#: Families built on request but not in the conformance kit's default runs.
MORE_FAMILIES = ("qwen2", *AUDIO_FAMILIES)
VOCAB = 128


def tiny_config(family: str, **overrides: Any):
    """A small transformers config: 2 to 4 blocks, hidden size 32."""
    import transformers as tf

    if family == "bert":
        cfg = tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=2, n_positions=64)
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, VOCAB - 1, VOCAB - 1
    elif family == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            pad_token_id=0,
        )
    elif family == "qwen2":  # grouped key/value heads, tied embeddings, biased projections
        cfg = tf.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            pad_token_id=0,
        )
    elif family in ("wav2vec2", "hubert"):
        cfg = _tiny_speech_config(family)
    elif family == "whisper":
        cfg = _tiny_whisper_config()
    elif family == "vit":
        cfg = tf.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
        )
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES + MORE_FAMILIES}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _tiny_whisper_config():
    """Whisper with the real encoder's length (1500 positions, 30 s of 80 log-mel bins)."""
    import transformers as tf

    # init_std 0.2, not 0.02: the convolutions' features must not drown under the sinusoidal
    # positions (magnitude 1), or the random encoder's output hardly depends on the audio
    return tf.WhisperConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=64,
        classifier_proj_size=16,
        init_std=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        decoder_start_token_id=2,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )


def _tiny_speech_config(family: str):
    """wav2vec2 (group-normed convolutions, no attention mask) or HuBERT (layer-normed, masked).

    Three convolutions of 16 channels with wav2vec2's total stride of 320 samples: one frame per
    20 ms of 16 kHz audio, as in the real models.
    """
    import transformers as tf

    layer_norm = family == "hubert"
    config = tf.HubertConfig if layer_norm else tf.Wav2Vec2Config
    return config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16),
        conv_stride=(10, 8, 4),
        conv_kernel=(10, 8, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        classifier_proj_size=16,
        feat_extract_norm="layer" if layer_norm else "group",
        do_stable_layer_norm=layer_norm,
    )


def tiny_feature_extractor(family: str, config: Any = None):
    """The feature extractor of an audio family: 16 kHz waveforms, normalised (wav2vec2, HuBERT), or
    Whisper's 80 log-mel bins over 30 s. Layer-normed models get attention masks, as the real ones do."""
    import transformers as tf

    if family == "whisper":
        return tf.WhisperFeatureExtractor(feature_size=getattr(config, "num_mel_bins", 80))
    if family in ("wav2vec2", "hubert"):
        masks = getattr(config, "feat_extract_norm", "group") == "layer"
        return tf.Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=16000, do_normalize=True, return_attention_mask=masks
        )
    raise ValueError(f"{family!r} is not an audio family; choose from {AUDIO_FAMILIES}")


def tiny_model(
    family: str, task: str = "classification", seed: int = 0, num_labels: int = 3, **overrides: Any
):
    """A randomly initialised tiny model, in eval mode, float32.

    ``task`` is ``classification`` (sequence, image or audio classification), ``causal_lm``
    (gpt2, llama) or ``base`` (the bare backbone).
    """
    import torch
    import transformers as tf

    cfg = tiny_config(family, **overrides)
    if task == "classification":
        cfg.num_labels = num_labels
        if family in AUDIO_FAMILIES:
            auto = tf.AutoModelForAudioClassification
        elif family == "vit":
            auto = tf.AutoModelForImageClassification
        else:
            auto = tf.AutoModelForSequenceClassification
    elif task == "causal_lm":
        auto = tf.AutoModelForCausalLM
    elif task == "base":
        auto = tf.AutoModel
    else:
        raise ValueError(f"unknown task {task!r}")
    torch.manual_seed(seed)
    return auto.from_config(cfg).eval()


def tiny_inputs(model, batch_size: int = 4, seq_len: int = 8, seed: int = 0) -> dict:
    """A batch the model accepts, with labels, and some padding where the model reads text."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if getattr(cfg, "model_type", "") == "vit":
        x = {
            "pixel_values": torch.randn(
                batch_size, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g
            )
        }
    elif getattr(cfg, "model_type", "") == "whisper":  # the encoder takes exactly its length of features
        frames = 2 * cfg.max_source_positions
        x = {"input_features": torch.randn(batch_size, cfg.num_mel_bins, frames, generator=g)}
    elif getattr(cfg, "model_type", "") in ("wav2vec2", "hubert"):
        # seq_len frames of 20 ms at 16 kHz, but enough of them for SpecAugment's masks in training
        frames = max(seq_len, 2 * cfg.mask_time_length)
        x = {"input_values": torch.randn(batch_size, frames * 320, generator=g)}
    else:
        ids = torch.randint(1, cfg.vocab_size, (batch_size, seq_len), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # right padding on one row
        ids[0, -2:] = 0
        x = {"input_ids": ids, "attention_mask": mask}
    name = type(model).__name__
    if "CausalLM" in name or "LMHead" in name:
        labels = x["input_ids"].clone()
        labels[x["attention_mask"] == 0] = -100
        x["labels"] = labels
    elif "Classification" in name:
        x["labels"] = torch.randint(0, cfg.num_labels, (batch_size,), generator=g)
    return x


def plugin_host(*plugins: str, builtins: bool = True) -> PluginHost:
    """A fresh plugin host with entry-point autoload off, plus the given ``-p`` style plugins."""
    return get_plugin_host(plugins, autoload=False, builtins=builtins)


WORDS = (
    "the a an and or but not no very quite really so too is was are be it this that movie film story "
    "plot actor acting scene good great fine nice fun best love wonderful bad awful boring worst dull "
    "poor hate mess weak i you we they he she of to in on with for at by from as what why how yes "
    "question answer add plus minus equals one two three four five six seven eight nine ten zero"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}{% if m['role'] == 'assistant' %} </s>{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


def tiny_tokenizer(family: str = "bert", chat: bool = False):
    """A word-level tokenizer over a fixed small vocabulary (no download): lower-cased, split on whitespace."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    extra = ["<user>", "<assistant>", "<system>"] if chat else []
    vocab = {tok: i for i, tok in enumerate(SPECIAL + extra + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if family == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        eos_token="</s>",
        model_max_length=64,
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_pretrained(
    path, family: str = "bert", task: str = "classification", seed: int = 0, chat: bool = False, **overrides
):
    """Save a tiny model and its tokenizer as a transformers directory a recipe can name as ``model.source``.

    ``vit`` gets an image processor (resize to the model's image size, normalise) instead of a tokenizer;
    the audio families (``AUDIO_FAMILIES``) get their feature extractor.
    """
    if family in AUDIO_FAMILIES:
        model = tiny_model(family, "base" if task == "classification" else task, seed=seed, **overrides)
        model.save_pretrained(path)
        tiny_feature_extractor(family, model.config).save_pretrained(path)
        return path
    if family == "vit":
        import transformers

        model = tiny_model(family, "base" if task == "classification" else task, seed=seed, **overrides)
        model.save_pretrained(path)
        size = model.config.image_size
        # the PIL-based processor (transformers 5 names it ...Pil; before, it was the default): no torchvision
        processor = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)
        processor(size={"height": size, "width": size}).save_pretrained(path)
        return path
    tokenizer = tiny_tokenizer(family, chat=chat)
    overrides.setdefault("pad_token_id", 0)
    if family in ("gpt2", "llama"):
        overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
        overrides.setdefault("bos_token_id", tokenizer.eos_token_id)
    model = tiny_model(family, "base" if task == "classification" else task, seed=seed, **overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_recipe_model(recipe, host: PluginHost):
    """The base model exactly as ``train`` loads it (data, task setup, the load hook, the task's
    preparation), to pass back as ``train(..., loaded_model=...)`` and inspect afterwards."""
    from adaptkit.adapt.pipeline import load_base

    return load_base(recipe, host).loaded


POSITIVE = "good great fine nice fun best love wonderful".split()
NEGATIVE = "bad awful boring worst dull poor hate mess weak".split()


def sentiment_rows(n: int, seed: int = 0, lengths: tuple[int, int] = (6, 6)) -> list[dict]:
    """``n`` distinct, separable sentiment examples ("the movie was good fun ...", label pos/neg, alternating),
    each with between ``lengths[0]`` and ``lengths[1]`` sentiment words."""
    import random

    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = len(rows) % 2
        k = lengths[0] if lengths[0] == lengths[1] else rng.randint(*lengths)
        text = "the movie was " + " ".join(rng.choice(POSITIVE if label else NEGATIVE) for _ in range(k))
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": ["neg", "pos"][label]})
    return rows


def write_sentiment(path, n: int, seed: int):
    """A separable two-class task over the tiny tokenizer's vocabulary, as JSON lines (random labels)."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.randint(0, 1)
            words = [rng.choice(POSITIVE if label else NEGATIVE) for _ in range(3)]
            f.write(
                json.dumps(
                    {
                        "text": f"the movie was {words[0]} and {words[1]} {words[2]}",
                        "label": ["neg", "pos"][label],
                    }
                )
                + "\n"
            )
    return path
