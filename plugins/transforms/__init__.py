"""Built-in plugin: training-data transforms (augmentation) a recipe lists under ``data.transforms``.

```yaml
data:
  transforms:
    - {name: lowercase, column: text}
    - {name: word_dropout, p: 0.1, column: text, seed: 0}
    - {name: image_augment, crop: 0.8, rotate: 10, shift: 0.1, flip: false, light: 0.2}
```

Transforms change the training split only, once, before it is encoded. Their randomness comes
from the transform's ``seed`` and the example's index alone, so every run of a recipe, and a run
resumed from a checkpoint, trains on exactly the same examples.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from adaptkit.contract.hookspecs import hookimpl
from adaptkit.errors import DataError

from .images import image_augment


def _text(example: dict[str, Any], column: str) -> str | None:
    """The text in ``column`` (None stays None), or a DataError listing the columns there are."""
    if column not in example:
        raise DataError(f"no column {column!r}; the columns are {sorted(example)} (set 'column')")
    value = example[column]
    if value is not None and not isinstance(value, str):
        raise DataError(f"column {column!r} holds {type(value).__name__}, not text")
    return value


def word_dropout(
    p: float = 0.1, column: str = "text", seed: int = 0
) -> Callable[[dict[str, Any], int], dict[str, Any]]:
    """Drop each word (whitespace-separated) of a text column with probability ``p``; at least one word stays."""
    if not 0 <= p < 1:
        raise ValueError(f"p must be at least 0 and less than 1, got {p!r}")

    def drop(example: dict[str, Any], index: int) -> dict[str, Any]:
        text = _text(example, column)
        if not text:
            return example
        # a generator of its own per example: the result depends on (seed, index), never on order or process
        rng = random.Random(f"word_dropout:{seed}:{index}")
        words = text.split()
        kept = [w for w in words if rng.random() >= p]
        if not kept:  # an empty text teaches nothing and breaks tasks that need a token
            kept = [words[rng.randrange(len(words))]]
        return {**example, column: " ".join(kept)}

    return drop


def lowercase(column: str = "text") -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Lower-case a text column."""

    def lower(example: dict[str, Any]) -> dict[str, Any]:
        text = _text(example, column)
        return example if text is None else {**example, column: text.lower()}

    return lower


@hookimpl
def adaptkit_register_transforms(register):
    """Register the ``word_dropout``, ``lowercase`` and ``image_augment`` transforms."""
    register("word_dropout", word_dropout)
    register("lowercase", lowercase)
    register("image_augment", image_augment)
