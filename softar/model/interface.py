"""The model interface softAR's algorithm runs on: any network that reads vectors in an embedding space R^m.

A `VectorLM` owns the embedding table E [V, m], maps a sequence of slot vectors to hidden states, and turns hidden
states into what the model emits. Soft tokens, summary slots and collapse (`softar.soft`) need nothing more, so a
softAR GPT (`softar.model.gpt`) and a Hugging Face causal LM (`softar.model.hf`) carry the same algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Hidden:
    """A forward pass's hidden states. `last` [B, T, d] is the last layer, what the LM head reads; `mix` [B, T, d]
    is a chosen layer or a learned mix of all layers (the collapse head's input), or None. Sliced like a tensor over
    its [B, T] dimensions: `h[:, n:]`."""

    last: torch.Tensor
    mix: torch.Tensor | None = None

    def __getitem__(self, index) -> Hidden:
        return Hidden(self.last[index], None if self.mix is None else self.mix[index])


@dataclass(frozen=True)
class Outputs:
    """What the model emits at each position: logits [..., V] through the LM head; h_m [..., m], the last hidden
    state mapped to R^m (Coconut's fed-back thought); y [..., m] from a vector head and c [..., m] from a collapse
    head, when the model has them."""

    logits: torch.Tensor
    h_m: torch.Tensor
    y: torch.Tensor | None = None
    c: torch.Tensor | None = None

    def at(self, index) -> Outputs:
        """The same outputs at some positions, e.g. `out.at((slice(None), -1))` for the last one."""
        return Outputs(self.logits[index], self.h_m[index], None if self.y is None else self.y[index],
                       None if self.c is None else self.c[index])


@runtime_checkable
class VectorLM(Protocol):
    """A language model over vectors. Implementations are `torch.nn.Module`s. `vector_head` and `collapse_head` are
    the modules behind `Outputs.y` and `Outputs.c`, or None when the model has no such head."""

    vector_head: Any
    collapse_head: Any

    @property
    def E(self) -> torch.Tensor:
        """The embedding table [V, m]: row i is hard token i's vector."""

    def hidden(self, vectors: torch.Tensor, positions: torch.Tensor | None = None,
               cache: Any | None = None) -> Hidden:
        """Slot vectors [B, T, m] at positions [T] or [B, T] (default: after what the cache holds) -> hidden states.
        With a cache, the new keys and values are appended to it."""

    def heads(self, h: Hidden) -> Outputs:
        """Hidden states -> everything the model emits."""

    def new_cache(self, batch_size: int, max_len: int) -> Any:
        """An empty KV cache for `batch_size` sequences of up to `max_len` positions."""

    def flops_per_position(self, context: int) -> float:
        """Training FLOPs (forward + backward) per position of a `context`-long window: 6N + 12 L d T."""
