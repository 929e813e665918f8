"""adaptkit: adapt pretrained models to new tasks with pluggable fine-tuning strategies.

Importing adaptkit does not import torch; the heavy libraries load when a model is touched.
"""

from adaptkit.adapt.stack import Adapted, apply
from adaptkit.contract.hookspecs import hookimpl
from adaptkit.contract.strategy import Event, Strategy, StrategyConfig, TrainState
from adaptkit.errors import AdaptkitError, ConfigError, StrategyError
from adaptkit.version import __version__

__all__ = [
    "Adapted",
    "AdaptkitError",
    "ConfigError",
    "Event",
    "Strategy",
    "StrategyConfig",
    "StrategyError",
    "TrainState",
    "__version__",
    "apply",
    "hookimpl",
]
