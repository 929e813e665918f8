"""Helpers for testing adaptkit and its plugins: tiny models built from configs, inputs, and the
strategy conformance kit.

No download happens here: every model is randomly initialised from a small config, so a test
runs in seconds on a CPU. Plugin authors can use these in their own test suites.
"""

from adaptkit.testing.conformance import CHECKS, check_strategy
from adaptkit.testing.kit import check_two_processes, conformance_test
from adaptkit.testing.models import (
    CHAT_TEMPLATE,
    FAMILIES,
    NEGATIVE,
    POSITIVE,
    SPECIAL,
    VOCAB,
    WORDS,
    load_recipe_model,
    plugin_host,
    save_tiny_pretrained,
    sentiment_rows,
    tiny_config,
    tiny_inputs,
    tiny_model,
    tiny_tokenizer,
    write_sentiment,
)

__all__ = [
    "CHAT_TEMPLATE",
    "CHECKS",
    "FAMILIES",
    "NEGATIVE",
    "POSITIVE",
    "SPECIAL",
    "VOCAB",
    "WORDS",
    "check_strategy",
    "check_two_processes",
    "conformance_test",
    "load_recipe_model",
    "plugin_host",
    "save_tiny_pretrained",
    "sentiment_rows",
    "tiny_config",
    "tiny_inputs",
    "tiny_model",
    "tiny_tokenizer",
    "write_sentiment",
]
