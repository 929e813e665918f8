"""Padding of token-id rows into a rectangular batch tensor, shared by the text tasks."""

from __future__ import annotations

from typing import Any


def pad(rows: list[list[int]], value: int) -> Any:
    """A ``long`` tensor of ``rows``, each right-padded with ``value`` to the longest row."""
    import torch

    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)
