"""The loop's own state (what a checkpoint restores) and the summary a finished run writes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


def known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of dataclass ``cls``: files written by another
    version may hold keys this one does not know."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class LoopState:
    """Counters of the training loop, saved in every checkpoint as ``trainer_state.json``.

    ``step`` counts optimizer steps taken, ``epoch`` finished epochs, ``batch_in_epoch``
    micro-batches taken in the current epoch (a resumed run skips that many).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None
    bad_evals: int = 0
    samples: int = 0
    tokens: int = 0
    train_time: float = 0.0  # seconds spent training before the latest checkpoint

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        """The state a checkpoint saved (keys it does not know are ignored)."""
        return cls(**known_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        """The state as JSON-ready data."""
        return asdict(self)

    def track(self, value: float, greater_is_better: bool, metrics: dict[str, float]) -> None:
        """Record an evaluation: a new best resets the count of evaluations without progress."""
        if self.best is None or (value > self.best if greater_is_better else value < self.best):
            self.best, self.best_step, self.best_metrics, self.bad_evals = value, self.step, metrics, 0
        else:
            self.bad_evals += 1


@dataclass(kw_only=True)
class RunSummary:
    """What a finished run reports, written as ``summary.json``; compare's rows are read from it.

    Fields with defaults may be missing from summaries written by older versions.
    """

    name: str | None
    steps: int
    epochs_completed: int
    total_steps: int
    strategies: list[str]
    trainable_parameters: int
    total_parameters: int
    final_metrics: dict[str, Any]
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, Any] | None = None
    final_train_loss: float | None = None
    wall_time_s: float
    samples_per_s: float | None
    tokens_per_s: float | None
    peak_memory_mb: float
    num_processes: int
    mixed_precision: str
    micro_batch_size: int
    gradient_accumulation: int
    packed: bool = False  # training rows packed several sequences to a row (data.packing)
    param_digest: str
    ranks_in_sync: bool
    run_id: str
    metric: str = "eval_loss"
    greater_is_better: bool = False
    memory_kind: str = "cpu_rss"
    memory_plan: dict[str, Any] | None = None
    forgetting: dict[str, Any] | None = None
    feature_cache: dict[str, int] | None = None
    saved_bytes: int | None = None  # only the main process saves, so only it knows

    @classmethod
    def read(cls, path: Path) -> RunSummary:
        """A ``summary.json`` read back (keys this version does not know are ignored)."""
        return cls(**known_fields(cls, json.loads(Path(path).read_text())))

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data (``saved_bytes`` only where it is known)."""
        data = asdict(self)
        if data["saved_bytes"] is None:
            del data["saved_bytes"]
        return data
