"""Built-in plugin: the tasks a recipe can name in ``model.task``.

A task knows which head the model needs, how data rows become model inputs, how to batch them
and how to score predictions. Plugins add tasks through ``adaptkit_register_tasks``.

The tasks live in modules of their own: ``classification`` (text classification and the
labelled-task base), ``causal_lm`` (supervised fine-tuning and language modelling), ``image``
(image classification), ``audio`` (audio classification) and ``generation`` (greedy generation
for evaluation). This module is the plugin: it registers them and re-exports them.
"""

from __future__ import annotations

from adaptkit.contract.hookspecs import hookimpl
from adaptkit.contract.task import IGNORE, Task, require_columns

from .audio import AudioClassification
from .causal_lm import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS_COLUMN,
    REFERENCE_COLUMN,
    SCORER_COLUMN,
    CausalLM,
    LanguageModeling,
)
from .classification import Classification, LabelledTask
from .generation import extract_answer, generate_texts
from .image import ImageClassification

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "IGNORE",
    "MAX_NEW_TOKENS_COLUMN",
    "REFERENCE_COLUMN",
    "SCORER_COLUMN",
    "AudioClassification",
    "CausalLM",
    "Classification",
    "ImageClassification",
    "LabelledTask",
    "LanguageModeling",
    "Task",
    "adaptkit_register_tasks",
    "extract_answer",
    "generate_texts",
    "require_columns",
]


@hookimpl
def adaptkit_register_tasks(register):
    """Register the built-in tasks: classification, causal_lm, language_modeling, image_classification,
    audio_classification."""
    register("classification", Classification)
    register("causal_lm", CausalLM)
    register("language_modeling", LanguageModeling)
    register("image_classification", ImageClassification)
    register("audio_classification", AudioClassification)
