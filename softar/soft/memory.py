"""What the summary slots hold besides pure embedding arithmetic: the controls of the retention study
(docs/context.md), chosen by `context.memory`: a registry, `MEMORIES` (adding one is one class registered here).
Pure arithmetic (`summary_slots`) is the entry None: no module, nothing learned.

- "pause": a learned constant vector per summary slot, blind to the history. The same number of extra slots filled
  with something that carries no memory: any gain it shows is not memory.
- "write": the seed's retroactive enrichment. Every chunk of `context.segment_len` history tokens that has left the
  hard region adds a learned write vector to the slot that now holds it: W h, the network's last hidden state over
  that chunk (read as a window of its own) projected onto R^m. A slot gets the mean of its chunks' write vectors on
  top of its arithmetic. W starts at zero, so the model starts as pure arithmetic; the pass over the chunks runs
  without gradients (W learns, the network is not trained through it), which keeps the cost to one forward pass per
  history token.
- "rmt": a learned memory, as the Recurrent Memory Transformer's. The summary slots hold memory vectors carried
  from chunk to chunk of the history: each chunk of `segment_len` tokens is read as a window [memory][chunk][write
  slots], and the network's last hidden states at the write slots, projected onto R^m, are the next memory. The
  window being scored reads the memory after the last chunk. Backpropagation runs through that chunk and the
  window (two segments); earlier chunks run without gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from softar.config import ContextConfig
from softar.soft.window import Layout, summary_slots

History = tuple[torch.Tensor, torch.Tensor]  # ids [B, h] right-aligned (the newest last), lengths [B]


class Memory(nn.Module):
    """A learned kind of summary slot: `summary` gives the slots [B, A+S, m] for a batch's history (or None: empty
    slots). Built as `cls(layout, width, m, chunk)` (width: the network's hidden size; chunk: context.segment_len)."""

    doc = ""
    every_batch = False  # it trains on every batch's history: context.fill_draw (batches without one) is refused
    reads_chunks = False  # it reads each history chunk as a window of its own (learned positions must hold it)

    def summary(self, model: nn.Module, history: History | None, batch_size: int) -> torch.Tensor | None:
        raise NotImplementedError

    @staticmethod
    def extra_passes(layout: Layout, chunk: int) -> float:
        """Training passes it adds per predicted token, for `SoftAR.flops_per_token`."""
        return 0.0


MEMORIES: dict[str, type[Memory] | None] = {"arithmetic": None}


def register(name: str):
    def add(cls: type[Memory]) -> type[Memory]:
        cls.doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        MEMORIES[name] = cls
        return cls

    return add


def memory_problem(c: ContextConfig, pos_emb: str, block_size: int) -> tuple[str, str] | None:
    """(config key, message) if context.memory cannot run with this context and model, else None."""
    if c.memory not in MEMORIES:
        return "context.memory", f"expected one of {', '.join(map(repr, MEMORIES))}, got {c.memory!r}"
    kind = MEMORIES[c.memory]
    if kind is None:
        return None
    if c.aggregate + c.segments == 0:
        return "context.memory", f"{c.memory!r} fills summary slots; this layout has none (context.aggregate = " \
            "segments = 0)"
    if kind.every_batch and c.fill_draw != 0:
        return "context.fill_draw", f"must be 0 with context.memory = {c.memory!r} (a batch without history would " \
            "leave its parameters unused)"
    if kind.reads_chunks and pos_emb == "learned":  # a history chunk is read as a window of its own
        chunk_window = c.aggregate + c.segments + c.segment_len + (c.aggregate + c.segments) * (c.memory == "rmt")
        if chunk_window > block_size:
            return "context.segment_len", (f"{c.memory!r} reads each {c.segment_len}-token chunk as a window of "
                                           f"{chunk_window} slots, more than model.block_size = {block_size} learned "
                                           "positions (use model.pos_emb = \"rope\")")
    return None


@register("pause")
class PauseSlots(Memory):
    """Learned constant vectors, blind to the history: the same number of extra slots filled with something that
    carries no memory."""

    def __init__(self, layout: Layout, width: int, m: int, chunk: int):
        super().__init__()
        self.vectors = nn.Parameter(torch.randn(layout.n_summary, m) * 0.02)  # as nanoGPT initialises embeddings

    def summary(self, model: nn.Module, history: History | None, batch_size: int) -> torch.Tensor:
        return self.vectors.expand(batch_size, -1, -1)  # [B, A+S, m]


def whole_chunks(hist: torch.Tensor, hist_len: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """A history hist [B, n] (right-aligned, the last hist_len [B] real) as whole chunks, aligned at the hard
    region's start -> (chunks [B, C, chunk] oldest first, the age of each chunk's newest token [C], valid [B, C]:
    the whole chunk is history)."""
    B, n = hist.shape
    C = n // chunk
    chunks = hist[:, n - C * chunk :].reshape(B, C, chunk)
    first_age = torch.arange(C - 1, -1, -1, device=hist.device) * chunk
    return chunks, first_age, (first_age + chunk)[None] <= hist_len[:, None]


@register("write")
class WriteVectors(Memory):
    """The embedding arithmetic plus learned write vectors from the network's hidden states over each evicted chunk
    (retroactive enrichment)."""

    every_batch = reads_chunks = True

    def __init__(self, layout: Layout, width: int, m: int, chunk: int):
        super().__init__()
        self.layout, self.chunk = layout, chunk
        self.proj = nn.Linear(width, m, bias=False)
        nn.init.zeros_(self.proj.weight)

    def summary(self, model: nn.Module, history: History | None, batch_size: int) -> torch.Tensor | None:
        if history is None:
            return None
        return summary_slots(model.E, *history, self.layout) + self.writes(model, *history)

    @staticmethod
    def extra_passes(layout: Layout, chunk: int) -> float:
        # a forward pass (a third of a training pass) over the history's whole chunks, on average half of
        # max_history tokens per window (its length is drawn uniformly)
        return layout.history / 2 / (3 * layout.token_slots)

    def writes(self, model: nn.Module, hist: torch.Tensor, hist_len: torch.Tensor) -> torch.Tensor:
        """The write vectors to add to the summary slots of histories hist [B, n] (right-aligned, the last
        hist_len [B] real) -> [B, A+S, m]. Only whole chunks count, aligned at the hard region's start."""
        chunks, first_age, valid = whole_chunks(hist, hist_len, self.chunk)
        B, C = valid.shape
        out = torch.zeros(B, self.layout.n_summary, self.proj.out_features, device=hist.device,
                          dtype=self.proj.weight.dtype)
        if not valid.any():
            return out
        with torch.no_grad():  # each chunk read as a window of its own, as the hard region once held it
            h = model.step(model.slots(None, model.E[chunks[valid]], 0), at=slice(-1, None)).hidden[:, -1]  # [N, d]
        writes = torch.zeros(B, C, out.shape[-1], device=hist.device, dtype=out.dtype)
        writes[valid] = self.proj(h.to(out.dtype)).to(writes.dtype)  # (autocast may run the projection in bf16)
        member = torch.stack([(first_age >= lo) & (first_age < hi) for lo, hi in self.layout.slot_ranges()])
        weight = member[None].to(out.dtype) * valid[:, None].to(out.dtype)  # [B, A+S, C]
        return weight @ writes / weight.sum(-1, keepdim=True).clamp_min(1)


@register("rmt")
class RecurrentMemory(Memory):
    """A recurrent memory carried from chunk to chunk of the history, as the Recurrent Memory Transformer's."""

    every_batch = reads_chunks = True

    def __init__(self, layout: Layout, width: int, m: int, chunk: int):
        super().__init__()
        self.chunk = chunk
        self.initial = nn.Parameter(torch.randn(layout.n_summary, m) * 0.02)  # the memory before any history
        self.write = nn.Parameter(torch.randn(layout.n_summary, m) * 0.02)  # the write slots' inputs
        self.proj = nn.Linear(width, m, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)

    @staticmethod
    def extra_passes(layout: Layout, chunk: int) -> float:
        # the forward pass over the history's chunks, as write vectors, and training through the last chunk
        return WriteVectors.extra_passes(layout, chunk) + (chunk + 2 * layout.n_summary) / layout.token_slots

    def summary(self, model: nn.Module, history: History | None, batch_size: int) -> torch.Tensor:
        """The memory [B, n_slots, m] after a history (hist [B, n], hist_len [B]), or the initial one."""
        memory = self.initial.expand(batch_size, -1, -1)
        if history is None:
            return memory
        chunks, _, valid = whole_chunks(*history, self.chunk)
        C, n = valid.shape[1], self.initial.shape[0]
        for j in range(C):
            if not valid[:, j].any():
                continue
            with torch.set_grad_enabled(torch.is_grad_enabled() and j == C - 1):  # through the last chunk only
                window = torch.cat([model.slots(memory, model.E[chunks[:, j]], 0),
                                    self.write.expand(batch_size, -1, -1).to(memory.dtype)], dim=1)
                new = self.proj(model.step(window, at=slice(-n, None)).hidden)  # [B, n, m]
            memory = torch.where(valid[:, j, None, None], new.to(memory.dtype), memory)
        return memory + 0.0 * self.initial.sum()  # the initial memory always takes part (DDP needs every parameter)
