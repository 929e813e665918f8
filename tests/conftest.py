"""Shared fixtures: a fresh plugin host with autoload off, and deterministic, small CPU runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _torch_determinism():
    try:
        import torch
    except ImportError:  # the light-start tests never need it
        return
    torch.set_num_threads(int(os.environ.get("ADAPTKIT_TEST_THREADS", "1")))
    torch.use_deterministic_algorithms(True, warn_only=True)


@pytest.fixture
def host():
    """A plugin host with the built-in plugins only (entry-point autoload off)."""
    from adaptkit.testing import plugin_host

    return plugin_host()


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory) -> Path:
    """One cache for every slow test of the session, so each wheel is downloaded once."""
    return tmp_path_factory.mktemp("adaptkit-home")


@pytest.fixture
def real_home(shared_home, monkeypatch) -> Path:
    """The session's shared cache as ``ADAPTKIT_HOME``."""
    monkeypatch.setenv("ADAPTKIT_HOME", str(shared_home))
    return shared_home
