"""QLoRA: the ``lora`` strategy on a 4-bit or 8-bit quantized base (bitsandbytes), on tiny CPU models.

Kept apart from test_lora.py so that LoRA's tests never skip with these when bitsandbytes is
missing or broken.
"""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from test_lora import (  # noqa: E402
    BLOCKS,
    HEAD,
    R,
    linear_shapes,
    logits,
    quantized_weight_bytes,
    same_backbone_new_head,
    train_steps,
)

import adaptkit  # noqa: E402
from adaptkit import Adapted  # noqa: E402
from adaptkit.testing import tiny_inputs, tiny_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_qlora_4bit(host, tmp_path, family):
    model = tiny_model(family)
    batch = tiny_inputs(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = logits(model, batch)
    fp32_bytes = quantized_weight_bytes(model, family)
    other_dtypes = {
        n: p.dtype
        for n, p in model.named_parameters()
        if not n.startswith(BLOCKS[family]) or "norm" in n or "ln_" in n
    }

    adapted = adaptkit.apply(model, "lora", host=host, r=R, quantize="4bit")
    quantized = [m for m in adapted.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == len(linear_shapes(tiny_model(family), family))
    assert all(m.weight.quant_type == "nf4" and m.weight.dtype == torch.uint8 for m in quantized)
    assert fp32_bytes / quantized_weight_bytes(adapted.model.get_base_model(), family) >= 3.5
    # nothing else was upcast or quantized (embeddings, norms, head keep their dtype)
    now = {
        n.replace("base_model.model.", "").replace(".original_module", ""): p.dtype
        for n, p in adapted.model.named_parameters()
    }
    assert all(now[n] == dtype for n, dtype in other_dtypes.items() if n in now)
    assert all(p.dtype == torch.float32 for p in adapted.trainable_parameters())

    after = logits(adapted.model, batch)
    assert (after - reference).abs().max() <= 0.25 * reference.abs().max()  # 4-bit rounding only

    before = {n: p.detach().clone() for n, p in adapted.model.named_parameters()}
    train_steps(adapted, batch)
    for name, p in adapted.model.named_parameters():
        trains = "lora_" in name or f"{HEAD[family]}.modules_to_save" in name
        assert p.requires_grad == trains, name
        assert torch.equal(p, before[name]) != trains, name

    expected = logits(adapted.model, batch)
    adapted.save(tmp_path / "run")
    files = sorted(p.name for p in (tmp_path / "run" / "lora").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"] or files == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    manifest = json.loads((tmp_path / "run" / "adaptkit.json").read_text())
    assert manifest["strategies"][0]["config"]["quantize"] == "4bit"
    again = Adapted.load(
        same_backbone_new_head(base_state, family), tmp_path / "run", host=host, check_base=False
    )
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in again.model.modules())
    assert torch.equal(logits(again.model, batch), expected)

    # dequantize-then-merge: a plain float32 model with the same outputs
    merged = adapted.merge()
    assert not any(isinstance(m, (bnb.nn.Linear4bit, peft.tuners.lora.LoraLayer)) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert torch.allclose(logits(merged, batch), expected, atol=1e-4, rtol=0)


def test_qlora_4bit_with_bf16_compute_upcasts_nothing(host):
    """A bf16 base stays bf16 outside the quantized layers; only the adapters are fp32."""
    model = tiny_model("llama").to(torch.bfloat16)
    adapted = adaptkit.apply(model, "lora", host=host, r=R, quantize="4bit", compute_dtype="bfloat16")
    frozen = {p.dtype for p in adapted.model.parameters() if not p.requires_grad and p.dtype != torch.uint8}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in adapted.trainable_parameters()} == {torch.float32}
    batch = tiny_inputs(model)
    adapted.model.train()
    # fp32 adapters on a bf16 base train under autocast, as mixed-precision training runs them
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = adapted.model(**batch).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapted.trainable_parameters())


def test_qlora_8bit(host, tmp_path):
    model = tiny_model("llama")
    batch = tiny_inputs(model)
    reference = logits(model, batch)
    fp32_bytes = quantized_weight_bytes(model, "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = adaptkit.apply(model, "lora", host=host, r=R, quantize="8bit")
        assert all(
            m.weight.dtype == torch.int8
            for m in adapted.model.modules()
            if isinstance(m, bnb.nn.Linear8bitLt)
        )
        assert (
            fp32_bytes / quantized_weight_bytes(adapted.model.get_base_model(), "llama") >= 3.0
        )  # int8 + a scale per row
        assert (logits(adapted.model, batch) - reference).abs().max() <= 0.1 * reference.abs().max()
        train_steps(adapted, batch)
        expected = logits(adapted.model, batch)
        adapted.save(tmp_path / "run")
        again = Adapted.load(tiny_model("llama"), tmp_path / "run", host=host)
        assert torch.equal(logits(again.model, batch), expected)
        merged = adapted.merge()
        # 8-bit matmuls run in float16 on the CPU, so the merged float32 model differs a little
        assert torch.allclose(logits(merged, batch), expected, atol=1e-2, rtol=0)
