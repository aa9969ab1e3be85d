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
    head, when the model has them; `hidden` [..., d], the last layer itself (what probes and learned memories read),
    when the step that made them keeps it."""

    logits: torch.Tensor
    h_m: torch.Tensor
    y: torch.Tensor | None = None
    c: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def at(self, index) -> Outputs:
        """The same outputs at some positions, e.g. `out.at((slice(None), -1))` for the last one."""
        return Outputs(*(None if v is None else v[index] for v in self.fields()))

    def fields(self) -> tuple[torch.Tensor | None, ...]:
        return self.logits, self.h_m, self.y, self.c, self.hidden

    @staticmethod
    def cat(parts: list[Outputs], dim: int = 0) -> Outputs:
        """Outputs of several batches (dim 0) or spans of positions (dim 1) as one."""
        if len(parts) == 1:
            return parts[0]
        columns = zip(*(p.fields() for p in parts), strict=True)
        return Outputs(*(None if c[0] is None else torch.cat(c, dim=dim) for c in columns))


@runtime_checkable
class VectorLM(Protocol):
    """A language model over vectors. Implementations are `torch.nn.Module`s. `vector_head` and `collapse_head` are
    the modules behind `Outputs.y` and `Outputs.c`, or None when the model has no such head. Everything softAR's
    algorithm needs of a network is here: code outside `softar.model` reads nothing else of it."""

    vector_head: Any
    collapse_head: Any

    @property
    def E(self) -> torch.Tensor:
        """The embedding table [V, m]: row i is hard token i's vector."""

    @property
    def width(self) -> int:
        """d, the width of the hidden states (`Hidden.last`), which learned memories project from."""

    def hidden(self, vectors: torch.Tensor, positions: torch.Tensor | None = None,
               cache: Any | None = None) -> Hidden:
        """Slot vectors [B, T, m] at positions [T] or [B, T] (default: after what the cache holds) -> hidden states.
        With a cache, the new keys and values are appended to it."""

    def heads(self, h: Hidden) -> Outputs:
        """Hidden states -> everything the model emits."""

    def new_cache(self, batch_size: int, max_len: int) -> Any:
        """An empty KV cache for `batch_size` sequences of up to `max_len` positions; a forward through it keeps its
        autograd graph (continuous thoughts train through it)."""

    def new_ring_cache(self, batch_size: int, size: int) -> Any | None:
        """The decode-time cache of `size` slots per sequence (`softar.model.gpt.RingCache`: one slot per step, whole
        windows written in with `write_rows`, rows dropped with `select`), or None when the network has none:
        decoding then recomputes each window."""

    def shard_units(self) -> list[torch.nn.Module]:
        """The modules FSDP2 shards one by one (the transformer blocks), or [] to shard the network as one unit."""

    def checkpoint_activations(self) -> None:
        """From now on a forward without a cache keeps no activations inside its blocks; backward recomputes them
        (train.checkpointing)."""

    def describe(self) -> dict[str, Any]:
        """The network's shape for run records and pages: n_layer, n_head, d_model, and what it is."""

    def flops_per_position(self, context: int) -> float:
        """Training FLOPs (forward + backward) per position of a `context`-long window: 6N + 12 L d T."""
