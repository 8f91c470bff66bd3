"""Our CLIP package: model, BPE tokenizer, checkpoint loading, preprocessing. Imports nothing of the project."""

from clip.clip import LoadError, available_models, create_model, load, tokenize

__all__ = ["LoadError", "available_models", "create_model", "load", "tokenize"]
