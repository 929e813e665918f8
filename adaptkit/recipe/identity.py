"""A recipe's identity: what makes two runs' checkpoints interchangeable, and the library versions
that decide a run's numbers."""

from __future__ import annotations

import json
import platform
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adaptkit.recipe.schema import Recipe


def recipe_id(recipe: Recipe) -> str:
    """A hash of what makes checkpoints interchangeable: model, data and strategies."""
    import hashlib

    key = recipe.model_dump(mode="json", include={"model", "data", "strategies"})
    key["seed"] = recipe.train.seed
    # another order of the same data is not the same run; the default adds no key, so old ids hold
    if recipe.train.batching != "random":
        key["batching"] = recipe.train.batching
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide a run's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("adaptkit", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
