"""Padding-free packing of encoded sequences (``data.packing``): causal LMs and classification.

Training sequences are packed, once, at encode time, into rows of at most ``max_length`` tokens:
a sequence is never split across rows, and each row carries ``position_ids`` that restart at 0 for
every sequence. Because the packed rows are a plain dataset built before the sampler, the
seeded, resumable data order (``EpochSampler``) applies to them unchanged: a resumed run rebuilds
the same rows and skips the same batches.

The packed form, which ``adaptkit.kernels.lm_loss`` (``packed_model_inputs``, ``check_packing``)
relies on: a sequence is a run of position ids 0, 1, 2, ...; the segment boundaries are carried
by the position ids alone. The padding after a row's last sequence gets one position id for all
its tokens (``padding_position``): never 0, so nothing reads it as a sequence's start, and never
the one after the last sequence's end, so transformers, which starts a new sequence wherever a
position id is not the previous one plus 1, keeps the padding out of that sequence (each padding
token is a sequence of one, seen by no real token).

The collated batch keeps a 2-D ``attention_mask`` (1 on real tokens), which the training loop
counts tokens with; the model never sees it. ``packed_model_inputs`` drops it before the forward
pass, because transformers keeps packed sequences apart only when no 2-D mask is given.

Causal LM (``pack_rows``, ``collate_packed``): the label of each sequence's first token is -100,
so no sequence learns to predict the next one's first token. Classification
(``pack_sequence_rows``, ``collate_packed_sequences``): the per-token columns (``input_ids``,
``token_type_ids``) are concatenated and each row keeps one label per sequence; the batch's
``labels`` are those of all its sequences in order (rows first), one per sequence, and the
pooling (``pooling.TokenPooling``) yields one vector per sequence in the same order.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

from adaptkit.contract.task import IGNORE


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


def padding_position(positions: Sequence[int]) -> int:
    """The position id of every padding token after a packed row whose position ids are ``positions``.

    1, or 2 where the row's last sequence is one token long (its last position 0, so a 1 would
    continue it): never 0 and never the last position plus 1 (module docstring).
    """
    return 2 if positions and positions[-1] == 0 else 1


def padded_positions(rows: list[dict], width: int) -> Any:
    """The rows' ``position_ids`` padded to ``width`` as the packed form says (``padding_position``)."""
    from .padding import pad

    out = []
    for r in rows:
        positions = list(r["position_ids"])
        out.append(positions + [padding_position(positions)] * (width - len(positions)))
    return pad(out, 0)


def collate_packed(rows: list[dict], pad_id: int) -> dict:
    """Packed causal-LM rows as a batch: right-padded to the longest row, padding marked by position."""
    from .padding import pad

    ids = [r["input_ids"] for r in rows]
    width = max(len(i) for i in ids)
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(i) for i in ids], 0),
        "labels": pad([r["labels"] for r in rows], IGNORE),
        "position_ids": padded_positions(rows, width),
    }


def pack_sequence_rows(columns: dict[str, Sequence], capacity: int) -> dict:
    """Packed rows of examples labelled once per sequence (classification).

    ``columns`` holds ``input_ids``, ``labels`` (one per sequence) and any other per-token
    columns (``token_type_ids``; an ``attention_mask`` of all ones is dropped: the collate makes
    it). Per-token columns are concatenated, ``labels`` become one list per row and
    ``position_ids`` restart at 0 for each sequence.
    """
    per_token = [k for k in columns if k not in ("labels", "attention_mask")]
    out: dict[str, list] = {k: [] for k in (*per_token, "labels", "position_ids")}
    ids = columns["input_ids"]
    for members in pack_lengths([len(x) for x in ids], capacity):
        for k in per_token:
            out[k].append([v for i in members for v in columns[k][i]])
        out["labels"].append([columns["labels"][i] for i in members])
        out["position_ids"].append([p for i in members for p in range(len(ids[i]))])
    return out


def pack_sequence_dataset(encoded: Any, capacity: int) -> Any:
    """A ``datasets.Dataset`` of packed rows from one of encoded, singly labelled sequences."""
    import datasets

    columns = {k: encoded[k] for k in encoded.column_names}
    return datasets.Dataset.from_dict(pack_sequence_rows(columns, capacity))


def collate_packed_sequences(rows: list[dict], pad_id: int) -> dict:
    """Packed classification rows as a batch: per-token columns right-padded, one label per sequence.

    ``labels`` are the rows' sequences' labels in order (rows first), as many as the sequences.
    """
    import torch

    from .padding import pad

    ids = [r["input_ids"] for r in rows]
    width = max(len(i) for i in ids)
    batch = {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(i) for i in ids], 0),
        "labels": torch.tensor([label for r in rows for label in r["labels"]], dtype=torch.long),
        "position_ids": padded_positions(rows, width),
    }
    if "token_type_ids" in rows[0]:
        batch["token_type_ids"] = pad([r["token_type_ids"] for r in rows], 0)
    return batch


def packed_or_padded(
    padded: Callable[[list[dict]], dict],
    pad_id: int,
    packed: Callable[[list[dict], int], dict] = collate_packed,
) -> Callable[[list[dict]], dict]:
    """A collate function for packed rows (those with ``position_ids``: ``packed``) and plain ones alike."""

    def collate(rows: list[dict]) -> dict:
        if rows and "position_ids" in rows[0]:
            return packed(rows, pad_id)
        return padded(rows)

    return collate
