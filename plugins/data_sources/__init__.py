"""Built-in data sources a recipe names in ``data.source``."""
