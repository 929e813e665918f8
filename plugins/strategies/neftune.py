"""``neftune``: noisy embeddings during training (Jain et al. 2023, "NEFTune: Noisy Embeddings
Improve Instruction Finetuning", https://arxiv.org/abs/2310.05914).

While the model is in training mode, uniform noise in ``[-s, s]`` with
``s = noise_alpha / sqrt(L * d)`` (``L`` tokens, ``d`` the hidden size) is added to the output of
the input embeddings; evaluation and generation see the embeddings untouched. It changes only
how training runs, so it is a training-only strategy: it owns and saves no weights, combines with
any strategy that chooses what trains (``full`` included), and merging removes its hook. The
noise is drawn from torch's global generator, which the training loop seeds and checkpoints, so
a resumed run draws the same noise.
"""

from __future__ import annotations

import math

from pydantic import Field

from adaptkit import Strategy, StrategyConfig, StrategyError, hookimpl


class NEFTuneConfig(StrategyConfig):
    """How loud the noise is."""

    noise_alpha: float = Field(
        5.0, gt=0, description="noise scale alpha: the noise is uniform in +-alpha/sqrt(tokens x hidden size)"
    )


class NEFTune(Strategy):
    """NEFTune: add uniform noise to the input embeddings while training (Jain et al., 2023)."""

    training_only = True
    tasks = ("classification", "causal_lm", "language_modeling")  # it perturbs token embeddings

    def __init__(self, config, name=None):
        super().__init__(config, name)
        self._hook = None

    def apply(self, model):
        """Hook the input embeddings; nothing else changes."""
        try:
            embeddings = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            embeddings = None
        if embeddings is None:
            raise StrategyError(
                f"{self.name}: {type(model).__name__} has no input embeddings to add noise to"
            )
        self._hook = embeddings.register_forward_hook(self._add_noise)
        return model

    def _add_noise(self, module, inputs, output):
        if not module.training:
            return output
        import torch

        scale = self.config.noise_alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    def merge(self, model):
        """Remove the hook: the merged model is the plain model it was applied to."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return model


@hookimpl
def adaptkit_register_strategies(register):
    """Register the ``neftune`` strategy."""
    register("neftune", NEFTune, NEFTuneConfig)
