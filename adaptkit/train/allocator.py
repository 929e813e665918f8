"""glibc's malloc policy for CPU training: keep freed tensors for reuse, or release them at once.

Chosen by memory planning before the weights load (``adaptkit.train.memory``); a user's own
glibc settings are always left as they are.
"""

from __future__ import annotations

import os
import sys

from adaptkit.estimate.machine import HEAP_SLACK

MiB = 2**20


#: Blocks above this size glibc always serves with mmap, and unmaps when freed (64-bit Linux).
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB


#: What each policy sets, as the environment variables glibc reads at start-up (``mallopt``
#: sets the same at run time): ``keep`` serves every block from the heap and never trims it,
#: ``release`` maps every block over 128 KiB (glibc's initial threshold) on its own and trims the
#: heap down to 128 KiB.
POLICY_SETTINGS = {
    "keep": {"MALLOC_TRIM_THRESHOLD_": 1 << 30, "MALLOC_MMAP_MAX_": 0},
    "release": {"MALLOC_MMAP_THRESHOLD_": 128 * 1024, "MALLOC_TRIM_THRESHOLD_": 128 * 1024},
}

#: glibc settings a user may have made: then adaptkit leaves the allocator as they set it
#: (``GLIBC_TUNABLES`` only where it tunes malloc; containers set it for other things too).
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")

#: ``mallopt``'s parameter numbers for those settings (glibc's malloc.h).
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_MMAP_MAX_": -4}


def choose_policy(live_peak: int, largest_block: int, budget: int) -> str | None:
    """The policy for freed memory (``set_cpu_allocator``) of a CPU run whose estimated live peak is
    ``live_peak`` bytes within ``budget``: ``release`` when keeping freed memory might not fit
    (``HEAP_SLACK`` times the live peak over the budget),
    ``keep`` when a step allocates blocks glibc would otherwise unmap (over
    ``GLIBC_MMAP_THRESHOLD_MAX``), else None (glibc's default already keeps every block)."""
    if live_peak * HEAP_SLACK > budget:
        return "release"
    return "keep" if largest_block > GLIBC_MMAP_THRESHOLD_MAX else None


def allocator_set_by_user() -> bool:
    """Whether the environment already sets glibc's malloc (see ``ALLOCATOR_ENV``)."""
    return any(os.environ.get(key) for key in ALLOCATOR_ENV[:-1]) or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", ""
    )


def set_cpu_allocator(policy: str) -> bool:
    """Choose what glibc does with freed tensors (Linux, CPU training): ``keep`` or ``release`` them.

    By default glibc serves blocks over ``GLIBC_MMAP_THRESHOLD_MAX`` (a causal LM's logits and
    their gradients) with mmap and unmaps them when freed, so every step faults in their pages
    afresh, a sizeable part of a small model's step. ``keep`` serves every tensor from the heap
    and keeps freed memory for the next step (no mmap, a trim threshold of 1 GiB): faster steps,
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
    return all(libc.mallopt(_MALLOPT[key], value) for key, value in POLICY_SETTINGS[policy].items())
