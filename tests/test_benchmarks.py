"""The benchmark harness keeps working: both loops train the same model the same way and report.

The benchmarks are not timed here (figures live in benchmarks/README.md); this runs the GPU
script's QLoRA case (4-bit base, gradient checkpointing, bf16 autocast) on the CPU with a tiny
model, which goes through every part of the harness the CPU benchmarks use and the GPU ones add.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from adaptkit.testing import save_tiny_pretrained

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_runs_both_loops_on_a_weightless_model_directory(tmp_path):
    model = tmp_path / "tiny-llama"
    save_tiny_pretrained(model, "llama", task="causal_lm")
    for weights in model.glob("*.safetensors"):
        weights.unlink()  # a config and a tokenizer only: the script makes seeded random weights
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu.py"),
            "--model",
            str(model),
            "--cases",
            "gpu-qlora",
            "--batch",
            "2",
            "--seq",
            "16",
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = res.stdout
    assert "random weights" in out
    rows = dict(re.findall(r"^  (adaptkit|baseline) .*trainable ([\d,]+)", out, re.M))
    # the same LoRA (r=8 on the same seven projections) in both loops
    assert rows.keys() == {"adaptkit", "baseline"} and rows["adaptkit"] == rows["baseline"] != "0", out
    ratios = re.search(r"adaptkit/baseline: throughput (\d+\.\d+), peak memory (\d+\.\d+)", out)
    assert ratios and all(float(x) > 0 for x in ratios.groups()), out


@pytest.mark.slow
def test_estimate_accuracy_benchmark_measures_a_model_directory(tmp_path):
    """benchmarks/estimate_accuracy.py on a tiny model directory (``--model``): every run trains,
    is measured, and the full fine-tune's trainable count is the model's own."""
    import json

    from transformers import AutoModelForCausalLM

    model = tmp_path / "tiny-llama"
    save_tiny_pretrained(model, "llama", task="causal_lm", chat=True)
    out = tmp_path / "results.json"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "estimate_accuracy.py"),
            "--model",
            str(model),
            "--only",
            "full,lora",
            "--steps",
            "1",
            "--batch",
            "2",
            "--seq",
            "48",
            "--target",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["results"]}
    assert rows.keys() == {"full", "lora"}
    assert (
        rows["full"]["trainable_parameters"] == AutoModelForCausalLM.from_pretrained(model).num_parameters()
    )
    assert 0 < rows["lora"]["trainable_parameters"] < rows["full"]["trainable_parameters"]
    for r in rows.values():
        assert r["measured_mib"] > 0 and r["estimate_mib"] > 0 and r["final_train_loss"] > 0
    assert f"{model}, cpu, micro-batch 2 x 48 tokens" in res.stdout
