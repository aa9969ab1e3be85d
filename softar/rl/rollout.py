"""Rollouts of task prompts under a policy over thoughts, batched through the decoder, and their replay with gradients.

A prompt is a task's `question <bot> [<thought> slots] <eot>` (`softar.tasks.data.Encoder.prompt`). Each thought slot
is filled by the policy, a thought feed of `softar.soft.feeds` (`thought_policies()`), then the answer is sampled
token by token until <eos>:

- **hard**: the thought is E[y] for a token y sampled from the model's distribution; its log-probability is y's.
- **soft**: the thought is the model's own soft token (`soft.kind`, e.g. Coconut's hidden state), deterministic;
  only the answer's tokens are actions.
- **noisy_soft**: the soft token plus Gaussian noise relative to its group's soft tokens; x is an action with a
  log-density (Soft Tokens, Hard Truths).
- **gated**: HRPO's hybrid thought (`softar.soft.gate`): a learned gate mixes E[y], for a sampled y (the action),
  with the model's soft token; RL trains the gate along with the model. Only a model with a gate runs it.

`rollout` samples G continuations of each of P prompts as one batch of P x G sequences (`softar.decode`), without
gradients, every sequence from its own random stream, and records every action. `replay` runs one prompt's group
with the recorded actions (`softar.soft.thoughts.forward_thoughts`, the loop training runs) and returns each
action's log-probability under the current weights, with gradients: called before the update it gives the old
log-probabilities, so the importance ratio of the first inner step is exactly 1. Both need the model in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softar.decode import LAST, decode
from softar.soft.collapse import Sampling
from softar.soft.feeds import Choice, Draw, Feed, HardFeed, make_policy, thought_policies
from softar.soft.thoughts import forward_thoughts, thought_span

MAX_ROWS = 1024  # sequences rolled out at once


@dataclass(frozen=True)
class Policy:
    kind: str = "soft"  # a thought policy of `softar.soft.feeds` (thought_policies())
    sigma: float = 0.5  # noisy_soft: the noise's std, relative to the soft tokens' root-mean-square coordinate
    temperature: float = 1.0  # of every sampled token (thought or answer)
    max_answer: int = 16  # answer tokens at most, <eos> included (and at most what the window has room for)

    def __post_init__(self):
        if self.kind not in thought_policies():
            raise ValueError(f"policy: expected one of {', '.join(thought_policies())}, got {self.kind!r}")
        if not (self.sigma > 0 and self.temperature > 0 and self.max_answer >= 1):
            raise ValueError("policy: sigma and temperature must be positive, max_answer at least 1")

    def feed(self, model, group: int) -> Feed:
        """The thought feed, for groups of `group` consecutive rollouts of one prompt."""
        return make_policy(self.kind, model.soft_spec, self.temperature, self.sigma, group)

    def check(self, model, prompt_len: int) -> None:
        """That this policy can run on `model` for a prompt of `prompt_len` slots, and replay what it draws."""
        if model.training:
            raise ValueError("rollouts and replays need model.eval(): dropout would make a replay differ")
        try:
            self.feed(model, 1).check(model, replay=True)
        except ValueError as e:
            raise ValueError(f"policy {e}") from None
        if prompt_len >= model.window_slots:
            raise ValueError(f"a prompt of {prompt_len} slots leaves no room to answer in the model's "
                             f"{model.window_slots} slots")


@dataclass
class Actions:
    """What N rollouts drew (rows p*G .. p*G + G-1 are prompt p's group). n thought slots, A answer slots."""

    thought_ids: torch.Tensor  # [N, n] hard / gated: the sampled tokens (-1 for other policies)
    thought_vectors: torch.Tensor  # [N, n, m] the thoughts that entered (noisy_soft: with their noise)
    answers: torch.Tensor  # [N, A] answer tokens, <eos> included; -1 after it
    noise_std: torch.Tensor  # [N, n] noisy_soft: the noise's std at each thought slot (0 for other policies)

    def rows(self, start: int, end: int) -> Actions:
        return Actions(self.thought_ids[start:end], self.thought_vectors[start:end], self.answers[start:end],
                       self.noise_std[start:end])


def rollout_seeds(base: int, first: int, count: int) -> list[int]:
    """The seeds of rollouts first .. first + count - 1 of one use (`base`): one random stream each."""
    return [(base * 4_194_319 + i) % 2**63 for i in range(first, first + count)]


def rollout(model, prompts: list[list[int]], group: int, policy: Policy, eos: int, seeds: list[int]) -> Actions:
    """G = `group` continuations of each prompt under `policy`, rollout i drawing from a stream seeded seeds[i]
    (P x G seeds): its thoughts, then answer tokens sampled until <eos>, `policy.max_answer` tokens, or the end of
    the window."""
    rows = [p for p in prompts for _ in range(group)]
    if len(seeds) != len(rows):
        raise ValueError(f"rollout: {len(seeds)} seeds for {len(rows)} rollouts")
    for p in prompts:
        policy.check(model, len(p))
    parts = []
    step = MAX_ROWS // group * group or group  # whole groups at a time
    for i in range(0, len(rows), step):
        batch = rows[i : i + step]
        g = decode(model, batch, HardFeed(Sampling(policy.temperature)),
                   [min(policy.max_answer, model.window_slots - len(p)) for p in batch], stop=[eos],
                   seed=seeds[i : i + step], thoughts=policy.feed(model, group))
        parts.append(Actions(g.thought_tokens, g.thoughts, g.tokens, g.thought_scales))
    A = max(a.answers.shape[1] for a in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, A - t.shape[1]), value=-1)  # noqa: E731
    return Actions(*(torch.cat(xs) for xs in zip(*((a.thought_ids, a.thought_vectors, pad(a.answers), a.noise_std)
                                                     for a in parts), strict=True)))


def replay(model, prompt: list[int], actions: Actions, policy: Policy, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability of every action of one prompt's group under the current weights, with gradients:
    (logp [G, n + A], mask [G, n + A]): the thoughts' (masked out for the deterministic soft policy), then the
    answer tokens' up to and including <eos>."""
    E = model.E
    n = thought_span(torch.tensor([prompt]), model.thought_id)[1]  # a batch padded to its longest: this prompt's own
    A = min(actions.answers.shape[1], model.window_slots - len(prompt))
    actions = Actions(actions.thought_ids[:, :n], actions.thought_vectors[:, :n], actions.answers[:, :A],
                      actions.noise_std[:, :n])
    G = actions.answers.shape[0]
    feed, rows = policy.feed(model, G), torch.arange(G, device=E.device)
    answer_mask = actions.answers >= 0
    fed = actions.answers[:, :-1].clamp_min(0).masked_fill(~answer_mask[:, :-1], eos)  # filler after <eos>
    ids = torch.cat([torch.tensor([prompt] * G, device=E.device), fed], dim=1)
    thought_logp = []

    def fill(out, t: int) -> torch.Tensor:
        recorded = Choice(actions.thought_vectors[:, t], actions.thought_ids[:, t], False,
                          scale=actions.noise_std[:, t])
        c = feed.choose(model, out.at(LAST), Draw(rows=rows, step=t, score=True, recorded=recorded))
        thought_logp.append(c.logp)
        return c.vector[:, None].to(E.dtype)

    logits, _ = forward_thoughts(model, ids, fill, prompt_len=len(prompt))  # answers may hold <thought>
    logp_all = (logits[:, len(prompt) - 1 :].float() / policy.temperature).log_softmax(-1)  # [G, A, V]
    answer_logp = logp_all.gather(-1, actions.answers.clamp_min(0)[..., None])[..., 0]
    scored = [lp for lp in thought_logp if lp is not None]
    thoughts = torch.stack(scored, 1) if scored else answer_logp.new_zeros(G, n)
    thought_mask = torch.full((G, n), bool(scored), device=E.device)
    return torch.cat([thoughts, answer_logp], 1), torch.cat([thought_mask, answer_mask], 1)
