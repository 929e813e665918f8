"""One path from a recipe to its task, data and base model, shared by every command.

``adaptkit train`` (``adaptkit.train``), ``eval``/``predict``/``generate``/``export``
(``adaptkit.runs``) and the test helpers (``adaptkit.testing``) all load through
``load_base``, so a model is always built the same way: data first (the task learns its labels
from it), then the loader hook, then the task fits model and processor together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adaptkit.data.load import apply_transforms, load_data
from adaptkit.errors import ConfigError

if TYPE_CHECKING:
    from adaptkit.contract.model import LoadedModel
    from adaptkit.contract.task import Task
    from adaptkit.host.manager import PluginHost
    from adaptkit.recipe.schema import Recipe


@dataclass
class Base:
    """A recipe's task, its data splits (with the file each came from) and the loaded base model."""

    task: Task
    splits: Any
    files: dict[str, str]
    loaded: LoadedModel


def load_base(recipe: Recipe, host: PluginHost, loaded: LoadedModel | None = None) -> Base:
    """Load the recipe's data, set its task up on it, and load the base model.

    ``loaded`` skips the loader hook (a caller that already holds the model, as tests do); the
    task still prepares it, which is idempotent.
    """
    splits, files = load_data(recipe.data, host, recipe.train.seed)
    task = host.lookup("tasks", recipe.model.task).obj(recipe.data)
    task.setup(splits, files)
    task.model_spec = recipe.model
    loaded = loaded or host.pm.hook.adaptkit_load_model(spec=recipe.model, task=task)
    if loaded is None:
        raise ConfigError(f"model.source: no loader recognised '{recipe.model.source}'")
    task.prepare_model(loaded.model, loaded.processor)
    return Base(task, splits, files, loaded)


def encode_for_training(base: Base, recipe: Recipe, host: PluginHost, pack: bool = False) -> tuple[Any, Any]:
    """The encoded training split (after the recipe's transforms; packed when ``pack``) and validation split."""
    task, processor = base.task, base.loaded.processor
    train = apply_transforms(base.splits["train"], recipe.data, host)
    encoded = task.encode(train, processor, base.files["train"])
    if pack:  # training rows only: evaluation means the same either way
        encoded = task.pack(encoded)
    return encoded, task.encode(base.splits["validation"], processor, base.files["validation"])
