"""``peft``: any other peft method (IA3, LoHa, LoKr, VeRA, prompt tuning, prefix tuning, ...) by name.

``{name: peft, method: ia3, options: {...}}``: ``options`` go to the peft config class of that
method and are validated by building it, so a misspelled option is an error naming it. The
head and whatever an earlier strategy left trainable are kept and saved as with ``lora``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator, model_validator

from adaptkit import StrategyConfig, StrategyError, hookimpl
from adaptkit.contract.anatomy import find_blocks, is_norm
from adaptkit.errors import NotMergeableError, SharedParameterError
from adaptkit_plugins.strategies._peft_common import (
    PeftStrategy,
    block_linear_names,
    check_ties,
    peft_task_type,
    resolve_module_names,
)

if TYPE_CHECKING:
    from torch import nn

#: Options adaptkit sets itself: peft's bookkeeping, and what the strategy derives from the model.
RESERVED_OPTIONS = {
    "peft_type",
    "inference_mode",
    "base_model_name_or_path",
    "revision",
    "auto_mapping",
    "peft_version",
}


def peft_methods() -> dict[str, type]:
    """peft's config classes by method name (``ia3``, ``loha``, ``prompt_tuning``, ...), ``lora`` excluded."""
    import peft

    methods = {str(t.value).lower(): cls for t, cls in peft.PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    # LoRA has its own strategy, with QLoRA and the checks this generic one cannot make
    methods.pop("lora", None)
    return methods


def _fields(config_cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls) if f.init}


class PeftMethodConfig(StrategyConfig):
    """Which peft method, and the options of its peft config class."""

    method: str = Field(
        description="the peft method: ia3, loha, lokr, vera, prompt_tuning, prefix_tuning, p_tuning, boft, oft, ..."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of the method's peft config class (IA3Config, LoHaConfig, ...); "
        "target_modules defaults to peft's choice for the model, else every linear layer in the blocks",
    )
    blocks: str | None = Field(
        None, description="dotted path of the transformer block list, when it cannot be found automatically"
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        methods = peft_methods()
        name = value.lower()
        if name == "lora":
            raise ValueError("use the 'lora' strategy for LoRA (it adds QLoRA and tied-weight checks)")
        if name not in methods:
            raise ValueError(f"unknown peft method {value!r}; available: {', '.join(sorted(methods))}")
        return name

    @model_validator(mode="after")
    def _valid_options(self) -> PeftMethodConfig:
        config_cls = peft_methods()[self.method]
        known = _fields(config_cls) - RESERVED_OPTIONS
        for key in self.options:
            if key in RESERVED_OPTIONS:
                raise ValueError(f"options.{key} is set by adaptkit and cannot be given")
            if key not in known:
                raise ValueError(
                    f"options.{key}: {config_cls.__name__} has no option '{key}'; its options: {', '.join(sorted(known))}"
                )
        # Building the config checks the values too; targets are checked against the model in apply.
        try:
            config_cls(**self.options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"options for {self.method} are invalid: {exc}") from None
        return self


def _takes_past_key_values(model: nn.Module) -> bool:
    """Whether peft's prefix tuning can pass the prefix to ``model`` (or to its backbone, as peft tries next)."""
    import inspect

    from transformers import PreTrainedModel

    forwards = [model.forward] + [m.forward for m in model.children() if isinstance(m, PreTrainedModel)]
    return any("past_key_values" in inspect.signature(f).parameters for f in forwards)


class PeftMethod(PeftStrategy):
    """Any other peft method (IA3, LoHa, LoKr, VeRA, prompt or prefix tuning, ...) by its config."""

    def __init__(self, config, name=None):
        super().__init__(config, name)
        # prompt-learning methods add tokens, not weights: nothing to merge, and peft drops the
        # position ids a packed row needs to keep its sequences apart
        self.mergeable = self.packs = config.method not in _PROMPT_METHODS

    def peft_config(self, model: nn.Module, modules_to_save: list[str]):
        """The method's peft config: the user's options plus the task type and what to save."""
        cfg = self.config
        config_cls = peft_methods()[cfg.method]
        fields = _fields(config_cls)
        options = dict(cfg.options)
        task_type = peft_task_type(model)
        if "task_type" not in options and task_type is not None:
            options["task_type"] = task_type
        if "target_modules" in fields:
            if "target_modules" in options:
                wanted = options["target_modules"]
                wanted = [wanted] if isinstance(wanted, str) else list(wanted)
                targets = resolve_module_names(model, wanted, "options.target_modules", self.name)
                check_ties(model, targets, self.name, "target_modules")
                options["target_modules"] = targets
            elif not self._peft_has_default(cfg.method, model):
                options["target_modules"] = [
                    n for n in self._default_targets(model) if not _under(n, modules_to_save)
                ]
                if "feedforward_modules" in fields and "feedforward_modules" not in options:
                    options["feedforward_modules"] = []  # IA3: scale every target's output
        if modules_to_save:
            if "modules_to_save" not in fields:
                raise StrategyError(
                    f"{self.name}: peft method {cfg.method} cannot keep {modules_to_save[:3]} trainable (its config has no modules_to_save)"
                )
            if check_ties(model, modules_to_save, self.name, "modules_to_save"):
                raise SharedParameterError(
                    f"{self.name}: {modules_to_save} hold tied embeddings; peft method {cfg.method} cannot keep the copies tied"
                )
            options["modules_to_save"] = list(options.get("modules_to_save") or []) + modules_to_save
        if (
            cfg.method == "prefix_tuning"
            and options.get("task_type") == "SEQ_CLS"
            and not _takes_past_key_values(model)
        ):
            # peft hands a classifier's prefix over as the past_key_values argument, which
            # transformers 5.24 renamed (to cache) in its classifiers' forward: the first step would fail
            raise StrategyError(
                f"{self.name}: prefix_tuning cannot adapt {type(model).__name__} with the installed transformers "
                "and peft (its forward takes no past_key_values, through which peft passes the prefix); "
                "use prompt_tuning, p_tuning or lora"
            )
        if options.get("task_type") is None and cfg.method in _PROMPT_METHODS:
            raise StrategyError(
                f"{self.name}: {cfg.method} needs a text model with a task peft knows (sequence classification or causal LM); got {type(model).__name__}"
            )
        try:
            return config_cls(**options)
        except (TypeError, ValueError) as exc:
            raise StrategyError(f"{self.name}: {cfg.method}: {exc}") from None

    def _default_targets(self, model: nn.Module) -> list[str]:
        """Where peft has no default for this model: the blocks' norms for ln_tuning (it tunes
        norms), every linear layer of the blocks for the others (as ``lora`` does)."""
        if self.config.method != "ln_tuning":
            return block_linear_names(model, self.config.blocks)
        path, blocks = find_blocks(model, self.config.blocks)
        return [
            f"{path}.{i}.{n}" for i, b in enumerate(blocks) for n, m in b.named_modules() if n and is_norm(m)
        ]

    @staticmethod
    def _peft_has_default(method: str, model: nn.Module) -> bool:
        from peft.utils import constants

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        for key in (method.upper(), method.upper().replace("_", "")):
            mapping = getattr(constants, f"TRANSFORMERS_MODELS_TO_{key}_TARGET_MODULES_MAPPING", None)
            if mapping is not None:
                return model_type in mapping
        return False

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the method into the weights where peft can (not for prompt-learning methods)."""
        if self.config.method in _PROMPT_METHODS:
            raise NotMergeableError(
                f"strategy '{self.name}': {self.config.method} adds virtual tokens and cannot be merged into the weights"
            )
        return super().merge(model)


#: Methods that prepend learned tokens or key/values: nothing to merge, and they need a task type.
_PROMPT_METHODS = {
    "prompt_tuning",
    "prefix_tuning",
    "p_tuning",
    "multitask_prompt_tuning",
    "cpt",
    "adaption_prompt",
}


def _under(name: str, modules: list[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


@hookimpl
def adaptkit_register_strategies(register):
    """Register the ``peft`` strategy (any other peft method by name)."""
    register("peft", PeftMethod, PeftMethodConfig)
