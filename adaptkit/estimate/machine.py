"""The machine's own figures: its matmul rate, the memory a process takes before any model (the
CPU's measured once and cached, CUDA's context), and the memory free on a device now."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from adaptkit.errors import AdaptkitError
from adaptkit.estimate.units import MiB

#: Device memory a CUDA process uses before any tensor (context, kernels, cuBLAS workspace).
#: Not measured here: it varies with GPU, driver and CUDA version, so a typical size stands for it.
CUDA_CONTEXT_BYTES = 512 * MiB

#: How much more than its live peak a CPU training process may hold when glibc keeps freed
#: memory in its heap (glibc's default, and adaptkit's ``keep``). torch allocates every tensor
#: 64-byte aligned (``posix_memalign``), which asks glibc for a little more than the tensor: the
#: hole a freed tensor leaves is then too small for the next tensor of the same size, so a step's
#: temporaries leave holes that only smaller tensors fill. How much depends on the order of a
#: model's operations, not on a size the estimate knows; benchmarks/README.md has the measured
#: ratios, the largest of which (LoRA with gradient checkpointing) this bound covers.
HEAP_SLACK = 2.0

#: What a training process imports before it loads a model (its resident baseline).
TRAINING_STACK = ("torch", "transformers", "accelerate", "datasets", "peft", "adaptkit.train.loop")


def measure_peak_tflops(device: str, dtype: str = "float32", seconds: float = 0.3) -> float:
    """The best matmul rate (TFLOP/s) of ``device`` in ``dtype`` over about ``seconds``, in this process."""
    import torch

    n = 1024 if device == "cpu" else 4096
    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    best = 0.0
    deadline = time.perf_counter() + seconds
    for _ in range(50):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e12)
        if time.perf_counter() > deadline:
            break
    return best


def cpu_overhead_bytes(model_dir: str | None = None) -> int:
    """Resident memory of a fresh Python process that imported the training stack and, given the
    model's directory, loaded its tokenizer as training does (a large vocabulary's tokenizer holds
    tens of MiB; a directory without one adds nothing).

    Measured once per model directory in a subprocess (it takes seconds: the imports are heavy) and
    cached under the adaptkit cache directory, keyed by the library versions and the directory.
    """
    from adaptkit.files import cache_dir, write_json
    from adaptkit.recipe.identity import library_versions

    key = json.dumps({"versions": library_versions(), "model_dir": model_dir}, sort_keys=True)
    path = cache_dir() / "estimate" / "cpu-overhead.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if isinstance(cached.get(key), int):
        return cached[key]
    res = subprocess.run(
        [sys.executable, "-c", _OVERHEAD_CHILD, model_dir or ""],
        capture_output=True,
        text=True,
        env={**os.environ, "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    if res.returncode != 0:
        raise AdaptkitError(
            f"estimate: could not measure the process baseline: {res.stderr.strip().splitlines()[-1:]}"
        )
    value = int(res.stdout.strip().splitlines()[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**cached, key: value})
    return value


#: The subprocess of ``cpu_overhead_bytes``: its argument is the model directory, or empty.
_OVERHEAD_CHILD = f"""
import sys
import {", ".join(TRAINING_STACK)}
if sys.argv[1]:
    try:  # what training loads beside the weights; a model without a tokenizer has none to load
        transformers.AutoTokenizer.from_pretrained(sys.argv[1])
    except Exception:
        pass
import psutil
print(psutil.Process().memory_info().rss)
"""


def free_memory(device: Any) -> int | None:
    """Bytes free now on ``device``: CUDA's free memory, or the RAM available (psutil); None elsewhere."""
    import torch

    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if kind == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    return None
