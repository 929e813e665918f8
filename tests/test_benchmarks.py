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
            "--under",
            "1",
            "--over",
            "100",
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
        assert r["overhead_mib"] > 0 and r["allocator"]  # the process baseline is its own column
    assert f"{model}, cpu, micro-batch 2 x 48 tokens" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "full", "classification"])
def test_both_loops_of_a_benchmark_case_train_the_same_thing(tmp_path, name):
    """adaptkit and the hand-written baseline of loop_overhead.py, on a tiny model of the case's
    family: the same parameters train on the same number of tokens, the first step sees the same
    batch (the same loss), and the second step's loss shows the same optimizer update (lr, decay,
    clipping, schedule)."""
    from dataclasses import replace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import CASES, adaptkit_allocator, measure

    case = CASES[name]
    family, task = ("bert", "classification") if case.task == "classification" else ("llama", "causal_lm")
    # no dropout: its random masks would differ between two processes that load differently
    model = save_tiny_pretrained(
        tmp_path / family, family, task=task, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    ) if family == "bert" else save_tiny_pretrained(tmp_path / family, family, task=task)  # fmt: skip
    tiny = replace(case, model=str(model), seq=16, batch=4, steps=1, warmup=1, lr=1e-2)
    script = ROOT / "benchmarks" / "loop_overhead.py"
    policy = adaptkit_allocator(tiny)  # adaptkit's run checks that it chose this policy itself
    ours, theirs = measure(script, "adaptkit", tiny, policy), measure(script, "baseline", tiny, policy)
    assert ours.allocator == theirs.allocator == policy
    # the same tokens a step: every example is exactly seq tokens long, in both loops' own counts
    assert ours.tokens_trained == theirs.tokens_trained == (tiny.steps + tiny.warmup) * tiny.batch * tiny.seq
    assert (ours.trainable, ours.total) == (theirs.trainable, theirs.total)
    assert 0 < ours.trainable < ours.total or case.strategy == "full"
    assert len(ours.losses) == len(theirs.losses) == 2
    assert ours.losses[0] == pytest.approx(theirs.losses[0], rel=1e-5)
    assert ours.losses[1] == pytest.approx(theirs.losses[1], rel=1e-4)
    assert ours.losses[1] != pytest.approx(ours.losses[0], rel=1e-4)  # the step changed something


@pytest.mark.slow
def test_a_benchmark_run_whose_allocator_differs_from_the_baselines_is_refused(tmp_path):
    """The loop-overhead comparison gives the baseline adaptkit's policy for freed memory; an
    adaptkit run that chose another policy than the one given to the baseline fails the
    measurement instead of comparing unlike with unlike."""
    from dataclasses import replace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import CASES, GLIBC_DEFAULT, adaptkit_allocator, measure

    model = save_tiny_pretrained(tmp_path / "llama", "llama", task="causal_lm")
    tiny = replace(CASES["lora"], model=str(model), seq=16, batch=4, steps=1, warmup=1)
    assert adaptkit_allocator(tiny) == GLIBC_DEFAULT  # a tiny model's blocks are all small
    with pytest.raises(SystemExit, match="adaptkit chose glibc default, the benchmark expected release"):
        measure(ROOT / "benchmarks" / "loop_overhead.py", "adaptkit", tiny, "release")


@pytest.mark.parametrize(
    ("device", "dtype", "expected"),
    [
        ("NVIDIA H200", "bfloat16", (989.5e12, "NVIDIA H200 SXM")),
        ("NVIDIA H200 NVL", "bfloat16", (835.5e12, "NVIDIA H200 NVL")),
        ("NVIDIA H100 PCIe", "float32", (51.0e12, "NVIDIA H100 PCIe")),
        ("NVIDIA H100 80GB HBM3", "bfloat16", (989.5e12, "NVIDIA H100 SXM")),
        ("NVIDIA A100-SXM4-80GB", "tf32", (156.0e12, "NVIDIA A100")),
        ("NVIDIA L40S", "bfloat16", (362.0e12, "NVIDIA L40S")),  # not the L4's figure
        ("NVIDIA L4", "bfloat16", (121.0e12, "NVIDIA L4")),
        ("NVIDIA A10", "float32", (31.2e12, "NVIDIA A10")),
        ("NVIDIA A10G", "float32", None),  # not the A10's datasheet
        ("Tesla T4", "bfloat16", None),  # no bf16 on a T4
        ("AMD EPYC", "float32", None),  # a CPU whose model the hypervisor hides
    ],
)
def test_mfu_uses_the_devices_published_peak_where_one_is_known(device, dtype, expected):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _peaks import describe_peak, published_peak

    assert published_peak(device, dtype) == expected
    line = describe_peak(device, dtype, 100e12)
    assert ("none known" in line) == (expected is None), line
