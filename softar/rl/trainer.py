"""`softar rl`: GRPO from a trained reasoning-task run, through the same `Trainer` as `softar train` (run directory,
atomic checkpoints, exact resume, SIGTERM, the non-finite guard, metrics.jsonl and TensorBoard, torchrun DDP).

The RL config names the run to start from (`rl.init_from`) and sets [rl] and [train] (and the task's eval_examples and
max_answer_tokens); the model, the task and the data are the initial run's. Each step draws train.batch_size train
prompts at the task's final curriculum stage, samples rl.group_size rollouts of each under the thought policy
(`softar.rl.rollout`), scores them with the task's reward (its `reward` where it has one, else 1 for a right answer),
and takes rl.inner_steps clipped-objective updates with a KL estimate to the initial policy (weight rl.kl_coef; it is
logged either way). Rollouts draw from a generator seeded by (train.seed, step, rank), so a resumed run draws what the
uninterrupted one drew.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import torch

from softar import SoftarError
from softar.checkpoint import check_state
from softar.config import Config, ConfigError, from_dict, load_raw, resolve
from softar.evaluate.reasoning import TaskData, evaluate_task, split_answer
from softar.rl.objective import clipped_objective, group_advantages, kl_to_reference, pass_at_k
from softar.rl.rollout import Actions, Policy, replay, rollout
from softar.rundir import check_data, load_latest, read_config
from softar.soft.model import build_model
from softar.train import Trainer, lr_at

PARTS = ("reward", "reward_std", "kl", "clipped", "answer_entropy", "thought_norm", "rollout_tokens_per_s")
RL_KEYS = {"rl": None, "train": None, "data": None, "task": ("eval_examples", "max_answer_tokens")}
PASS_K = (1, 4, 16, 32)


def rl_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """The RL run's config: the initial run's, with the RL file's (and the overrides') rl, train, data and
    task.eval_examples / task.max_answer_tokens on top."""
    raw = load_raw(path, overrides)
    for section, values in raw.items():
        if section not in RL_KEYS:
            raise ConfigError(f"{section}: an RL run keeps the model, task and soft tokens of rl.init_from; only "
                              f"{', '.join(RL_KEYS)} may be set")
        allowed = RL_KEYS[section]
        if allowed is not None and isinstance(values, dict) and set(values) - set(allowed):
            raise ConfigError(f"{section}.{sorted(set(values) - set(allowed))[0]}: an RL run keeps its initial "
                              f"run's task; only {', '.join(f'{section}.{k}' for k in allowed)} may be set")
    init = (raw.get("rl") or {}).get("init_from") if isinstance(raw.get("rl"), dict) else None
    if not isinstance(init, str) or not init:
        raise ConfigError("rl.init_from: must name the trained task run to start from")
    base = read_config(Path(init))
    if not base.task.name:
        raise ConfigError(f"rl.init_from: {init} is a language-model run; RL needs a reasoning-task run "
                          "(task.name)")
    merged = base.to_dict()
    for section, values in raw.items():
        if isinstance(values, dict):
            merged[section].update(values)
    cfg = from_dict(merged)
    try:
        check_data(Path(init), cfg.data.dir)
    except SoftarError as e:  # another tokenizer or dataset than the run was trained on
        raise ConfigError(f"rl.init_from: {e}") from None
    check_policy(cfg)
    return cfg


def check_policy(cfg: Config) -> None:
    """Before a run directory is touched: the policy can run on this model and task, and the initial checkpoint
    loads into it."""
    data = TaskData.open(cfg)
    enc = data.encoder
    longest = max(len(enc.prompt(ex, enc.final_stage())) for split in ("train", "valid")
                  for ex in data.examples[split])
    model = build_model(resolve(cfg, data.meta["vocab_size"])).eval()
    try:
        Policy(cfg.rl.policy, cfg.rl.sigma, cfg.rl.temperature, cfg.task.max_answer_tokens).check(model, longest)
    except ValueError as e:
        raise ConfigError(f"rl.policy: {e}") from None
    init = load_latest(Path(cfg.rl.init_from))
    check_state(model.state_dict(), init.tensors.get("model", {}), f"rl.init_from: checkpoint {init.path}")


def answer_entropy(answers: list[tuple[int, ...]]) -> float:
    """Nats of the empirical distribution of a group's answers: 0 when all agree, log G when all differ."""
    counts = Counter(answers).values()
    n = sum(counts)
    return -sum(c / n * math.log(c / n) for c in counts)


class RLTrainer(Trainer):
    """A `Trainer` whose step is a GRPO step and whose periodic eval reports pass@k."""

    def __init__(self, cfg: Config, out: str | Path, resume: bool = False, quiet: bool = False, stack=None):
        super().__init__(cfg, out, resume, quiet, stack)
        r, task = self.cfg.rl, self.cfg.task
        self.enc = self.task.encoder
        self.stage, self.eos = self.enc.final_stage(), self.enc.id["<eos>"]
        self.policy = Policy(r.policy, r.sigma, r.temperature, task.max_answer_tokens)
        self.part_names = list(PARTS)
        self.net.eval()  # no dropout: a replay reproduces its rollout, and the first ratio is exactly 1
        init = load_latest(Path(r.init_from), self.device)  # `check_policy` has checked it fits
        if self.step == 0:  # a resumed run keeps its own weights
            self.net.load_state_dict(init.tensors["model"])
        self.reference = build_model(self.cfg).to(self.device).eval()  # the initial policy, for the KL
        self.reference.load_state_dict(init.tensors["model"])
        self.reference.thought_id = self.net.thought_id
        self.reference.requires_grad_(False)

    def reward(self, record: dict, answer: torch.Tensor) -> float:
        ids = [a for a in answer.tolist() if a >= 0 and a != self.eos]
        words, _ = split_answer(self.enc, ids)
        task = self.enc.task
        if hasattr(task, "reward"):
            return float(task.reward(record, words))
        return float(task.check(record, words, self.enc.rendering))

    def _generator(self, salt: int) -> torch.Generator:
        seed = (self.cfg.train.seed * 1_000_003 + salt * 65_537 + self.world.rank) % 2**63
        return torch.Generator(self.device).manual_seed(seed)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        t, r = self.cfg.train, self.cfg.rl
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, t)
        gen, t0 = self._generator(self.step), time.perf_counter()
        examples, records = self.task.examples["train"], self.task.records["train"]
        groups: list[tuple[list[int], Actions]] = []
        rewards = []
        for i in self.sampler.next_indices():
            prompt = self.enc.prompt(examples[i], self.stage)
            actions = rollout(self.net, prompt, r.group_size, self.policy, self.eos, gen)
            groups.append((prompt, actions))
            rewards.append([self.reward(records[i], a) for a in actions.answers])
        seconds = time.perf_counter() - t0
        tokens = sum(int((a.answers >= 0).sum()) + a.thought_ids.numel() for _, a in groups)
        rewards = torch.tensor(rewards, device=self.device)  # [P, G]
        advantages = group_advantages(rewards)
        with torch.no_grad():
            old = [replay(self.net, p, a, self.policy, self.eos)[0] for p, a in groups]
            ref = [replay(self.reference, p, a, self.policy, self.eos)[0] for p, a in groups]
        bad, kl = False, 0.0
        for inner in range(r.inner_steps):  # kl: of the policy that drew the rollouts; clipped: of the last update
            total, clipped = torch.zeros((), device=self.device), 0.0
            for k, (prompt, actions) in enumerate(groups):
                logp, mask = replay(self.net, prompt, actions, self.policy, self.eos)
                loss, frac = clipped_objective(logp, old[k], advantages[k], mask, r.clip)
                div = kl_to_reference(logp, ref[k], mask)
                loss = (loss + r.kl_coef * div) / len(groups)
                loss.backward()
                total = total + loss.detach()
                kl += div.item() / len(groups) if inner == 0 else 0.0
                clipped += frac.item() / len(groups)
            self.world.mean_grads(self.net)
            norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
            bad = self.world.any(not (math.isfinite(total.item()) and math.isfinite(norm.item())), self.device)
            if not bad:
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if bad:
                break
        self.step += 1
        norms = torch.cat([a.thought_vectors.norm(dim=-1).flatten() for _, a in groups])
        entropy = sum(answer_entropy([tuple(x.tolist()) for x in a.answers]) for _, a in groups) / len(groups)
        parts = torch.tensor([rewards.mean().item(), rewards.std(-1, correction=0).mean().item(), kl, clipped,
                              entropy, norms.mean().item() if norms.numel() else 0.0, tokens / max(seconds, 1e-9)],
                             device=self.device)
        return self.world.mean(total[None])[0], self.world.mean(parts), bad

    def evaluate(self) -> dict:
        """The first task.eval_examples valid prompts: greedy accuracy (soft thoughts, as `softar eval --task`)
        and pass@k of rl.eval_samples rollouts under the policy, with their mean reward."""
        limit, n = self.cfg.task.eval_examples, self.cfg.rl.eval_samples
        greedy = evaluate_task(self.net, self.task, "valid", [self.stage], limit)[f"stage_{self.stage}"]
        self.net.eval()
        gen = self._generator(-1 - self.step)
        passes = {k: [] for k in PASS_K if k <= n}
        rewards = []
        for ex, rec in zip(self.task.examples["valid"][:limit], self.task.records["valid"][:limit], strict=True):
            actions = rollout(self.net, self.enc.prompt(ex, self.stage), n, self.policy, self.eos, gen)
            scores = [self.reward(rec, a) for a in actions.answers]
            rewards += scores
            right = sum(s == 1.0 for s in scores)
            for k in passes:
                passes[k].append(pass_at_k(n, right, k))
        return {"kind": "eval", "step": self.step, "val_accuracy": greedy["accuracy"],
                "val_reward": sum(rewards) / len(rewards),
                **{f"val_pass@{k}": sum(v) / len(v) for k, v in passes.items()}}
