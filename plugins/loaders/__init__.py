"""Built-in model loaders: any transformers model directory (or hub id), and models that ship
inside PyPI packages."""
