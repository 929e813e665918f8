"""The errors adaptkit raises on purpose.

Everything a user can cause (a bad recipe, config, data file, plugin or flag) is an
``AdaptkitError``: the CLI prints its message, without a traceback, and exits with status 2.
Anything else escaping is a bug in adaptkit or a plugin and keeps its traceback.
"""

from __future__ import annotations


class AdaptkitError(Exception):
    """Base class of every error caused by user input rather than by a bug."""

    exit_code = 2


class ConfigError(AdaptkitError):
    """A recipe or a strategy config is invalid.

    ``problems`` holds one ``(dotted_path, message)`` pair per problem so that every
    problem of a recipe is reported at once.
    """

    def __init__(self, problems: list[tuple[str, str]] | str, source: str | None = None):
        if isinstance(problems, str):
            problems = [("", problems)]
        self.problems = problems
        self.source = source
        lines = [f"{path}: {msg}" if path else msg for path, msg in problems]
        head = f"{source}: " if source else ""
        if len(lines) == 1:
            super().__init__(head + lines[0])
        else:
            super().__init__(head + f"{len(lines)} problems:\n" + "\n".join("  " + line for line in lines))


class StrategyError(AdaptkitError):
    """A strategy cannot be applied to this model, or strategies cannot be combined."""


class NotMergeableError(StrategyError):
    """A strategy's changes cannot be folded into a plain model."""


class UnownedParametersError(StrategyError):
    """Parameters would train that no strategy owns (and so none would save)."""


class SharedParameterError(StrategyError):
    """A parameter shared by two modules (tied embeddings) would be frozen or trained by accident."""


class PluginError(AdaptkitError):
    """A plugin failed to load, or failed inside a hook (the message names it)."""


class DataError(AdaptkitError):
    """A data file or data source is unusable (the message names the file, row and column)."""


class CheckpointError(AdaptkitError):
    """A checkpoint is incomplete, corrupted, unsafe or belongs to another base model."""


class DoesNotFitError(AdaptkitError):
    """The estimated peak of a training step exceeds the memory available for it."""


class TrainingError(AdaptkitError):
    """Training cannot go on (a NaN loss, say); the last good checkpoint is kept."""


class LaunchError(AdaptkitError):
    """The way the run was launched cannot work (FSDP without GPUs, say). Every process of the
    launch finds the same, so only the first one says it."""

    every_rank = True
