"""Rollouts of a task prompt under a policy over thoughts, and their replay with gradients.

A prompt is a task's `question <bot> [<thought> slots] <eot>` (`softar.tasks.data.Encoder.prompt`). Each thought slot
is filled by the policy, then the answer is sampled token by token until <eos>:

- **hard**: the thought is E[y] for a token y sampled from the model's distribution; its log-probability is y's.
- **soft**: the thought is the model's own soft token (`soft.kind`, e.g. Coconut's hidden state), deterministic;
  only the answer's tokens are actions.
- **noisy_soft**: the soft token plus Gaussian noise, x = mu + s * eps, with s = sigma times the root-mean-square
  coordinate of the group's soft tokens at that slot (so sigma means the same for Coconut's large hidden states and
  for expected embeddings; s is recorded and replayed as a constant); x is an action with log-density
  log N(x; mu, s^2 I) (Soft Tokens, Hard Truths).
- **gated**: HRPO's hybrid thought (`softar.soft.gate`): a learned gate mixes E[y], for a sampled y (the action),
  with the model's soft token; RL trains the gate along with the model. Only a model with a gate (an RL run of this
  policy) runs it.

The soft and gated policies need a soft token that draws nothing (`soft.kind` expected, hidden, regress, collapse): a
kind that samples a token (gated, moi) would give a replay other vectors than its rollout. Both functions need the
model in eval mode (dropout would do the same).

`rollout` samples a group of continuations of one prompt, without gradients, and records every action. `replay`
runs the same prompt with the recorded actions and returns each action's log-probability under the current weights,
with gradients: called before the update it gives the old log-probabilities, so the importance ratio of the first
inner step is exactly 1. Both run through the KV cache, one forward per thought and one for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softar.model import Outputs
from softar.rl.objective import gaussian_log_density
from softar.soft.gate import GATE
from softar.soft.thoughts import thought_span
from softar.soft.tokens import SOFT_TOKENS, Generator, make_soft_token, normal, sample_ids

POLICIES = ("hard", "soft", "noisy_soft", "gated")


@dataclass(frozen=True)
class Policy:
    kind: str = "soft"  # one of POLICIES
    sigma: float = 0.5  # noisy_soft: the noise's std, relative to the soft tokens' root-mean-square coordinate
    temperature: float = 1.0  # of every sampled token (thought or answer)
    max_answer: int = 16  # answer tokens at most, <eos> included (and at most what the window has room for)

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {self.kind!r}")
        if not (self.sigma > 0 and self.temperature > 0 and self.max_answer >= 1):
            raise ValueError("policy: sigma and temperature must be positive, max_answer at least 1")

    def check(self, model, prompt_len: int) -> None:
        """That this policy can run on `model` for a prompt of `prompt_len` slots."""
        if model.training:
            raise ValueError("rollouts and replays need model.eval(): dropout would make a replay differ")
        if self.kind == "gated" and getattr(model, GATE, None) is None:
            raise ValueError("policy 'gated': the model has no learned gate (a run trained with rl.policy = "
                             "\"gated\" has one)")
        if self.kind in ("soft", "noisy_soft", "gated") and SOFT_TOKENS[model.soft_spec.kind].samples:
            raise ValueError(f"policy {self.kind!r}: soft.kind {model.soft_spec.kind!r} draws a token, so a replay "
                             "would not reproduce its thoughts; use expected, hidden, regress or collapse")
        if prompt_len >= model.window_slots:
            raise ValueError(f"a prompt of {prompt_len} slots leaves no room to answer in the model's "
                             f"{model.window_slots} slots")


@dataclass
class Actions:
    """What a group of G rollouts drew. n thought slots, A answer slots."""

    thought_ids: torch.Tensor  # [G, n] hard / gated: the sampled tokens (0 for other policies)
    thought_vectors: torch.Tensor  # [G, n, m] the thoughts that entered (noisy_soft: with their noise)
    answers: torch.Tensor  # [G, A] answer tokens, <eos> included; -1 after it
    noise_std: torch.Tensor  # [n] noisy_soft: the noise's std at each thought slot (0 for other policies)


def _thought(model, out: Outputs, policy: Policy, generator: Generator, drawn_id: torch.Tensor | None,
             drawn_vector: torch.Tensor | None, drawn_std: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One thought from the outputs at the slot before it [G, ...]: (vector [G, m], sampled id [G] or zeros,
    log-probability [G] or None for a deterministic thought, noise std []). Given the recorded draw, it replays it."""
    E, spec = model.E, model.soft_spec
    logp_all = (out.logits.float() / policy.temperature).log_softmax(-1)
    zeros = torch.zeros(out.logits.shape[0], dtype=torch.long, device=E.device)
    no_noise = torch.zeros((), device=E.device)
    if policy.kind in ("hard", "gated"):
        y = drawn_id if drawn_id is not None else sample_ids(logp_all, generator)
        v = E[y] if policy.kind == "hard" else gated_thought(model, out, y)
        return v, y, logp_all.gather(-1, y[:, None])[:, 0], no_noise
    mu = make_soft_token(out, E, spec)
    if policy.kind == "soft":
        return mu, zeros, None, no_noise
    std = drawn_std if drawn_std is not None else policy.sigma * mu.detach().float().pow(2).mean().sqrt()
    x = drawn_vector if drawn_vector is not None else mu + std * normal(mu.shape, generator, mu.device).to(mu.dtype)
    return x, zeros, gaussian_log_density(x.float(), mu.float(), float(std)), std


def gated_thought(model, out: Outputs, y: torch.Tensor) -> torch.Tensor:
    """The gated policy's thought for sampled ids y [G] from the outputs at the slot before [G, ...]."""
    E = model.E
    return getattr(model, GATE)(out.h_m, E[y], make_soft_token(out, E, model.soft_spec), E.pow(2).mean().sqrt())


def _prefix(model, prompt: torch.Tensor, policy: Policy, generator: Generator, recorded: Actions | None):
    """Run the prompt [G, L] through a fresh cache, the policy filling its thought slots -> (outputs at the last
    slot [G, 1, ...], cache, the thoughts as `Actions` without answers, thought log-probs [G, n] or None)."""
    lm, E = model.lm, model.E
    policy.check(model, prompt.shape[1])
    vectors = F.embedding(prompt, E)
    start, n = thought_span(prompt, model.thought_id) if model.thought_id is not None else (0, 0)
    if n and start == 0:
        raise ValueError("a thought slot needs a position before it")
    start = start if n else prompt.shape[1]
    cache = lm.new_cache(*prompt.shape)
    out = model.outputs(lm.hidden(vectors[:, :start], cache=cache))
    ids, vecs, logps, stds = [], [], [], []
    for t in range(n):
        draw = (None, None, None) if recorded is None else (recorded.thought_ids[:, t],
                                                          recorded.thought_vectors[:, t], recorded.noise_std[t])
        v, y, logp, std = _thought(model, out.at((slice(None), -1)), policy, generator, *draw)
        ids.append(y)
        vecs.append(v.to(vectors.dtype))
        logps.append(logp)
        stds.append(std)
        out = model.outputs(lm.hidden(vecs[-1][:, None], cache=cache))
    if start + n < prompt.shape[1]:
        out = model.outputs(lm.hidden(vectors[:, start + n :], cache=cache))
    G, m = prompt.shape[0], E.shape[1]
    thoughts = Actions(torch.stack(ids, 1) if ids else prompt.new_zeros(G, 0),
                       torch.stack(vecs, 1) if vecs else vectors.new_zeros(G, 0, m),
                       prompt.new_zeros(G, 0), torch.stack(stds) if stds else torch.zeros(0, device=E.device))
    thought_logp = torch.stack(logps, 1) if logps and logps[0] is not None else None
    return out.at((slice(None), slice(-1, None))), cache, thoughts, thought_logp


@torch.no_grad()
def rollout(model, prompt: list[int], group: int, policy: Policy, eos: int, generator: Generator = None) -> Actions:
    """G = `group` continuations of one prompt under `policy`: its thoughts, then answer tokens sampled until
    <eos>, `policy.max_answer` tokens, or the end of the window."""
    lm, E = model.lm, model.E
    ids = torch.tensor([prompt] * group, device=E.device)
    last, cache, thoughts, _ = _prefix(model, ids, policy, generator, None)
    limit = min(policy.max_answer, model.window_slots - len(prompt))
    answers = torch.full((group, limit), -1, dtype=torch.long, device=E.device)
    done = torch.zeros(group, dtype=torch.bool, device=E.device)
    for a in range(limit):
        y = sample_ids(last.logits[:, -1].float() / policy.temperature, generator)
        answers[:, a] = torch.where(done, -1, y)
        done |= y == eos
        if done.all():
            break
        last = model.outputs(lm.hidden(E[y][:, None], cache=cache))
    thoughts.answers = answers
    return thoughts


def replay(model, prompt: list[int], actions: Actions, policy: Policy, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability of every action of a group under the current weights, with gradients:
    (logp [G, n + A], mask [G, n + A]): the thoughts' (masked out for the deterministic soft policy), then the
    answer tokens' up to and including <eos>."""
    E = model.E
    G, A = actions.answers.shape
    ids = torch.tensor([prompt] * G, device=E.device)
    last, cache, _, thought_logp = _prefix(model, ids, policy, None, actions)
    n = actions.thought_ids.shape[1]
    answer_mask = actions.answers >= 0
    fed = actions.answers[:, :-1].clamp_min(0).masked_fill(~answer_mask[:, :-1], eos)  # filler after <eos>
    logits = last.logits
    if A > 1:
        logits = torch.cat([logits, model.outputs(model.lm.hidden(E[fed], cache=cache)).logits], dim=1)
    logp_all = (logits.float() / policy.temperature).log_softmax(-1)  # [G, A, V]
    answer_logp = logp_all.gather(-1, actions.answers.clamp_min(0)[..., None])[..., 0]
    if thought_logp is None:
        thought_logp = answer_logp.new_zeros(G, n)
    thought_mask = torch.full((G, n), policy.kind != "soft", device=E.device)
    return torch.cat([thought_logp, answer_logp], 1), torch.cat([thought_mask, answer_mask], 1)
