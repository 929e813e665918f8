"""``lora``: low-rank adapters through peft, optionally on a 4-bit or 8-bit quantized base (QLoRA).

The task head (or whatever an earlier strategy such as ``freeze`` left trainable) keeps training
and is saved with the adapter in peft's ``modules_to_save``, so ``peft.PeftModel.from_pretrained``
restores the whole trained state on a fresh base without adaptkit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from adaptkit import StrategyConfig, StrategyError, hookimpl
from adaptkit.contract.anatomy import head_parameter_names
from adaptkit.errors import NotMergeableError
from adaptkit_plugins.strategies._peft_common import (
    PeftStrategy,
    block_linear_names,
    check_ties,
    finish_merge,
    is_linear,
    peft_task_type,
    resolve_module_names,
)

if TYPE_CHECKING:
    from torch import nn

#: ``init`` values and what peft's ``init_lora_weights`` gets. Methods that need data (eva, corda)
#: are left out. LoftQ is computed here (``_loftq``: peft computes it on CUDA only) and written
#: over peft's default adapter.
INITS = {
    "default": True,
    "random": False,
    "gaussian": "gaussian",
    "orthogonal": "orthogonal",
    "pissa": "pissa",
    "olora": "olora",
    "loftq": True,
}
#: Inits that start from a decomposition of the base weights and leave the residual in the base
#: (PiSSA: the top singular vectors; OLoRA: a QR decomposition). The residual is a deterministic
#: function of the base, so applying the strategy to the same base again rebuilds it: a checkpoint
#: holds the adapter only. An export converts the adapter to a plain LoRA of rank 2r that applies
#: to the untouched base (peft's own conversion, ``path_initial_model_for_weight_conversion``).
REWRITES_BASE = ("pissa", "olora")


class LoraConfig(StrategyConfig):
    """LoRA options (peft's names in parentheses where they differ)."""

    r: int = Field(8, gt=0, description="rank of the low-rank update")
    alpha: float = Field(
        16, gt=0, description="scaling numerator (lora_alpha): the update is scaled by alpha / r"
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="dropout on the adapter's input (lora_dropout; 0 as in peft: on a CPU its masks cost a fifth of a step)",
    )
    target_modules: list[str] | None = Field(
        None,
        description="module names (or dotted name suffixes) to adapt; default: every linear layer inside the transformer blocks",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="extra modules (names or suffixes) trained in full and saved with the adapter; the task head always is",
    )
    use_rslora: bool = Field(
        False, description="rank-stabilised scaling alpha / sqrt(r) instead of alpha / r"
    )
    use_dora: bool = Field(
        False, description="weight-decomposed LoRA (DoRA): also train a magnitude per output"
    )
    init: Literal["default", "random", "gaussian", "orthogonal", "pissa", "olora", "loftq"] = Field(
        "default",
        description="adapter initialisation: default (B = 0, the model starts unchanged), gaussian, orthogonal, "
        "pissa (the top singular vectors of each weight; the rest stays in the base), olora (its QR "
        "decomposition), loftq (with quantize: 4bit, base and adapter fitted together so their sum "
        "starts near the full-precision weight), or random (B != 0: the model changes at once; for tests)",
    )
    loftq_iterations: int = Field(
        1, ge=1, description="with init loftq: alternations of quantizing the base and fitting the adapter"
    )
    blocks: str | None = Field(
        None, description="dotted path of the transformer block list, when it cannot be found automatically"
    )
    quantize: Literal["4bit", "8bit"] | None = Field(
        None,
        description="QLoRA: store the linear layers of the blocks in 4 or 8 bits (bitsandbytes) under the adapters",
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (with quantize: 4bit)")
    double_quant: bool = Field(
        True, description="quantize the 4-bit scaling constants too (with quantize: 4bit)"
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the quantized layers compute in (with quantize: 4bit)"
    )


class Lora(PeftStrategy):
    """LoRA: train low-rank updates of the linear layers (QLoRA with quantize: 4bit)."""

    # new low-rank weights over a frozen network learn at rates ten times full fine-tuning's
    # (Hu et al.; QLoRA: 2e-4 for large models, up to a few 1e-3 for small ones)
    lr_range = (1e-4, 3e-3)

    def __init__(self, config: LoraConfig, name: str | None = None):
        super().__init__(config, name)
        #: Names of the GPT-2 Conv1D layers that were quantized (merging gives them back as Conv1D).
        self._conv1d: set[str] = set()
        #: The adapter as initialised by a base-rewriting init (``REWRITES_BASE``), else None.
        self._initial: dict | None = None
        #: LoftQ's adapter factors, computed while peft wraps the model, set on it after.
        self._loftq: dict = {}
        if config.quantize is not None:
            self.launches = frozenset({"single", "ddp"})
            self.launches_note = (
                "QLoRA's quantized weights are stored as bytes, which FSDP and DeepSpeed cannot shard "
                "beside float weights unless stored in the compute dtype (bnb_4bit_quant_storage), a "
                "path adaptkit has not run on GPUs; launch QLoRA on one process or DDP, or drop quantize"
            )

    def check(self, stack, position):
        """Refuse a base-rewriting init on a quantized base, then the usual stack checks."""
        if self.config.init in REWRITES_BASE and self.config.quantize is not None:
            raise StrategyError(
                f"{self.name}: init {self.config.init} decomposes full-precision base weights; it cannot "
                "start from a quantized base (drop quantize, or use init: default)"
            )
        if self.config.init == "loftq" and (self.config.quantize != "4bit" or self.config.use_dora):
            raise StrategyError(
                f"{self.name}: init loftq fits the adapter to a 4-bit base; it needs quantize: 4bit "
                "and no use_dora"
            )
        super().check(stack, position)

    def apply(self, model: nn.Module) -> nn.Module:
        """Wrap with peft; a base-rewriting init also keeps the adapter as initialised, for export."""
        wrapped = super().apply(model)
        if self._loftq:
            from adaptkit_plugins.strategies._loftq import set_adapters

            set_adapters(wrapped, self._loftq)
            self._loftq = {}
        self._initial = None
        if self.config.init in REWRITES_BASE:
            from peft.utils import get_peft_model_state_dict

            self._initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(wrapped).items()}
        return wrapped

    def held_bytes(self, model: nn.Module) -> int:
        """A base-rewriting init keeps a float32 copy of the initial adapter (for export)."""
        if self.config.init not in REWRITES_BASE:
            return 0
        return 4 * sum(p.numel() for n, p in self.owned.items() if ".lora_" in n)

    def export(self, model: nn.Module, directory: Path) -> None:
        """peft's format; an adapter that started from a decomposition of the base is first converted,
        by peft, to a plain LoRA of rank 2r that applies to the untouched base."""
        if self.config.init == "loftq":
            raise StrategyError(
                f"{self.name}: a LoftQ adapter fits only the 4-bit base it was fitted with, which no "
                "other machine rebuilds from the untouched base; export the merged model (--merge)"
            )
        if self._initial is None:
            return super().export(model, directory)
        import tempfile

        from adaptkit.files import save_tensors

        with tempfile.TemporaryDirectory() as tmp:
            initial = Path(tmp) / "initial"
            initial.mkdir()
            model.peft_config["default"].save_pretrained(str(initial))
            save_tensors(self._initial, initial / "adapter_model.safetensors")
            model.save_pretrained(
                str(directory), safe_serialization=True, path_initial_model_for_weight_conversion=str(initial)
            )

    @property
    def quantizes_base(self) -> bool:
        """True with ``quantize`` set: the strategies after this one see a 4-bit or 8-bit base."""
        return self.config.quantize is not None

    # -- building ---------------------------------------------------------------------------

    def extra_modules_to_save(self, model: nn.Module) -> list[str]:
        """The user's ``modules_to_save``, each resolved to full module names."""
        return resolve_module_names(model, self.config.modules_to_save, "modules_to_save", self.name)

    def _targets(self, model: nn.Module, modules_to_save: list[str]) -> list[str]:
        cfg = self.config
        saved = lambda n: any(n == m or n.startswith(m + ".") for m in modules_to_save)  # noqa: E731
        if cfg.target_modules is None:
            # A linear layer that already trains in full needs no low-rank update on top.
            targets = [n for n in block_linear_names(model, cfg.blocks) if not saved(n)]
            if not targets:
                raise StrategyError(
                    f"{self.name}: no linear layer inside the transformer blocks is left to adapt"
                )
            return targets
        targets = resolve_module_names(model, cfg.target_modules, "target_modules", self.name)
        clash = [n for n in targets if saved(n)]
        if clash:
            raise StrategyError(
                f"{self.name}: {clash[:3]} are both LoRA targets and trained in full (modules_to_save or an earlier "
                f"strategy); remove them from {self.name}.target_modules (got {cfg.target_modules!r})"
            )
        check_ties(model, targets, self.name, "target_modules")
        return targets

    def prepare(self, model: nn.Module, modules_to_save: list[str]) -> nn.Module:
        """Resolve the targets, then quantize the blocks' linear layers when asked (QLoRA)."""
        self._target_names = self._targets(model, modules_to_save)
        if self.config.quantize is None:
            return model
        saved = lambda n: any(n == m or n.startswith(m + ".") for m in modules_to_save)  # noqa: E731
        # Layers trained in full (modules_to_save: the head, an earlier strategy's top blocks)
        # stay in full precision; everything else linear in the blocks is frozen and quantized.
        names = [n for n in block_linear_names(model, self.config.blocks) if not saved(n)]
        self._conv1d = {n for n in names if type(model.get_submodule(n)).__name__ == "Conv1D"}
        if self.config.init == "loftq":
            from adaptkit_plugins.strategies._loftq import prepare_loftq

            quantized = set(names)
            self._loftq = prepare_loftq(model, [n for n in self._target_names if n in quantized], self.config)
        quantize_linear_layers(model, names, self.config)
        return model

    def peft_config(self, model: nn.Module, modules_to_save: list[str]):
        """peft's LoraConfig for the resolved targets and modules to save."""
        import peft

        cfg = self.config
        targets = self._target_names
        conv1d = [n for n in targets if type(model.get_submodule(n)).__name__ == "Conv1D"]
        if conv1d and len(conv1d) != len(targets):
            # peft applies one fan_in_fan_out flag to every target
            raise StrategyError(
                f"{self.name}: target_modules mix Conv1D layers {conv1d[:2]} with Linear layers; adapt one kind at a time"
            )
        if conv1d and cfg.init == "olora":  # peft's OLoRA ignores fan_in_fan_out: the shapes would not fit
            raise StrategyError(
                f"{self.name}: init olora does not support Conv1D layers (GPT-2's {conv1d[0]}); "
                "use pissa or default"
            )
        tied = check_ties(model, modules_to_save, self.name, "modules_to_save")
        task_type = peft_task_type(model)
        head = {n.rpartition(".")[0] for n in head_parameter_names(model)}
        if task_type == "SEQ_CLS" and not head <= set(modules_to_save):
            # peft's SEQ_CLS wrapper would make the head train and save it whatever the config
            # says; an earlier strategy that froze the head on purpose keeps it frozen.
            task_type = None
        try:
            return peft.LoraConfig(
                task_type=task_type,
                r=cfg.r,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=targets,
                modules_to_save=modules_to_save or None,
                use_rslora=cfg.use_rslora,
                use_dora=cfg.use_dora,
                init_lora_weights=INITS[cfg.init],
                fan_in_fan_out=bool(conv1d),
                bias="none",
                # Tied input and output embeddings trained through modules_to_save stay one
                # matrix instead of two copies that drift apart.
                ensure_weight_tying=tied,
            )
        except ValueError as exc:
            raise StrategyError(f"{self.name}: {exc}") from None

    # -- merging ------------------------------------------------------------------------------

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the adapters into the weights; a quantized base is dequantized to float32 first.

        Merging into 4-bit weights would round the update away, so a QLoRA model merges
        into a float32 copy of its dequantized weights and comes back unquantized.
        """
        if self.config.quantize is None:
            return super().merge(model)
        if self.config.use_dora:
            raise NotMergeableError(
                f"strategy '{self.name}': merging DoRA into a quantized base is not supported; merge without quantize"
            )
        was_training = model.training
        _dequantize_merge_lora(model, self._conv1d)
        merged = model.merge_and_unload()  # only modules_to_save wrappers are left to unwrap
        for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            merged.__dict__.pop(attr, None)
        return finish_merge(merged, was_training)


# -- quantization ------------------------------------------------------------------------------


def quantize_linear_layers(model: nn.Module, names: list[str], config: LoraConfig) -> None:
    """Replace the named Linear/Conv1D layers of ``model`` by bitsandbytes 4- or 8-bit layers, in place.

    Only these layers change: embeddings, norms and the head keep their dtype, and nothing is
    upcast. The model is marked ``is_loaded_in_4bit``/``8bit`` as transformers marks a
    quantized model, which is how peft picks its bitsandbytes LoRA layers.
    """
    import bitsandbytes as bnb
    import torch

    compute_dtype = getattr(torch, config.compute_dtype)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if not is_linear(old):
            raise StrategyError(f"quantize: '{name}' is a {type(old).__name__}, not a linear layer")
        weight = old.weight.detach()
        if type(old).__name__ == "Conv1D":  # stores [in, out]; bitsandbytes wants [out, in]
            weight = weight.t()
        out_features, in_features = weight.shape
        device = weight.device
        has_bias = old.bias is not None
        if config.quantize == "4bit":
            new = bnb.nn.Linear4bit(
                in_features,
                out_features,
                bias=has_bias,
                compute_dtype=compute_dtype,
                compress_statistics=config.double_quant,
                quant_type=config.quant_type,
                device="meta",
            )
            new.weight = bnb.nn.Params4bit(
                weight.contiguous().clone(),
                requires_grad=False,
                compress_statistics=config.double_quant,
                quant_type=config.quant_type,
            )
        else:
            new = bnb.nn.Linear8bitLt(
                in_features, out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0, device="meta"
            )
            new.weight = bnb.nn.Int8Params(
                weight.contiguous().clone(), requires_grad=False, has_fp16_weights=False
            )
        if has_bias:
            new.bias = torch.nn.Parameter(old.bias.detach().clone(), requires_grad=False)
        new = new.to(device)  # moving the bitsandbytes parameter is what quantizes it
        if hasattr(new, "support_avx512bf16_for_cpu"):
            # bitsandbytes' CPU inference fast path repacks the weight in place the first time
            # it runs under no_grad (scales rounded to bf16, and it fails on layers narrower
            # than a quantization block); outputs would then depend on whether eval ran first,
            # and merge could no longer dequantize the weight.
            new.support_avx512bf16_for_cpu = False
        new.train(old.training)
        setattr(parent, child, new)
    if config.quantize == "4bit":
        model.is_loaded_in_4bit = True
    else:
        model.is_loaded_in_8bit = True


def _dequantize(layer: nn.Module):
    """A bitsandbytes linear layer's weight as a float32 tensor [out, in]."""
    from peft.utils.integrations import dequantize_bnb_weight

    weight = layer.weight
    state = getattr(weight, "quant_state", None) or getattr(layer, "state", None)
    return dequantize_bnb_weight(weight, state=state).float()


def _dequantize_merge_lora(model: nn.Module, conv1d: set[str]) -> None:
    """Replace every LoRA layer over a quantized base (and every other quantized layer) by a
    float32 Linear (or Conv1D, where the base model had one) holding dequantized W + delta."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    from adaptkit.contract.anatomy import unwrap

    prefix, _ = unwrap(model)
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    for name, module in list(model.named_modules()):
        is_lora = isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), quantized)
        inside_lora = ".base_layer" in name or ".lora_" in name
        if not (is_lora or (isinstance(module, quantized) and not inside_lora)):
            continue
        base = module.get_base_layer() if is_lora else module
        with torch.no_grad():
            weight = _dequantize(base)
            if is_lora:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).float()
            bias = base.bias.detach().float().clone() if base.bias is not None else None
            original = name[len(prefix) :] if name.startswith(prefix) else name
            if original in conv1d:
                new = Conv1D(weight.shape[0], weight.shape[1])
                new.weight.copy_(weight.t())
                if bias is not None:
                    new.bias.copy_(bias)
            else:
                new = torch.nn.Linear(
                    weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device
                )
                new.weight.copy_(weight)
                if bias is not None:
                    new.bias.copy_(bias)
        new.requires_grad_(False)
        new.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)


@hookimpl
def adaptkit_register_strategies(register):
    """Register the ``lora`` strategy."""
    register("lora", Lora, LoraConfig)
