"""The model: an embedding space, a transformer backbone over vectors, and output heads."""

from softar.model.gpt import GPT, KVCache

__all__ = ["GPT", "KVCache"]
