"""espeak-ng, the speech synthesizer, run as a program: found on PATH or unpacked from Debian without root.

espeak-ng (GPL-3.0-or-later; its voices, dictionaries and variants ship in the package
``espeak-ng-data``) is never linked into adaptkit: it runs as a separate program, and what it
writes is audio. Where it is not installed, ``find_espeak`` fetches ``ESPEAK_DEBS`` with
``apt-get download`` (no root needed), unpacks each with ``dpkg -x`` and runs the binary with
``LD_LIBRARY_PATH`` and ``ESPEAK_DATA_PATH`` pointing into the unpacked tree (nothing is in the
loader's or espeak-ng's default paths then). espeak-ng writes 16-bit mono wav at 22,050 Hz;
``to_rate`` resamples with ``scipy.signal.resample_poly`` (320/441 for 16 kHz).

Used by the ``spoken_keywords`` data source and by tests/test_whisper_ct2.py.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptkit.errors import DataError
from adaptkit_plugins.data_sources import _debian

#: The Debian packages of espeak-ng's program, its data, its library and the library's two dependencies.
ESPEAK_DEBS = ["espeak-ng", "espeak-ng-data", "libespeak-ng1", "libpcaudio0", "libsonic0"]
#: Whisper's (and the spoken keywords') sampling rate.
SAMPLING_RATE = 16_000


@dataclass(frozen=True)
class Espeak:
    """How to run espeak-ng here: the command, its environment, its version, the packages it came from."""

    command: tuple[str, ...]
    env: dict[str, str]
    version: str  # e.g. "1.51"
    #: the .deb files unpacked (their names carry Debian's versions); () for an installed espeak-ng
    debs: tuple[str, ...] = ()

    def run(self, *args: str, cwd: Path | None = None) -> str:
        """Run espeak-ng with ``args``; its stdout. A DataError says what failed."""
        try:
            res = subprocess.run(
                [*self.command, *args], env=self.env, capture_output=True, text=True, cwd=cwd, timeout=300
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataError(f"espeak-ng {' '.join(args[:6])} ... failed: {exc}") from None
        # an unknown voice: status 1 and "Error: The specified espeak-ng voice does not exist."
        if res.returncode != 0 or "Error" in res.stderr:
            detail = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"espeak-ng {' '.join(args[:6])} ... failed: {detail}")
        return res.stdout


def find_espeak(root: Path) -> Espeak:
    """espeak-ng: the installed one, else the Debian packages fetched and unpacked under ``root``.

    A DataError says why espeak-ng cannot be had (no apt-get/dpkg, the download failed, ...).
    """
    if shutil.which("espeak-ng"):
        command, env, debs = ("espeak-ng",), dict(os.environ), ()
    else:
        if not (shutil.which("apt-get") and shutil.which("dpkg")):
            raise DataError(
                "espeak-ng is not on PATH, and apt-get/dpkg are not there to fetch and unpack its Debian "
                f"packages ({' '.join(ESPEAK_DEBS)}); install espeak-ng"
            )
        fetched = _debian.unpack_debs(
            ESPEAK_DEBS, root, f"espeak-ng (Debian packages {' '.join(ESPEAK_DEBS)})"
        )
        lib = next((root / "root" / "usr" / "lib").glob("*/libespeak-ng.so.1"), None)
        binary = root / "root" / "usr" / "bin" / "espeak-ng"
        if lib is None or not binary.is_file():
            raise DataError(
                f"the Debian packages {' '.join(ESPEAK_DEBS)} hold no espeak-ng or libespeak-ng.so.1"
            )
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib.parent), env.get("LD_LIBRARY_PATH")]))
        env["ESPEAK_DATA_PATH"] = str(lib.parent / "espeak-ng-data")
        command, debs = (str(binary),), tuple(d.name for d in fetched)
    try:
        res = subprocess.run([*command, "--version"], env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"espeak-ng does not run here: {exc}") from None
    found = re.search(r"text-to-speech:\s*(\S+)", res.stdout)
    if res.returncode != 0 or not found:
        detail = (res.stderr.strip().splitlines() or [res.stdout.strip() or "no output"])[-1]
        raise DataError(f"espeak-ng does not run here: `espeak-ng --version` said {detail!r}")
    return Espeak(command, env, found.group(1), debs)


def voices(espeak: Espeak, language: str = "en") -> list[str]:
    """The language codes of espeak-ng's own voices for ``language`` (``--voices=en``), sorted.

    MBROLA voices (files ``mb/...``) are left out: they need the mbrola program and its voice
    databases, which are not in these packages. So are the variants it lists (files ``!v/...``).
    """
    codes = set()
    for line in espeak.run(f"--voices={language}").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5 and not fields[4].startswith(("mb/", "!v/")):
            codes.add(fields[1])
    return sorted(codes)


def variants(espeak: Espeak) -> list[str]:
    """The file names of espeak-ng's voice variants (``--voices=variant``, files ``!v/NAME``), sorted.

    The name is what follows ``+`` in ``-v en-us+NAME``; a name with a space cannot be, and is left out.
    """
    names = set()
    for line in espeak.run("--voices=variant").splitlines()[1:]:
        found = re.search(r"!v/(.+?)\s*(\(|$)", line)
        if found and not re.search(r"\s", found.group(1)):
            names.add(found.group(1))
    return sorted(names)


def read_wav(path: Path) -> tuple[int, Any]:
    """A 16-bit mono wav file as its rate and float32 samples in [-1, 1)."""
    import wave

    import numpy as np

    with wave.open(str(path)) as f:
        if f.getsampwidth() != 2 or f.getnchannels() != 1:
            raise DataError(
                f"{path}: expected 16-bit mono wav, got {8 * f.getsampwidth()}-bit x {f.getnchannels()}"
            )
        rate = f.getframerate()
        samples = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").astype(np.float32) / 32768
    return rate, samples


@functools.lru_cache(maxsize=8)
def _lowpass(up: int, down: int) -> Any:
    """resample_poly's own filter for ``up``/``down`` (a Kaiser-windowed sinc), designed once, not per call."""
    from scipy.signal import firwin

    max_rate = max(up, down)
    return firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))


def to_rate(samples: Any, rate: int, target: int = SAMPLING_RATE) -> Any:
    """``samples`` at ``rate`` resampled to ``target`` Hz (``scipy.signal.resample_poly``), float32."""
    import numpy as np
    from scipy.signal import resample_poly

    if rate == target:
        return np.asarray(samples, dtype=np.float32)
    gcd = int(np.gcd(rate, target))
    up, down = target // gcd, rate // gcd
    x = np.asarray(samples, dtype=np.float64)
    return resample_poly(x, up, down, window=_lowpass(up, down)).astype(np.float32)


def say(espeak: Espeak, text: str, wav: Path, *args: str) -> Any:
    """``text`` spoken by espeak-ng (``args``: ``-v``, ``-s``, ``-p``, ...) as float32 samples at 16 kHz.

    ``wav`` is where espeak-ng writes its 22,050 Hz file.
    """
    espeak.run(*args, "-w", str(wav), text)
    rate, samples = read_wav(wav)
    return to_rate(samples, rate)
