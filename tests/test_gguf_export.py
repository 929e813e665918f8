"""GGUF export: tiny random LLaMA / Qwen2 models and a real byte-level BPE tokenizer, read back with
transformers' own GGUF loader. Nothing is downloaded and nothing is mocked.

Random models use ``initializer_range=0.1`` rather than the default 0.02: at 0.02 the attention scores
are so close to zero that writing Q/K in the wrong row order moves the logits by only ~7e-3, which
would hide inside the q8_0 tolerance; at 0.1 it moves them by ~3, far outside every bound below.
"""

from __future__ import annotations

import math
import random

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from adaptkit.errors import ConfigError  # noqa: E402
from adaptkit.export.gguf import _LLAMA3_SPLIT, write_gguf  # noqa: E402

# Measured with the fixtures below (torch 2.13 CPU, transformers 5.25, gguf 0.19); each bound leaves
# at least 2.3x headroom. f16 keeps 11 significant bits (relative rounding <= 2**-11 per weight), which
# moves logits of magnitude ~3 by 2.8e-3 (Llama) and 4.3e-3 (Qwen2). Q8_0 rounds each weight to 1/254
# of its 32-block's largest magnitude, ~30x coarser: 9.3e-2.
F16_LOGITS_ATOL = 1e-2
Q8_0_LOGITS_ATOL = 0.25
# A GGUF model must compute exactly what the original does with its weights rounded as the file stores
# them (2-D weights to f16, norms and biases kept f32); only float non-associativity could differ.
SAME_WEIGHTS_ATOL = 1e-5

_WORDS = (
    "the a cat dog sat on mat ran fast slow big small red blue tree house river model token "
    "export weights file quick brown fox jumps over lazy 42 1999 don't it's"
).split()


def _sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + rng.choice(".!?")
        for _ in range(count)
    ]


def _bpe_tokenizer(style: str = "gpt2"):
    """A byte-level BPE (vocab 320) trained on 400 generated sentences, GPT-2 or Llama-3 pre-tokenized."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    if style == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # Llama-3: its own split regex, then bytes; and a BOS added to every encoding
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_sentences(400), trainer)
    if style == "llama3":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    wrapped.add_tokens(["<think>"])  # an added, non-special token: USER_DEFINED in GGUF
    wrapped.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    return wrapped


@pytest.fixture(scope="module")
def tokenizer():
    return _bpe_tokenizer()


def _llama(vocab_size: int, layers: int = 2, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.1,
        **({"tie_word_embeddings": False} | overrides),
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return _llama(len(tokenizer))


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def _logits(model, tokenizer):
    batch = tokenizer(_sentences(4, seed=1), return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    return logits[batch["attention_mask"].bool()]  # padded positions are not compared


def _as_stored(model):
    """A copy of ``model`` with each weight rounded the way the f16 file stores it."""
    copy = type(model)(model.config).eval()
    copy.load_state_dict({k: v.half().float() if v.dim() == 2 else v for k, v in model.state_dict().items()})
    return copy


def _tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_f16_round_trip_gives_back_the_weights_and_logits(tmp_path, llama, tokenizer):
    path = write_gguf(llama, tokenizer, tmp_path / "model.gguf", quant="f16")
    loaded = _load(path)

    original, restored = llama.state_dict(), loaded.state_dict()
    assert set(restored) == set(original)
    for name, weight in original.items():
        # Bitwise: any error in the Q/K permutation or its inverse would scramble whole rows here.
        assert torch.equal(restored[name].half(), weight.half()), name
    assert loaded.config.num_key_value_heads == 2 and loaded.config.head_dim == 16

    got = _logits(loaded, tokenizer)
    assert (got - _logits(llama, tokenizer)).abs().max() < F16_LOGITS_ATOL  # measured 2.8e-3
    assert (got - _logits(_as_stored(llama), tokenizer)).abs().max() < SAME_WEIGHTS_ATOL  # measured 0

    types = _tensor_types(path)
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" in types  # untied: the output projection is its own tensor


def test_q8_0_is_close_and_smaller(tmp_path, llama, tokenizer):
    f16 = write_gguf(llama, tokenizer, tmp_path / "f16" / "model.gguf", quant="f16")
    q8 = write_gguf(llama, tokenizer, tmp_path / "q8" / "model.gguf", quant="q8_0")
    assert q8.stat().st_size < f16.stat().st_size

    types = _tensor_types(q8)
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"

    loaded = _load(q8)
    restored = loaded.state_dict()
    for name, weight in llama.state_dict().items():
        if weight.dim() != 2:
            assert torch.equal(restored[name], weight), name
            continue
        # Each value is within half a step (block max / 127) of the original, plus the f16 step scale's
        # own rounding (<= 127 * 2**-11 of a step): proves the blocks hold these rows, not others.
        blocks = weight.reshape(-1, 32)
        step = blocks.abs().amax(dim=1, keepdim=True) / 127
        error = (restored[name].reshape(-1, 32) - blocks).abs()
        assert (error <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), name

    assert (_logits(loaded, tokenizer) - _logits(llama, tokenizer)).abs().max() < Q8_0_LOGITS_ATOL  # 9.3e-2


@pytest.mark.parametrize("style", ["gpt2", "llama3"])
def test_tokenizer_read_back_encodes_the_same(tmp_path, style):
    from transformers import AutoTokenizer

    original = _bpe_tokenizer(style)
    # The embedding is padded past the vocabulary, as real checkpoints often are.
    path = write_gguf(_llama(len(original) + 5, layers=1), original, tmp_path / "model.gguf")
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)

    texts = _sentences(30, seed=2) + [
        "Hello, World! 12345  spaced\n\nnew line",
        "<s>the cat</s> <think>hmm</think>",
        "héllo ✓ 日本語",
        "  leading spaces and don't I'll",
    ]
    for text in texts:
        ids = original(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids, text
        assert loaded.decode(ids) == original.decode(ids)
    # the Llama-3 style tokenizer adds BOS itself, the GPT-2 one does not: both behaviours survive
    assert (original("x")["input_ids"][0] == original.bos_token_id) == (style == "llama3")
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    assert loaded.chat_template == original.chat_template
    assert loaded.convert_ids_to_tokens(len(original) + 4) == f"[PAD{len(original) + 4}]"


def test_unsupported_model_is_refused_and_nothing_is_written(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    )
    path = tmp_path / "out" / "model.gguf"
    with pytest.raises(ConfigError) as error:
        write_gguf(model, tokenizer, path)
    assert (
        "llama" in str(error.value) and "qwen2" in str(error.value) and "GPT2LMHeadModel" in str(error.value)
    )
    assert not path.exists() and not any(tmp_path.rglob("*"))


def test_non_bpe_tokenizer_and_unknown_quant_are_refused(tmp_path, llama, tokenizer):
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", *_WORDS])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    words = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>")
    path = tmp_path / "model.gguf"
    with pytest.raises(ConfigError, match="byte-level BPE"):
        write_gguf(_llama(len(vocab), layers=1), words, path)
    with pytest.raises(ConfigError, match="f16, f32, q8_0"):
        write_gguf(llama, tokenizer, path, quant="q4_0")
    assert not any(tmp_path.iterdir())


def test_qwen2_f16_round_trip_with_biases_and_tied_embeddings(tmp_path, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.1,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # the q/k/v biases start at zero; make them matter
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=0.1)

    path = write_gguf(model, tokenizer, tmp_path / "model.gguf", quant="f16")
    loaded = _load(path)
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and loaded.config.tie_word_embeddings
    assert "output.weight" not in _tensor_types(path)  # tied: llama.cpp reuses token_embd

    restored = loaded.state_dict()
    for name, weight in model.state_dict().items():
        expected = weight.half() if weight.dim() == 2 else weight  # biases and norms are stored f32
        assert torch.equal(restored[name].to(expected.dtype), expected), name
    got = _logits(loaded, tokenizer)
    assert (got - _logits(model, tokenizer)).abs().max() < F16_LOGITS_ATOL  # measured 4.3e-3
    assert (got - _logits(_as_stored(model), tokenizer)).abs().max() < SAME_WEIGHTS_ATOL


def test_llama3_rope_scaling_is_written_as_llama_cpp_frequency_factors(tmp_path, tokenizer):
    # transformers' GGUF loader ignores `rope_freqs` (it rebuilds a default RoPE), so this checks the
    # file against llama.cpp's own formula (convert_hf_to_gguf.py, LlamaModel) instead of a reload.
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0}
    rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    path = write_gguf(_llama(len(tokenizer), layers=1, rope_parameters=rope), tokenizer, tmp_path / "m.gguf")

    (tensor,) = [t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight"]
    low_wavelen, high_wavelen = 256 / 1.0, 256 / 4.0
    expected = []
    for i in range(0, 16, 2):
        wavelen = 2 * math.pi * 10000.0 ** (i / 16)
        if wavelen < high_wavelen:
            expected.append(1.0)
        elif wavelen > low_wavelen:
            expected.append(8.0)
        else:
            smooth = (256 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert 1.0 < expected[3] < 8.0  # the parameters above exercise the smoothed band too
    assert torch.allclose(torch.tensor(tensor.data.tolist()), torch.tensor(expected), rtol=1e-5)


def test_a_lora_run_exported_to_gguf_gives_the_runs_logits(tmp_path, tokenizer):
    """A real adaptkit run (LoRA on a tiny LLaMA with a BPE tokenizer), exported with
    ``adaptkit export RUN OUT.gguf --format gguf``: transformers' GGUF loader gives the run's logits
    to f16 precision, and the model card sits beside the file."""
    import json

    from adaptkit.cli import main
    from adaptkit.runs import open_run
    from adaptkit.testing import plugin_host

    base = tmp_path / "base"
    _llama(len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    (tmp_path / "data").mkdir()
    for split, seed in (("train", 0), ("validation", 1)):
        with open(tmp_path / "data" / f"{split}.jsonl", "w") as f:
            for prompt, response in zip(_sentences(16, seed), _sentences(16, seed + 7)):
                f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    (tmp_path / "r.yaml").write_text(
        f"model: {{source: {base}, task: causal_lm}}\n"
        f"data: {{source: {tmp_path / 'data'}, max_length: 64}}\n"
        "strategies: [{name: lora, r: 4}]\n"
        "train: {max_steps: 3, lr: 5.0e-2, micro_batch_size: 4}\n"
        f"output: {tmp_path / 'runs'}/{{name}}\n"
    )
    assert main(["train", str(tmp_path / "r.yaml")]) == 0
    opened = open_run(tmp_path / "runs" / "r", plugin_host())
    ids = tokenizer(_sentences(3, 5), return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = opened.adapted.model(**ids).logits
    out = tmp_path / "export" / "model.gguf"
    assert main(["export", str(tmp_path / "runs" / "r"), str(out), "--format", "gguf"]) == 0
    with torch.no_grad():
        got = _load(out)(**ids).logits
    assert (got - expected).abs().max().item() < F16_LOGITS_ATOL
    card = out.with_suffix(".md").read_text()
    assert "library_name: gguf" in card and "name: lora" in card and 'gguf_file="model.gguf"' in card
    assert main(["export", str(tmp_path / "runs" / "r"), str(tmp_path / "x"), "--format", "gguf"]) == 2
