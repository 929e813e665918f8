"""One GPU: adaptkit's LoRA and QLoRA training against the hand-written peft + Accelerate loop,
with tokens per second, MFU and peak GPU memory, all measured in one run.

The cases are ``gpu-lora`` (a bfloat16 base, bf16 autocast, LoRA r=8 on every linear layer of the
blocks) and ``gpu-qlora`` (the same on a 4-bit NF4 base with double quantization and gradient
checkpointing), 16 sequences of 512 tokens a step. Each run is its own process, adaptkit and the
hand-written loop alternating. Peak memory is ``torch.cuda.max_memory_allocated`` at the end of the
last step, so it includes the model. MFU is model FLOPs per second (4N + 6T per token: N the base
weights, counted before quantization, T the adapter weights; see mfu.py) over the bf16 matmul rate
of the same GPU, measured before the first run and after each one, and over the GPU's published
dense bf16 peak (``_peaks.py``), printed beside it.

``--model`` takes a packaged model name or a model directory. A directory with a config and a
tokenizer but no weights (what fits on a machine that cannot download) gets random weights, seeded:
speed and memory depend on the shapes, not on the values. ``--shape smollm2-1.7b`` trains a model
of SmolLM2-1.7B's widths and depth (random weights, the given model's tokenizer), where a GPU is
busy enough for its MFU to mean something.

    python benchmarks/gpu.py [--model smollm2-135m-instruct] [--shape smollm2-1.7b] [--repeats 1] [--cases gpu-lora gpu-qlora]

Without a GPU it runs the same cases on the CPU as a check of the script (the peak is then float32's).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CASES, LLAMA_LINEAR, Result, measure, median, model_path  # noqa: E402
from _peaks import describe_peak, device_name, published_peak  # noqa: E402
from mfu import flops_per_token, peak_matmul_flops  # noqa: E402

LOOP_SCRIPT = Path(__file__).resolve().parent / "loop_overhead.py"
GPU_CASES = [name for name in CASES if name.startswith("gpu-")]
# Config changes that give a LLaMA-architecture model another size (the SmolLM2 family shares one tokenizer).
SHAPES = {
    "smollm2-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 64,
    },
}


def bf16_peak(n: int = 8192, reps: int = 10) -> float:
    """The GPU's bf16 matmul rate in FLOP/s: the mean of ``reps`` n x n x n products after three warm-ups."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3)


def peak() -> float:
    """The peak this run compares with: bf16 on a GPU, float32 (as mfu.py) on a CPU."""
    import torch

    return bf16_peak() if torch.cuda.is_available() else peak_matmul_flops(seconds=1.0)[0]


def with_weights(model: str, workdir: Path, shape: str | None = None) -> tuple[str, bool]:
    """The model directory to train, and whether its weights are random (made here, seeded, in bf16).

    Weights are made when the directory has none, or when ``shape`` (a key of ``SHAPES``) resizes the model.
    """
    import torch
    import transformers

    path = Path(model_path(model))
    if shape is None and any(path.glob("*.safetensors")):
        return str(path), False
    target = workdir / "model"
    shutil.copytree(path, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.gguf"))
    config = transformers.AutoConfig.from_pretrained(path)
    for key, value in SHAPES.get(shape, {}).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    ):  # a GPU initialises 1B weights in a blink
        random_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    random_model.save_pretrained(target)
    del random_model
    return str(target), True


def base_weights(path: str) -> int:
    """N: the model's weights before any quantization (a tied embedding counted once), on the meta device."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    """Measure the peak, run each case with both loops, print tokens/s, MFU, peak memory and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="packaged model name or model directory"
    )
    parser.add_argument("--shape", choices=list(SHAPES), help="resize the model (random weights)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each loop per case (alternating)")
    parser.add_argument("--cases", nargs="+", default=GPU_CASES, choices=GPU_CASES)
    parser.add_argument("--batch", type=int, help="sequences a step (default: the case's, 16)")
    parser.add_argument("--seq", type=int, help="tokens a sequence (default: the case's, 512)")
    parser.add_argument("--steps", type=int, help="timed steps (default: the case's, 30)")
    args = parser.parse_args()
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(
            f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
    else:
        print(f"device: no GPU; a check of the script on the CPU (torch {torch.__version__})")
    with tempfile.TemporaryDirectory(prefix="adaptkit-gpu-bench-") as tmp:
        path, random = with_weights(args.model, Path(tmp), args.shape)
        n = base_weights(path)
        label = f"{args.model} resized to {args.shape}" if args.shape else args.model
        print(f"model: {label}, {n / 1e6:.1f}M weights" + (", random weights" if random else ""))
        peaks = [peak()]
        print(f"peak matmul: {peaks[0] / 1e12:.1f} TFLOP/s", flush=True)
        loops = ["adaptkit", "baseline"]
        shape = {
            k: v
            for k, v in (("batch", args.batch), ("seq", args.seq), ("steps", args.steps))
            if v is not None
        }
        cases = {name: dataclasses.replace(CASES[name], model=path, **shape) for name in args.cases}
        results: dict[tuple[str, str], list[tuple[Result, float]]] = {
            (c, loop): [] for c in args.cases for loop in loops
        }
        for name in args.cases:
            case = cases[name]
            for _ in range(args.repeats):
                for loop in loops:
                    result = measure(LOOP_SCRIPT, loop, case)
                    peaks.append(peak())
                    results[name, loop].append((result, (peaks[-2] + peaks[-1]) / 2))
                    print(
                        f"  {name} {loop}: {result.tokens_per_s:,.0f} tokens/s, peak {result.peak_mib:,.0f} MiB, "
                        f"loss {result.losses[-1]:.3f}; matmul peak after it {peaks[-1] / 1e12:.1f} TFLOP/s",
                        flush=True,
                    )
    print(f"peak matmul over the run: {min(peaks) / 1e12:.1f} to {max(peaks) / 1e12:.1f} TFLOP/s")
    device, dtype = device_name(), "bfloat16" if torch.cuda.is_available() else "float32"
    print(describe_peak(device, dtype, median(peaks)))
    published = published_peak(device, dtype)
    for name, case in cases.items():
        print(
            f"\n[{name}] {label}: LoRA r=8 on {'/'.join(LLAMA_LINEAR)}"
            f"{', 4-bit NF4 base, gradient checkpointing' if case.quantize else ', bfloat16 base'}, "
            f"bf16 autocast, batch {case.batch} x {case.seq} tokens, {case.warmup} warm-up + {case.steps} timed steps"
        )
        summary = {}
        for loop in loops:
            runs = results[name, loop]
            trainable = runs[0][0].trainable
            per_token = flops_per_token("lora", n + trainable, trainable)
            tput = median([r.tokens_per_s for r, _ in runs])
            mfu = median([r.tokens_per_s * per_token / p for r, p in runs])
            mem = median([r.peak_mib for r, _ in runs])
            summary[loop] = tput, mem
            of_published = (
                "" if published is None else f" ({tput * per_token / published[0]:.1%} of published)"
            )
            print(
                f"  {loop:8s} {tput:9,.0f} tokens/s  MFU {mfu:6.1%}{of_published}  peak {mem:8,.0f} MiB  "
                f"trainable {trainable:,}  (runs: {', '.join(f'{r.tokens_per_s:,.0f}' for r, _ in runs)} tokens/s)"
            )
        (t_a, m_a), (t_b, m_b) = summary["adaptkit"], summary["baseline"]
        print(f"  adaptkit/baseline: throughput {t_a / t_b:.3f}, peak memory {m_a / m_b:.3f}")


if __name__ == "__main__":
    main()
