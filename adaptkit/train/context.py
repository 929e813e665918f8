"""The run as plugins see it: recipe, host, accelerator, model, task, and the metric history.

Every plugin notification of a run goes through ``Run.notify_plugins``, so each hook is called the same
way: every plugin in isolation, a failing one named in one line, the run going on.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adaptkit.adapt.stack import Adapted
    from adaptkit.host.manager import PluginHost
    from adaptkit.recipe.schema import Recipe


@dataclass
class Run:
    """Everything about a run that hooks and helpers need (the ``run`` argument of run hooks)."""

    recipe: Recipe
    host: PluginHost | None
    run_dir: Path
    accelerator: Any = None
    adapted: Adapted | None = None
    task: Any = None
    processor: Any = None
    eval_rows: Any = None  # the raw validation split, for evaluation by generation
    history: list[dict[str, Any]] = field(default_factory=list)
    forgetting_texts: list[str] = field(default_factory=list)
    forgetting_base: dict[str, Any] | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (always true outside a distributed launch)."""
        return self.accelerator is None or self.accelerator.is_main_process

    def log(self, message: str) -> None:
        """Print a message once (on the main process)."""
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    def notify_plugins(self, hook: str, strict: bool = False, **kwargs: Any) -> None:
        """Call a run hook on every plugin, each in isolation; a plugin that raises is named.

        A notification goes on after a failing plugin; with ``strict`` (``adaptkit_on_train_start``)
        the first failure stops the run before any step.
        """
        if strict:
            self.host.call_strict(hook, run=self, **kwargs)
            return
        for err in self.host.notify(hook, run=self, **kwargs):
            self.log(f"adaptkit: {err}")

    def log_metrics(self, entry: dict[str, Any]) -> None:
        """Append an entry to the history, to ``metrics.jsonl`` and to the trackers."""
        self.history.append(entry)
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
        # trackers take numbers only; accelerate.log writes on the main process and is a no-op without trackers
        numbers = {
            k: v
            for k, v in entry.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self.accelerator.log(numbers, step=entry["step"])
