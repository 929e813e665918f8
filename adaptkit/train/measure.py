"""What a run measures about itself: peak memory, and a digest of its weights."""

from __future__ import annotations

import resource
from typing import Any


def peak_memory_mb(device: Any) -> float:
    """Peak memory of this process since it started or ``reset_peak_memory``: GPU max allocated, or
    the CPU's peak resident set (Linux's VmHWM; elsewhere ``ru_maxrss``, which cannot be reset)."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: Any) -> None:
    """Start ``peak_memory_mb`` over from what the process holds now (after the auto micro-batch's trial steps)."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set (Linux 4.0+)
            f.write("5")
    except OSError:
        pass


def param_digest(model: Any) -> str:
    """sha256 of every parameter, in name order: equal digests mean identical weights."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
