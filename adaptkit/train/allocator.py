"""glibc's malloc policy for CPU training: keep freed tensors for reuse, or release them at once.

Chosen by memory planning before the weights load (``adaptkit.train.memory``); a user's own
glibc settings are always left as they are.
"""

from __future__ import annotations

import os
import sys

MiB = 2**20

#: How much more than the live peak a CPU run may keep resident when freed memory is kept for reuse.
ALLOCATOR_SLACK = 1.5


#: Blocks above this size glibc always serves with mmap, and unmaps when freed (64-bit Linux).
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB


#: glibc settings a user may have made: then adaptkit leaves the allocator as they set it
#: (``GLIBC_TUNABLES`` only where it tunes malloc; containers set it for other things too).
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def allocator_set_by_user() -> bool:
    """Whether the environment already sets glibc's malloc (see ``ALLOCATOR_ENV``)."""
    return bool(
        os.environ.get("MALLOC_MMAP_THRESHOLD_")
        or os.environ.get("MALLOC_TRIM_THRESHOLD_")
        or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    )


def set_cpu_allocator(policy: str) -> bool:
    """Choose what glibc does with freed tensors (Linux, CPU training): ``keep`` or ``release`` them.

    By default glibc serves blocks over ``GLIBC_MMAP_THRESHOLD_MAX`` (a causal LM's logits and
    their gradients) with mmap and unmaps them when freed, so every step faults in their pages
    afresh, a sizeable part of a small model's step. ``keep`` serves every tensor from the heap
    and keeps freed memory for the next step (mmap and trim thresholds of 1 GiB): faster steps,
    for somewhat more resident memory. ``release`` (a fixed 128 KiB mmap threshold) gives every
    tensor-sized block its own mapping, returned when freed: the process holds its live memory
    and no more, and pays a page fault on every fresh page, so steps are markedly slower than
    with glibc's default. Training keeps when memory is ample and releases when it is tight
    (``plan_memory``), and leaves glibc's default where no block of a step exceeds that
    threshold (then the default keeps them all in the heap already). benchmarks/README.md has
    the measured figures. Returns False, changing nothing, where there is no glibc ``mallopt``
    or the environment already sets glibc's allocator (``ALLOCATOR_ENV``).
    """
    import ctypes

    if not sys.platform.startswith("linux") or allocator_set_by_user():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
    if policy == "release":  # 128 KiB: glibc's initial values
        return bool(libc.mallopt(m_mmap_threshold, 128 * 1024)) & bool(
            libc.mallopt(m_trim_threshold, 128 * 1024)
        )
    trim = bool(libc.mallopt(m_trim_threshold, 1 << 30))
    # glibc before 2.35 or so refuses an mmap threshold over 32 MiB: no mmap at all does the same
    return trim and bool(libc.mallopt(m_mmap_threshold, 1 << 30) or libc.mallopt(m_mmap_max, 0))
