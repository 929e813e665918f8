"""The torch modules behind the ``adapters`` strategy: a bottleneck adapter and the wrapper that
puts one after an existing module.

Kept apart from ``adaptkit_plugins.strategies.adapters`` because it imports torch at module level: the
strategy imports it only inside ``apply``, so ``adaptkit strategies`` starts without torch.
"""

from __future__ import annotations

import torch
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """``x -> up(act(down(x)))``: project ``dim`` down to ``bottleneck`` and back.

    The residual connection lives in ``AdapterWrapped``. With ``init_scale`` 0 the up-projection
    starts at zero, so the adapter outputs exactly zero and the adapted model computes exactly
    what the base model did (Houlsby et al. 2019, "near-identity initialisation").
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        non_linearity: str,
        init_scale: float,
        device: torch.device | None = None,
    ):
        super().__init__()
        # Always float32, whatever the base model's dtype: the trained parameters need the range.
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=torch.float32)
        self.act = _ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=torch.float32)
        with torch.no_grad():
            # The BERT initialisation for the down-projection, as adapter-transformers uses.
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.zeros_(self.down.bias)
            if init_scale > 0:
                nn.init.normal_(self.up.weight, std=init_scale)
            else:
                nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution (without the residual)."""
        return self.up(self.act(self.down(x)))


class AdapterWrapped(nn.Module):
    """An existing module followed by a bottleneck adapter: ``h = base_layer(x); h + adapter(h)``.

    The original module lives on as ``base_layer`` (peft's convention), so its parameters are named
    ``<name>.base_layer.weight``; attribute reads the wrapper itself lacks (``weight``,
    ``in_features``, ``nf``) fall through to it, so model code and ``get_parameter("<name>.weight")``
    keep working. A module returning a tuple (a whole attention block) gets the adapter on its
    first element only.
    """

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        """Run the original module, then add the adapter's output to the first output."""
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, tuple):
            return (self._adapt(out[0]),) + tuple(out[1:])
        return self._adapt(out)

    def _adapt(self, h: torch.Tensor) -> torch.Tensor:
        # Compute in the adapter's float32 and cast back, so a bf16 base keeps bf16 activations.
        delta = self.adapter(h.to(self.adapter.down.weight.dtype))
        return h + delta.to(h.dtype)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # "base_layer" itself missing means a half-built object (copy/unpickle): no fallback,
            # or the lookup below would recurse forever.
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)
