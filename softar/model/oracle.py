"""`HMMOracle`: the exact Bayes filter of a hidden Markov model, as a `VectorLM` over one-hot embeddings.

It is the soft-feedback study's positive control: a model for which feeding back the expected embedding must win.
The oracle reads each slot as a distribution over the symbol emitted there and keeps the mixture of the posteriors
(`HMM.beliefs`). A hard token is exact filtering; its own predictive distribution fed back (the `expected` soft
token, E being the identity) is exact marginalisation, so soft feedback reproduces the Bayes k-step prediction
exactly, while one sampled rollout commits to a symbol and loses the belief, and averaging S of them only approaches
it. Run through the same engine and the same open-loop code as a trained model, it shows what the measurement
reports where the effect is known to exist.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from softar.data.synthetic import HMM
from softar.model.interface import Hidden, Outputs


class HMMOracle(nn.Module):
    vector_head = None
    collapse_head = None

    def __init__(self, hmm: HMM):
        super().__init__()
        self.hmm = hmm
        self.register_buffer("table", torch.eye(hmm.symbols))  # E: symbol i is the one-hot vector e_i

    @property
    def E(self) -> torch.Tensor:
        return self.table  # [V, V]

    @property
    def width(self) -> int:
        return self.hmm.symbols

    def hidden(self, vectors: torch.Tensor, positions: torch.Tensor | None = None, cache: Any | None = None) -> Hidden:
        """Slots [B, T, V] read from the first (positions are implied: a window starts from the stationary belief)
        -> log p(next symbol) [B, T, V] as the hidden state."""
        if cache is not None:
            raise ValueError("the HMM oracle keeps no cache: it reads each window whole")
        return Hidden(self.hmm.predictive(vectors).to(vectors.dtype))

    def heads(self, h: Hidden) -> Outputs:
        return Outputs(logits=h.last, h_m=h.last.exp())  # the thought it would feed back: its predictive distribution

    def new_cache(self, batch_size: int, max_len: int) -> None:
        return None

    def new_ring_cache(self, batch_size: int, size: int) -> None:
        return None  # the engine recomputes each window

    def shard_units(self) -> list[nn.Module]:
        return []

    def checkpoint_activations(self) -> None:
        pass  # no activations to keep: it has no parameters

    def describe(self) -> dict[str, Any]:
        return {"n_layer": 0, "n_head": 0, "d_model": self.hmm.symbols, "kind": "hmm_oracle",
                "states": self.hmm.states}

    def flops_per_position(self, context: int) -> float:
        return 0.0
