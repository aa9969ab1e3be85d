"""Languages whose optimum is known exactly: `softar prepare --synthetic hmm|bag|binding`.

- **hmm**: a hidden Markov model: a sticky chain over `states` (each step it stays with probability `stickiness`, else
  jumps to a state drawn uniformly), each state emitting mostly from its own block of symbols and, with probability
  `overlap`, any symbol. One symbol says little about the state; the posterior over states (the belief) weighs them
  all. So the k-step prediction p(x_{t+k} | x_<=t) = b_t A^k B keeps what one sampled symbol loses, and the forward
  algorithm gives the Bayes-optimal teacher-forced and open-loop losses exactly: the soft-feedback study's ceiling.
- **bag**: documents of a latent topic: each draws its own unigram distribution from a Dirichlet and then its tokens
  independently from it, until a separator (after each token with probability 1 / doc_length). The counts of the
  document's tokens so far are a sufficient statistic: p(v | past) = (alpha + n_v) / (V alpha + n), exactly, from
  any window (exchangeability). Old tokens matter, and a sum of their embeddings keeps all they say.
- **binding**: documents of key-value facts and then one query for each key, most of them past a 32-token window of
  their fact: the value is known exactly from the fact, and a sum of the facts' embeddings (every key and every
  value, whatever the pairing) says nothing about which value goes with which key.

The data folder is an ordinary character dataset (one character per symbol, so `softar sample` prints text) plus
`KIND.json`: the spec, the parameters, and the sha256 of the token files they generated.
"""

from __future__ import annotations

import bisect
import math
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from softar import SoftarError
from softar.data.dataset import META_FILE, SPLITS, load_meta, load_split
from softar.disk import read_json, sha256_bytes, sha256_file, strict_json

ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits  # symbol i is character i
VAL_FRACTION, MAX_VAL = 0.1, 100_000  # of the tokens, as for a corpus (at most 100k: every eval reads all of it)
MAX_TOKENS = 10**8  # about 2.5 GB while sampling (states, symbols and draws as int64/float64)
SAMPLE_CHUNK = 1 << 20


@dataclass(frozen=True)
class HMMSpec:
    """What `softar prepare --synthetic hmm` draws. The defaults make the belief matter: 8 states with 4 home symbols
    each, three symbols in ten drawn from anywhere, a state lasting 10 steps on average. There the Bayes loss is
    2.80 nats against the unigram's 3.47, and at 8 steps open loop the exact belief (3.05) beats two averaged sampled
    rollouts (3.22) and even sixteen (3.07): soft feedback has something to win."""

    kind: ClassVar[str] = "hmm"
    states: int = 8
    symbols: int = 32
    stickiness: float = 0.9
    overlap: float = 0.3
    tokens: int = 1_000_000  # train + val
    seed: int = 0

    def problem(self) -> str | None:
        """What is wrong with the spec, as '--flag: why', or None."""
        if not 1 <= self.states <= len(ALPHABET):
            return f"--states: expected 1..{len(ALPHABET)}, got {self.states}"
        if not max(2, self.states) <= self.symbols <= len(ALPHABET):
            return f"--symbols: expected {max(2, self.states)}..{len(ALPHABET)} (at least one per state), got " \
                   f"{self.symbols}"
        if not 0.0 <= self.stickiness < 1.0:
            return f"--stickiness: expected a probability in [0, 1), got {self.stickiness}"
        if not 0.0 < self.overlap <= 1.0:
            return f"--overlap: expected a probability in (0, 1] (every symbol possible in every state), got " \
                   f"{self.overlap}"
        return _common_problem(self)

    def language(self) -> HMM:
        return HMM.from_spec(self)

    def chars(self) -> list[str]:
        return list(ALPHABET[: self.symbols])


class HMM:
    """An HMM's parameters (float64): the initial distribution [S] (the chain's stationary one, so a window cut
    anywhere starts from it), the transitions A [S, S] and the emissions B [S, V], every row a distribution and
    every emission positive (no symbol is impossible, so every loss is finite)."""

    def __init__(self, initial: np.ndarray, transition: np.ndarray, emission: np.ndarray):
        self.initial, self.transition, self.emission = (np.asarray(a, dtype=np.float64)
                                                        for a in (initial, transition, emission))
        problem = self.problem()
        if problem:
            raise SoftarError(problem)

    def problem(self) -> str | None:
        pi, A, B = self.initial, self.transition, self.emission
        S = pi.shape[0] if pi.ndim == 1 else 0
        if not S or A.shape != (S, S) or B.ndim != 2 or B.shape[0] != S or B.shape[1] < 2:
            return f"shapes initial {pi.shape}, transition {A.shape}, emission {B.shape} do not form an HMM"
        if not all(np.isfinite(m).all() and (m >= 0).all() for m in (pi, A, B)) or not (B > 0).all():
            return "probabilities must be finite and non-negative, every emission positive"
        for name, m in (("initial", pi[None]), ("transition", A), ("emission", B)):
            if np.abs(m.sum(-1) - 1).max() > 1e-9:
                return f"the {name} rows do not sum to 1"
        if np.abs(pi @ A - pi).max() > 1e-9:
            return "the initial distribution is not the chain's stationary one"
        return None

    @property
    def states(self) -> int:
        return self.initial.shape[0]

    @property
    def symbols(self) -> int:
        return self.emission.shape[1]

    @classmethod
    def from_spec(cls, spec: HMMSpec) -> HMM:
        S, V = spec.states, spec.symbols
        A = spec.stickiness * np.eye(S) + (1 - spec.stickiness) / S  # stay, or jump anywhere
        home = np.zeros((S, V))
        for s, block in enumerate(np.array_split(np.arange(V), S)):
            home[s, block] = 1 / len(block)
        B = (1 - spec.overlap) * home + spec.overlap / V
        return cls(np.full(S, 1 / S), A, B)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n symbols of one chain started from the initial distribution [n] int64."""
        cum_a, cum_initial = [list(np.cumsum(row)) for row in self.transition], list(np.cumsum(self.initial))
        states = np.empty(n, dtype=np.int64)
        s = None
        for start in range(0, n, SAMPLE_CHUNK):  # uniforms as Python floats a chunk at a time (one stream)
            u = rng.random(min(SAMPLE_CHUNK, n - start)).tolist()
            for t, ut in enumerate(u, start):  # each state from the last: a Python loop, ~0.3 us a step
                cum = cum_initial if s is None else cum_a[s]
                s = min(bisect.bisect(cum, ut), self.states - 1)
                states[t] = s
        x = np.empty(n, dtype=np.int64)
        draws = rng.random(n)
        for s in range(self.states):  # emissions, vectorised per state
            at = states == s
            x[at] = np.minimum(np.searchsorted(np.cumsum(self.emission[s]), draws[at], side="right"),
                               self.symbols - 1)
        return x

    # -- the forward algorithm ------------------------------------------------------------------------------------

    def _tensors(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.from_numpy(m).to(device) for m in (self.initial, self.transition, self.emission))

    def beliefs(self, weights: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Slot weights [W, T, V] -> the state distribution of the step after each slot [W, T, S], from `prior` [W, S]
        (default: the initial distribution) at the first slot.

        A slot is read as a distribution over what was emitted there (weights clamped at 0 and normalised; none at
        all reads as uniform), and the belief becomes the mixture of the posteriors given each symbol. A one-hot
        slot is exact filtering; a slot holding the predictive distribution itself leaves the belief as it was
        (marginalisation): that is what makes the soft feedback of `softar.model.oracle` exact."""
        pi, A, B = self._tensors(weights.device)
        w = weights.double().clamp(min=0)
        mass = w.sum(-1, keepdim=True)
        w = torch.where(mass > 0, w / mass.clamp(min=1e-300), 1.0 / self.symbols)
        prior = pi.expand(w.shape[0], -1) if prior is None else prior
        out = torch.empty(w.shape[0], w.shape[1], self.states, dtype=torch.float64, device=w.device)
        for t in range(w.shape[1]):
            post = prior * ((w[:, t] / (prior @ B)) @ B.T)  # sum_x w(x) p(s | x, past)  [W, S]
            prior = (post / post.sum(-1, keepdim=True)) @ A
            out[:, t] = prior
        return out

    def predictive(self, weights: torch.Tensor) -> torch.Tensor:
        """log p(next symbol | the slots so far) [W, T, V] for slot weights [W, T, V]."""
        return (self.beliefs(weights) @ self._tensors(weights.device)[2]).log()

    def teacher_forced(self, ids: torch.Tensor) -> torch.Tensor:
        """log p(ids[:, t + 1] | ids[:, :t + 1]) [W, T] for windows ids [W, T + 1], each read from its start alone."""
        logp = self.predictive(self.one_hot(ids[:, :-1]))
        return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)

    def open_loop(self, ids: torch.Tensor, prefix: int, horizon: int) -> torch.Tensor:
        """log p(ids[:, prefix + 1 + k] | ids[:, :prefix + 1]) [W, horizon], k = 0..horizon-1: the exact k-step
        prediction b A^k B from the prefix alone, the best any open-loop rollout can do."""
        _, A, B = self._tensors(ids.device)
        b = self.beliefs(self.one_hot(ids[:, : prefix + 1]))[:, -1]  # [W, S]
        out = []
        for k in range(horizon):
            out.append((b @ B).log().gather(-1, ids[:, prefix + 1 + k, None]).squeeze(-1))
            b = b @ A
        return torch.stack(out, 1)

    def one_hot(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(ids, self.symbols).double()

    def loss_full(self, data: np.ndarray, chunk: int = 4096) -> float:
        """The Bayes-optimal loss of every token of a split after the first, given everything before it: the limit
        no window reaches."""
        ids = torch.from_numpy(np.asarray(data, dtype=np.int64))
        emission = self._tensors("cpu")[2]
        total, prior = 0.0, None
        for start in range(0, len(ids) - 1, chunk):  # the belief carries from chunk to chunk
            part = ids[start : start + chunk + 1]
            b = self.beliefs(self.one_hot(part[None, :-1]), prior)  # [1, n, S]
            total -= (b[0] @ emission).log().gather(-1, part[1:, None]).sum().item()
            prior = b[:, -1]
        return total / (len(ids) - 1)

    def to_json(self) -> dict:
        return {"initial": self.initial.tolist(), "transition": self.transition.tolist(),
                "emission": self.emission.tolist()}

    @classmethod
    def from_json(cls, raw: dict) -> HMM:
        return cls(*(_field(raw, k, list) for k in ("initial", "transition", "emission")))


class Bag:
    """Documents of a latent topic (`--synthetic bag`): each draws a unigram distribution theta ~ Dirichlet(alpha)
    over `symbols` content symbols, then its tokens i.i.d. from theta; after each token the document ends with
    probability `hazard` (a separator, the last symbol, then a new document). The predictive given any window is
    exact: after a separator 1 / V; else a separator with probability `hazard`, and symbol v with (1 - hazard)
    (alpha + n_v) / (V alpha + n), n_v counting v among the window's tokens since its last separator (the tokens
    before the window are exchangeable with the ones it holds, so they need not be seen)."""

    def __init__(self, symbols: int, concentration: float, hazard: float):
        self.symbols, self.concentration, self.hazard = int(symbols), float(concentration), float(hazard)
        if not (2 <= self.symbols < len(ALPHABET) and 0.01 <= self.concentration <= 100
                and 1e-7 <= self.hazard <= 0.5):  # the ranges a BagSpec can ask for
            raise SoftarError(f"not a bag language: symbols {symbols}, concentration {concentration}, "
                              f"hazard {hazard}")

    @property
    def vocab(self) -> int:
        return self.symbols + 1  # the separator is the last symbol

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n tokens of documents [n] int64, the first starting a document."""
        V, parts, total = self.symbols, [], 0
        while total < n:
            length = int(rng.geometric(self.hazard))
            theta = rng.dirichlet(np.full(V, self.concentration))
            doc = np.minimum(np.searchsorted(np.cumsum(theta), rng.random(length), side="right"), V - 1)
            parts += [doc, np.array([V])]
            total += length + 1
        return np.concatenate(parts)[:n].astype(np.int64)

    def teacher_forced(self, ids: torch.Tensor) -> torch.Tensor:
        """log p(ids[:, t + 1] | ids[:, :t + 1]) [W, T] for windows ids [W, T + 1], each read from its start alone."""
        x = ids.cpu().numpy().astype(np.int64)
        W, L = x.shape
        V, a, h = self.symbols, self.concentration, self.hazard
        sep = x == V
        segment = np.cumsum(sep, 1)  # a separator opens the next document's segment
        same = _occurrences_before(((np.arange(W)[:, None] * (L + 1) + segment) * (V + 1) + x).ravel()).reshape(W, L)
        content = np.cumsum(~sep, 1)  # content tokens up to and including t
        last_sep = np.maximum.accumulate(np.where(sep, np.arange(L), -1), 1)
        n = content - np.where(last_sep >= 0, np.take_along_axis(content, last_sep.clip(0), 1), 0)  # since it
        prev, target = x[:, :-1], x[:, 1:]
        logp = np.log1p(-h) + np.log(a + same[:, 1:]) - np.log(V * a + n[:, :-1])
        logp = np.where(target == V, np.log(h), logp)
        logp = np.where(prev == V, np.where(target == V, -np.inf, -np.log(V)), logp)  # a document starts
        return torch.from_numpy(logp).to(ids.device)

    def loss_full(self, data: np.ndarray) -> float:
        """The Bayes-optimal loss of every token of a split after the first, given everything before it."""
        return -self.teacher_forced(torch.from_numpy(np.asarray(data, dtype=np.int64))[None]).mean().item()

    def to_json(self) -> dict:
        return {"symbols": self.symbols, "concentration": self.concentration, "hazard": self.hazard}

    @classmethod
    def from_json(cls, raw: dict) -> Bag:
        return cls(_field(raw, "symbols", int), _field(raw, "concentration", float), _field(raw, "hazard", float))


def _occurrences_before(keys: np.ndarray) -> np.ndarray:
    """For each entry of keys [n], how many entries before it hold the same key."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(k)]))
    out = np.empty(len(k), dtype=np.int64)
    out[order] = np.arange(len(k)) - first
    return out


class Binding:
    """Documents of key-value facts (`--synthetic binding`): a start symbol, `pairs` facts "key value ;" (distinct
    keys drawn from `nodes` node symbols, each value any node, drawn independently), then every key asked once more
    in a fresh order in the same form. The optimum of a query's value is exact: certain given its fact; given a
    context that does not hold the fact, uniform over the nodes (values are independent of everything else, so no
    other token of the document says anything about it): loss log(nodes), accuracy 1 / nodes.

    The form is the one a small model learns the lookup in (an induction head: find the key's earlier occurrence,
    copy the token after it); keys and values sharing one alphabet and the ";" between facts are what make it quick
    (docs/context.md has the measured recipes that stalled)."""

    def __init__(self, pairs: int, nodes: int):
        self.pairs, self.nodes = int(pairs), int(nodes)
        if not (2 <= self.pairs <= self.nodes <= 26):
            raise SoftarError(f"not a binding language: pairs {pairs}, nodes {nodes}")

    @property
    def vocab(self) -> int:
        return self.nodes + 2  # nodes, ";", the start symbol

    @property
    def sep(self) -> int:
        return self.nodes

    @property
    def start(self) -> int:
        return self.nodes + 1

    @property
    def doc_length(self) -> int:
        return 1 + 6 * self.pairs

    def chars(self) -> list[str]:
        return list(string.ascii_uppercase[: self.nodes] + ";.")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n tokens of documents [n] int64, the first starting a document."""
        P, N = self.pairs, self.nodes
        docs = -(-n // self.doc_length)
        keys = rng.permuted(np.tile(np.arange(N), (docs, 1)), axis=1)[:, :P]  # [docs, P] distinct keys, in order
        values = rng.integers(0, N, (docs, P))
        asked = rng.permuted(np.tile(np.arange(P), (docs, 1)), axis=1)  # the queries' order
        rows, sep = np.arange(docs)[:, None], np.full((docs, P), self.sep)
        facts = np.stack([keys, values, sep], 2).reshape(docs, 3 * P)
        queries = np.stack([keys[rows, asked], values[rows, asked], sep], 2).reshape(docs, 3 * P)
        out = np.concatenate([np.full((docs, 1), self.start), facts, queries], 1)
        return out.reshape(-1)[:n].astype(np.int64)

    def query_values(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For ids [N, L]: (is_query [N, L] bool: the token is a query's value whose document starts within ids,
        doc_start [N, L] long: where that document starts, -1 where none does)."""
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        doc_start = torch.where(ids == self.start, pos, -1).cummax(1).values
        offset = pos - doc_start - (3 * self.pairs + 2)  # 0 at the first query's value
        is_query = (doc_start >= 0) & (offset >= 0) & (offset % 3 == 0) & (offset < 3 * self.pairs)
        return is_query, doc_start

    def fact_positions(self, data: np.ndarray) -> np.ndarray:
        """For a split [n] that begins at a document's start: each query value's fact, as the position of that
        fact's value [n] int64 (-1 for every other token and in a document cut short at the end)."""
        P, D = self.pairs, self.doc_length
        docs = len(data) // D
        x = np.asarray(data[: docs * D], dtype=np.int64).reshape(docs, D)
        if docs and (x[:, 0] != self.start).any():
            raise SoftarError("binding data: a document does not begin where the documents' length says")
        keys, asked = x[:, 1 : 3 * P + 1 : 3], x[:, 3 * P + 1 :: 3]  # [docs, P] each
        j = (asked[:, :, None] == keys[:, None, :]).argmax(2)  # [docs, P] which fact each query asks
        base = (np.arange(docs) * D)[:, None]
        out = np.full(len(data), -1, dtype=np.int64)
        out[base + 3 * P + 2 + 3 * np.arange(P)] = base + 2 + 3 * j
        return out

    def query_targets(self, ids: torch.Tensor, prefix: int, window: int) -> dict[str, torch.Tensor]:
        """The targets ids[:, prefix:] [N, K] that are queries' values whose fact lies before the last `window`
        tokens: `mask` (bool), and there two optima. A reader of those `window` tokens alone: `window_loss`
        log(nodes), `window_accuracy` 1 / nodes (a reader of the whole document: loss 0, accuracy 1). A reader that
        also knows the document's values as a bag (which nodes, how often, not whose; a reference, not a bound on
        what summaries can hold): `bag_loss` -log((c - s) / (pairs - m)), c the value's count in the bag, s its count
        among the m other keys' values the window shows with their key, and `bag_accuracy`, 1 / (the number of
        values tied for the most likely) when the answer is one of them, else 0. And `in_sight`: the queries
        whose whole fact is among those `window` tokens, which any model that looks up what it reads answers."""
        is_query, doc_start = self.query_values(ids)
        pos = torch.arange(ids.shape[1], device=ids.device)
        key_pos = doc_start[:, :, None] + 1 + 3 * torch.arange(self.pairs, device=ids.device)  # [N, L, P]
        key = torch.gather(ids, 1, key_pos.clamp(0, ids.shape[1] - 1).flatten(1)).view(key_pos.shape)
        asked = torch.roll(ids, 1, 1)[:, :, None]  # the key before each token
        fact_value = ((key == asked).long().argmax(2) * 3 + doc_start + 2)  # [N, L] where the fact's value sits
        mask = (is_query & (fact_value < pos - window))[:, prefix:].cpu()
        in_sight = (is_query & (fact_value - 1 >= pos - window))[:, prefix:].cpu()  # key and value in the window
        x, starts = ids.cpu().numpy(), doc_start[:, prefix:].cpu().numpy()
        bag_loss, bag_accuracy = np.zeros(mask.shape), np.zeros(mask.shape)
        for r, k in zip(*np.nonzero(mask.numpy()), strict=True):
            t, s = prefix + k, starts[r, k]
            facts = x[r, s + 1 : s + 1 + 3 * self.pairs].reshape(self.pairs, 3)[:, :2]
            bag = np.bincount(facts[:, 1], minlength=self.nodes)
            seen = {(a, b) for a, b in zip(x[r, t - window : t - 1], x[r, t - window + 1 : t], strict=True)
                    if (a, b) in {tuple(f) for f in facts} and a != x[r, t - 1]}  # other keys shown with their value
            left = bag - np.bincount([b for _, b in seen], minlength=self.nodes)
            bag_loss[r, k] = -math.log(left[x[r, t]] / (self.pairs - len(seen)))
            best = np.flatnonzero(left == left.max())
            bag_accuracy[r, k] = 1 / len(best) if x[r, t] in best else 0.0
        return {"mask": mask, "window_loss": torch.where(mask, math.log(self.nodes), 0.0).double(),
                "window_accuracy": torch.where(mask, 1 / self.nodes, 0.0).double(),
                "bag_loss": torch.from_numpy(bag_loss), "bag_accuracy": torch.from_numpy(bag_accuracy),
                "in_sight": in_sight}

    def to_json(self) -> dict:
        return {"pairs": self.pairs, "nodes": self.nodes}

    @classmethod
    def from_json(cls, raw: dict) -> Binding:
        return cls(_field(raw, "pairs", int), _field(raw, "nodes", int))


def _field(raw: dict, key: str, kind: type):
    """raw[key] as `kind` (an int is a float too), else a one-line error."""
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else kind):
        raise SoftarError(f"parameter {key!r}: expected {kind.__name__}, got {type(v).__name__}")
    return float(v) if kind is float else v


@dataclass(frozen=True)
class BagSpec:
    """What `softar prepare --synthetic bag` draws. The defaults leave a wide gap between short and long contexts:
    `softar eval`'s Bayes loss (each token read from its window's start, so from 0..N-1 tokens) is about 3.48 nats
    for windows of 32, 3.16 for 128, and 2.88 given everything before each token, against the unigram's 4.11 (61
    symbols, alpha 0.2, documents of 1,024 tokens on average). Ten million tokens make about 8,800 documents: a
    small GPT overfits the topics of a few hundred."""

    kind: ClassVar[str] = "bag"
    symbols: int = 61
    concentration: float = 0.2
    doc_length: int = 1024
    tokens: int = 10_000_000
    seed: int = 0

    def problem(self) -> str | None:
        if not 2 <= self.symbols < len(ALPHABET):
            return f"--symbols: expected 2..{len(ALPHABET) - 1} (the separator is one more), got {self.symbols}"
        if not 0.01 <= self.concentration <= 100:
            return f"--concentration: expected 0.01..100, got {self.concentration}"
        if not 2 <= self.doc_length <= 10**7:
            return f"--doc-length: expected 2..10**7, got {self.doc_length}"
        return _common_problem(self)

    def language(self) -> Bag:
        return Bag(self.symbols, self.concentration, 1 / self.doc_length)

    def chars(self) -> list[str]:
        return list(ALPHABET[: self.symbols + 1])


@dataclass(frozen=True)
class BindingSpec:
    """What `softar prepare --synthetic binding` draws: 14 facts over 26 nodes, documents of 85 tokens. Past a
    32-token window most queries' facts are out of sight, and nothing else in sight says anything
    about their values."""

    kind: ClassVar[str] = "binding"
    pairs: int = 14
    nodes: int = 26
    tokens: int = 1_000_000
    seed: int = 0

    def problem(self) -> str | None:
        if not 2 <= self.pairs <= 26:
            return f"--pairs: expected 2..26, got {self.pairs}"
        if not self.pairs <= self.nodes <= 26:
            return f"--nodes: expected {self.pairs}..26 (at least --pairs), got {self.nodes}"
        return _common_problem(self)

    def language(self) -> Binding:
        return Binding(self.pairs, self.nodes)

    def chars(self) -> list[str]:
        return self.language().chars()


def _common_problem(spec: HMMSpec | BagSpec | BindingSpec) -> str | None:
    if not 1000 <= spec.tokens <= MAX_TOKENS:
        return f"--tokens: expected 1000..{MAX_TOKENS:,}, got {spec.tokens}"
    if not 0 <= spec.seed < 2**32:
        return f"--seed: expected 0..2**32-1, got {spec.seed}"
    return None


Language = HMM | Bag | Binding
SPECS: dict[str, type] = {"hmm": HMMSpec, "bag": BagSpec, "binding": BindingSpec}
LANGUAGES: dict[str, type] = {"hmm": HMM, "bag": Bag, "binding": Binding}
EXACT = (HMM, Bag)  # languages whose every token's optimum `teacher_forced` gives


def bayes_loss(lang: HMM | Bag, data: np.ndarray, length: int, batch_size: int = 256) -> float:
    """The Bayes-optimal loss on exactly the targets `softar.evaluate.lm.evaluate_split` scores, each read, as the
    model reads it, from its window's start alone (`sequential_windows`)."""
    from softar.data.dataset import sequential_windows

    total, count = 0.0, 0
    for x, y in sequential_windows(data, length, batch_size):
        total -= lang.teacher_forced(torch.cat([x, y[:, -1:]], 1)).sum().item()
        count += y.numel()
    return total / count


def generate(spec: HMMSpec | BagSpec | BindingSpec) -> tuple[Language, dict[str, np.ndarray]]:
    """The language of a spec and its two splits, independent draws from one seeded generator."""
    problem = spec.problem()
    if problem:
        raise SoftarError(problem)
    lang = spec.language()
    rng = np.random.default_rng(spec.seed)
    n_val = min(max(2, int(spec.tokens * VAL_FRACTION)), MAX_VAL)
    return lang, {"train": lang.sample(spec.tokens - n_val, rng), "val": lang.sample(n_val, rng)}


def parameter_file(kind: str) -> str:
    return f"{kind}.json"


def load_language(data_dir: str | Path) -> Language | None:
    """The language behind a synthetic dataset, checked against its tokens (the sha256 of each split file, the
    vocabulary); None for a dataset that is not synthetic. A synthetic dataset whose parameter file is missing,
    corrupt or disagrees with its tokens is a one-line error."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    source = str(meta.get("source", ""))
    if not source.startswith("synthetic:"):
        for kind in LANGUAGES:
            if (data_dir / parameter_file(kind)).exists():
                raise SoftarError(f"{data_dir / parameter_file(kind)}: {META_FILE} says the data is "
                                  f"{meta.get('source')!r}, not synthetic")
        return None
    kind = source.removeprefix("synthetic:")
    if kind not in LANGUAGES:
        raise SoftarError(f"{data_dir / META_FILE}: unknown synthetic language {kind!r}")
    path = data_dir / parameter_file(kind)
    if not path.is_file():
        raise SoftarError(f"synthetic dataset {data_dir} has no {path.name} (its parameters); prepare it again")
    raw = read_json(path, f"{kind} parameters", {"kind": str, "spec": dict, "token_sha256": dict})
    if raw["kind"] != kind:
        raise SoftarError(f"{path}: kind {raw['kind']!r} is not {kind!r}")
    try:
        lang = LANGUAGES[kind].from_json(raw)
        spec = SPECS[kind](**raw["spec"])
        problem = spec.problem()
    except (TypeError, ValueError, OverflowError) as e:
        raise SoftarError(f"{path}: not a {kind}'s parameters ({type(e).__name__}: {str(e)[:80]})") from None
    except SoftarError as e:
        raise SoftarError(f"{path}: {e}") from None
    if problem or lang.to_json() != spec.language().to_json():  # the optimum is computed from these parameters
        raise SoftarError(f"{path}: the parameters are not the ones its spec makes ({problem or 'they differ'})")
    vocab = lang.symbols if isinstance(lang, HMM) else lang.vocab
    if vocab != meta["vocab_size"]:
        raise SoftarError(f"{path}: {vocab} symbols, but the tokens have a vocabulary of {meta['vocab_size']}")
    for split in SPLITS:
        if raw["token_sha256"].get(split) != sha256_file(data_dir / f"{split}.bin"):
            raise SoftarError(f"{path}: {split}.bin is not the data these parameters generated (sha256 differs)")
        if isinstance(lang, Binding):  # parameters changed together with their spec: the documents must fit them
            starts = load_split(data_dir, split)[:: lang.doc_length]
            if (starts != lang.start).any():
                raise SoftarError(f"{path}: {split}.bin does not hold documents of {lang.pairs} facts")
    return lang


def prepare_synthetic(out: str | Path, spec: HMMSpec | BagSpec | BindingSpec, force: bool = False) -> dict:
    """Write a synthetic dataset folder (`softar prepare --synthetic KIND`); returns its meta. The same spec in the
    same folder is nothing to do."""
    from softar.data.prepare import claim_out, existing_dataset, write_dataset
    from softar.data.tokenizer import CharTokenizer

    out = Path(out).absolute()
    problem = spec.problem()
    if problem:
        raise SoftarError(problem)
    claim_out(out)
    source = f"synthetic:{spec.kind}"
    if (old := existing_dataset(out, force, lambda old: old.get("source") == source and
                                old.get("synthetic") == asdict(spec))) is not None:
        return old
    lang, splits = generate(spec)
    tok = CharTokenizer(spec.chars())
    text = {name: tok.decode(ids.tolist()) for name, ids in splits.items()}

    def write_parameters(path: Path) -> None:  # written after the split files, whose checksums it holds
        shas = {split: sha256_file(path.parent / f"{split}.bin") for split in SPLITS}
        path.write_text(strict_json({"kind": spec.kind, "spec": asdict(spec), **lang.to_json(),
                                     "token_sha256": shas}, indent=1), encoding="utf-8")

    meta = {"source": source, "tokenizer": "char", "requested_vocab_size": None,
            "characters": {name: len(t) for name, t in text.items()},
            "text_sha256": sha256_bytes("".join(text[split] for split in SPLITS).encode("utf-8")),
            "synthetic": asdict(spec)}
    return write_dataset(out, force, tok, splits, meta, {parameter_file(spec.kind): write_parameters})
