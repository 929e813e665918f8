"""Sizes in bytes: reading a memory size a user wrote (``24GB``) and printing one (``1.23 GiB``)."""

from __future__ import annotations

import re

from adaptkit.errors import ConfigError

MiB = 2**20

#: Bytes per unit: decimal (KB, MB, ...) and binary (KiB, MiB, ...), always bytes, never bits.
UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(text: str, what: str = "--device-memory") -> int:
    """Bytes in a size such as ``24GB``, ``512MB``, ``1.5GiB``: GB is 10**9 bytes, GiB 2**30.

    Units are case-insensitive and always bytes (``gb`` is never gigabits); a bad string is a
    ConfigError naming ``what`` and the accepted forms.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]+)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in UNITS or float(match.group(1)) <= 0:
        raise ConfigError(
            f"{what}: '{text}' is not a memory size; write a positive number with a unit, "
            f"like 24GB, 512MB or 1.5GiB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(float(match.group(1)) * UNITS[unit])


def format_bytes(n: float) -> str:
    """``1.23 GiB``, ``456.7 MiB``: binary units, as memory is counted."""
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / MiB:.1f} MiB"
