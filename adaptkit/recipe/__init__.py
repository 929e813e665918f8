"""Recipes: the schema of a run, YAML reading and writing, ``key.sub=value`` overrides, and a
recipe's identity (what makes two runs' checkpoints interchangeable).

Pure data: nothing here knows about plugins, models or torch.
"""
