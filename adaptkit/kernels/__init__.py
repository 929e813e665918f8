"""Compute kernels that change memory, not results: the causal-LM loss computed a chunk of tokens at
a time, and CPU attention with dropout that recomputes its probabilities in the backward pass."""
