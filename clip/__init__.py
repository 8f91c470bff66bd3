"""Our CLIP package: model, BPE tokenizer, checkpoint loading, preprocessing."""
from clip.clip import available_models, create_model, load, tokenize

__all__ = ["available_models", "create_model", "load", "tokenize"]
