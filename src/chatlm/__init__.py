"""chatlm: train a small ChatGPT-style model end to end with nanochat's recipe, driven by Hydra."""

__version__ = "0.1.0"
