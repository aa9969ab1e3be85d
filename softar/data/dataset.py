"""Token datasets as nanoGPT-layout memmaps (`train.bin`, `val.bin`, flat uint16/uint32), plus `meta.json`,
and the samplers that cut them into training windows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from softar import SoftarError
from softar.disk import read_json

META_FILE = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


META_FIELDS = {"vocab_size": int, "dtype": str, "tokens": {"train": int, "val": int},
               "characters": {"train": int, "val": int}, "text_sha256": str, "tokenizer": str}
SPLITS = ("train", "val")


def load_meta(data_dir: str | Path) -> dict:
    """meta.json, checked: a positive vocabulary whose ids fit the recorded dtype, non-negative counts."""
    path = Path(data_dir) / META_FILE
    if not path.exists():
        raise SoftarError(f"no prepared data in {data_dir} (expected {path}; run `softar prepare`)")
    meta = read_json(path, "dataset", META_FIELDS)
    V = meta["vocab_size"]
    if not 0 < V <= 2**32:
        raise SoftarError(f"dataset {path}: vocab_size {V} is out of range")
    if meta["dtype"] != token_dtype(V).name:
        raise SoftarError(f"dataset {path}: dtype {meta['dtype']!r} does not fit vocab_size {V} "
                          f"(expected {token_dtype(V).name!r})")
    if any(meta[k][s] < 0 for k in ("tokens", "characters") for s in SPLITS):
        raise SoftarError(f"dataset {path}: negative token or character counts")
    return meta


def load_split(data_dir: str | Path, split: str) -> np.memmap:
    """A split's tokens, checked against meta.json: whole tokens, the recorded count, every id in the vocabulary."""
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise SoftarError(f"missing split file {path}")
    if not path.is_file():  # np.memmap would block on a FIFO
        raise SoftarError(f"{path} is not a regular file")
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise SoftarError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens (a truncated file?)")
    if size // dtype.itemsize != meta["tokens"][split]:
        raise SoftarError(f"{path} holds {size // dtype.itemsize} tokens but meta.json says {meta['tokens'][split]}")
    if size == 0:
        raise SoftarError(f"{path} holds no tokens")
    data = np.memmap(path, dtype=dtype, mode="r")
    if int(data.max()) >= meta["vocab_size"]:
        raise SoftarError(f"{path} holds token id {int(data.max())}, outside the vocabulary of {meta['vocab_size']}")
    return data


@dataclass
class WindowSampler:
    """Random windows of `length + 1` tokens (inputs and shifted targets), as in nanoGPT; with `history` > 0,
    each window also comes with the up to `history` tokens before it, of which a random number (0..history) count.

    Under data parallelism every rank draws the same global batch of `batch_size * world` windows and keeps its
    own disjoint slice, so N ranks see exactly the batch one process would. Its only state is a torch.Generator,
    shared by all ranks: it checkpoints as one uint8 tensor and resumes exactly, at any world size.
    """

    data: np.ndarray
    length: int  # input tokens per window: a model's token slots
    batch_size: int  # per rank
    seed: int
    rank: int = 0
    world: int = 1
    history: int = 0

    def __post_init__(self) -> None:
        if len(self.data) <= self.length + self.history:
            raise SoftarError(
                f"split has {len(self.data)} tokens, fewer than one window of {self.length + 1}"
                + (f" after {self.history} tokens of history (context.max_history)" if self.history else "")
            )
        self.gen = torch.Generator().manual_seed(self.seed)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """(inputs [B, T], targets [B, T]), plus (history ids [B, h] newest last, history lengths [B]) when
        `history` > 0. History ids beyond a window's length are real text but do not count."""
        return self.windows_at(*self.mine(*self.draw()))

    def draw(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The global batch's window starts [B * world] (offsets into the split) and counted history lengths (or
        None), the same on every rank."""
        n = self.batch_size * self.world
        starts = torch.randint(len(self.data) - self.length - self.history, (n,), generator=self.gen)
        starts = starts + self.history
        lens = torch.randint(0, self.history + 1, (n,), generator=self.gen) if self.history else None
        return starts, lens

    def mine(self, starts: torch.Tensor, lens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's slice of a global batch."""
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return starts[mine], None if lens is None else lens[mine]

    def windows_at(self, starts: torch.Tensor, lens: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """`next_batch` of the windows that begin at `starts`."""
        win = torch.from_numpy(np.stack([self.data[s : s + self.length + 1] for s in starts.tolist()])
                               .astype(np.int64))
        if not self.history:
            return win[:, :-1], win[:, 1:]  # [B, T] inputs, [B, T] targets
        hist = torch.from_numpy(np.stack([self.data[s - self.history : s] for s in starts.tolist()])
                                .astype(np.int64))
        return win[:, :-1], win[:, 1:], hist, lens

    def state(self) -> torch.Tensor:
        return self.gen.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)


def sequential_windows(data: np.ndarray, length: int, batch_size: int, history: int = 0):
    """Every token of a split exactly once as a target: consecutive non-overlapping windows.

    Yields ([B, T] inputs, [B, T] targets) with the last window shorter; used for whole-split evaluation. With
    `history` > 0 each window also gets the (up to) `history` tokens before it, as `WindowSampler` gives them."""
    n = len(data) - 1
    starts = list(range(0, n, length))
    for i in range(0, len(starts), batch_size):
        group = starts[i : i + batch_size]
        lens = [min(length, n - s) for s in group]
        for size in sorted(set(lens)):  # windows of one length share a batch
            ss = [s for s, n_ in zip(group, lens, strict=True) if n_ == size]
            win = torch.from_numpy(np.stack([data[s : s + size + 1] for s in ss]).astype(np.int64))
            if not history:
                yield win[:, :-1], win[:, 1:]
                continue
            hist = np.zeros((len(ss), history), dtype=np.int64)
            for row, s in enumerate(ss):
                h = data[max(0, s - history) : s]
                hist[row, history - len(h) :] = h
            hist_len = torch.tensor([min(s, history) for s in ss])
            yield win[:, :-1], win[:, 1:], torch.from_numpy(hist), hist_len


def random_windows(data: np.ndarray, length: int, count: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """`count` random windows of `length` tokens [count, length], drawn with their own generator (evaluation never
    moves a training sampler)."""
    x, y = WindowSampler(data, length - 1, count, seed).next_batch()
    return torch.cat([x, y[:, -1:]], dim=1).to(device)
