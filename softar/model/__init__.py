"""The network only: the `VectorLM` interface, softAR's GPT over vectors, and a Hugging Face backend (`hf`)."""

from softar.model.gpt import GPT, KVCache
from softar.model.interface import Hidden, Outputs, VectorLM

__all__ = ["GPT", "Hidden", "KVCache", "Outputs", "VectorLM"]
