"""Adapting a model: the ordered strategy stack, its trainable parameters, saving, loading,
merging and the base model's fingerprint; and the pipeline from a recipe to an adapted model
with its data."""
