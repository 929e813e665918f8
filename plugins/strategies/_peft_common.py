"""What the peft-based strategies (``lora``, ``peft``) share: choosing what stays trainable,
wrapping a model with peft, and saving, loading and merging in peft's own format.

Not a plugin: a helper module for ``adaptkit_plugins.strategies.lora`` and ``adaptkit_plugins.strategies.peft_methods``.
Like every plugin module it imports torch, transformers and peft only inside functions, so
``adaptkit strategies`` can list the strategies without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit import Strategy, StrategyError
from adaptkit.contract.anatomy import find_blocks, head_parameter_names, tied_groups
from adaptkit.errors import CheckpointError, NotMergeableError, SharedParameterError

if TYPE_CHECKING:
    from torch import nn

#: The files peft writes; adaptkit reads only the safetensors one.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


# -- reading the model -------------------------------------------------------------------------


def peft_task_type(model: nn.Module) -> str | None:
    """peft's ``task_type`` for a transformers model: ``SEQ_CLS``, ``CAUSAL_LM`` or None.

    peft picks its wrapper class from it (``PeftModelForCausalLM`` keeps ``generate``), and
    prompt-learning methods need it to know where the virtual tokens go.
    """
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    return None


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's transposed linear layer)."""
    from torch import nn

    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def block_linear_names(model: nn.Module, blocks: str | None = None) -> list[str]:
    """Full names of the linear layers inside the transformer blocks, in model order."""
    path, block_list = find_blocks(model, blocks)
    names = []
    for i, block in enumerate(block_list):
        names += [f"{path}.{i}.{n}" for n, m in block.named_modules() if n and is_linear(m)]
    return names


def resolve_module_names(model: nn.Module, wanted: list[str], field: str, strategy: str) -> list[str]:
    """Full module names for each entry of ``wanted`` (an exact name or a dotted suffix).

    An entry that matches nothing is an error repeating the user's value, so a typo cannot
    silently train nothing.
    """
    modules = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for want in wanted:
        matched = [n for n in modules if n == want or n.endswith("." + want)]
        if not matched:
            raise StrategyError(
                f"{strategy}.{field}: no module of {type(model).__name__} is named '{want}' (got {wanted!r})"
            )
        found += [n for n in matched if n not in found]
    return found


def owning_modules(model: nn.Module, param_names: set[str], strategy: str) -> list[str]:
    """The smallest modules that hold exactly ``param_names``, for peft's ``modules_to_save``.

    peft saves whole modules, not single parameters, so each kept parameter's owning module must
    be kept completely; a module of which only some parameters train (only a Linear's bias, say)
    cannot be expressed, and is refused rather than silently training or dropping the rest.
    """
    owners: dict[str, list[str]] = {}
    for name in sorted(param_names):
        module, _, _ = name.rpartition(".")
        owners.setdefault(module, []).append(name)
    modules = dict(model.named_modules())
    result = []
    for module_name, kept in owners.items():
        everything = [
            f"{module_name}.{n}" if module_name else n
            for n, _ in modules[module_name].named_parameters(remove_duplicate=False)
        ]
        partial = sorted(set(everything) - param_names)
        if partial or not module_name:
            raise StrategyError(
                f"{strategy}: {kept[:3]} train but {partial[:3] or 'the rest of the model'} in the same module do not; "
                "peft can only save whole modules. Keep the whole module trainable in the earlier strategy "
                f"(or freeze it), or name the module in {strategy}.modules_to_save"
            )
        result.append(module_name)
    # a parent and its child both listed: the parent covers the child
    return [m for m in result if not any(m.startswith(other + ".") for other in result)]


def kept_trainable(model: nn.Module, after_other_strategies: bool) -> set[str]:
    """Names of the parameters that must keep training under peft (and be saved with it).

    Applied first, on a model whose parameters all train because nobody chose yet, that is the
    task head. After an earlier strategy (``freeze``), it is whatever that strategy left
    trainable: its choice of head, top blocks or norms must survive peft freezing everything.
    """
    names = dict(model.named_parameters(remove_duplicate=False))
    if after_other_strategies:
        return {n for n, p in names.items() if p.requires_grad}
    head = set(head_parameter_names(model))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = {id(p) for p in output.parameters()} if output is not None else set()
    if any(id(names[n]) in lm_head for n in head):
        # A language-model head is pretrained (and often tied to the input embeddings): it is
        # not a new task head, and training all of vocab x hidden defeats the point of peft.
        return set()
    return head


def check_ties(model: nn.Module, module_names: list[str], strategy: str, what: str) -> bool:
    """True when a module in ``module_names`` holds a weight tied to another module.

    For ``modules_to_save`` the caller turns on peft's ``ensure_weight_tying`` (both copies stay
    one); for LoRA targets it is refused: a delta on a tied matrix changes the other use of
    it too, and merging it breaks the tie in a saved model.
    """
    tied = {n.rpartition(".")[0]: group for group in tied_groups(model) for n in group}
    hits = [m for m in module_names if m in tied]
    if hits and what == "target_modules":
        raise SharedParameterError(
            f"{strategy}: {hits} share their weight with {sorted(set(tied[hits[0]]) - {hits[0] + '.weight'})} "
            "(tied embeddings); a low-rank update there would also change the other use of the weight. "
            f"Leave them out of {strategy}.target_modules, or name them in {strategy}.modules_to_save to train the shared weight"
        )
    return bool(hits)


# -- the shared strategy -----------------------------------------------------------------------


class PeftStrategy(Strategy):
    """Base of strategies that wrap the model with ``peft``: save, load and merge in peft's format.

    Subclasses implement ``peft_config(model, modules_to_save)``; ``apply`` does the rest.
    """

    wraps_with_peft = True
    #: Set by ``check``: whether strategies come before this one in the stack.
    _after_others = False

    def check(self, stack: list[Strategy], position: int) -> None:
        """Record whether earlier strategies chose what trains (their choice is then kept)."""
        self._after_others = position > 0

    def peft_config(self, model: nn.Module, modules_to_save: list[str]) -> Any:
        """The peft config to wrap ``model`` with (``modules_to_save`` already resolved)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, modules_to_save: list[str]) -> nn.Module:
        """Change the base before wrapping (``lora`` quantizes here, sparing ``modules_to_save``)."""
        return model

    def extra_modules_to_save(self, model: nn.Module) -> list[str]:
        """Module names the user asked to train and save in full, resolved to full names."""
        return []

    def apply(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` with peft, keeping the head and earlier choices trainable and saved."""
        import peft

        was_training = model.training
        keep = kept_trainable(model, self._after_others)
        modules_to_save = owning_modules(model, keep, self.name)
        for extra in self.extra_modules_to_save(model):
            if extra not in modules_to_save:
                modules_to_save.append(extra)
        modules_to_save = [
            m for m in modules_to_save if not any(m.startswith(o + ".") for o in modules_to_save)
        ]
        model = self.prepare(model, modules_to_save)
        config = self.peft_config(model, modules_to_save)
        for p in model.parameters():
            p.requires_grad_(False)
        # Reentrant gradient checkpointing needs an input that requires grad, else every
        # checkpointed block drops out of autograd; the hook is harmless without checkpointing,
        # and checkpointing is often switched on after the strategy runs (by the Trainer).
        if hasattr(model, "enable_input_require_grads"):
            try:
                model.enable_input_require_grads()
            except NotImplementedError:
                pass
        try:
            wrapped = peft.get_peft_model(model, config)
        except (ValueError, TypeError) as exc:  # TypeError: a layer type the method does not support
            raise StrategyError(f"{self.name}: peft refused the configuration: {exc}") from None
        upcast_trainable(wrapped)
        # peft creates dropout and copies in training mode even on a model in eval mode.
        wrapped.train(was_training)
        self.owned = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
        if not self.owned:
            raise StrategyError(f"{self.name}: nothing trains after applying peft; check target_modules")
        return wrapped

    # -- saving and loading -----------------------------------------------------------------

    def save(self, model: nn.Module, directory: Path) -> None:
        """peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``).

        ``peft.PeftModel.from_pretrained(base, directory)`` loads it without adaptkit.
        """
        state = _adapter_state(model)
        empty = [k for k, t in state.items() if t.numel() == 0]
        if empty:  # a sharded parameter saved without gathering
            raise CheckpointError(
                f"{self.name}: refusing to save empty tensors {empty[:3]} (sharded and not gathered?)"
            )
        model.save_pretrained(str(directory), safe_serialization=True)

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """Load the saved adapter onto ``model`` (a fresh base this strategy was just applied to).

        Strict: a missing or unexpected key is a CheckpointError, never a warning, because an
        adapter that silently did not load leaves the base model's outputs. Pickle files
        are refused: unpickling can run arbitrary code.
        """
        import torch
        from peft.utils import set_peft_model_state_dict

        from adaptkit.files import load_tensors

        directory = Path(directory)
        path = directory / ADAPTER_WEIGHTS
        if not path.is_file():
            pickled = [f for f in PICKLED_WEIGHTS if (directory / f).exists()]
            if pickled:
                raise CheckpointError(
                    f"{directory / pickled[0]}: pickle checkpoints are refused (they can run code); convert it to safetensors"
                )
            raise CheckpointError(f"{path}: file not found")
        if str(getattr(model.peft_config.get("default"), "peft_type", "")).endswith("P_TUNING"):
            # peft saves p-tuning's encoder *outputs*; loaded into a trainable model they would
            # be encoded a second time, and the outputs would silently differ.
            raise CheckpointError(
                f"strategy '{self.name}': peft saves p_tuning prompts already encoded; they load only for inference "
                f"(peft.PeftModel.from_pretrained(base, '{directory}')), not back into a trainable model"
            )
        tensors = load_tensors(path)
        expected = _adapter_state(model)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"strategy '{self.name}': {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, t in tensors.items():
            if tuple(t.shape) != tuple(expected[key].shape):
                raise CheckpointError(
                    f"strategy '{self.name}': {path}: '{key}' has shape {tuple(t.shape)}, the model has {tuple(expected[key].shape)}"
                )
        set_peft_model_state_dict(model, tensors)
        # peft only warns about keys it could not place (and places prompt embeddings outside
        # the state dict it reports on), so check the result: every saved tensor must read back.
        loaded = _adapter_state(model)
        not_loaded = [k for k, t in tensors.items() if not torch.equal(loaded[k].to(t.device, t.dtype), t)]
        if not_loaded:
            raise CheckpointError(
                f"strategy '{self.name}': {not_loaded[:5]} from {path} did not load into the model"
            )
        upcast_trainable(model)
        return model

    # -- merging ------------------------------------------------------------------------------

    def merge(self, model: nn.Module) -> nn.Module:
        """peft's ``merge_and_unload``: a plain transformers model with the adapter folded in."""
        if not hasattr(model, "merge_and_unload"):
            raise NotMergeableError(
                f"strategy '{self.name}': this peft method cannot be merged into a plain model"
            )
        was_training = model.training
        tied_before = _tie_count(model)
        try:
            merged = model.merge_and_unload()
        except (AttributeError, NotImplementedError, ValueError) as exc:
            raise NotMergeableError(f"strategy '{self.name}': peft cannot merge it: {exc}") from None
        if _tie_count(merged) < tied_before:
            _retie(merged, self.name)
        return finish_merge(merged, was_training)


def finish_merge(merged: nn.Module, was_training: bool) -> nn.Module:
    """A merged model as a plain one: without the input-gradient hook ``apply`` added, in its mode."""
    if hasattr(merged, "disable_input_require_grads"):
        try:
            merged.disable_input_require_grads()
        except (AttributeError, NotImplementedError):  # no hook to remove, or no input embeddings
            pass
    merged.train(was_training)
    return merged


def _adapter_state(model: nn.Module) -> dict:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def _tie_count(model: nn.Module) -> int:
    return sum(len(g) - 1 for g in tied_groups(model))


def _retie(model: nn.Module, strategy: str) -> None:
    """Tie the input and output embeddings again after a merge unwrapped them.

    peft's tied ``modules_to_save`` copies come back as two Parameter objects over one storage;
    transformers' ``tie_weights`` makes them one again. Refused when the two hold different
    values: re-tying would then silently throw one of the trained matrices away.
    """
    import torch

    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out is None or inp is None or not torch.equal(out.weight, inp.weight):
        raise SharedParameterError(
            f"strategy '{strategy}': merging untied the model's tied embeddings and they now differ"
        )
    model.tie_weights()
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise SharedParameterError(
            f"strategy '{strategy}': could not tie the merged model's embeddings again"
        )


def upcast_trainable(model: nn.Module) -> None:
    """Trainable parameters in float32: optimizers and grad scalers need fp32 masters."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
