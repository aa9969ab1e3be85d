"""The context window: its layout, its memory hierarchy, and the one window builder (docs/design.md, "Context
layout").

A window of T = model.block_size slots, in order:

    [ aggregate (A) ][ segments (S), oldest first ][ hard tokens (H) ][ soft tokens (K) ]

The summary slots hold embedding arithmetic over the history before the hard region. Segment i (i = 0 newest) covers
the L_i tokens just older than segment i - 1 (segment 0: just before the hard region); the aggregate covers everything
older than the last segment (with `aggregate_all`: all history). A summary slot is W @ E, where W [B, A+S, V] is
the slot's weighted token counts, normalised by the aggregation op: differentiable in E and computed without a loop
over positions.

Training (`summary_slots`) gives each window a history of random length. Generation (`ContextState`) moves each
token down the ladder as it ages: soft -> collapsed to hard -> evicted into the newest segment -> through the older
segments -> merged into the aggregate. Its slots equal the training-time computation on the same history, and its
memory and work per step do not depend on how long the history is. Both hand (summary, token vectors, soft count)
to `WindowBuilder`, the one place a window is put together.

Names: *window slots* are all T = model.block_size slots; *token slots* are the hard + soft ones, the positions that
predict a next token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from softar.config import ContextConfig
from softar.model.gpt import compact
from softar.soft.collapse import CollapsePolicy

AGGREGATE, SEGMENT, HARD, SOFT = range(4)  # slot kinds
KIND_NAMES = ("aggregate", "segment", "hard", "soft")


@dataclass(frozen=True)
class Layout:
    """A context config resolved against the window size."""

    aggregate: int  # 0 or 1 slot
    segments: tuple[int, ...]  # tokens per segment, newest first
    hard: int
    soft: int
    op: str
    decay: float
    aggregate_all: bool
    history: int  # training: up to this many history tokens per window (0 when there are no summary slots)

    @classmethod
    def from_config(cls, c: ContextConfig, block_size: int) -> Layout:
        hard = block_size - c.aggregate - c.segments - c.soft
        n_summary = c.aggregate + c.segments
        return cls(c.aggregate, tuple(c.segment_lengths()), hard, c.soft, c.op, c.decay, c.aggregate_all,
                   c.max_history if n_summary else 0)

    @property
    def plain(self) -> bool:
        return self.aggregate == len(self.segments) == self.soft == 0

    @property
    def n_summary(self) -> int:
        return self.aggregate + len(self.segments)

    @property
    def token_slots(self) -> int:
        """Hard + soft: the positions that predict a next token."""
        return self.hard + self.soft

    @property
    def span(self) -> int:
        """History tokens the segments cover."""
        return sum(self.segments)

    def slot_ranges(self) -> list[tuple[int, float]]:
        """For each summary slot in window order: the (first, end) age of the history tokens it covers. Age 0 is
        the token just before the hard region."""
        ranges, start = [], 0
        for length in self.segments:
            ranges.append((start, start + length))
            start += length
        ranges.reverse()  # oldest segment first, as in the window
        if self.aggregate:
            ranges.insert(0, (0 if self.aggregate_all else self.span, float("inf")))
        return ranges


def age_weights(layout: Layout, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and membership of n history tokens (column j has age n - 1 - j) in each summary slot:
    ([A+S, n] float, [A+S, n] bool). The weight is 1, or decay^(age - the slot's first age) for op = "decay"."""
    age = torch.arange(n - 1, -1, -1, device=device)
    ws, members = [], []
    for lo, hi in layout.slot_ranges():
        inside = (age >= lo) & (age < hi)
        w = layout.decay ** (age - lo).clamp_min(0).double() if layout.op == "decay" else torch.ones(n, device=device)
        ws.append(torch.where(inside, w.float(), 0.0))
        members.append(inside)
    if not ws:
        return torch.zeros(0, n, device=device), torch.zeros(0, n, dtype=torch.bool, device=device)
    return torch.stack(ws), torch.stack(members)


def summary_weights(hist: torch.Tensor, hist_len: torch.Tensor, layout: Layout,
                    vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token weights of each summary slot: hist [B, n] ids, right-aligned (the newest last), of which the last
    hist_len [B] are real -> (W [B, A+S, V] float32, counts [B, A+S] tokens per slot)."""
    B, n = hist.shape
    w, member = age_weights(layout, n, hist.device)  # [s, n]
    valid = torch.arange(n - 1, -1, -1, device=hist.device)[None] < hist_len[:, None]  # [B, n]
    W = torch.zeros(B, w.shape[0], vocab_size, device=hist.device)
    W.scatter_add_(2, hist[:, None].expand(B, w.shape[0], n), w[None] * valid[:, None])
    counts = (member[None] & valid[:, None]).sum(-1)
    return W, counts


def normalize(W: torch.Tensor, counts: torch.Tensor, op: str) -> torch.Tensor:
    """Apply the aggregation op: sum and decay as they are, mean / n, sqrt / sqrt(n); an empty slot stays 0."""
    if op == "mean":
        return W / counts.clamp_min(1).unsqueeze(-1).to(W.dtype)
    if op == "sqrt":
        return W / counts.clamp_min(1).unsqueeze(-1).to(W.dtype).sqrt()
    return W


def summary_slots(E: torch.Tensor, hist: torch.Tensor, hist_len: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The summary slots for a batch of histories: [B, A+S, m], differentiable in E."""
    W, counts = summary_weights(hist, hist_len, layout, E.shape[0])
    return normalize(W, counts, layout.op).to(E.dtype) @ E


class WindowBuilder(nn.Module):
    """The one window builder: summary slots [B, A+S, m] + token vectors [B, n, m] (the last n_soft of them soft)
    -> the window [B, A+S+n, m]. A plain layout passes the tokens through. Otherwise it makes slots of different
    kinds distinguishable: a learned vector per kind added to each slot, and optionally a learned projection +
    LayerNorm per kind for the aggregate, segment and soft slots (hard tokens are the distribution the others are
    measured against). The LayerNorm's scale starts at the embedding init scale."""

    def __init__(self, layout: Layout, m: int, kind_embeddings: bool, project: bool):
        super().__init__()
        self.layout = layout
        self.kind = nn.Embedding(len(KIND_NAMES), m) if kind_embeddings and not layout.plain else None
        self.proj = None
        if project and not layout.plain:
            self.proj = nn.ModuleDict({k: nn.Sequential(nn.Linear(m, m, bias=False), nn.LayerNorm(m))
                                       for k in ("aggregate", "segment", "soft")})
            for p in self.proj.values():
                nn.init.constant_(p[1].weight, 0.02)

    def forward(self, summary: torch.Tensor | None, tokens: torch.Tensor, n_soft: int) -> torch.Tensor:
        if self.layout.plain:
            return tokens
        if summary is None:  # no history: empty summary slots
            summary = tokens.new_zeros(tokens.shape[0], self.layout.n_summary, tokens.shape[2])
        A, n = self.layout.aggregate, tokens.shape[1]
        parts = [(summary[:, :A], AGGREGATE), (summary[:, A:], SEGMENT), (tokens[:, : n - n_soft], HARD),
                 (tokens[:, n - n_soft :], SOFT)]
        return torch.cat([self.slot(x, kind) for x, kind in parts if x.shape[1]], dim=1)

    def slot(self, x: torch.Tensor, kind: int) -> torch.Tensor:
        """Vectors [B, n, m] as slots of one kind (each slot on its own, so a soft region can grow step by step)."""
        if self.layout.plain:
            return x
        if self.proj is not None and kind != HARD:
            x = self.proj[KIND_NAMES[kind]](x)
        return x + self.kind.weight[kind] if self.kind is not None else x


class SlidingWindow:
    """A plain model's generation-time window: the vectors fed back (hard or soft), the newest last, up to `size`
    slots. A token that arrives at a full window leaves only the newest `keep` slots (half the window), so the
    window moves once per `size - keep + 1` tokens and otherwise grows at its end."""

    def __init__(self, prompt: torch.Tensor, size: int):
        B, n, m = prompt.shape  # prompt vectors [B, n, m]
        self.size, self.keep = size, max(1, size // 2)
        self.buf = prompt.new_zeros(B, size, m)
        self.len = min(n, size)
        self.buf[:, : self.len] = prompt[:, n - self.len :]
        self.seen = n  # tokens pushed in all, the prompt's included

    @property
    def length(self) -> int:
        return self.len

    def push(self, vec: torch.Tensor) -> bool:
        """Add one fed-back vector [B, m] -> whether the window moved (every row alike)."""
        self.seen += 1
        if self.len < self.size:
            self.buf[:, self.len] = vec
            self.len += 1
            return False
        self.buf[:, : self.keep - 1] = self.buf[:, self.size - self.keep + 1 :].clone()
        self.buf[:, self.keep - 1] = vec
        self.len = self.keep
        return True

    def window(self) -> torch.Tensor:
        return self.buf[:, : self.len]  # [B, len, m]

    def regions(self) -> list[tuple[str, int, int]]:
        """As `ContextState.regions`: one region of token slots, the newest `len` tokens."""
        return [("tokens", 0, self.len)]

    def select(self, rows: torch.Tensor) -> None:
        self.buf = compact(self.buf, rows)


class ContextState:
    """The generation-time memory hierarchy for a batch that advances in lockstep.

    Holds the soft region (vectors, their collapsed ids, whether each is collapsed yet, and its OOD score), the hard
    region's ids, the ids of the tokens the segments cover (newest last) and the aggregate's weighted token counts
    [B, V] (float64, so sums of counts stay exact). `push` adds one generated token.

    The ladder moves every `shift_every` tokens (B): when the newest region overflows (the soft region, or the hard
    one in a layout without soft slots), its oldest B tokens move one step down at once, and each older region
    passes on what overflows it. Between moves the window only grows at its end, so a KV cache serves it
    (`softar.decode`). B = 1 moves every token one step at every token. The window at any point is a prefix of
    the full window training sees with the same history (a causal model reads each prefix alone), so training needs
    no schedule of its own."""

    def __init__(self, layout: Layout, batch_size: int, vocab_size: int, m: int, device=None,
                 dtype: torch.dtype = torch.float32, shift_every: int = 1):
        newest = layout.soft or layout.hard
        if not 1 <= shift_every <= max(newest, 1):
            raise ValueError(f"shift_every must be in 1..{newest} (the size of the region new tokens enter), got "
                             f"{shift_every}")
        self.layout, self.V, self.shift_every = layout, vocab_size, shift_every
        z = dict(device=device)
        self.soft_vec = torch.zeros(batch_size, 0, m, dtype=dtype, **z)
        self.soft_id = torch.zeros(batch_size, 0, dtype=torch.long, **z)
        self.soft_done = torch.zeros(batch_size, 0, dtype=torch.bool, **z)  # collapsed in place (or hard mode)
        self.soft_score = torch.zeros(batch_size, 0, **z)
        self.hard = torch.zeros(batch_size, 0, dtype=torch.long, **z)
        self.seg = torch.zeros(batch_size, 0, dtype=torch.long, **z)
        self.agg = torch.zeros(batch_size, vocab_size, dtype=torch.float64, **z)
        self.agg_n = 0  # tokens merged into the aggregate
        self.seen = 0  # tokens pushed in all
        self.collapsed_by_policy = torch.zeros(batch_size, dtype=torch.long, **z)
        self.collapsed_by_age = torch.zeros(batch_size, dtype=torch.long, **z)
        self.moved = False  # since the last push: the ladder moved (every slot of the window may have changed)

    @property
    def length(self) -> int:
        """The window's slots: summary + hard + soft."""
        return self.layout.n_summary + self.hard.shape[1] + self.soft_vec.shape[1]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows of the batch."""
        for name in ("soft_vec", "soft_id", "soft_done", "soft_score", "hard", "seg", "agg", "collapsed_by_policy",
                     "collapsed_by_age"):
            setattr(self, name, getattr(self, name)[rows])

    # -- moving tokens down the ladder ------------------------------------------------------------------------------
    def extend_hard(self, ids: torch.Tensor) -> None:
        """Append given tokens [B, n] (a prompt) to the hard region; exactly the overflow flows down."""
        self.seen += ids.shape[1]
        self._to_hard(ids, block=1)

    def _to_hard(self, ids: torch.Tensor, block: int) -> None:
        self.hard = torch.cat([self.hard, ids], dim=1)
        over = self.hard.shape[1] - self.layout.hard
        if over > 0:
            n = min(max(over, block), self.hard.shape[1])
            evicted, self.hard = self.hard[:, :n], self.hard[:, n:]
            self.moved = True
            self._to_segments(evicted)

    def _to_segments(self, ids: torch.Tensor) -> None:
        if self.layout.aggregate and self.layout.aggregate_all:
            self._to_aggregate(ids)
        self.seg = torch.cat([self.seg, ids], dim=1)
        over = self.seg.shape[1] - self.layout.span
        if over > 0:
            old, self.seg = self.seg[:, :over], self.seg[:, over:]
            if self.layout.aggregate and not self.layout.aggregate_all:
                self._to_aggregate(old)

    def _to_aggregate(self, ids: torch.Tensor) -> None:
        k = ids.shape[1]
        w = torch.ones(k, dtype=torch.float64, device=ids.device)
        if self.layout.op == "decay":  # everything already in ages by k; the newest of these gets weight 1
            self.agg *= self.layout.decay**k
            w = self.layout.decay ** torch.arange(k - 1, -1, -1, dtype=torch.float64, device=ids.device)
        self.agg.scatter_add_(1, ids, w.expand(ids.shape[0], k).contiguous())
        self.agg_n += k

    def push(self, vec: torch.Tensor, ids: torch.Tensor, collapsed: torch.Tensor, score: torch.Tensor,
             E: torch.Tensor, policy: CollapsePolicy | None = None) -> torch.Tensor:
        """Add one generated token to the soft region: its soft vector [B, m], the id it collapses to [B], whether
        it is collapsed right away [B] (hard mode, or its OOD score passed the threshold) and its score [B]. Then
        the policy's budget collapses the highest-scoring soft tokens beyond it, and when the soft region overflows
        its oldest tokens move down the ladder (`shift_every` at a time).

        -> [B] bool: the rows whose window changed other than by one new slot at its end (the ladder moved, or the
        budget collapsed an older soft token in place); the other rows' windows gained exactly `new_slot()`."""
        self.seen += 1
        self.moved = False
        vec = torch.where(collapsed[:, None], E[ids].to(vec.dtype), vec)
        self.soft_vec = torch.cat([self.soft_vec, vec[:, None]], dim=1)
        self.soft_id = torch.cat([self.soft_id, ids[:, None]], dim=1)
        self.soft_done = torch.cat([self.soft_done, collapsed[:, None]], dim=1)
        self.soft_score = torch.cat([self.soft_score, score[:, None].float()], dim=1)
        self.collapsed_by_policy += collapsed.long()
        changed = torch.zeros_like(collapsed)
        if policy is not None and policy.budget >= 0:
            extra = policy.over_budget(self.soft_score, self.soft_done)
            self.soft_vec = torch.where(extra[..., None], E[self.soft_id].to(vec.dtype), self.soft_vec)
            self.soft_done |= extra
            self.collapsed_by_policy += extra.sum(1)
            changed = extra[:, :-1].any(1)  # the newest token's slot is new either way
        over = self.soft_vec.shape[1] - self.layout.soft
        if over > 0:  # with no soft slots the new token goes straight to the hard region: still one new slot
            n = min(max(over, self.shift_every if self.layout.soft else 1), self.soft_vec.shape[1])
            self.moved = self.layout.soft > 0
            self.collapsed_by_age += (~self.soft_done[:, :n]).sum(1)
            oldest = self.soft_id[:, :n]
            self.soft_vec, self.soft_id = self.soft_vec[:, n:], self.soft_id[:, n:]
            self.soft_done, self.soft_score = self.soft_done[:, n:], self.soft_score[:, n:]
            self._to_hard(oldest, 1 if self.layout.soft else self.shift_every)  # the hard region stays full
        return changed | self.moved

    def new_slot(self, E: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The slot the last push added at the window's end: (its vector [B, m], its kind)."""
        if self.layout.soft:
            return self.soft_vec[:, -1], SOFT
        return E[self.hard[:, -1]], HARD

    def regions(self) -> list[tuple[str, int, int]]:
        """What each part of the window holds, newest first: (name, first age, end age), where age 0 is the newest
        token pushed. Names: soft, hard, segment<i> (0 newest), aggregate. Every region is listed, empty ones too;
        with `aggregate_all` the aggregate also holds the segments' tokens, and is listed for those older only."""
        parts = [("soft", self.soft_vec.shape[1]), ("hard", self.hard.shape[1])]
        parts += [(f"segment{i}", n) for i, n in enumerate(self._segment_fill())]
        if self.layout.aggregate:
            parts.append(("aggregate", self.agg_n - (self.seg.shape[1] if self.layout.aggregate_all else 0)))
        out, age = [], 0
        for name, n in parts:
            out.append((name, age, age + n))
            age += n
        return out

    def tier(self, age: int) -> str:
        """Where the token pushed `age` tokens before the newest one sits now: a region of `regions()`, or gone
        (no slot holds it any more)."""
        return next((name for name, lo, hi in self.regions() if lo <= age < hi), "gone")

    def _segment_fill(self) -> list[int]:
        left, fill = self.seg.shape[1], []
        for length in self.layout.segments:
            fill.append(min(length, left))
            left -= fill[-1]
        return fill

    # -- what the model sees ----------------------------------------------------------------------------------------
    def summary_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [B, A+S, V] float64, counts [B, A+S]): segments from the ids they cover, the aggregate from its
        running counts. Work per step: O(segment span + V), whatever the history length."""
        lay = self.layout
        B = self.seg.shape[0]
        W, counts = summary_weights(self.seg, torch.full((B,), self.seg.shape[1], device=self.seg.device), lay,
                                    self.V)
        W = W.double()
        if lay.aggregate:
            W[:, 0] = self.agg
            counts[:, 0] = self.agg_n
        return W, counts

    def window(self, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(summary [B, A+S, m], tokens [B, n_hard + n_soft, m], n_soft): the inputs of `WindowBuilder`."""
        W, counts = self.summary_weights()
        summary = normalize(W, counts, self.layout.op).to(E.dtype) @ E
        tokens = torch.cat([E[self.hard], self.soft_vec.to(E.dtype)], dim=1)
        return summary, tokens, self.soft_vec.shape[1]

    def token_counts(self) -> torch.Tensor:
        """[B, V] float64: the weight-one contents of every slot, as token counts (collapsed ids for soft slots).
        With op sum, mean or sqrt and aggregate_all off, every token pushed is counted exactly once."""
        if self.layout.op == "decay" or self.layout.aggregate_all:
            raise ValueError("token counts are weight-one only for op sum/mean/sqrt without aggregate_all")
        total = self.summary_weights()[0].sum(1)
        for ids in (self.hard, self.soft_id):
            total.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))
        return total
