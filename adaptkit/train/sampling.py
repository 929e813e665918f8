"""The order of the training examples: a seeded permutation each epoch (``train.batching: random``)
or micro-batches of similar lengths in a seeded order (``train.batching: by_length``).

Both orders depend on the seed and the epoch number alone, so a resumed run, which skips the
batches its checkpoint had already seen, sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from adaptkit.errors import ConfigError

#: Micro-batches per rank that one length-sorted mega-batch spans (``by_length``). Sorting a
#: larger window groups lengths more tightly (less padding), a smaller one keeps more of the
#: permutation's randomness in which examples share a batch; 50 is the window Hugging Face's
#: LengthGroupedSampler (``megabatch_mult``) uses, a setting with a long record in practice.
MEGA_BATCH_FACTOR = 50
#: A data set is cut into at least this many mega-batches where it is large enough, so that a
#: small one is not sorted whole (its batches would then hold the same neighbours every epoch).
MIN_MEGA_BATCHES = 4


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

    Each epoch: the seeded permutation, cut into mega-batches of ``MEGA_BATCH_FACTOR`` steps'
    examples, each sorted by length, cut into steps of ``micro_batch_size x processes`` examples,
    and the steps shuffled with the same generator. Every example comes exactly once an epoch.

    The data loader cuts this stream into micro-batches by position, and Accelerate hands them to
    the ranks in turn (rank r gets micro-batches r, r + processes, ...), so a step's slice of the
    stream is one micro-batch for each rank, every one of them from one length bucket.
    """

    def __init__(self, lengths: Sequence[int], seed: int, micro_batch_size: int, processes: int = 1):
        import torch

        super().__init__(len(lengths), seed)
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.int64)
        # One step's micro-batches across the ranks move as one: the ranks of a step then get
        # similar lengths, and none waits at the gradient all-reduce for a rank with longer rows.
        self.step_size = micro_batch_size * processes
        self.mega_size = self.step_size * mega_batch_factor(self.n, self.step_size)

    def __iter__(self) -> Iterator[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        ordered = torch.cat([self.sorted_by_length(chunk) for chunk in perm.split(self.mega_size)])
        return iter(shuffle_steps(ordered, self.step_size, g).tolist())

    def sorted_by_length(self, indices: Any) -> Any:
        """``indices`` shortest first; a stable sort, so ties keep the permutation's order."""
        import torch

        return indices[torch.sort(self.lengths[indices], stable=True).indices]


def mega_batch_factor(n: int, step_size: int) -> int:
    """Steps per mega-batch: ``MEGA_BATCH_FACTOR``, fewer where the data would fill too few."""
    return max(1, min(MEGA_BATCH_FACTOR, n // (step_size * MIN_MEGA_BATCHES)))


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
