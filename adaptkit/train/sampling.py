"""The order of the training examples: a seeded permutation each epoch (``train.batching: random``)
or micro-batches of similar lengths in a seeded order (``train.batching: by_length``).

Both orders depend on the seed and the epoch number alone, so a resumed run, which skips the
batches its checkpoint had already seen, sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from adaptkit.errors import ConfigError


class EpochSampler:
    """A fresh permutation each epoch, drawn from ``seed + epoch`` alone.

    The order therefore depends only on the epoch number, so a resumed run sees exactly the
    batches an uninterrupted run would have seen.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class LengthGroupedSampler(EpochSampler):
    """Micro-batches of similar lengths, in a random order, drawn from ``seed + epoch`` alone.

    Each epoch: transformers' length grouping (``get_length_grouped_indices``: the seeded
    permutation cut into mega-batches of up to 50 steps' examples, each sorted by length), cut
    into steps of ``micro_batch_size x processes`` examples, and the steps shuffled with the same
    generator. Every example comes exactly once an epoch.

    The data loader cuts this stream into micro-batches by position, and Accelerate hands them to
    the ranks in turn (rank r gets micro-batches r, r + processes, ...), so a step's slice of the
    stream is one micro-batch for each rank, every one of them from one length bucket.
    """

    def __init__(self, lengths: Sequence[int], seed: int, micro_batch_size: int, processes: int = 1):
        super().__init__(len(lengths), seed)
        self.lengths = list(lengths)
        # One step's micro-batches across the ranks move as one: the ranks of a step then get
        # similar lengths, and none waits at the gradient all-reduce for a rank with longer rows.
        self.step_size = micro_batch_size * processes

    def __iter__(self) -> Iterator[int]:
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        if not self.lengths:  # transformers' grouping looks for the longest of none
            return iter([])
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        ordered = torch.tensor(get_length_grouped_indices(self.lengths, self.step_size, generator=g))
        return iter(shuffle_steps(ordered, self.step_size, g).tolist())


def shuffle_steps(ordered: Any, step_size: int, generator: Any) -> Any:
    """The whole steps of ``ordered`` in a random order, the partial last step kept last.

    Mega-batches hold whole steps, so each whole step lies in one sorted mega-batch. The partial
    step stays at the end: moved forward, it would shift every later micro-batch off its bucket.
    """
    import torch

    whole = len(ordered) // step_size * step_size
    steps = ordered[:whole].view(-1, step_size)
    steps = steps[torch.randperm(len(steps), generator=generator)]
    return torch.cat([steps.flatten(), ordered[whole:]])


def example_lengths(dataset: Any) -> list[int] | None:
    """The number of tokens of each encoded example (its ``input_ids``), or None without them."""
    if "input_ids" not in (getattr(dataset, "column_names", None) or []):
        return None
    import pyarrow.compute as pc

    # read from the Arrow column at once (selections and shuffles applied), not row by row
    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()


def make_sampler(train_ds: Any, spec: Any, processes: int) -> EpochSampler:
    """The training data's order as ``spec.batching`` asks; by_length needs token ids."""
    if spec.batching == "random":
        return EpochSampler(len(train_ds), spec.seed)
    lengths = example_lengths(train_ds)
    if lengths is None:
        raise ConfigError(
            [
                (
                    "train.batching",
                    "by_length sorts examples by their number of tokens, and this task's encoded "
                    "examples have none (no input_ids: images?); set train.batching: random",
                )
            ]
        )
    return LengthGroupedSampler(lengths, spec.seed, spec.micro_batch_size, processes)
