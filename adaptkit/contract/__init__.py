"""The plugin contract: everything a plugin author reads and subclasses.

The hooks (``hookspecs``), the ``Strategy`` base class and its config, the ``Task`` base class,
the loaded-model type, and helpers that find a model's blocks, head and tied weights
(``anatomy``). Nothing here imports torch at module level.
"""
