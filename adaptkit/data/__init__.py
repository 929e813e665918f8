"""Data: reading local files and directories (through ``datasets``), data sources registered by
plugins, and training-split transforms."""
