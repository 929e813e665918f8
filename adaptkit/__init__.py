"""adaptkit: adapt pretrained models to new tasks with pluggable fine-tuning strategies.

Importing adaptkit does not import torch; the heavy libraries load when a model is touched.
"""

from adaptkit.adapted import Adapted, apply
from adaptkit.errors import AdaptkitError, ConfigError, StrategyError
from adaptkit.hookspecs import hookimpl
from adaptkit.strategy import Strategy, StrategyConfig, TrainState

__version__ = "0.1.0"

__all__ = [
    "Adapted",
    "AdaptkitError",
    "ConfigError",
    "Strategy",
    "StrategyConfig",
    "StrategyError",
    "TrainState",
    "__version__",
    "apply",
    "hookimpl",
]
