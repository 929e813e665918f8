"""The hooks a plugin can implement: this file is the plugin author's reference.

A plugin is a module (or object) with functions named after these hooks, each decorated with
``adaptkit.hookimpl``. Parameters are matched by name: declare exactly the ones you use, with no
default values (pluggy never passes a parameter that has a default). A function whose name starts
with ``adaptkit_`` but is not listed here makes the plugin fail to load, so a typo cannot go
unnoticed.

Plugins must import heavy modules (torch, transformers, peft) inside the functions that need
them: ``adaptkit strategies`` and ``adaptkit plugins`` import every plugin but never torch.

Registration hooks (``adaptkit_register_*``) are called once per plugin manager. Each receives a
``register`` callback; registrations are attributed to the calling plugin, and a name registered
twice is an error naming both plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from adaptkit.contract.model import LoadedModel
    from adaptkit.contract.task import Task
    from adaptkit.recipe.schema import ModelSpec

hookspec = pluggy.HookspecMarker("adaptkit")
hookimpl = pluggy.HookimplMarker("adaptkit")

#: Version of the plugin API described in this file. A plugin module may set
#: ``ADAPTKIT_API = N`` to say it needs at least version N; an older host refuses it clearly.
PLUGIN_API_VERSION = 1


@hookspec
def adaptkit_register_strategies(register: Callable[..., None]) -> None:
    """Register fine-tuning strategies.

    Call ``register(name, strategy_class, config_class)`` once per strategy:

    - ``name``: the name recipes and ``adaptkit.apply`` use (lower case, ``[a-z0-9_]+``).
    - ``strategy_class``: a subclass of ``adaptkit.Strategy``; its docstring's first line is the
      description ``adaptkit strategies`` shows.
    - ``config_class``: a subclass of ``adaptkit.StrategyConfig`` (a pydantic model) that
      validates the strategy's section of a recipe.

    Neither class may import torch at module level.
    """


@hookspec
def adaptkit_register_tasks(register: Callable[..., None]) -> None:
    """Register tasks (what a model learns: classification, causal-LM SFT, ...).

    Call ``register(name, task_class)`` with a subclass of ``adaptkit.contract.task.Task``. A task builds
    the model's head, turns data rows into batches and computes its metrics.
    """


@hookspec
def adaptkit_register_data_sources(register: Callable[..., None]) -> None:
    """Register data sources a recipe can name in ``data.source``.

    Call ``register(name, load)`` where ``load(options: dict, seed: int)`` returns a
    ``datasets.DatasetDict`` with a ``train`` split and optionally ``validation``/``test``.
    Local files and directories are handled by the host; register sources that generate or
    fetch data (``reasoning_gym``, a database, ...). A source whose data ships in a package may
    be an object with an ``info()`` method returning ``package``, ``license``, ``description``,
    ``cached``, ``path`` and ``size_bytes``: ``adaptkit models`` then lists it with the
    packaged models.

    Evaluation by generation (``causal_lm``): give the validation rows a ``scorer`` column naming
    a metric registered through ``adaptkit_register_metrics`` (the same name on every row), a
    ``reference`` column (a string: whatever that metric needs to judge one answer) and
    optionally ``max_new_tokens`` (int, default 32). After each evaluation the model answers each
    prompt by greedy decoding; the first line of each answer goes to
    ``metric(answers, references)``, logged as ``answer_accuracy``, which then decides the best
    evaluation. A local file with these columns works the same way (``scorer: accuracy`` with
    the gold answer as ``reference`` is exact-match accuracy).
    """


@hookspec
def adaptkit_register_metrics(register: Callable[..., None]) -> None:
    """Register evaluation metrics by name.

    Call ``register(name, fn)`` where ``fn(predictions, references) -> float`` and both
    arguments are sequences of the same length.
    """


@hookspec
def adaptkit_register_transforms(register: Callable[..., None]) -> None:
    """Register data transforms (augmentation) a recipe can list under ``data.transforms``.

    Call ``register(name, factory)`` where ``factory(**options)`` returns a function mapping one
    training example (a dict) to a new example. Transforms apply to the training split only, once,
    before encoding. A function with two positional parameters also gets the example's index: draw
    randomness from it (and a seed option) so that every run sees the same data. The recipe's
    options are checked against the factory's parameters; a ``ValueError`` from the factory is
    reported as a recipe error naming ``data.transforms[i]``. ``adaptkit_plugins.transforms`` has examples.
    """


@hookspec
def adaptkit_register_models(register: Callable[..., None]) -> None:
    """Register models that a recipe's ``model.source`` can name by a short name.

    Call ``register(name, model)`` with an ``adaptkit.contract.model.ModelSource``: an object with
    ``description``, ``license``, ``fetch()`` (the local model directory, downloaded and
    converted on first use) and ``info()`` (its row in ``adaptkit models``). Loading a registered
    name is still a loader's job (``adaptkit_load_model``); the estimator reads the model's config
    from ``fetch()``'s directory.
    """


@hookspec(firstresult=True)
def adaptkit_load_model(spec: ModelSpec, task: Task) -> LoadedModel | None:
    """Load the model a recipe names; the first non-None result wins.

    ``spec`` is the recipe's validated ``model`` section (source, dtype, ``trust_remote_code``,
    ...); ``task`` is the task instance, whose ``auto_model`` names the transformers auto class
    and whose ``model_kwargs()`` gives head options (``num_labels``, label names). Return an
    ``adaptkit.contract.model.LoadedModel`` if this plugin
    recognises ``spec.source``, otherwise ``None``. The built-in transformers loader runs last
    (``trylast``), so any plugin can take over a source before it.
    """


@hookspec
def adaptkit_on_train_start(run: Any) -> None:
    """Called once on every process after the model, data and optimizer are prepared.

    ``run`` is the ``adaptkit.train.context.Run`` (recipe, accelerator, model, run directory).
    An exception here is reported naming the plugin and stops the run before any step.
    """


@hookspec
def adaptkit_on_step_end(run: Any, step: int, logs: dict[str, float]) -> None:
    """Called after every optimizer step with the step number (1-based) and its logged values.

    Notification only: an exception is reported naming the plugin, and the other
    implementations still run.
    """


@hookspec
def adaptkit_on_evaluate(run: Any, step: int, metrics: dict[str, float]) -> None:
    """Called after each evaluation with its metrics (``eval_loss``, task metrics)."""


@hookspec
def adaptkit_on_checkpoint(run: Any, step: int, path: str) -> None:
    """Called on the main process after a checkpoint directory is complete (manifest written)."""


@hookspec
def adaptkit_on_train_end(run: Any, summary: dict[str, Any]) -> None:
    """Called once at the end of a run with the summary written to the run directory."""
