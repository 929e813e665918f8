"""Built-in plugin: evaluation metrics (plain Python, no heavy imports)."""

from __future__ import annotations

from collections.abc import Sequence

from adaptkit.contract.hookspecs import hookimpl


def accuracy(predictions: Sequence, references: Sequence) -> float:
    """Fraction of predictions equal to their reference."""
    if not references:
        return 0.0
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def macro_f1(predictions: Sequence, references: Sequence) -> float:
    """F1 averaged over the classes present in references or predictions, each class weighted equally."""
    classes = sorted(set(references) | set(predictions))
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        tp = sum(p == c and r == c for p, r in zip(predictions, references))
        fp = sum(p == c and r != c for p, r in zip(predictions, references))
        fn = sum(p != c and r == c for p, r in zip(predictions, references))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


@hookimpl
def adaptkit_register_metrics(register):
    """Register the ``accuracy`` and ``macro_f1`` metrics."""
    register("accuracy", accuracy)
    register("macro_f1", macro_f1)
