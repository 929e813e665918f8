"""The first-party fine-tuning strategies, each written only against adaptkit's public plugin API."""
