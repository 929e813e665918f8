"""The memory and time estimator: its arithmetic by hand, packed sizes against bitsandbytes, the
suggestions, the CLI, the pre-flight check in training and micro_batch_size: auto."""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from adaptkit.cli import main
from adaptkit.errors import AdaptkitError, ConfigError, DoesNotFitError
from adaptkit.estimate.estimator import Estimator
from adaptkit.estimate.suggest import divisors, suggest
from adaptkit.estimate.units import parse_memory
from adaptkit.recipe.schema import apply_overrides, validate
from adaptkit.train.allocator import ALLOCATOR_ENV

# the hand-counted model: LLaMA, 2 blocks, hidden 64, MLP 128, 4 heads of 16, 2 key/value heads, vocabulary 128
V, H, I, HEADS, HD, KVD, LAYERS = 128, 64, 128, 4, 16, 32, 2  # noqa: E741 (the paper-style names of the hand count)
B, S = 2, 16
T = B * S  # tokens in a micro-batch
BLOCK_PARAMS = H * H * 2 + H * KVD * 2 + 3 * H * I + 2 * H  # q, o; k, v; gate, up, down; two norms
PARAMS = V * H + LAYERS * BLOCK_PARAMS + H + V * H  # embeddings, blocks, final norm, untied lm_head


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A model directory with a config.json and nothing else: no weights, no tokenizer."""
    import transformers

    d = tmp_path_factory.mktemp("est") / "llama"
    transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KVD // HD,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    ).save_pretrained(d)
    assert [p.name for p in d.iterdir()] == ["config.json"]
    return d


def make_recipe(source, strategies, host, max_length=S, task="causal_lm", **train):
    raw = {
        "model": {"source": str(source), "task": task},
        "data": {"source": "unused.jsonl", "max_length": max_length},
        "strategies": strategies,
        "train": {"micro_batch_size": B, **train},
    }
    return validate(raw, host=host)


@pytest.fixture
def estimator(host):
    return Estimator(host, device="cpu", overhead_bytes=0, peak_tflops=0)


# -- the arithmetic ---------------------------------------------------------------------------


def test_full_training_terms_by_hand(llama_dir, host, estimator):
    est = estimator.estimate(make_recipe(llama_dir, ["full"], host))
    assert est.total_parameters == est.trainable_parameters == PARAMS == 90432
    assert est.frozen_weights == 0
    assert est.trainable_weights == est.gradients == 4 * PARAMS
    assert est.optimizer_states == 8 * PARAMS  # AdamW: two float32 moments
    # What autograd keeps per block (float32): RMSNorm input, normalised and output twice (6 x T x H, the
    # output being what q/k/v and gate/up read), its 1/rms twice; attention's q and output (T x H), k and
    # v (T x KVD), log-sum-exp (T x heads); the MLP's gate, SiLU, up and product (4 x T x I).
    per_block = 4 * T * (8 * H + 4 * I + 2 + 2 * KVD + HEADS)
    rope = 2 * S * HD * 4  # cos and sin, first saved in block 0
    embeddings = T * 8  # the token ids, for the embedding's gradient
    after = (
        4 * (3 * T * H + T) + T * 8 + 4
    )  # final norm (input, normalised, 1/rms), the loss' targets and weight
    assert est.activations == embeddings + LAYERS * per_block + rope + after
    assert est.activations_per_block == per_block + rope
    # training computes the loss a chunk of tokens at a time (adaptkit.kernels.lm_loss; all T tokens fit one
    # chunk here): nothing logits-sized is kept, a chunk's logits and their gradient are the term
    assert est.logits == 2 * 4 * T * V
    assert est.largest_block == 4 * V * H  # the embedding's (and the head's) gradient, made afresh each step
    assert est.lora_dropout == est.checkpoint_pages == est.overhead == 0
    # the peak: the backward pass reaches block 0 with every gradient above it allocated
    grads_above = 4 * (H + V * H)
    live = embeddings + LAYERS * per_block + rope + after  # after the forward
    live += grads_above - after  # loss and head done
    live += 4 * BLOCK_PARAMS - per_block  # block 1 done
    block0 = (
        live + (per_block + rope) + 4 * BLOCK_PARAMS
    )  # a transient as large as its saved tensors, its gradients
    assert est.peak_phase == "backward: block 0"
    assert est.total == 4 * PARAMS + 8 * PARAMS + block0
    assert est.dominant == "optimizer_states"


def test_lora_terms_by_hand(llama_dir, host, estimator):
    r = 4
    est = estimator.estimate(make_recipe(llama_dir, [{"name": "lora", "r": r, "dropout": 0.1}], host))
    lora_params = LAYERS * r * ((H + H) * 2 + (H + KVD) * 2 + (H + I) * 2 + (I + H))
    assert est.trainable_parameters == lora_params == 8192
    assert est.frozen_weights == est.frozen_by_dtype["float32"] == 4 * PARAMS
    assert est.trainable_weights == est.gradients == 4 * lora_params
    assert est.largest_block == 4 * T * V  # the logits
    # each of the 7 adapted layers has its own dropout: its mask and its output (float32 on a CPU)
    assert est.lora_dropout == LAYERS * 4 * T * (2 * 6 * H + 2 * I)
    # frozen linear layers keep no input; norms keep input and 1/rms; each lora_B keeps lora_A's output
    per_block = 4 * T * (2 * H + 2 + 7 * r + 2 * H + 2 * KVD + HEADS + 3 * I)
    after = 4 * (T * H + T) + T * 8 + 4
    assert est.activations == LAYERS * per_block + 2 * S * HD * 4 + after


def test_gradient_checkpointing_keeps_block_inputs_and_one_block(llama_dir, host, estimator):
    plain = estimator.estimate(make_recipe(llama_dir, ["full"], host))
    ckpt = estimator.estimate(
        apply_on(make_recipe(llama_dir, ["full"], host), ["model.gradient_checkpointing=true"], host)
    )
    per_block = 4 * T * (8 * H + 4 * I + 2 + 2 * KVD + HEADS)
    after, embeddings, rope = 4 * (3 * T * H + T) + T * 8 + 4, T * 8, 2 * S * HD * 4
    assert ckpt.activations == embeddings + after + LAYERS * 4 * T * H + per_block + rope
    assert ckpt.activations < plain.activations
    # recomputing the forward of every block costs one more forward pass of the blocks
    assert ckpt.flops_per_step > plain.flops_per_step


def test_flops_and_time_per_step(llama_dir, host):
    est = Estimator(host, device="cpu", overhead_bytes=0, peak_tflops=2.0).estimate(
        make_recipe(llama_dir, ["full"], host, gradient_accumulation=3)
    )
    matmul = LAYERS * (BLOCK_PARAMS - 2 * H) + V * H  # every linear layer, the head included
    attention = LAYERS * 4 * B * HEADS * S * S * HD // 2  # QK and AV, causal
    forward = 2 * T * matmul + attention
    assert est.flops_per_step == 3 * (
        forward + 2 * forward
    )  # full training: 6N per token, three micro-batches
    assert est.time_per_step_s == pytest.approx(est.flops_per_step / 2e12)
    frozen = Estimator(host, device="cpu", overhead_bytes=0, peak_tflops=0).estimate(
        make_recipe(llama_dir, [{"name": "freeze", "train_head": False, "trainable_top_blocks": 1}], host)
    )
    assert frozen.flops_per_step < est.flops_per_step / 3  # the bottom block needs no backward at all


def test_frozen_bottom_blocks_build_no_graph(llama_dir, host, estimator):
    """Below the lowest trainable parameter nothing is saved for a backward pass (freeze, early gradual unfreezing)."""
    top = estimator.estimate(
        make_recipe(llama_dir, [{"name": "freeze", "train_head": False, "trainable_top_blocks": 1}], host)
    )
    assert top.activations_by_block[0] == 0 and top.activations_by_block[1] > 0
    # one epoch of unfreezing a block per epoch: only the head group ever trains
    head = estimator.estimate(make_recipe(llama_dir, [{"name": "gradual_unfreeze"}], host, epochs=1))
    assert head.activations_by_block == [0, 0] and head.trainable_parameters == H + V * H
    # with max_steps the number of epochs depends on the data: the estimate takes the last stage, all blocks
    worst = estimator.estimate(make_recipe(llama_dir, [{"name": "gradual_unfreeze"}], host, max_steps=5))
    assert worst.trainable_parameters == PARAMS


@pytest.mark.parametrize("optimizer, per_value", [("adamw", 8), ("paged_adamw", 8), ("sgd", 4)])
def test_optimizer_states(llama_dir, host, estimator, optimizer, per_value):
    est = estimator.estimate(make_recipe(llama_dir, ["full"], host, optimizer=optimizer))
    assert est.optimizer_states == per_value * PARAMS


def test_8bit_optimizer_states(llama_dir, host, estimator):
    est = estimator.estimate(make_recipe(llama_dir, ["full"], host, optimizer="adamw_8bit"))
    # tensors under 4096 values keep 32-bit states (bitsandbytes' min_8bit_size); the others two bytes
    # per value plus a float32 scale per 256-value block of each of the two states
    sizes = [V * H] + LAYERS * [H * H, H * KVD, H * KVD, H * H, H * I, H * I, I * H, H, H] + [H, V * H]
    expected = sum(8 * n if n < 4096 else 2 * n + 2 * 4 * -(-n // 256) for n in sizes)
    assert est.optimizer_states == expected


def test_packed_sizes_match_bitsandbytes(tmp_path, host, estimator):
    """NF4 with and without double quantization and int8: the estimate equals what bitsandbytes allocates."""
    import adaptkit
    from adaptkit.testing import tiny_config, tiny_model

    tiny_config("llama").save_pretrained(tmp_path / "m")
    for quantize, double, kind in (("4bit", True, "nf4+dq"), ("4bit", False, "nf4"), ("8bit", True, "int8")):
        lora = {"name": "lora", "quantize": quantize, "double_quant": double}
        est = estimator.estimate(make_recipe(tmp_path / "m", [lora], host))
        adapted = adaptkit.apply(tiny_model("llama", "causal_lm"), [lora], host=host)
        real = sum(
            _packed_bytes(m.weight)
            for m in adapted.model.modules()
            if type(m).__module__.startswith("bitsandbytes")
        )
        assert est.frozen_by_dtype[kind] == real
        # embeddings, norms and the head keep their float32
        unquantized = sum(
            p.numel()
            for n, p in adapted.model.named_parameters()
            if p.dtype == __import__("torch").float32 and not p.requires_grad
        )
        assert est.frozen_by_dtype["float32"] == 4 * unquantized


def _packed_bytes(weight) -> int:
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    if type(weight).__name__ == "Int8Params":
        return size(weight) + size(weight.SCB)
    qs = weight.quant_state
    total = size(weight) + size(qs.absmax) + size(qs.code)
    if qs.nested:
        total += size(qs.state2.absmax) + size(qs.state2.code) + size(qs.offset)
    return total


def test_meta_pass_saves_what_a_real_cpu_pass_saves(tmp_path, host, estimator):
    """The fused-attention emulation and LoRA on meta tensors keep exactly what a real forward keeps."""
    import torch

    import adaptkit
    from adaptkit.testing import tiny_config, tiny_model

    tiny_config("llama").save_pretrained(tmp_path / "m")
    lora = [{"name": "lora", "r": 4, "dropout": 0.1}]
    est = estimator.estimate(make_recipe(tmp_path / "m", lora, host, max_length=12))
    model = adaptkit.apply(tiny_model("llama", "causal_lm"), lora, host=host).model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    ids = torch.randint(1, 128, (B, 12))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    # the model's own loss also keeps its log-probabilities (logits-sized); training's chunked loss does not
    # (tests/test_lm_loss.py), and the estimate leaves them out
    assert sum(saved.values()) == est.activations + est.lora_dropout + out.logits.numel() * 4


def test_gradual_unfreeze_is_estimated_at_its_last_stage(llama_dir, host, estimator):
    schedule = {"name": "gradual_unfreeze", "unit": "step", "every": 1}
    one = estimator.estimate(make_recipe(llama_dir, [schedule], host, max_steps=1))
    two = estimator.estimate(make_recipe(llama_dir, [schedule], host, max_steps=2))
    assert one.trainable_parameters == H + V * H  # the head group: final norm and lm_head
    assert two.trainable_parameters == H + V * H + BLOCK_PARAMS  # and the top block by the last step


def test_cpu_overhead_and_checkpoint_pages(tmp_path, host):
    from adaptkit.testing import tiny_config

    tiny_config("llama", dtype="float32").save_pretrained(tmp_path / "m")  # stored as the recipe loads it
    recipe = make_recipe(tmp_path / "m", [{"name": "lora", "quantize": "4bit", "dropout": 0.05}], host)
    cpu = Estimator(host, device="cpu", overhead_bytes=123, peak_tflops=0).estimate(recipe)
    assert cpu.overhead == 123
    # the float32 checkpoint's pages of the 21 quantized layers stay mapped on a CPU
    assert cpu.checkpoint_pages == 4 * 3 * (4 * 32 * 32 + 3 * 32 * 64)
    cuda = Estimator(host, device="cuda", overhead_bytes=0, peak_tflops=0).estimate(recipe)
    assert cuda.checkpoint_pages == 0
    # each of the 21 dropouts keeps its output and its mask: float32 values on a CPU, bool on CUDA
    inputs = 3 * (6 * 32 + 64)  # T x (input width) summed over a block's adapted layers, per token
    assert cpu.lora_dropout == 2 * 4 * 2 * S * inputs
    assert cuda.lora_dropout == (4 + 1) * 2 * S * inputs
    assert cuda.total < cpu.total - 123 - cpu.checkpoint_pages


def test_a_cpu_estimate_bounds_what_a_heap_that_keeps_freed_memory_holds(llama_dir, host):
    """On a CPU the estimate is the live peak, and ``resident_with_reuse`` the most a process may
    hold when glibc keeps freed memory (``HEAP_SLACK`` times it), shown on its own line; a GPU's
    caching allocator is what its estimate already describes."""
    from adaptkit.estimate.machine import HEAP_SLACK
    from adaptkit.estimate.render import render

    recipe = make_recipe(llama_dir, [{"name": "lora"}], host)
    cpu = Estimator(host, device="cpu", overhead_bytes=0, peak_tflops=0).estimate(recipe)
    cuda = Estimator(host, device="cuda", overhead_bytes=0, peak_tflops=0).estimate(recipe)
    assert cpu.resident_with_reuse == int(cpu.total * HEAP_SLACK) > cpu.total
    assert cuda.resident_with_reuse == cuda.total
    assert "kept for reuse" in render(cpu, None, []) and "kept for reuse" not in render(cuda, None, [])


def test_freed_memory_is_kept_only_where_the_heap_bound_fits():
    """Training keeps freed memory for reuse only when ``HEAP_SLACK`` times the live peak fits the
    budget, and only where a step's blocks are large enough for glibc to unmap them otherwise."""
    from adaptkit.estimate.machine import HEAP_SLACK
    from adaptkit.train.allocator import GLIBC_MMAP_THRESHOLD_MAX, choose_policy

    live, large, small = 1000 * 2**20, GLIBC_MMAP_THRESHOLD_MAX + 1, GLIBC_MMAP_THRESHOLD_MAX
    bound = int(live * HEAP_SLACK)
    assert choose_policy(live, large, bound) == "keep"
    assert choose_policy(live, small, bound) is None  # glibc's default keeps them already
    assert choose_policy(live, large, bound - 1) == choose_policy(live, small, bound - 1) == "release"
    assert choose_policy(live, large, int(live * 1.5)) == "release"  # a step may hold more than 1.5x


# -- making it fit -------------------------------------------------------------------------------


def apply_on(recipe, overrides, host):
    return validate(apply_overrides(recipe.model_dump(mode="json"), overrides), host=host)


def test_suggestions_in_order_each_lower(llama_dir, host, estimator):
    stack = [{"name": "freeze", "train_head": False, "trainable_top_blocks": 1}, {"name": "lora", "r": 4}]
    recipe = make_recipe(llama_dir, stack, host, max_length=32, micro_batch_size=8, gradient_accumulation=2)
    suggestions = suggest(estimator, recipe, budget=1)  # nothing fits: every change is listed
    changes = [s.overrides for s in suggestions]
    assert changes == [
        ["model.gradient_checkpointing=true"],
        ["train.micro_batch_size=1", "train.gradient_accumulation=16"],
        ["train.optimizer=adamw_8bit"],
        ["strategies.1.quantize=4bit"],
        ["data.max_length=8"],
    ]  # 32 halved until the shortest tried
    totals = [estimator.estimate(recipe).total] + [s.estimate.total for s in suggestions]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    assert not any(s.fits for s in suggestions)
    # each estimate is that of the recipe with this change and the earlier ones applied
    cumulative = recipe
    for s in suggestions:
        cumulative = apply_on(cumulative, s.overrides, host)
        assert estimator.estimate(cumulative).total == s.estimate.total


def test_a_change_that_saves_nothing_is_left_out(llama_dir, host, estimator):
    # LoRA's tensors are all under bitsandbytes' 4096-value threshold: 8-bit AdamW keeps them in 32 bits
    recipe = make_recipe(llama_dir, [{"name": "lora", "r": 4}], host)
    changes = [s.overrides[0] for s in suggest(estimator, recipe, budget=1)]
    assert "train.optimizer=adamw_8bit" not in changes and "strategies.0.quantize=4bit" in changes


def test_suggestions_stop_once_it_fits(llama_dir, host, estimator):
    recipe = make_recipe(llama_dir, ["full"], host, micro_batch_size=8)
    with_checkpointing = estimator.estimate(
        apply_on(recipe, ["model.gradient_checkpointing=true"], host)
    ).total
    suggestions = suggest(estimator, recipe, budget=with_checkpointing)
    assert [s.overrides for s in suggestions] == [["model.gradient_checkpointing=true"]]
    assert suggestions[0].fits
    assert suggest(estimator, recipe, budget=10**12) == []


def test_smaller_micro_batch_keeps_the_effective_batch(llama_dir, host, estimator):
    recipe = make_recipe(
        llama_dir, ["full"], host, micro_batch_size=12, gradient_accumulation=2, max_length=32
    )
    recipe = apply_on(recipe, ["model.gradient_checkpointing=true"], host)
    sizes = {
        m: estimator.estimate(
            apply_on(recipe, [f"train.micro_batch_size={m}", f"train.gradient_accumulation={24 // m}"], host)
        ).total
        for m in (12, 8, 6, 4)
    }
    budget = (sizes[6] + sizes[8]) // 2  # 6 fits, 8 does not
    suggestions = suggest(estimator, recipe, budget)
    assert suggestions[0].overrides == ["train.micro_batch_size=6", "train.gradient_accumulation=4"]
    assert suggestions[0].fits and suggestions[0].estimate.total == sizes[6]


def test_parse_memory():
    assert parse_memory("24GB") == 24 * 10**9
    assert parse_memory("512MB") == 512 * 10**6
    assert parse_memory("1.5GiB") == 3 * 2**29
    assert parse_memory("24gb") == 24 * 10**9  # bytes, never gigabits
    assert parse_memory(" 8 GiB ") == 8 * 2**30
    for bad in ("24", "abc", "-1GB", "0GB", "24 GBs", "GB"):
        with pytest.raises(ConfigError, match="--device-memory: .* is not a memory size"):
            parse_memory(bad)


def test_divisors():
    assert divisors(12) == [12, 6, 4, 3, 2, 1]
    assert divisors(1) == [1]


# -- the command line ---------------------------------------------------------------------------


def write_recipe(
    path: Path, source, strategies: str, train: str = "micro_batch_size: 2", data_source="d.jsonl"
) -> Path:
    path.write_text(
        f"model: {{source: {source}, task: causal_lm}}\n"
        f"data: {{source: {data_source}, max_length: {S}}}\n"
        f"strategies: {strategies}\n"
        f"train: {{{train}}}\n"
        f"output: {path.parent / 'runs'}/{{name}}\n"
    )
    return path


def test_cli_table_and_suggestions(tmp_path, llama_dir, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", llama_dir, "[{name: lora, r: 4}]")
    assert main(["estimate", str(recipe), "--device-memory", "1KB", "--peak-tflops", "1"]) == 0
    out = capsys.readouterr().out
    for row in (
        "frozen weights",
        "trainable weights",
        "gradients",
        "optimizer states",
        "activations",
        "lora dropout",
        "logits",
        "overhead",
        "peak",
    ):
        assert f"\n  {row} " in out
    assert "-> does NOT fit" in out and "dominant term: overhead" in out
    assert "time per optimizer step" in out
    assert "model.gradient_checkpointing=true" in out and "strategies.0.quantize=4bit" in out


def test_a_model_with_a_pad_token_is_estimated_not_a_traceback(tmp_path, capsys):
    """Fed no attention mask, transformers looks for the pad token in the ids, which a meta tensor
    cannot answer; the estimate's batches carry a mask, as training's do."""
    from adaptkit.testing import save_tiny_pretrained

    save_tiny_pretrained(tmp_path / "gpt2", "gpt2", "causal_lm")  # pad_token_id 0
    for task in ("causal_lm", "classification"):
        recipe = write_recipe(tmp_path / f"{task}.yaml", tmp_path / "gpt2", "[full]").read_text()
        (tmp_path / f"{task}.yaml").write_text(recipe.replace("task: causal_lm", f"task: {task}"))
        assert main(["estimate", str(tmp_path / f"{task}.yaml")]) == 0, capsys.readouterr().err
        assert "dominant term" in capsys.readouterr().out


def test_cli_json_matches_the_estimator(tmp_path, llama_dir, host, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", llama_dir, "[full]")
    assert (
        main(
            [
                "estimate",
                str(recipe),
                "train.micro_batch_size=4",
                "--device-memory",
                "1TB",
                "--json",
                "--peak-tflops",
                "0",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    est = report["estimate"]
    assert report["fits"] and report["suggestions"] == [] and report["device_memory"] == 10**12
    direct = Estimator(host, device="cpu", overhead_bytes=est["overhead"], peak_tflops=0).estimate(
        make_recipe(llama_dir, ["full"], host, micro_batch_size=4)
    )
    assert est["total"] == direct.total and est["micro_batch_size"] == 4
    assert est["overhead"] > 100 * 2**20  # a process that imported torch and transformers


def test_cli_resolves_auto_against_the_device_memory(tmp_path, llama_dir, host, capsys):
    recipe = write_recipe(
        tmp_path / "r.yaml", llama_dir, "[full]", "micro_batch_size: auto, effective_batch_size: 8"
    )
    assert main(["estimate", str(recipe), "--device-memory", "1TB", "--peak-tflops", "0"]) == 0
    assert (
        "micro-batch 8 (auto: the largest that fits) x 16 tokens, accumulation 1" in capsys.readouterr().out
    )
    estimator = Estimator(host, device="cpu", overhead_bytes=None, peak_tflops=0)
    two = estimator.estimate(
        make_recipe(llama_dir, ["full"], host, micro_batch_size=2, gradient_accumulation=4)
    ).total
    four = estimator.estimate(
        make_recipe(llama_dir, ["full"], host, micro_batch_size=4, gradient_accumulation=2)
    ).total
    assert (
        main(
            ["estimate", str(recipe), f"--device-memory={(two + four) // 2}B", "--json", "--peak-tflops", "0"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["micro_batch_size_auto"] and report["fits"]
    assert (report["estimate"]["micro_batch_size"], report["estimate"]["gradient_accumulation"]) == (2, 4)


@pytest.mark.parametrize("size", ["lots", "24", "-3GB"])
def test_cli_bad_memory_exits_2(tmp_path, llama_dir, capsys, size):
    recipe = write_recipe(tmp_path / "r.yaml", llama_dir, "[full]")
    assert main(["estimate", str(recipe), f"--device-memory={size}"]) == 2
    err = capsys.readouterr().err
    assert f"--device-memory: '{size}' is not a memory size" in err and "Traceback" not in err


def test_cli_unreadable_model(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "nowhere", "[full]")
    assert main(["estimate", str(recipe), "--device-memory", "1GB"]) == 2
    assert "model.source: cannot read the config" in capsys.readouterr().err


# -- in training ----------------------------------------------------------------------------------


def write_lm_data(path: Path, n: int = 24) -> Path:
    rng = random.Random(0)
    words = "the a movie film good bad one two three".split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {"prompt": f"question {i}", "response": " ".join(rng.choice(words) for _ in range(12))}
                )
                + "\n"
            )
    return path


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from adaptkit.testing import save_tiny_pretrained

    d = tmp_path_factory.mktemp("lm")
    save_tiny_pretrained(d / "llama", "llama", task="causal_lm", chat=True)
    write_lm_data(d / "train.jsonl")
    return d


def lm_recipe(lm_dir: Path, name: str, train: str, host):
    from adaptkit.recipe.schema import load_recipe

    path = write_recipe(
        lm_dir / f"{name}.yaml", lm_dir / "llama", "[full]", train, data_source=lm_dir / "train.jsonl"
    )
    return path, load_recipe(path, host=host)


def test_preflight_refuses_a_run_that_will_not_fit(lm_dir, host):
    from adaptkit.train.loop import train

    _, recipe = lm_recipe(
        lm_dir, "tiny-limit", "micro_batch_size: 4, max_steps: 1, memory_limit_mb: 0.01", host
    )
    with pytest.raises(DoesNotFitError) as info:
        train(recipe, host)
    message = str(info.value)
    assert "this run needs about" in message
    assert "model.gradient_checkpointing=true" in message and "train.optimizer=adamw_8bit" in message
    assert "train.preflight: false" in message  # how to try anyway
    assert not recipe.run_dir.exists()  # stopped before loading anything or writing the run directory
    _, off = lm_recipe(
        lm_dir, "tiny-off", "micro_batch_size: 4, max_steps: 1, memory_limit_mb: 0.01, preflight: false", host
    )
    summary = train(off, host)
    assert summary["steps"] == 1 and summary["memory_plan"]["preflight"] is False


def test_preflight_refusal_from_the_cli(lm_dir, capsys):
    path, _ = lm_recipe(lm_dir, "cli-limit", "micro_batch_size: 4, max_steps: 1", None)
    assert main(["train", str(path), "train.memory_limit_mb=0.01"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adaptkit: error: this run needs about") and "Traceback" not in err


def test_auto_micro_batch_picks_the_largest_that_fits_and_resume_keeps_it(lm_dir, host, estimator):
    from adaptkit.train.loop import train
    from adaptkit.train.memory import BATCH_FILE

    def total(micro):
        _, r = lm_recipe(
            lm_dir, "probe", f"micro_batch_size: {micro}, gradient_accumulation: {8 // micro}", host
        )
        return estimator.estimate(r).total

    totals = {m: total(m) for m in (8, 4, 2, 1)}
    assert totals[8] > totals[4] > totals[2] > totals[1]
    limit = (totals[2] + totals[4]) / 2 / 2**20  # 2 fits, 4 does not
    train_spec = f"micro_batch_size: auto, effective_batch_size: 8, max_steps: 2, save_every: 1, memory_limit_mb: {limit}"
    _, recipe = lm_recipe(lm_dir, "auto", train_spec, host)
    summary = train(recipe, host, fresh=True)
    assert (summary["micro_batch_size"], summary["gradient_accumulation"]) == (
        2,
        4,
    )  # 8 examples per step kept
    assert summary["memory_plan"]["allocator"] == "release"  # tight: freed memory is returned at once
    from adaptkit.runs import open_run

    assert open_run(recipe.run_dir, host).batch_size == 2  # adaptkit eval uses the micro-batch that fitted
    saved = json.loads((recipe.run_dir / BATCH_FILE).read_text())
    assert (saved["micro_batch_size"], saved["gradient_accumulation"], saved["effective_batch_size"]) == (
        2,
        4,
        8,
    )
    state = json.loads((recipe.run_dir / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["samples"] == 2 * 8  # Accelerate accumulated 4 micro-batches of 2 per step
    # resumed with room for everything, it keeps the batch it started with
    _, more = lm_recipe(
        lm_dir,
        "auto",
        train_spec.replace("max_steps: 2", "max_steps: 3").replace(
            f"memory_limit_mb: {limit}", "memory_limit_mb: 100000"
        ),
        host,
    )
    resumed = train(more, host)
    assert resumed["steps"] == 3 and (resumed["micro_batch_size"], resumed["gradient_accumulation"]) == (2, 4)
    assert (
        "allocator" not in resumed["memory_plan"]
    )  # room enough, and no block a step makes exceeds 32 MiB: glibc's default
    # a fresh run searches again
    fresh = train(more, host, fresh=True)
    assert (fresh["micro_batch_size"], fresh["gradient_accumulation"]) == (8, 1)


def test_qlora_end_to_end(lm_dir, host):
    """4-bit base, LoRA on every linear layer of the blocks, gradient checkpointing, paged 8-bit AdamW."""
    from adaptkit.files import load_tensors
    from adaptkit.recipe.schema import load_recipe
    from adaptkit.train.loop import train

    path = write_recipe(
        lm_dir / "qlora.yaml",
        lm_dir / "llama",
        "[{name: lora, r: 4, quantize: 4bit}]",
        "micro_batch_size: 4, max_steps: 2, optimizer: paged_adamw_8bit, lr: 0.01",
        data_source=lm_dir / "train.jsonl",
    )
    recipe = load_recipe(path, ["model.gradient_checkpointing=true"], host=host)
    est = Estimator(host, device="cpu", overhead_bytes=0, peak_tflops=0).estimate(recipe)
    assert set(est.frozen_by_dtype) == {"float32", "nf4+dq"} and est.gradient_checkpointing
    summary = train(recipe, host, fresh=True)
    assert summary["steps"] == 2 and summary["memory_plan"]["estimate_mb"] == pytest.approx(est.total / 2**20)
    adapter = load_tensors(recipe.run_dir / "final" / "lora" / "adapter_model.safetensors")
    b = [t for k, t in adapter.items() if "lora_B" in k]
    assert len(b) == 3 * 7 and all(
        t.abs().sum() > 0 for t in b
    )  # every adapted layer trained (B starts at zero)


def test_auto_micro_batch_that_never_fits(lm_dir, host):
    from adaptkit.train.loop import train

    _, recipe = lm_recipe(
        lm_dir, "auto-none", "micro_batch_size: auto, max_steps: 1, memory_limit_mb: 0.01", host
    )
    with pytest.raises(DoesNotFitError, match="not even a micro-batch of 1 fits"):
        train(recipe, host)


def test_effective_batch_size_needs_auto(llama_dir, host):
    with pytest.raises(ConfigError, match="effective_batch_size is for micro_batch_size: auto"):
        make_recipe(llama_dir, ["full"], host, effective_batch_size=16)


ALLOCATOR_CHILD = """
import resource, sys, torch
from adaptkit.train.allocator import set_cpu_allocator
policy, sizes = sys.argv[1], [int(mib) for mib in sys.argv[2:]]
print(set_cpu_allocator(policy) if policy != "glibc" else False)
def faults_to_fill(mib):  # page faults while a new tensor of this size is written (and then freed)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(mib * 2**18)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for mib in sizes[:-1]:
    faults_to_fill(mib)
print(faults_to_fill(sizes[-1]))  # fresh pages, or memory an earlier tensor left behind
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize(
    "policy, sizes, user_setting, fresh_pages",
    [
        # glibc unmaps a freed block over 32 MiB: the next step's faults its pages in again; keep reuses them
        ("glibc", (100, 80), None, True),
        ("keep", (100, 80), None, False),
        # blocks of a few MiB glibc sometimes keeps in the heap (which fill reuses memory varies from
        # run to run, so it is no control here); release gives every one its own mapping, every time
        ("release", (2, 2, 2, 2, 2), None, True),
        (
            "keep",
            (100, 80),
            "131072",
            True,
        ),  # MALLOC_MMAP_THRESHOLD_ in the environment wins: adaptkit changes nothing
    ],
)
def test_cpu_allocator_policy(policy, sizes, user_setting, fresh_pages):
    """What each policy does to the page faults of a step's tensors, against glibc's default."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    if user_setting:
        env["MALLOC_MMAP_THRESHOLD_"] = user_setting
    res = subprocess.run(
        [sys.executable, "-c", ALLOCATOR_CHILD, policy, *map(str, sizes)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    changed, faults = res.stdout.split()
    assert changed == str(policy != "glibc" and user_setting is None)
    pages = sizes[-1] * 2**20 // resource.getpagesize()
    assert int(faults) >= pages if fresh_pages else int(faults) < pages // 10


def test_an_allocator_tuned_in_glibc_tunables_is_left_alone(monkeypatch):
    from adaptkit.train.allocator import allocator_set_by_user

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")  # containers set this: not malloc's
    assert not allocator_set_by_user()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0:glibc.malloc.hugetlb=1")
    assert allocator_set_by_user()


def test_strategy_error_on_meta_is_the_users_error(tmp_path, host, estimator):
    from adaptkit.testing import tiny_config

    cfg = tiny_config("llama", tie_word_embeddings=True)
    cfg.save_pretrained(tmp_path / "m")
    with pytest.raises(AdaptkitError, match="tied_head"):
        estimator.estimate(make_recipe(tmp_path / "m", ["freeze"], host))


def test_meta_pass_saves_what_a_real_cpu_pass_with_attention_dropout_saves(tmp_path, host, estimator):
    """BERT's attention dropout on a CPU runs adaptkit's own attention (adaptkit/attention.py): the
    estimate keeps what it keeps (a boolean mask, no attention-sized floats), as the real pass does."""
    import torch

    import adaptkit
    from adaptkit.kernels.attention import use_cpu_dropout_attention
    from adaptkit.testing import tiny_config, tiny_model

    config = tiny_config("bert", num_labels=2)
    assert config.attention_probs_dropout_prob > 0
    config.save_pretrained(tmp_path / "m")
    est = estimator.estimate(make_recipe(tmp_path / "m", ["full"], host, task="classification"))
    model = tiny_model("bert", "classification", num_labels=2)
    assert use_cpu_dropout_attention(model)
    model = adaptkit.apply(model, ["full"], host=host).model.train()
    weights = {
        t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())
    }  # position ids too
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(1, 128, (B, S)), labels=torch.zeros(B, dtype=torch.long))
    assert sum(saved.values()) == est.activations
    # each of the 3 layers keeps its dropout mask as booleans: batch x heads x sequence x sequence bytes
    assert sum(n for n in saved.values() if n == B * 2 * S * S) >= 3 * B * 2 * S * S


def test_a_strategy_error_stops_a_run_once_before_any_weight_loads(tmp_path, capsys):
    """A strategy refusing the recipe is said once, by the pre-flight check, with exit 2: not once
    as a skipped estimate and again when the strategy applies to the loaded model."""
    from adaptkit.testing import save_tiny_pretrained

    save_tiny_pretrained(tmp_path / "tied", "llama", task="causal_lm", tie_word_embeddings=True)
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"text": f"row {i} " * 8}) + "\n")
    recipe = write_recipe(
        tmp_path / "r.yaml", tmp_path / "tied", "[freeze]", "max_steps: 1", data_source=tmp_path / "d.jsonl"
    )
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("tied_head") == 1 and "memory estimate skipped" not in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "r" / "summary.json").exists()


def test_lisa_optimizer_states_cover_the_drawn_blocks_only(llama_dir, host, estimator):
    """LISA drops the optimizer state of the blocks it draws out, so the estimate counts the state
    of what trains at the last step: everything outside the blocks and one drawn block."""
    est = estimator.estimate(make_recipe(llama_dir, [{"name": "lisa", "active_layers": 1}], host))
    outside = PARAMS - LAYERS * BLOCK_PARAMS
    assert est.optimizer_states == 8 * (outside + BLOCK_PARAMS)
    assert est.trainable_parameters == outside + BLOCK_PARAMS


def test_a_base_rewriting_lora_init_counts_the_copy_it_keeps(llama_dir, host, estimator):
    """PiSSA keeps the adapter as initialised (its export subtracts it): one more float32 copy."""
    plain = estimator.estimate(make_recipe(llama_dir, [{"name": "lora", "r": 4}], host))
    pissa = estimator.estimate(make_recipe(llama_dir, [{"name": "lora", "r": 4, "init": "pissa"}], host))
    assert plain.trainable_parameters == pissa.trainable_parameters == 8192  # the adapters only
    assert pissa.trainable_weights == 2 * plain.trainable_weights == 2 * 4 * 8192


def test_loftq_is_estimated_as_the_qlora_it_trains_as(llama_dir, host, estimator):
    """LoftQ changes the 4-bit base's values and the adapter's, not their shapes, and keeps
    nothing once fitted: the estimate (on the meta device, where nothing is fitted) is QLoRA's."""
    qlora = {"name": "lora", "r": 4, "quantize": "4bit"}
    plain = estimator.estimate(make_recipe(llama_dir, [qlora], host))
    loftq = estimator.estimate(make_recipe(llama_dir, [qlora | {"init": "loftq"}], host))
    assert loftq.total == plain.total and loftq.trainable_parameters == plain.trainable_parameters


# -- audio classifiers ----------------------------------------------------------------------------


@pytest.mark.parametrize("family, seconds", [("whisper", 1.0), ("wav2vec2", 0.5), ("hubert", 0.5)])
def test_meta_pass_saves_what_a_real_cpu_pass_saves_for_audio_classifiers(
    tmp_path, host, estimator, family, seconds
):
    """An audio classifier trained in full on ``data.max_seconds`` clips (Whisper's encoder cut to
    them, as the task prepares it): the estimate keeps what a real forward keeps. Wav2Vec2 and
    HuBERT skip layers at random in training (LayerDrop); the estimate is of a step that skips none,
    whatever the random state."""
    import torch

    import adaptkit
    from adaptkit.kernels.attention import use_cpu_dropout_attention
    from adaptkit.recipe.schema import DataSpec
    from adaptkit.testing import tiny_config, tiny_model

    config = tiny_config(family)
    config.num_labels = 2
    config.save_pretrained(tmp_path / "m")
    raw = {
        "model": {"source": str(tmp_path / "m"), "task": "audio_classification"},
        "data": {"source": "unused.jsonl", "max_seconds": seconds},
        "strategies": ["full"],
        "train": {"micro_batch_size": B},
    }
    torch.manual_seed(47)  # a random state in which LayerDrop's draws would skip both layers
    before = torch.get_rng_state()
    est = estimator.estimate(validate(raw, host=host))
    assert torch.equal(torch.get_rng_state(), before)  # a run draws the same, estimated first or not
    assert est.inputs == f"{seconds:g} s of audio"

    model = tiny_model(family, num_labels=2)
    model.config.layerdrop = 0.0  # the step the estimate is of: one that skips no layer
    use_cpu_dropout_attention(model)  # as the loader does: wav2vec2 and HuBERT drop attention out
    host.lookup("tasks", "audio_classification").obj(DataSpec(source="x", max_seconds=seconds)).prepare_model(
        model, None
    )
    model = adaptkit.apply(model, ["full"], host=host).model.train()
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    if family == "whisper":
        assert model.config.max_source_positions == 50  # one second: 50 encoder positions
        inputs = {"input_features": torch.randn(B, config.num_mel_bins, 100)}
    else:
        inputs = {"input_values": torch.randn(B, round(seconds * 16000))}
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs, labels=torch.zeros(B, dtype=torch.long))
    assert sum(saved.values()) == est.activations


def test_a_waveform_model_without_max_seconds_is_not_estimated_saying_why(tmp_path, capsys):
    from adaptkit.cli import main
    from adaptkit.testing import tiny_config

    tiny_config("wav2vec2").save_pretrained(tmp_path / "m")
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: {{source: {tmp_path / 'm'}, task: audio_classification}}\n"
        "data: {source: unused.jsonl}\nstrategies: [full]\n"
    )
    assert main(["estimate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.max_seconds" in err and "Traceback" not in err, err
