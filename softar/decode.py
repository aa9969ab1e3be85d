"""Decoding: the one loop that continues contexts, for sampling text, inspection, evaluation, reasoning and RL.

`decode(model, prompts, feed)` continues each prompt (any lengths) for up to `max_new_tokens` steps. Each step the
model emits its outputs at the last slot (`SoftAR.step`), and the feed (`softar.soft.feeds`) says what re-enters
the context: a sampled token's embedding, a soft token, a teacher-forced token, a constant, an RL policy's thought.
It returns, per sequence, the tokens shown, the log-probability of each under the model, and optionally the vectors
that re-entered, the per-step distributions and where each token sits in the memory hierarchy (`Generation`).

How it runs:
- **Lanes.** Sequences whose prompts have the same length (and thought slots) advance in lockstep as one lane;
  each lane keeps its window state, a `SlidingWindow` for a plain model, a `ContextState` (the memory hierarchy)
  for a layout. All lanes share one decode step.
- **Thoughts.** With a `thoughts` feed, the prompts' <thought> slots (`model.thought_id`) are filled as the prompt
  is read (`softar.soft.thoughts.fill_slots`, the loop training runs), then decoding continues after the prompt.
- **The cache.** softAR's GPT keeps a `RingCache` of one window per sequence. A step whose window only gained a slot
  at its end costs one position. A window that moved (a plain window sliding by half, a hierarchy shifting, a soft
  token collapsed in place by the budget) is recomputed whole and written back into the ring. With
  `context.shift_every = B` the hierarchy moves once per B tokens, so the cache serves B - 1 steps out of B.
  A Hugging Face network keeps its own KV cache the same way (`softar.model.hf.HFRingCache`: appended each step,
  masked per row). `use_cache=False` recomputes every window at every step.
- **Randomness.** Sequence i draws from its own stream, seeded `seed + i` (or `seed[i]`), so a sequence's text does
  not depend on its batch: alone or among others, it is the same. A `torch.Generator` instead is one stream for the
  whole batch (the open-loop metrics draw that way).
- **Stopping.** A sequence ends at a stop token or after `max_new_tokens`; it leaves the batch at once, so finished
  sequences cost nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from softar import SoftarError
from softar.model import Outputs
from softar.soft.collapse import CollapsePolicy
from softar.soft.feeds import Draw, Feed, HardFeed
from softar.soft.model import SoftAR
from softar.soft.thoughts import fill_slots, thought_span
from softar.soft.tokens import RowGenerators, top_probs
from softar.soft.window import HARD, ContextState, SlidingWindow

LAST = (slice(None), -1)  # index of the last position of [B, T, ...]
TRACE_TOP_K = 10


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
    """What `decode` returns, one row per prompt, in the order given. N = max_new_tokens, n = thought slots."""

    prompts: list[torch.Tensor]  # each [T0_i]
    tokens: torch.Tensor  # [B, N] the ids shown; -1 after a sequence ended (and where the feed shows none)
    lengths: torch.Tensor  # [B] generated tokens per sequence (a stop token included)
    logprobs: torch.Tensor  # [B, N] log p(token) under the model's distribution (temperature 1, unfiltered); 0 after
    stopped: torch.Tensor  # [B] bool: ended on a stop token
    collapsed: torch.Tensor  # [B, N] bool: re-entered as its hard token (hard feeds: all; soft: by the policy)
    scores: torch.Tensor  # [B, N] the collapse policy's OOD score at entry (soft feeds with a layout)
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
    # return_logits=True: float32 logits before each generated token and after a sequence's last one (its
    # position `lengths[b]`); 0 = max_new_tokens reads the prompts only: their next-token distributions
    logits: torch.Tensor | None = None  # [B, N + 1, V]
    # a `thoughts` feed: what filled each prompt's thought slots
    thoughts: torch.Tensor | None = None  # [B, n, m]
    thought_tokens: torch.Tensor | None = None  # [B, n] the token a thought drew (-1: none)
    thought_scales: torch.Tensor | None = None  # [B, n] a noisy feed's noise std (0: none)

    def sequences(self) -> list[list[int]]:
        """Prompt + generated ids of each sequence."""
        return [p.tolist() + t[:n].tolist() for p, t, n in zip(self.prompts, self.tokens, self.lengths.tolist(),
                                                                 strict=True)]

    def full(self) -> torch.Tensor:
        """[B, T0 + N]: prompts and generated ids in one tensor, for prompts of one length that all ran to N."""
        if len({len(p) for p in self.prompts}) != 1 or not bool((self.lengths == self.tokens.shape[1]).all()):
            raise ValueError("full() needs prompts of one length and no early stops; use sequences()")
        return torch.cat([torch.stack(self.prompts), self.tokens], dim=1)


@dataclass(frozen=True)
class Decoding:
    """A decoding as a user sets it (`softar sample`, `softar inspect`, the generation study): what re-enters the
    context, which soft tokens a layout collapses in place, how many tokens, and which end a sequence."""

    feed: Feed = field(default_factory=HardFeed)
    policy: CollapsePolicy = field(default_factory=CollapsePolicy)
    max_new_tokens: int = 64
    stop: tuple[int, ...] = ()

    def run(self, model: SoftAR, prompts: torch.Tensor | Sequence, seed: int | Sequence[int] = 0,
            **options) -> Generation:
        """`decode` under these settings (options: those of `decode`)."""
        return decode(model, prompts, self.feed, self.max_new_tokens, self.stop, seed, self.policy, **options)


class _Lane:
    """Sequences with prompts of one length (and one span of thought slots): their window state, advancing in
    lockstep."""

    def __init__(self, model: SoftAR, prompts: torch.Tensor, shift_every: int, span: tuple[int, int]):
        self.model, E = model, model.E
        self.span = span  # thought slots still to fill: (first, count); (0, 0) once filled
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
    return Outputs(*(put(a, b) for a, b in zip(out.fields(), new.fields(), strict=True)))


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


def decode(model: SoftAR, prompts: torch.Tensor | Sequence, feed: Feed, max_new_tokens: int | Sequence[int] = 64,
           stop: Sequence[int] = (), seed: int | Sequence[int] | torch.Generator = 0,
           policy: CollapsePolicy | None = None, thoughts: Feed | None = None, shift_every: int | None = None,
           use_cache: bool = True, return_vectors: bool = False, return_trace: bool = False,
           return_logits: bool = False) -> Generation:
    """Continue each prompt (ids [B, T0], or a list of id sequences of any lengths), the feed choosing what
    re-enters at each step, for `max_new_tokens` steps (or as many for each prompt); sequence i draws from its own
    stream seeded `seed + i` (or `seed[i]`, or all from one `torch.Generator`). `stop`: tokens that end a
    sequence. `policy`: which soft tokens a layout collapses in place. `thoughts`: the feed that fills the prompts'
    <thought> slots. `shift_every` overrides the model's `context.shift_every` (how many tokens the memory
    hierarchy takes per move). Runs without autograd; what it returns are ordinary tensors, ready to index a loss
    with (RL)."""
    g = _decode(model, prompts, feed, max_new_tokens, tuple(stop), seed, policy or CollapsePolicy(), thoughts,
                shift_every, use_cache, return_vectors, return_trace, return_logits)
    for name, value in vars(g).items():
        if isinstance(value, torch.Tensor):
            setattr(g, name, value.clone())  # out of inference mode
    g.prompts = [p.clone() for p in g.prompts]
    return g


@torch.inference_mode()
def _decode(model: SoftAR, prompts: torch.Tensor | Sequence, feed: Feed, max_new: int | Sequence[int],
            stop_tokens: tuple[int, ...],
            seed: int | Sequence[int] | torch.Generator, policy: CollapsePolicy, thought_feed: Feed | None,
            shift_every: int | None, use_cache: bool, return_vectors: bool, trace: bool,
            return_logits: bool) -> Generation:
    E = model.E
    device = E.device
    prompts = _as_prompts(prompts, device, E.shape[0])
    B = len(prompts)
    limit = torch.tensor([max_new] * B if isinstance(max_new, int) else list(max_new), device=device)
    if limit.shape != (B,) or int(limit.min()) < (0 if isinstance(max_new, int) else 1):
        raise ValueError(f"max_new_tokens must be one number >= 0 or one per prompt ({B}) >= 1")
    N = int(limit.max())
    per_prompt = not isinstance(max_new, int)
    if model.memory is not None:  # ContextState keeps arithmetic only; the controls are scored by `softar eval`
        raise SoftarError(f"generation keeps summary slots as embedding arithmetic; this model's context.memory is "
                          f"{model.context_cfg.memory!r}")
    spans = [thought_span(p[None], model.thought_id) if thought_feed is not None else (0, 0) for p in prompts]
    if any(n for _, n in spans) and (not model.layout.plain or max(map(len, prompts)) > model.window_slots):
        raise ValueError("prompts with thought slots need a plain model whose window holds them whole")
    for f in (feed, thought_feed):
        if f is not None:
            f.check(model)
    shift_every = model.context_cfg.shift_every if shift_every is None else shift_every
    if isinstance(seed, torch.Generator):
        gens = seed
    else:
        seeds = [seed + i for i in range(B)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != B:
            raise ValueError(f"seed: {len(seeds)} seeds for {B} prompts")
        gens = RowGenerators(seeds, device)
    # lanes of equal prompt length and thought slots; active rows are kept in lane order, so each lane is one
    # contiguous slice
    keys = sorted({(len(p), *s) for p, s in zip(prompts, spans, strict=True)})
    order = [i for k in keys for i, p in enumerate(prompts) if (len(p), *spans[i]) == k]
    if isinstance(gens, RowGenerators):
        gens.select(order)
    lanes = [_Lane(model, torch.stack([p for p, s in zip(prompts, spans, strict=True) if (len(p), *s) == k]),
                   shift_every, k[1:]) for k in keys]
    alive = torch.tensor(order, device=device)  # the original index of each active row
    identity = order == list(range(B))
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    # a plain window that can never fill needs no more slots than its longest sequence
    longest = max(len(p) + int(n) for p, n in zip(prompts, limit.tolist(), strict=True))
    ring_size = min(model.window_slots, longest) if model.layout.plain else model.window_slots
    ring = model.lm.new_ring_cache(B, ring_size) if use_cache else None
    positions = torch.arange(model.window_slots, device=device)

    tokens = torch.full((B, N), -1, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, N, device=device)
    collapsed = torch.zeros(B, N, dtype=torch.bool, device=device)
    scores = torch.zeros(B, N, device=device)
    vectors = torch.zeros(B, N, E.shape[1], dtype=E.dtype, device=device) if return_vectors else None
    logits_out = torch.zeros(B, N + 1, E.shape[0], device=device) if return_logits else None
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
    n_thoughts = max(n for _, n in spans)
    thoughts = torch.zeros(B, n_thoughts, E.shape[1], dtype=E.dtype, device=device) if thought_feed else None
    thought_tokens = torch.full((B, n_thoughts), -1, dtype=torch.long, device=device) if thought_feed else None
    thought_scales = torch.zeros(B, n_thoughts, device=device) if thought_feed else None

    def draws(a: int, b: int) -> RowGenerators | torch.Generator:
        return gens.part(a, b) if isinstance(gens, RowGenerators) else gens

    def view(lanes_now: list[_Lane]) -> None:
        """Append each active row's window to its sequence's views."""
        for row, w in zip(alive.tolist(), (w for lane in lanes_now for w in lane.views()), strict=True):
            windows[row].append(w)

    def recompute(lane: _Lane, a: int, b: int, rows: torch.Tensor | None = None) -> Outputs:
        """The outputs at the end of a lane (active rows [a, b)), its window read whole (rows: only these rows of
        the lane), filling its thought slots the first time; written into the ring at the active rows a + rows."""
        window = lane.window()
        if rows is not None:
            window = window[rows]
        start, n = lane.span
        fill = None
        if n:  # the first reading of a prompt with thought slots: the thought feed fills them
            def fill(prev: Outputs, t: int) -> torch.Tensor:
                at = alive[a:b]
                c = thought_feed.choose(model, prev.at(LAST), Draw(draws(a, b), at, t))
                thoughts[at, t], thought_tokens[at, t] = c.vector.to(E.dtype), c.token
                if c.scale is not None:
                    thought_scales[at, t] = c.scale.float()
                return c.vector[:, None].to(window.dtype)
        cache = model.new_cache(window.shape[0], window.shape[1]) if ring is not None or n else None
        out, filled = fill_slots(model, window, start, n, fill, cache, last=True)
        if n:
            lane.state.buf[:, start : start + n] = filled
            lane.span = (0, 0)
        if ring is not None:
            ring.write_rows(a + (torch.arange(b - a, device=device) if rows is None else rows), cache)
        return out.at(LAST)

    def lane_slices() -> list[tuple[_Lane, int, int]]:
        """Each lane with the slice [a, b) of the active rows it holds."""
        s, result = 0, []
        for lane in lanes:
            result.append((lane, s, s + lane.rows))
            s += lane.rows
        return result

    def drop(keep: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        """Keep only these active rows [R] bool (finished sequences leave the batch, so they cost nothing more);
        -> `moved` of those kept."""
        nonlocal alive
        for lane, a, b in lane_slices():
            lane.state.select(keep[a:b].nonzero()[:, 0])
        lanes[:] = [lane for lane in lanes if lane.rows]
        rows = keep.nonzero()[:, 0]
        alive = alive[rows]
        if isinstance(gens, RowGenerators):
            gens.select(rows.tolist())
        if ring is not None:
            ring.select(rows)
        return moved[rows]

    def advance(moved: torch.Tensor) -> Outputs:
        """The next step's outputs: one decode step for every window that only grew, a recomputation for those
        that moved [R]."""
        if ring is None or bool(moved.all()):
            return Outputs.cat([recompute(lane, a, b) for lane, a, b in lane_slices()])
        x = torch.cat([lane.new_slot() for lane in lanes])  # [R, 1, m]
        if len(lanes) == 1:
            pos = positions[lanes[0].length - 1 : lanes[0].length]  # [1]: one position for all rows
        else:
            pos = torch.cat([positions[lane.length - 1].expand(lane.rows) for lane in lanes])[:, None]
        step = model.step(x, ring, pos).at(LAST)
        parts = []
        for lane, a, b in lane_slices():
            part = step.at(slice(a, b))
            rows = moved[a:b].nonzero()[:, 0]
            parts.append(_put(part, rows, recompute(lane, a, b, rows)) if len(rows) else part)
        return Outputs.cat(parts)

    out = Outputs.cat([recompute(lane, a, b) for lane, a, b in lane_slices()])
    if N == 0 and logits_out is not None:
        logits_out[alive, 0] = out.logits.float()
    for g in range(N):
        choice = feed.choose(model, out, Draw(gens, alive, g))
        v, nxt = choice.vector, choice.token
        none_shown = not choice.hard and bool((nxt < 0).any())  # a thought-like feed: -1, no token
        if none_shown and layout:
            raise ValueError(f"feed {feed.name!r} shows no token; a layout collapses soft tokens to the token shown")
        shown = nxt.clamp_min(0) if none_shown else nxt
        logp = out.logits.float().log_softmax(-1).gather(-1, shown[:, None])[:, 0]
        if none_shown:
            logp = logp.masked_fill(nxt < 0, 0.0)
        rows = slice(None) if len(alive) == B and identity else alive  # a slice writes faster than an index
        tokens[rows, g], logprobs[rows, g] = nxt, logp
        if logits_out is not None:
            logits_out[rows, g] = out.logits.float()
        score = torch.zeros_like(logp)
        entered = torch.full_like(nxt, choice.hard, dtype=torch.bool)  # a plain model's soft tokens stay soft
        policy_applies = layout and not choice.hard
        if trace or policy_applies:
            policy_score = policy.score_of(v, out.logits, shown, E)
        if trace:
            view(lanes)
            trace_ids[rows, g], trace_probs[rows, g], entropies[rows, g] = top_probs(out.logits, k)
            ood[rows, g] = policy_score
        if policy_applies:
            score = policy_score
            entered = policy.at_entry(score)
            v = torch.where(entered[:, None], E[shown].to(v.dtype), v)  # what re-enters
        scores[rows, g], collapsed[rows, g] = score, entered
        if vectors is not None:
            vectors[rows, g] = v.to(E.dtype)
        moved = []
        for lane, a, b in lane_slices():
            if lane.layout:
                moved.append(lane.state.push(v[a:b], shown[a:b], entered[a:b], score[a:b], E, policy))
                n_soft = lane.state.soft_vec.shape[1]  # the newest generated tokens; a budget may collapse them
                if n_soft and not choice.hard:
                    collapsed[alive[a:b], g + 1 - n_soft : g + 1] |= lane.state.soft_done
            else:
                moved.append(torch.full((b - a,), lane.state.push(v[a:b].to(E.dtype)), device=device))
        moved = torch.cat(moved)  # [R]: windows that changed other than by one slot at their end
        ended = torch.zeros_like(moved)
        if len(stop):
            ended = torch.isin(nxt, stop)
            stopped[alive] = ended
        if per_prompt:
            ended = ended | (limit[alive] <= g + 1)
        elif g == N - 1:
            ended = torch.ones_like(ended)
        if ended.any():
            lengths[alive[ended]] = g + 1
            if trace:  # the last window of each finished sequence
                views, rows_now = [w for lane in lanes for w in lane.views()], alive.tolist()
                for r in ended.nonzero()[:, 0].tolist():
                    windows[rows_now[r]].append(views[r])
            for lane, a, b in lane_slices():
                done = ended[a:b].nonzero()[:, 0]
                if layout and len(done):
                    names = [lane.state.tier(g - t) for t in range(g + 1)]
                    for r in done.tolist():
                        tiers[alive[a + r]] = names
                    by_age[alive[a + done]] = lane.state.collapsed_by_age[done]
        # with return_logits a finished sequence is read once more, for its distribution after its last token
        last_read = logits_out is not None and bool(ended.any())
        if ended.all() and not last_read:
            break
        if ended.any() and not last_read:
            moved = drop(~ended, moved)
        out = advance(moved)
        if last_read:
            logits_out[alive[ended], g + 1] = out.logits[ended].float()
            if ended.all():
                break
            out, moved = out.at(~ended), drop(~ended, moved)
    return Generation(prompts, tokens, lengths, logprobs, stopped, collapsed, scores, vectors, tiers, by_age,
                      trace_ids, trace_probs, entropies, ood, windows, logits_out, thoughts, thought_tokens,
                      thought_scales)
