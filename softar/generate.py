"""Generation: one batched engine for sampling text, evaluation, reasoning tasks and RL.

`generate(model, prompts, decoding)` takes prompts of any lengths and returns, per sequence, the ids, the
log-probability of each chosen token, and optionally the vectors that re-entered the context and where each token
sits in the memory hierarchy (`Generation`). Each step the model emits its outputs (`softar.model.Outputs`). In
hard mode the next input is E[token]. In soft mode it is the soft token (`Decoding.soft`, any definition in
`softar.soft.tokens.SOFT_TOKENS`) and the token shown is its collapse (`softar.soft.collapse`).

How it runs:
- **Lanes.** Sequences whose prompts have the same length advance in lockstep as one lane; each lane keeps its
  window state, a `SlidingWindow` for a plain model, a `ContextState` (the memory hierarchy) for a layout. All lanes
  share one decode step.
- **The cache.** softAR's GPT keeps a `RingCache` of one window per sequence. A step whose window only gained a slot
  at its end costs one position. A window that moved (a plain window sliding by half, a hierarchy shifting, a soft
  token collapsed in place by the budget) is recomputed whole and written back into the ring. With
  `context.shift_every = B` the hierarchy moves once per B tokens, so the cache serves B - 1 steps out of B; B = 1
  is the per-token hierarchy, recomputed at every token. `use_cache=False` recomputes every window at every step:
  the reference the cached path is tested against, and the path a Hugging Face network takes.
- **Randomness.** Sequence i draws from its own stream, seeded `seed + i` (`RowGenerators`). A sequence's text
  does not depend on its batch: alone or among others, it is the same.
- **Tracing.** `return_trace=True` also keeps, per step, the top-k of the distribution, its entropy, and the
  window that produced the token (`WindowView`): what `softar inspect` draws.
- **Stopping.** A sequence ends at a stop token or after `max_new_tokens`; it leaves the batch at once, so finished
  sequences cost nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from softar import SoftarError
from softar.config import SoftConfig
from softar.model import Outputs
from softar.soft.collapse import CollapsePolicy, Sampling, collapse
from softar.soft.model import SoftAR
from softar.soft.tokens import Generator, RowGenerators, add_noise, make_soft_token, top_probs
from softar.soft.window import HARD, ContextState, SlidingWindow

LAST = (slice(None), -1)  # index of the last position of [B, T, ...]
TRACE_TOP_K = 10


@dataclass
class Decoding:
    mode: str = "hard"  # hard | soft
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    soft: SoftConfig = field(default_factory=SoftConfig)  # soft mode: what re-enters, and its noise
    collapse: str = "nn_l2"  # soft mode: a name in softar.soft.collapse.COLLAPSES, how a soft token is shown
    policy: CollapsePolicy = field(default_factory=CollapsePolicy)  # models with a layout: collapse in place
    max_new_tokens: int = 64
    stop_tokens: tuple[int, ...] = ()  # a sequence ends after emitting one of these


@dataclass
class WindowView:
    """The window as one sequence saw it: its regions newest first (name, first age, end age; age 0 is the newest
    token pushed, see `ContextState.regions`), how many tokens the sequence had pushed, prompt included (token
    index = seen - 1 - age), and which soft-region tokens are collapsed in place, oldest first."""

    regions: list[tuple[str, int, int]]
    seen: int
    soft_collapsed: list[bool]


@dataclass
class Generation:
    """What `generate` returns, one row per prompt, in the order given. N = max_new_tokens."""

    prompts: list[torch.Tensor]  # each [T0_i]
    tokens: torch.Tensor  # [B, N] the generated ids; -1 after a sequence ended
    lengths: torch.Tensor  # [B] generated tokens per sequence (a stop token included)
    logprobs: torch.Tensor  # [B, N] log p(token) under the model's distribution (temperature 1, unfiltered); 0 after
    stopped: torch.Tensor  # [B] bool: ended on a stop token
    collapsed: torch.Tensor  # [B, N] bool: re-entered as its hard token (hard mode: all; soft: by the policy)
    scores: torch.Tensor  # [B, N] the collapse policy's OOD score at entry (soft mode with a layout)
    vectors: torch.Tensor | None = None  # [B, N, m] what re-entered the context (return_vectors=True)
    tiers: list[list[str]] | None = None  # layouts: where each generated token sat when its sequence ended
    collapsed_by_age: torch.Tensor | None = None  # [B] layouts: soft tokens collapsed on leaving the soft region
    # return_trace=True (k = TRACE_TOP_K): the model's next-token distribution at each step (temperature 1,
    # unfiltered, as logprobs), the policy's OOD score in every mode, and the window that produced each token
    top_ids: torch.Tensor | None = None  # [B, N, k] the most likely next tokens
    top_probs: torch.Tensor | None = None  # [B, N, k] their probabilities
    entropy: torch.Tensor | None = None  # [B, N] nats
    ood: torch.Tensor | None = None  # [B, N] the collapse policy's score (`scores` only where the policy applies)
    windows: list[list[WindowView]] | None = None  # per sequence: the window before each step, then the last one

    def sequences(self) -> list[list[int]]:
        """Prompt + generated ids of each sequence."""
        return [p.tolist() + t[:n].tolist() for p, t, n in zip(self.prompts, self.tokens, self.lengths.tolist(),
                                                                 strict=True)]

    def full(self) -> torch.Tensor:
        """[B, T0 + N]: prompts and generated ids in one tensor, for prompts of one length that all ran to N."""
        if len({len(p) for p in self.prompts}) != 1 or bool(self.stopped.any()):
            raise ValueError("full() needs prompts of one length and no early stops; use sequences()")
        return torch.cat([torch.stack(self.prompts), self.tokens], dim=1)


def next_token(model: SoftAR, out: Outputs, dec: Decoding, generator: Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's choice from the outputs at the last slot [B, ...]: (vector that re-enters [B, m], id shown [B])."""
    E = model.E
    sampling = Sampling(dec.temperature, dec.top_k, dec.top_p, generator)
    if dec.mode == "hard":
        nxt = sampling.draw(out.logits)
        return E[nxt], nxt
    v = add_noise(dec.soft, make_soft_token(out, E, dec.soft, generator), E, out.logits, generator)
    return v, collapse(dec.collapse, v, out, E, sampling)


class _Lane:
    """Sequences with prompts of one length: their window state, advancing in lockstep."""

    def __init__(self, model: SoftAR, prompts: torch.Tensor, shift_every: int):
        self.model, E = model, model.E
        if model.layout.plain:
            self.state = SlidingWindow(E[prompts], model.window_slots)
        else:
            self.state = ContextState(model.layout, prompts.shape[0], E.shape[0], E.shape[1], E.device, E.dtype,
                                      shift_every)
            self.state.extend_hard(prompts)  # the prompt is given text: hard from the start

    @property
    def layout(self) -> bool:
        return isinstance(self.state, ContextState)

    @property
    def length(self) -> int:
        return self.state.length

    @property
    def rows(self) -> int:
        return (self.state.hard if self.layout else self.state.buf).shape[0]

    def window(self) -> torch.Tensor:
        """The whole window [R, L, m], built by the model's one window builder."""
        if self.layout:
            return self.model.slots(*self.state.window(self.model.E))
        return self.state.window()

    def views(self) -> list[WindowView]:
        """The window of each row, as `WindowView`s (tracing only: it reads soft_done back from the device)."""
        done = self.state.soft_done.tolist() if self.layout else [[]] * self.rows
        regions = self.state.regions()  # the lane's rows advance in lockstep: one set of regions
        return [WindowView(regions, self.state.seen, d) for d in done]

    def new_slot(self) -> torch.Tensor:
        """The slot the last push added [R, 1, m]."""
        if self.layout:
            vec, kind = self.state.new_slot(self.model.E)
            return self.model.slots.slot(vec[:, None], kind)
        return self.model.slots.slot(self.state.buf[:, self.state.len - 1 : self.state.len], HARD)


def _put(out: Outputs, rows: torch.Tensor, new: Outputs) -> Outputs:
    """out with rows [r] replaced by new [r, ...]."""
    def put(a, b):
        if a is None:
            return None
        a = a.clone()
        a[rows] = b
        return a
    return Outputs(put(out.logits, new.logits), put(out.h_m, new.h_m), put(out.y, new.y), put(out.c, new.c))


def _cat(parts: list[Outputs]) -> Outputs:
    if len(parts) == 1:
        return parts[0]
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    return Outputs(*(cat([getattr(o, f) for o in parts]) for f in ("logits", "h_m", "y", "c")))


def _as_prompts(prompts, device, vocab_size: int) -> list[torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts: expected ids [B, T] or a list of sequences, got a tensor of shape "
                             f"{tuple(prompts.shape)}")
        rows = list(prompts.to(device))
    else:
        rows = [torch.as_tensor(p, dtype=torch.long, device=device) for p in prompts]
    if not rows or any(r.dim() != 1 or r.numel() == 0 for r in rows):
        raise ValueError("prompts: every prompt must be a non-empty sequence of ids")
    if any(int(r.min()) < 0 or int(r.max()) >= vocab_size for r in rows):
        raise ValueError(f"prompts: ids must be in [0, {vocab_size})")
    return rows


def generate(model: SoftAR, prompts: torch.Tensor | Sequence, dec: Decoding, seed: int | Sequence[int] = 0,
             use_cache: bool = True, return_vectors: bool = False, shift_every: int | None = None,
             return_trace: bool = False) -> Generation:
    """Continue each prompt (ids [B, T0], or a list of id sequences of any lengths) under `dec`; sequence i draws
    from its own stream seeded `seed + i` (or `seed[i]`). `shift_every` overrides the model's
    `context.shift_every` (how many tokens the memory hierarchy takes per move). Runs without autograd; what it
    returns are ordinary tensors, ready to index a loss with (RL)."""
    g = _generate(model, prompts, dec, seed, use_cache, return_vectors, shift_every, return_trace)
    for name in ("tokens", "lengths", "logprobs", "stopped", "collapsed", "scores", "vectors", "collapsed_by_age",
                 "top_ids", "top_probs", "entropy", "ood"):
        if getattr(g, name) is not None:
            setattr(g, name, getattr(g, name).clone())  # out of inference mode
    g.prompts = [p.clone() for p in g.prompts]
    return g


@torch.inference_mode()
def _generate(model: SoftAR, prompts: torch.Tensor | Sequence, dec: Decoding, seed: int | Sequence[int],
              use_cache: bool, return_vectors: bool, shift_every: int | None, trace: bool) -> Generation:
    E, lm = model.E, model.lm
    device = E.device
    prompts = _as_prompts(prompts, device, E.shape[0])
    B, N = len(prompts), dec.max_new_tokens
    seeds = [seed + i for i in range(B)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != B:
        raise ValueError(f"seed: {len(seeds)} seeds for {B} prompts")
    if N < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if model.memory is not None:  # ContextState keeps arithmetic only; the controls are scored by `softar eval`
        raise SoftarError(f"generation keeps summary slots as embedding arithmetic; this model's context.memory is "
                          f"{model.context_cfg.memory!r}")
    shift_every = model.context_cfg.shift_every if shift_every is None else shift_every
    gens = RowGenerators(seeds, device)
    # lanes of equal prompt length; active rows are kept in lane order, so each lane is one contiguous slice
    lengths_seen = sorted({len(p) for p in prompts})
    order = [i for n in lengths_seen for i, p in enumerate(prompts) if len(p) == n]
    gens.select(order)
    lanes = [_Lane(model, torch.stack([p for p in prompts if len(p) == n]), shift_every) for n in lengths_seen]
    alive = torch.tensor(order, device=device)  # the original index of each active row
    identity = order == list(range(B))
    stop = torch.tensor(sorted(set(dec.stop_tokens)), dtype=torch.long, device=device)
    cached = use_cache and hasattr(lm, "new_ring_cache")
    ring = lm.new_ring_cache(B, model.window_slots) if cached else None
    positions = torch.arange(model.window_slots, device=device)

    tokens = torch.full((B, N), -1, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, N, device=device)
    collapsed = torch.zeros(B, N, dtype=torch.bool, device=device)
    scores = torch.zeros(B, N, device=device)
    vectors = torch.zeros(B, N, E.shape[1], dtype=E.dtype, device=device) if return_vectors else None
    lengths = torch.full((B,), N, dtype=torch.long, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    layout = not model.layout.plain
    tiers: list[list[str]] | None = [[] for _ in range(B)] if layout else None
    by_age = torch.zeros(B, dtype=torch.long, device=device) if layout else None
    k = min(TRACE_TOP_K, E.shape[0])
    trace_ids = torch.full((B, N, k), -1, dtype=torch.long, device=device) if trace else None
    trace_probs = torch.zeros(B, N, k, device=device) if trace else None
    entropies = torch.zeros(B, N, device=device) if trace else None
    ood = torch.zeros(B, N, device=device) if trace else None
    windows: list[list[WindowView]] | None = [[] for _ in range(B)] if trace else None

    def view(lanes_now: list[_Lane]) -> None:
        """Append each active row's window to its sequence's views."""
        for row, w in zip(alive.tolist(), (w for lane in lanes_now for w in lane.views()), strict=True):
            windows[row].append(w)

    def recompute(lane: _Lane, start: int, rows: torch.Tensor | None = None) -> Outputs:
        """The outputs at the end of a lane's whole window (rows: only these rows of the lane), written into the ring
        at the active rows start + rows."""
        window = lane.window()
        rows = torch.arange(window.shape[0], device=device) if rows is None else rows
        window = window[rows]
        if ring is None:
            return model.read(window, last=True).at(LAST)
        cache = lm.new_cache(window.shape[0], window.shape[1])
        out = model.outputs(lm.hidden(window, cache=cache)[:, -1:]).at(LAST)
        ring.write_rows(start + rows, cache)
        return out

    def spans() -> list[tuple[_Lane, int, int]]:
        """Each lane with the slice [a, b) of the active rows it holds."""
        s, result = 0, []
        for lane in lanes:
            result.append((lane, s, s + lane.rows))
            s += lane.rows
        return result

    out = _cat([recompute(lane, a) for lane, a, _ in spans()])
    for g in range(N):
        v, nxt = next_token(model, out, dec, gens)
        logp = out.logits.float().log_softmax(-1).gather(-1, nxt[:, None])[:, 0]
        rows = slice(None) if len(alive) == B and identity else alive  # a slice writes faster than an index
        tokens[rows, g], logprobs[rows, g] = nxt, logp
        score = torch.zeros_like(logp)
        entered = torch.full_like(nxt, dec.mode == "hard", dtype=torch.bool)  # a plain model's soft tokens stay soft
        policy_applies = layout and dec.mode == "soft"
        if trace or policy_applies:
            policy_score = dec.policy.score_of(v, out.logits, nxt, E)
        if trace:
            view(lanes)
            trace_ids[rows, g], trace_probs[rows, g], entropies[rows, g] = top_probs(out.logits, k)
            ood[rows, g] = policy_score
        if policy_applies:
            score = policy_score
            entered = dec.policy.at_entry(score)
            v = torch.where(entered[:, None], E[nxt].to(v.dtype), v)  # what re-enters
        scores[rows, g], collapsed[rows, g] = score, entered
        if vectors is not None:
            vectors[rows, g] = v.to(E.dtype)
        moved = []
        for lane, a, b in spans():
            if lane.layout:
                moved.append(lane.state.push(v[a:b], nxt[a:b], entered[a:b], score[a:b], E, dec.policy))
                n_soft = lane.state.soft_vec.shape[1]  # the newest generated tokens; a budget may collapse them
                if n_soft and dec.mode == "soft":
                    collapsed[alive[a:b], g + 1 - n_soft : g + 1] |= lane.state.soft_done
            else:
                moved.append(torch.full((b - a,), lane.state.push(v[a:b].to(E.dtype)), device=device))
        moved = torch.cat(moved)  # [R]: windows that changed other than by one slot at their end
        ended = torch.zeros_like(moved)
        if len(stop):
            ended = torch.isin(nxt, stop)
            stopped[alive] = ended
        if g == N - 1:
            ended = torch.ones_like(ended)
        if ended.any():
            lengths[alive[ended]] = g + 1
            if trace:  # the last window of each finished sequence
                views, rows_now = [w for lane in lanes for w in lane.views()], alive.tolist()
                for r in ended.nonzero()[:, 0].tolist():
                    windows[rows_now[r]].append(views[r])
            for lane, a, b in spans():
                done = ended[a:b].nonzero()[:, 0]
                if layout and len(done):
                    names = [lane.state.tier(g - t) for t in range(g + 1)]
                    for r in done.tolist():
                        tiers[alive[a + r]] = names
                    by_age[alive[a + done]] = lane.state.collapsed_by_age[done]
            if g == N - 1 or ended.all():
                break
            for lane, a, b in spans():  # finished sequences leave the batch
                lane.state.select((~ended[a:b]).nonzero()[:, 0])
            lanes[:] = [lane for lane in lanes if lane.rows]
            keep = (~ended).nonzero()[:, 0]
            alive, moved = alive[keep], moved[keep]
            gens.select(keep.tolist())
            if ring is not None:
                ring.select(keep)
        # the next step's outputs: one decode step for every window that only grew, a recomputation for the rest
        parts = []
        if ring is not None and not bool(moved.all()):
            x = torch.cat([lane.new_slot() for lane in lanes])  # [R, 1, m]
            if len(lanes) == 1:
                pos = positions[lanes[0].length - 1 : lanes[0].length]  # [1]: one position for all rows
            else:
                pos = torch.cat([positions[lane.length - 1].expand(lane.rows) for lane in lanes])[:, None]
            step = model.outputs(lm.hidden(x, positions=pos, cache=ring)).at(LAST)
            for lane, a, b in spans():
                part = step.at(slice(a, b))
                rows = moved[a:b].nonzero()[:, 0]
                parts.append(_put(part, rows, recompute(lane, a, rows)) if len(rows) else part)
        else:
            parts = [recompute(lane, a) for lane, a, _ in spans()]
        out = _cat(parts)
    return Generation(prompts, tokens, lengths, logprobs, stopped, collapsed, scores, vectors, tiers, by_age,
                      trace_ids, trace_probs, entropies, ood, windows)

