"""``adapters``: bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020).

A small two-layer network, ``h + up(act(down(h)))``, follows the output projection of a block's
sub-layers, before the block adds its residual (and, in BERT, before its LayerNorm). ``houlsby``
puts one after the attention output and one after the feed-forward output of every block;
``pfeiffer`` only the feed-forward one. The backbone is frozen; the adapters (and by default the
task head) train. Adapters are non-linear, so they cannot be merged into a plain model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from adaptkit import Strategy, StrategyConfig, StrategyError, hookimpl
from adaptkit.contract.anatomy import find_blocks, head_parameter_names, is_norm, resolve_ties, unwrap
from adaptkit.errors import NotMergeableError

#: Where the attention sub-layer's output projection lives, relative to a block; first match wins.
ATTENTION_OUTPUTS: tuple[str, ...] = (
    "attention.output.dense",  # BERT, RoBERTa, ELECTRA; ViT before transformers 5
    "attn.c_proj",  # GPT-2
    "self_attn.o_proj",  # LLaMA, Mistral, Qwen2, Gemma
    "attention.o_proj",  # ViT (transformers 5)
    "self_attn.out_proj",  # OPT, BART, CLIP
    "attention.out_lin",  # DistilBERT
    "attention.dense",  # GPT-NeoX
    "self_attention.dense",  # Falcon, BLOOM
    "self_attn.dense",  # Phi
    "attn.out_proj",  # GPT-J
    "attn.attention.out_proj",  # GPT-Neo
)

#: Where the feed-forward sub-layer's output projection lives, relative to a block.
FFN_OUTPUTS: tuple[str, ...] = (
    "output.dense",  # BERT, RoBERTa, ELECTRA; ViT before transformers 5
    "mlp.c_proj",  # GPT-2, GPT-Neo
    "mlp.down_proj",  # LLaMA, Mistral, Qwen2, Gemma
    "mlp.fc2",  # ViT (transformers 5), CLIP, Phi
    "fc2",  # OPT, BART
    "ffn.lin2",  # DistilBERT
    "mlp.dense_4h_to_h",  # GPT-NeoX, Falcon, BLOOM
    "mlp.fc_out",  # GPT-J
)


class AdaptersConfig(StrategyConfig):
    """Where bottleneck adapters go, how big they are, and what else trains."""

    kind: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby",
        description="houlsby: an adapter after the attention output and one after the feed-forward output of "
        "every block; pfeiffer: after the feed-forward output only",
    )
    reduction_factor: int = Field(
        16, ge=1, description="bottleneck size is max(1, hidden size // reduction_factor)"
    )
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field(
        "relu", description="activation between the down- and up-projection"
    )
    init_scale: float = Field(
        0.0,
        ge=0.0,
        description="standard deviation of the up-projection's initial weights; 0 starts it at zero, so the "
        "adapted model computes exactly what the base model did",
    )
    train_head: bool = Field(
        True, description="keep the task head (everything outside the backbone) trainable"
    )
    tied_head: Literal["error", "untie", "share"] = Field(
        "error",
        description="when the trainable head shares its weight with the frozen input embeddings: "
        "error, untie (give the head its own copy) or share (train both on purpose)",
    )
    train_norms: bool = Field(
        False, description="keep every normalisation layer trainable (as Houlsby et al. do)"
    )
    blocks: str | None = Field(
        None, description="dotted path of the block list, when it cannot be found automatically"
    )
    attention_output: str | None = Field(
        None,
        description="module, relative to a block, whose output the attention adapter follows "
        "(houlsby only), when it cannot be found automatically",
    )
    ffn_output: str | None = Field(
        None,
        description="module, relative to a block, whose output the feed-forward adapter follows, "
        "when it cannot be found automatically",
    )

    @model_validator(mode="after")
    def _attention_output_needs_houlsby(self):
        # Silently ignoring a placement the user asked for would train a different model than intended.
        if self.kind == "pfeiffer" and self.attention_output is not None:
            raise ValueError(
                "attention_output is only used by kind 'houlsby'; pfeiffer adapters follow the feed-forward output only"
            )
        return self


class Adapters(Strategy):
    """Insert bottleneck adapters into every block, freeze the backbone, train the adapters.

    Trains the adapters, the task head (``train_head``) and the norms (``train_norms``); ``owned``
    holds exactly those, so the default save and load round-trip them. After an earlier strategy
    (``freeze``), what that strategy made trainable stays trainable and stays its own.
    """

    mergeable = False
    lr_range = (1e-4, 3e-3)  # small new modules beside a frozen network, as for LoRA (Houlsby et al.)

    def __init__(self, config, name=None):
        super().__init__(config, name)
        self._earlier: list[Strategy] = []

    def check(self, stack, position):
        """Refuse to follow a peft strategy; remember the strategies before this one."""
        for earlier in stack[:position]:
            if earlier.wraps_with_peft:
                raise StrategyError(
                    f"put '{self.name}' before '{earlier.name}' in the stack: '{earlier.name}' wraps the model with peft, "
                    f"and adapters inserted into a peft model would be frozen and saved by neither"
                )
        self._earlier = list(stack[:position])

    def apply(self, model):
        """Insert a bottleneck adapter after each target layer; train the adapters, the head and norms asked for, nothing else."""
        from adaptkit_plugins.strategies._adapter_layer import AdapterWrapped, BottleneckAdapter

        cfg = self.config
        targets = [
            (name, module, _output_dim(module, model, name)) for name, module in self._find_targets(model)
        ]

        # Find everything, and refuse what cannot work, before touching the model.
        names = set(head_parameter_names(model)) if cfg.train_head else set()
        if cfg.train_norms:
            for mod_name, mod in model.named_modules():
                if is_norm(mod):
                    names |= {
                        f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters(recurse=False)
                    }
        resolve_ties(
            model, names, self.config.tied_head, self.name, hint=f", or {self.name}.train_head to false"
        )

        kept = {id(p) for s in self._earlier for p in s.owned.values()}
        for p in model.parameters():
            if id(p) not in kept:  # an earlier strategy's parameters keep the state it gave them
                p.requires_grad_(False)

        for name, module, dim in targets:
            bottleneck = max(1, dim // cfg.reduction_factor)
            weight = next(module.parameters(), None)
            adapter = BottleneckAdapter(
                dim,
                bottleneck,
                cfg.non_linearity,
                cfg.init_scale,
                device=weight.device if weight is not None else None,
            )
            wrapped = AdapterWrapped(module, adapter)
            wrapped.train(module.training)
            _set_submodule(model, name, wrapped)
            names |= {f"{name}.adapter.{n}" for n, _ in adapter.named_parameters()}

        all_params = dict(model.named_parameters(remove_duplicate=False))
        owned = {}
        for name in sorted(names):
            param = all_params[name]
            if id(param) in kept:
                continue  # trained and saved by the earlier strategy that owns it
            param.requires_grad_(True)
            if all(param is not q for q in owned.values()):
                owned[name] = param
        self.owned = owned
        return model

    def merge(self, model):
        """Refuse: an adapter's non-linearity cannot be folded into a plain model's weights."""
        raise NotMergeableError(
            f"strategy '{self.name}' cannot be merged: bottleneck adapters add a non-linear layer that no plain "
            "transformers model has; save the adapted model and load it back with Adapted.load instead"
        )

    # -- helpers -----------------------------------------------------------------------------

    def _find_targets(self, model) -> list[tuple[str, object]]:
        """(name in model, module) of every module an adapter will follow, bottom block first."""
        cfg = self.config
        path, blocks = find_blocks(model, cfg.blocks)
        wanted = [("ffn_output", cfg.ffn_output, FFN_OUTPUTS)]
        if cfg.kind == "houlsby":
            wanted.insert(0, ("attention_output", cfg.attention_output, ATTENTION_OUTPUTS))
        targets = []
        for i, block in enumerate(blocks):
            modules = dict(block.named_modules())
            for field, override, candidates in wanted:
                if override is not None:
                    if not override or override not in modules:
                        some = [n for n in modules if n][:12]
                        raise StrategyError(
                            f"{self.name}.{field}: block {i} of '{path}' ({type(block).__name__}) has no module "
                            f"'{override}'; its modules include {some}"
                        )
                    rel = override
                else:
                    rel = next((c for c in candidates if c in modules), None)
                    if rel is None:
                        raise StrategyError(
                            f"{self.name}: cannot find the {field.replace('_', ' ')} of the blocks of {type(model).__name__} "
                            f"(block {i} of '{path}' is a {type(block).__name__}, tried {list(candidates)}); name the module "
                            f"relative to a block with '{field}'"
                            + ("" if cfg.blocks else " (and the block list with 'blocks')")
                        )
                targets.append((f"{path}.{i}.{rel}", modules[rel]))
        if len({id(m) for _, m in targets}) != len(targets):
            raise StrategyError(
                f"{self.name}: attention_output and ffn_output name the same module; name two different ones"
            )
        return targets


def _output_dim(module, model, name: str) -> int:
    """Width of ``module``'s output.

    A Linear's out_features or a Conv1D's nf; for a composite module (an override naming a whole
    attention block), the model's hidden size, else the width of its last projection.
    """
    for attr in ("out_features", "nf"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    _, inner = unwrap(model)
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    hidden = getattr(config, "hidden_size", None)
    if isinstance(hidden, int):
        return hidden
    widths = [
        w
        for sub in module.modules()
        for w in (getattr(sub, "out_features", None), getattr(sub, "nf", None))
        if isinstance(w, int)
    ]
    if not widths:
        raise StrategyError(
            f"adapters: cannot tell the output width of '{name}' ({type(module).__name__}): it has no out_features, "
            f"no projection inside, and {type(model).__name__} has no config.hidden_size; point "
            "attention_output / ffn_output at a Linear"
        )
    return widths[-1]


def _set_submodule(model, name: str, module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@hookimpl
def adaptkit_register_strategies(register):
    """Register the ``adapters`` strategy."""
    register("adapters", Adapters, AdaptersConfig)
