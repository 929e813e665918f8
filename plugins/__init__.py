"""adaptkit's first-party strategies, imported as ``adaptkit_plugins``.

Each module is an ordinary adaptkit plugin written only against adaptkit's public API
(``adaptkit.hookimpl``, ``adaptkit.Strategy``, ``adaptkit.StrategyConfig``, ``adaptkit.contract.anatomy``),
exactly as a third-party package would write it.
"""
