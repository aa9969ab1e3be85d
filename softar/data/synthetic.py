"""Languages whose optimum is known exactly: `softar prepare --synthetic hmm`.

A hidden Markov model: a sticky chain over `states` (each step it stays with probability `stickiness`, else jumps to
a state drawn uniformly), each state emitting mostly from its own block of symbols and, with probability `overlap`,
any symbol. One symbol says little about the state; the posterior over states (the belief) weighs them all. So the
k-step prediction p(x_{t+k} | x_<=t) = b_t A^k B keeps what one sampled symbol loses, and the forward algorithm gives
the Bayes-optimal teacher-forced and open-loop losses exactly: the ceiling every model is measured against.

The data folder is an ordinary character dataset (one character per symbol, so `softar sample` prints text) plus
`hmm.json`: the spec, the parameters, and the sha256 of the token files they generated.
"""

from __future__ import annotations

import bisect
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from softar import SoftarError
from softar.data.dataset import META_FILE, SPLITS, load_meta
from softar.disk import read_json, sha256_bytes, sha256_file, strict_json

HMM_FILE = "hmm.json"
ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits  # symbol i is character i
VAL_FRACTION = 0.1  # of the tokens, as for a corpus; val is an independent chain
MAX_TOKENS = 10**8  # about 2.5 GB while sampling (states, symbols and draws as int64/float64)
SAMPLE_CHUNK = 1 << 20


@dataclass(frozen=True)
class HMMSpec:
    """What `softar prepare --synthetic hmm` draws. The defaults make the belief matter: 8 states with 4 home symbols
    each, three symbols in ten drawn from anywhere, a state lasting 10 steps on average. There the Bayes loss is
    2.80 nats against the unigram's 3.47, and at 8 steps open loop the exact belief (3.05) beats two averaged sampled
    rollouts (3.22) and even sixteen (3.07): soft feedback has something to win."""

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
        if not 1000 <= self.tokens <= MAX_TOKENS:
            return f"--tokens: expected 1000..{MAX_TOKENS:,}, got {self.tokens}"
        if not 0 <= self.seed < 2**32:
            return f"--seed: expected 0..2**32-1, got {self.seed}"
        return None


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

    def to_json(self, spec: HMMSpec, token_sha256: dict[str, str]) -> str:
        return strict_json({"kind": "hmm", "spec": asdict(spec), "initial": self.initial.tolist(),
                            "transition": self.transition.tolist(), "emission": self.emission.tolist(),
                            "token_sha256": token_sha256}, indent=1)


def bayes_loss(hmm: HMM, data: np.ndarray, length: int, batch_size: int = 256) -> float:
    """The Bayes-optimal loss on exactly the targets `softar.evaluate.lm.evaluate_split` scores, each read, as the
    model reads it, from its window's start alone (`sequential_windows`)."""
    from softar.data.dataset import sequential_windows

    total, count = 0.0, 0
    for x, y in sequential_windows(data, length, batch_size):
        total -= hmm.teacher_forced(torch.cat([x, y[:, -1:]], 1)).sum().item()
        count += y.numel()
    return total / count


def bayes_loss_full(hmm: HMM, data: np.ndarray, chunk: int = 4096) -> float:
    """The Bayes-optimal loss of every token of a split after the first, given everything before it: the limit no
    window reaches."""
    ids = torch.from_numpy(np.asarray(data, dtype=np.int64))
    emission = hmm._tensors("cpu")[2]
    total, prior = 0.0, None
    for start in range(0, len(ids) - 1, chunk):  # the belief carries from chunk to chunk
        part = ids[start : start + chunk + 1]
        b = hmm.beliefs(hmm.one_hot(part[None, :-1]), prior)  # [1, n, S]
        total -= (b[0] @ emission).log().gather(-1, part[1:, None]).sum().item()
        prior = b[:, -1]
    return total / (len(ids) - 1)


def generate(spec: HMMSpec) -> tuple[HMM, dict[str, np.ndarray]]:
    """The HMM of a spec and its two splits, independent chains from one seeded generator."""
    problem = spec.problem()
    if problem:
        raise SoftarError(problem)
    hmm = HMM.from_spec(spec)
    rng = np.random.default_rng(spec.seed)
    n_val = max(2, int(spec.tokens * VAL_FRACTION))
    return hmm, {"train": hmm.sample(spec.tokens - n_val, rng), "val": hmm.sample(n_val, rng)}


def load_hmm(data_dir: str | Path) -> HMM | None:
    """The HMM behind a synthetic dataset, checked against its tokens (the sha256 of each split file, the number of
    symbols); None for a dataset that is not synthetic. A synthetic dataset whose hmm.json is missing, corrupt or
    disagrees with its tokens is a one-line error."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    path = data_dir / HMM_FILE
    if not str(meta.get("source", "")).startswith("synthetic:"):
        if path.exists():
            raise SoftarError(f"{path}: {META_FILE} says the data is {meta.get('source')!r}, not synthetic")
        return None
    if not path.is_file():
        raise SoftarError(f"synthetic dataset {data_dir} has no {HMM_FILE} (its parameters); prepare it again")
    raw = read_json(path, "HMM parameters", {"kind": str, "spec": dict, "initial": list, "transition": list,
                                              "emission": list, "token_sha256": dict})
    if raw["kind"] != "hmm":
        raise SoftarError(f"{path}: kind {raw['kind']!r} is not 'hmm'")
    try:
        hmm = HMM(raw["initial"], raw["transition"], raw["emission"])
    except (TypeError, ValueError) as e:
        raise SoftarError(f"{path}: not an HMM's parameters ({type(e).__name__}: {str(e)[:80]})") from None
    except SoftarError as e:
        raise SoftarError(f"{path}: {e}") from None
    if hmm.symbols != meta["vocab_size"]:
        raise SoftarError(f"{path}: {hmm.symbols} symbols, but the tokens have a vocabulary of {meta['vocab_size']}")
    for split in SPLITS:
        if raw["token_sha256"].get(split) != sha256_file(data_dir / f"{split}.bin"):
            raise SoftarError(f"{path}: {split}.bin is not the data these parameters generated (sha256 differs)")
    return hmm


def prepare_synthetic(out: str | Path, spec: HMMSpec, force: bool = False) -> dict:
    """Write a synthetic dataset folder (`softar prepare --synthetic hmm`); returns its meta. The same spec in the
    same folder is nothing to do."""
    from softar.data.prepare import claim_out, existing_dataset, write_dataset
    from softar.data.tokenizer import CharTokenizer

    out = Path(out).absolute()
    problem = spec.problem()
    if problem:
        raise SoftarError(problem)
    claim_out(out)
    if (old := existing_dataset(out, force, lambda old: old.get("synthetic") == asdict(spec))) is not None:
        return old
    hmm, splits = generate(spec)
    tok = CharTokenizer(list(ALPHABET[: spec.symbols]))
    text = {name: tok.decode(ids.tolist()) for name, ids in splits.items()}

    def write_hmm(path: Path) -> None:  # written after the split files, whose checksums it holds
        shas = {split: sha256_file(path.parent / f"{split}.bin") for split in SPLITS}
        path.write_text(hmm.to_json(spec, shas), encoding="utf-8")

    meta = {"source": "synthetic:hmm", "tokenizer": "char", "requested_vocab_size": None,
            "characters": {name: len(t) for name, t in text.items()},
            "text_sha256": sha256_bytes("".join(text[split] for split in SPLITS).encode("utf-8")),
            "synthetic": asdict(spec)}
    return write_dataset(out, force, tok, splits, meta, {HMM_FILE: write_hmm})
