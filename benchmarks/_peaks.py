"""Devices' published peak matrix-multiply rates, for MFU against the vendor's figure.

Each entry is the dense rate (without 2:4 sparsity) of the vendor's datasheet, in TFLOP/s per
dtype, for the device whose name (``torch.cuda.get_device_name``, or a CPU's model name) matches
the pattern; the first match wins, so a variant comes before its family. CPU vendors publish no
such figure for most models, and a virtual machine often hides the model ("AMD EPYC"): there the
benchmarks compare with the measured matmul peak alone, and say so.
"""

from __future__ import annotations

import re

#: (pattern on the device name, datasheet name, dense peak TFLOP/s by dtype)
PUBLISHED: list[tuple[str, str, dict[str, float]]] = [
    (r"H200 NVL", "NVIDIA H200 NVL", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.5, "float16": 835.5}),
    (r"H200", "NVIDIA H200 SXM", {"float32": 67.0, "tf32": 494.5, "bfloat16": 989.5, "float16": 989.5}),
    (r"H100 NVL", "NVIDIA H100 NVL", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.5, "float16": 835.5}),
    (r"H100 PCIe", "NVIDIA H100 PCIe", {"float32": 51.0, "tf32": 378.0, "bfloat16": 756.5, "float16": 756.5}),
    (r"H100", "NVIDIA H100 SXM", {"float32": 67.0, "tf32": 494.5, "bfloat16": 989.5, "float16": 989.5}),
    (r"A100", "NVIDIA A100", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0, "float16": 312.0}),
    (r"L40S", "NVIDIA L40S", {"float32": 91.6, "tf32": 183.0, "bfloat16": 362.0, "float16": 362.0}),
    (r"\bL4\b", "NVIDIA L4", {"float32": 30.3, "tf32": 60.0, "bfloat16": 121.0, "float16": 121.0}),
    (r"\bA10\b", "NVIDIA A10", {"float32": 31.2, "tf32": 62.5, "bfloat16": 125.0, "float16": 125.0}),
    (r"\bT4\b", "NVIDIA T4", {"float32": 8.1, "float16": 65.0}),
    (r"V100", "NVIDIA V100 SXM2", {"float32": 15.7, "float16": 125.0}),
]


def published_peak(device: str, dtype: str) -> tuple[float, str] | None:
    """The published dense peak of ``device`` for ``dtype`` in FLOP/s and the datasheet's name,
    or None where none is known (most CPUs, a model a hypervisor hides, a dtype it lacks)."""
    for pattern, name, peaks in PUBLISHED:
        if re.search(pattern, device):
            return (peaks[dtype] * 1e12, name) if dtype in peaks else None
    return None


def device_name() -> str:
    """The name the benchmarks look a peak up by: the GPU's, else the CPU's model name."""
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe_peak(device: str, dtype: str, measured: float) -> str:
    """One line for a benchmark's output: the published peak beside the measured one, or why
    there is none."""
    found = published_peak(device, dtype)
    if found is None:
        return (
            f"published {dtype} peak: none known for '{device}'; MFU is against the measured matmul "
            f"peak ({measured / 1e12:.3f} TFLOP/s)"
        )
    peak, name = found
    return (
        f"published {dtype} peak ({name}, dense): {peak / 1e12:.1f} TFLOP/s; measured matmul peak "
        f"{measured / 1e12:.1f} TFLOP/s ({measured / peak:.0%} of it)"
    )
