"""Padding-free packing of encoded causal-LM sequences (``data.packing``).

Training sequences are packed, once, at encode time, into rows of at most ``max_length`` tokens:
a sequence is never split across rows, each row carries ``position_ids`` that restart at 0 for
every sequence, and the label of each sequence's first token is -100, so no sequence learns to
predict the next one's first token. Because the packed rows are a plain dataset built before the
sampler, the seeded, resumable data order (``EpochSampler``) applies to them unchanged: a resumed
run rebuilds the same rows and skips the same batches.

The collated batch keeps a 2-D ``attention_mask`` (1 on real tokens), which the training loop
counts tokens with; the model never sees it. ``adaptkit.kernels.lm_loss.packed_model_inputs``
drops it before the forward pass, because transformers keeps packed sequences apart only when no
2-D mask is given; the padding at a row's end gets positions 0, 1, ... of its own, so it forms a
sequence of its own that no real token attends to.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

IGNORE = -100  # transformers' ignore_index


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins whose lengths sum to at most ``capacity``.

    Best-fit decreasing: the longest sequence first, each into the fullest bin it still fits.
    It depends on the lengths alone (ties broken by index), so the same data always gives the
    same rows; members keep their original order within a bin, and bins are ordered by their
    first member.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (room left, bin number), sorted: the first entry with enough room is the best fit
    free: list[tuple[int, int]] = []
    for i in order:
        n = min(lengths[i], capacity)
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def pack_rows(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], capacity: int) -> dict:
    """Columns ``input_ids``, ``labels`` and ``position_ids`` of the packed rows (each a list per row)."""
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in pack_lengths([len(x) for x in ids], capacity):
        row_ids: list[int] = []
        row_labels: list[int] = []
        row_pos: list[int] = []
        for i in members:
            row_ids += ids[i]
            # the first token is predicted from the previous sequence's last one: never learned
            row_labels += [IGNORE, *labels[i][1:]]
            row_pos += range(len(ids[i]))
        out["input_ids"].append(row_ids)
        out["labels"].append(row_labels)
        out["position_ids"].append(row_pos)
    return out


def pack_dataset(encoded: Any, capacity: int) -> Any:
    """A ``datasets.Dataset`` of packed rows from one of encoded sequences (``input_ids``, ``labels``)."""
    import datasets

    return datasets.Dataset.from_dict(pack_rows(encoded["input_ids"], encoded["labels"], capacity))


def collate_packed(rows: list[dict], pad_id: int) -> dict:
    """Packed rows as a batch: right-padded to the longest row, padding masked by position.

    The padding's positions count 0, 1, ... afresh, so where no 2-D mask is passed the padding is
    a sequence of its own: real tokens, which come before it, never attend to it.
    """
    from .padding import pad

    ids = [r["input_ids"] for r in rows]
    width = max(len(i) for i in ids)
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(i) for i in ids], 0),
        "labels": pad([r["labels"] for r in rows], IGNORE),
        "position_ids": pad(
            [list(r["position_ids"]) + list(range(width - len(r["position_ids"]))) for r in rows], 0
        ),
    }


def packed_or_padded(padded: Callable[[list[dict]], dict], pad_id: int) -> Callable[[list[dict]], dict]:
    """A collate function for packed rows (those with ``position_ids``) and plain ones alike."""

    def collate(rows: list[dict]) -> dict:
        if rows and "position_ids" in rows[0]:
            return collate_packed(rows, pad_id)
        return padded(rows)

    return collate
