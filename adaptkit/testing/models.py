"""Tiny models built from configs, tokenizers and inputs, for tests of adaptkit and its plugins.

No download happens here: every model is randomly initialised from a small config, so a test
runs in seconds on a CPU. Plugin authors can use these in their own test suites.
"""

from __future__ import annotations

from typing import Any

from adaptkit.host.manager import PluginHost, get_plugin_host

FAMILIES = ("bert", "gpt2", "llama", "vit")
#: Families built on request but not in the conformance kit's default runs.
MORE_FAMILIES = ("qwen2",)
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


def tiny_model(
    family: str, task: str = "classification", seed: int = 0, num_labels: int = 3, **overrides: Any
):
    """A randomly initialised tiny model, in eval mode, float32.

    ``task`` is ``classification`` (sequence or image classification), ``causal_lm`` (gpt2,
    llama) or ``base`` (the bare backbone).
    """
    import torch
    import transformers as tf

    cfg = tiny_config(family, **overrides)
    if task == "classification":
        cfg.num_labels = num_labels
        auto = (
            tf.AutoModelForImageClassification if family == "vit" else tf.AutoModelForSequenceClassification
        )
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

    ``vit`` gets an image processor (resize to the model's image size, normalise) instead of a tokenizer.
    """
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
