"""`softar rl`: GRPO from a trained reasoning-task run, through the same `Trainer` as `softar train` (run directory,
atomic checkpoints, exact resume, SIGTERM, the non-finite guard, metrics.jsonl and TensorBoard, torchrun DDP).

The RL config names the run to start from (`rl.init_from`) and sets [rl] and [train] (and the task's eval_examples and
max_answer_tokens, task.depths); the model, the task and the data are the initial run's. Each step draws
train.batch_size train prompts at the task's final curriculum stage (a generating task's: fresh questions at
task.depths), samples rl.group_size rollouts of each under the thought policy, as one batch (`softar.rl.rollout`),
scores them with rl.reward (`softar.tasks.rewards`), and takes rl.inner_steps clipped-objective updates with a KL
estimate to the initial policy (weight rl.kl_coef; it is logged either way). Each rollout draws from a stream of
its own, seeded by (train.seed, step, its place in the global batch), so a resumed run draws what the uninterrupted
one drew, and R ranks draw what one process does.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from softar import SoftarError
from softar.checkpoint import check_state
from softar.config import Config, ConfigError, TrainConfig, from_dict, load_raw, resolve, seeded
from softar.evaluate.reasoning import TaskData, evaluate_task
from softar.rl.objective import (
    PASS_K,
    clipped_objective,
    group_advantages,
    group_weights,
    guessed_pass_at_k,
    kl_to_reference,
    pass_at_k,
)
from softar.rl.rollout import Actions, Policy, replay, rollout, rollout_seeds
from softar.rundir import check_data, load_latest, read_config
from softar.soft.gate import gate_state, load_initial
from softar.soft.model import build_model
from softar.tasks.data import Example, training_depths
from softar.tasks.modes import MODES
from softar.tasks.rewards import PATH_REWARDS, REWARDS
from softar.train import Trainer, apply_update

PARTS = ("reward", "reward_std", "kl", "clipped", "answer_entropy", "thought_norm", "rollout_tokens_per_s")
RL_KEYS = {"rl": None, "train": None, "data": None, "task": ("eval_examples", "max_answer_tokens", "depths")}
UNUSED_TRAIN_KEYS = ("grad_accum", "dtype", "compile")


def rl_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """The RL run's config: the initial run's, with the RL file's (and the overrides') rl, train, data and
    task.eval_examples / task.max_answer_tokens / task.depths on top (the initial run's warm-up and depth
    curriculum are its own, not repeated)."""
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
    seed = (raw.get("train") or {}).get("seed", TrainConfig.seed) if isinstance(raw.get("train"), dict) \
        else TrainConfig.seed
    init = raw["rl"]["init_from"] = seeded(init, seed)
    base = read_config(Path(init))
    if not base.task.name:
        raise ConfigError(f"rl.init_from: {init} is a language-model run; RL needs a reasoning-task run "
                          "(task.name)")
    unused = sorted(set(raw.get("train") or {}) & set(UNUSED_TRAIN_KEYS)) if isinstance(raw.get("train"), dict) else []
    if unused:
        raise ConfigError(f"train.{unused[0]}: not used by an RL run (it rolls out and updates in float32, one batch "
                          "a step, uncompiled)")
    if isinstance(raw.get("train"), dict) and raw["train"].get("parallel", "ddp") != "ddp":
        raise ConfigError("train.parallel: an RL run replicates its model on every rank and averages the gradients "
                          "itself; only \"ddp\" is supported")
    merged = base.to_dict()
    merged["train"] = dataclasses.asdict(TrainConfig())
    merged["task"].update(recall_iters=0, depth_iters=0)  # the initial run's warm-up and curriculum, not the RL run's
    for section, values in raw.items():  # [train] starts from the defaults: the schedule is the RL run's own
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
    try:
        training_depths(cfg.task, data.meta)
    except SoftarError as e:
        raise ConfigError(str(e)) from None
    enc = data.encoder
    problem = scoring_problem(data.task, cfg.task.mode, cfg.rl.reward, cfg.rl.chain)
    if problem:
        raise ConfigError(problem)
    # a generated question is as long as a valid one of its depth (valid holds every depth the dataset generates)
    longest = max(len(enc.prompt(ex, enc.final_stage(), cfg.rl.chain == "thoughts")) for split in ("train", "valid")
                  if split in data.examples for ex in data.examples[split])
    model = build_model(resolve(cfg, data.encoder.tok.vocab_size)).eval()
    try:
        Policy(cfg.rl.policy, cfg.rl.sigma, cfg.rl.temperature, cfg.task.max_answer_tokens).check(model, longest)
    except ValueError as e:
        raise ConfigError(f"rl.policy: {e}") from None
    init = load_latest(Path(cfg.rl.init_from))
    weights = {**gate_state(model.state_dict()), **init.tensors.get("model", {})}  # as `load_initial` loads it
    check_state(model.state_dict(), weights, f"rl.init_from: checkpoint {init.path}")


def scoring_problem(task, mode: str, reward: str, chain: str, flags: tuple[str, str] = ("rl.reward", "rl.chain")
                    ) -> str | None:
    """Why a run of `mode` on `task` cannot be scored with `reward` with the policy acting where `chain` says, or
    None: the path rewards read each step as one node, and path / path_partial and chain "thoughts" need the whole
    chain written in order (a cot run). `flags` name the two settings in the message."""
    m = MODES[mode]
    if reward in PATH_REWARDS and not getattr(task, "node_steps", False):
        return f"{flags[0]}: {reward!r} reads each written step as one node; {task.name}'s steps are not (twins' are)"
    if (reward in ("path", "path_partial") or chain == "thoughts") and (m.curriculum or m.reversed_steps
                                                                      or not m.writes_steps):
        what = f"{flags[0]}: {reward!r} scores the whole chain written in order" if chain == "written" \
            else f"{flags[1]}: \"thoughts\" puts a slot where each step is written"
        return f"{what}; the {mode!r} run does not write it (a cot run does)"
    return None


def answer_entropy(answers: list[tuple[int, ...]]) -> float:
    """Nats of the empirical distribution of a group's outputs (answers, or whole paths): 0 when all agree, log G
    when all differ."""
    counts = Counter(answers).values()
    n = sum(counts)
    return -sum(c / n * math.log(c / n) for c in counts)


class RLTrainer(Trainer):
    """A `Trainer` whose step is a GRPO step and whose periodic eval reports pass@k."""

    def __init__(self, cfg: Config, out: str | Path, resume: bool = False, quiet: bool = False, stack=None):
        init = load_latest(Path(cfg.rl.init_from))  # before the run directory is touched (`check_policy` checked it)
        super().__init__(cfg, out, resume, quiet, stack)
        r, task = self.cfg.rl, self.cfg.task
        self.task = self.workload.data
        if task.depths:  # every evaluation asks the questions RL trains on
            self.task.keep_depths("valid", task.depths, "task.depths")
        self.enc = self.task.encoder
        self.stage, self.eos = self.enc.final_stage(), self.enc.id["<eos>"]
        self.policy = Policy(r.policy, r.sigma, r.temperature, task.max_answer_tokens)
        self.part_names = list(PARTS)
        self.net.eval()  # no dropout: a replay reproduces its rollout, and the first ratio is exactly 1
        if self.step == 0:  # a resumed run keeps its own weights
            load_initial(self.net, init.tensors["model"])
        self.reference = build_model(self.cfg).to(self.device).eval()  # the initial policy, for the KL
        load_initial(self.reference, init.tensors["model"])
        self.reference.thought_id = self.net.thought_id
        self.reference.requires_grad_(False)

    def _seed(self, salt: int) -> int:
        """The base seed of one use (`salt`: a step, an evaluation)."""
        return (self.cfg.train.seed * 1_000_003 + salt * 1_048_583) % 2**62

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        t, r = self.cfg.train, self.cfg.rl
        self.schedule()
        t0 = time.perf_counter()
        records, examples = self.next_questions()
        chain = r.chain == "thoughts"
        prompts = [self.enc.prompt(ex, self.stage, chain) for ex in examples]
        G = r.group_size
        # rollout j of the prompt in slot s of the global batch draws from its own stream: R ranks of B prompts roll
        # out what one process of R x B does
        first = self.world.rank * t.batch_size * G
        drawn = rollout(self.net, prompts, G, self.policy, self.eos,
                        rollout_seeds(self._seed(self.step), first, len(prompts) * G))
        groups: list[tuple[list[int], Actions]] = [(p, drawn.rows(k * G, (k + 1) * G)) for k, p in enumerate(prompts)]
        rewards = [[reward_of(self.task, rec, a, r.reward, t if chain else None)
                    for a, t in zip(acts.answers, acts.thought_ids, strict=True)]
                   for rec, (_, acts) in zip(records, groups, strict=True)]
        seconds = time.perf_counter() - t0
        tokens = int((drawn.answers >= 0).sum()) + drawn.thought_ids.numel()
        rewards = torch.tensor(rewards, device=self.device)  # [P, G]
        advantages = group_advantages(rewards, r.scale_advantages)
        with torch.no_grad():
            ref, masks = zip(*(replay(self.reference, p, a, self.policy, self.eos) for p, a in groups), strict=True)
        counts = torch.stack([m.sum() for m in masks]).float()  # each group's actions
        weights = group_weights(counts, r.loss_average, self.world.mean(counts.sum()[None])[0] * self.world.size,
                                self.world.size)
        old: list[torch.Tensor] = []  # the rollouts' log-probs: the first inner step's replay, detached (ratio 1)
        bad, kl, clipped, first = False, 0.0, 0.0, torch.zeros((), device=self.device)
        for inner in range(r.inner_steps):  # loss and kl: at the rollouts' policy; clipped: in the later updates
            total = torch.zeros((), device=self.device)
            for k, (prompt, actions) in enumerate(groups):
                logp, mask = replay(self.net, prompt, actions, self.policy, self.eos)
                if inner == 0:
                    old.append(logp.detach())
                loss, frac = clipped_objective(logp, old[k], advantages[k], mask, r.clip, r.loss_average)
                div = kl_to_reference(logp, ref[k], mask, r.loss_average)
                if r.kl_coef > 0:
                    loss = loss + r.kl_coef * div
                (loss * weights[k]).backward()
                total = total + loss.detach() * weights[k]
                if inner == 0:
                    kl += div.item() * weights[k].item()
                else:
                    clipped += frac.item() / len(groups) / (r.inner_steps - 1)
            self.world.mean_grads(self.net)
            nonfinite = apply_update(self.net, self.opt, total, t.grad_clip, self.world)
            if inner == 0:
                first, bad = total, nonfinite  # a skipped step: no update at all
            if nonfinite:
                break  # later inner steps stop at a non-finite one; the updates before it stand
        self.step += 1
        norms = drawn.thought_vectors.norm(dim=-1).flatten()
        entropy = sum(answer_entropy([tuple(t.tolist()) * chain + tuple(x.tolist())
                                      for t, x in zip(a.thought_ids, a.answers, strict=True)])
                      for _, a in groups) / len(groups)
        parts = torch.tensor([rewards.mean().item(), rewards.std(-1, correction=0).mean().item(), kl, clipped,
                              entropy, norms.mean().item() if norms.numel() else 0.0, tokens / max(seconds, 1e-9)],
                             device=self.device)
        return self.world.mean(first[None])[0], self.world.mean(parts), bad

    def next_questions(self) -> tuple[list[dict], list[Example]]:
        """This rank's questions of the next step, records and examples: drawn from the train split, or for a task
        that generates its questions fresh ones at task.depths (else every depth of the dataset), depths mixed in
        every mode (the decode loop batches prompts of any length)."""
        if "generator" not in self.task.meta:
            picked = self.sampler.next_indices()
            return [self.task.records["train"][i] for i in picked], [self.task.examples["train"][i] for i in picked]
        params = {**self.task.meta["generator"], "depths": training_depths(self.cfg.task, self.task.meta)}
        records = self.sampler.mine(self.enc.task.generate(
            self.sampler.batch_rng(), params, self.cfg.train.batch_size * self.world.size, False))
        return records, [self.enc.example(r, "a generated question") for r in records]

    def final_evaluation(self) -> dict:
        """The supervised final evaluation (greedy, soft thoughts, every curriculum stage), and pass@k under the
        policy on the whole valid split."""
        final = super().final_evaluation()  # evaluate_task leaves the model in eval mode, as it found it
        sampled = pass_rates(self.net, self.task, "valid", self.policy, self.cfg.rl.eval_samples, None,
                             self._seed(-(2**40)), self.cfg.rl.reward, self.cfg.rl.chain)
        final["sampled"] = {k: v for k, v in sampled.items() if k not in ("right", "named")}  # no per-question lists
        return final

    def evaluate(self) -> dict:
        """The first task.eval_examples valid prompts: greedy accuracy (soft thoughts, as `softar eval --task`)
        and pass@k of rl.eval_samples rollouts under the policy, with their mean reward."""
        limit = self.cfg.task.eval_examples
        greedy = evaluate_task(self.net, self.task, "valid", [self.stage], limit)[f"stage_{self.stage}"]
        sampled = pass_rates(self.net, self.task, "valid", self.policy, self.cfg.rl.eval_samples, limit,
                             self._seed(-1 - self.step), self.cfg.rl.reward, self.cfg.rl.chain)
        return {"kind": "eval", "step": self.step, "val_accuracy_greedy_soft": greedy["accuracy"],
                **{f"val_{k}": v for k, v in sampled.items() if isinstance(v, float)},
                **{f"val_option_guess_{k}": v for k, v in sampled.get("option_guess", {}).items()}}


def written(data: TaskData, answer: torch.Tensor, chain: torch.Tensor | None = None) -> tuple[list[str], list[str]]:
    """What a rollout wrote after its prompt, [A] ids (<eos> and -1 padding included), as the task's words: (its
    steps, before its last <ans>; its answer, after it; empty without <ans>). With `chain` [n], the tokens its
    chain's thought slots showed (rl.chain = "thoughts"; -1 pads a prompt with fewer slots than its batch's longest)
    come first, as if written, then the prompt's <ans>. Every thought policy shows a token at every slot."""
    enc = data.encoder
    ids = [a for a in answer.tolist() if a >= 0 and a != enc.id["<eos>"]]
    if chain is not None:
        ids = [t for t in chain.tolist() if t >= 0] + [enc.id["<ans>"]] + ids
    return enc.split_answer(ids)


def reward_of(data: TaskData, record: dict, answer: torch.Tensor, reward: str = "answer",
              chain: torch.Tensor | None = None) -> float:
    """A rollout's reward (`softar.tasks.rewards.REWARDS[reward]`) from what it wrote, `answer` [A] ids (and its
    chain's shown tokens, `written`)."""
    steps, words = written(data, answer, chain)
    return REWARDS[reward](data.encoder.task, record, steps, words, data.encoder.rendering)


def pass_rates(model, data: TaskData, split: str, policy: Policy, samples: int, limit: int | None, seed: int,
               reward: str = "answer", chain: str = "written") -> dict:
    """`samples` rollouts of each of the first `limit` questions of a split under `policy`, at the final curriculum
    stage, all as one batch (rollout j of question q draws from a stream of its own, from `seed`): pass@k for k in
    1, 4, 16, 32 up to `samples` (a rollout passes when its `reward` is 1; the unbiased estimator, averaged over
    questions), the mean reward, and per question the number of passing rollouts (`right`). For a task whose steps
    are one node each (twins), `well_formed`: the share of rollouts whose output is well formed (`format`), right or
    wrong.

    For a choice between options (ProsQA) it also gives `named` (per question, the rollouts whose answer names one
    of the options), `options` (how many a question offers) and `option_guess`: the pass@k the same rollouts would
    get if each one that names an option named one at random, which is what pass@k must beat to show more than
    guessing. `chain`: rl.chain, where the policy acts."""
    enc = data.encoder
    stage, eos = enc.final_stage(), enc.id["<eos>"]
    ks = [k for k in PASS_K if k <= samples]
    examples, records = data.examples[split][:limit], data.records[split][:limit]
    slots = chain == "thoughts"
    actions = rollout(model, [enc.prompt(ex, stage, slots) for ex in examples], samples, policy, eos,
                      rollout_seeds(seed, 0, len(examples) * samples))
    rewards: list[float] = []
    right: list[int] = []
    named: list[int] = []
    options: set[int] = set()
    formed, node_steps = 0.0, getattr(enc.task, "node_steps", False)
    score, well_formed = REWARDS[reward], REWARDS["format"]
    for q, rec in enumerate(records):
        rows = slice(q * samples, (q + 1) * samples)
        outputs = [written(data, a, t if slots else None)
                   for a, t in zip(actions.answers[rows], actions.thought_ids[rows], strict=True)]
        scores = [score(enc.task, rec, steps, words, enc.rendering) for steps, words in outputs]
        answers = [words for _, words in outputs]
        if node_steps:
            formed += sum(well_formed(enc.task, rec, steps, words, enc.rendering) for steps, words in outputs)
        rewards += scores
        right.append(sum(s == 1.0 for s in scores))
        if hasattr(enc.task, "options"):
            offered = enc.task.options(rec)
            options.add(len(offered))
            named.append(sum(enc.task.answer_node(rec, w, enc.rendering) in offered for w in answers))
    result = {"samples": samples, "reward": sum(rewards) / len(rewards),
              **{f"pass@{k}": statistics.fmean(pass_at_k(samples, r, k) for r in right) for k in ks},
              "right": right, **({"well_formed": formed / len(rewards)} if node_steps else {})}
    if named and len(options) == 1:  # the null needs one chance level: every question offers as many options
        result |= {"named": named, "options": options.pop()}
        result["option_guess"] = {f"pass@{k}": option_guess(result, k) for k in ks}
    return result


def option_guess(sampled: dict, k: int, per_question: bool = False) -> float | list[float]:
    """The option-guessing null of a `pass_rates` result: the pass@k of its samples if each that names an option
    named one at random; averaged over questions, or per question."""
    values = [guessed_pass_at_k(sampled["samples"], m, k, 1 / sampled["options"]) for m in sampled["named"]]
    return values if per_question else statistics.fmean(values)


def sampled_eval(run_dir: str | Path, data_file: str | Path, policy: str, samples: int, temperature: float,
                 device_name: str = "auto", seed: int = 0, max_answer: int | None = None,
                 sigma: float | None = None, reward: str | None = None, chain: str | None = None,
                 depths: list[int] | None = None) -> dict:
    """`softar eval RUN --task NAME --data FILE --samples N --policy P`: pass@k of a task run (supervised or RL) on
    every question of a file (or those whose chain has one of `depths` steps), with thoughts filled by the policy P
    (inference hard or soft, whatever it was trained with). The answer's length limit, noisy-soft's sigma, the
    reward a pass needs and where the policy acts (rl.chain) are the run's unless given."""
    from softar.device import pick_device
    from softar.rundir import load_run

    if temperature <= 0:
        raise SoftarError("--temperature: sampling needs a temperature above 0")
    run = load_run(run_dir, pick_device(device_name))
    reward, chain = reward or run.cfg.rl.reward, chain or run.cfg.rl.chain
    data = TaskData.open(run.cfg, splits=(), files={"eval": Path(data_file)})
    if depths is not None:
        data.keep_depths("eval", depths, f"--depths: {data_file}")
    problem = scoring_problem(data.task, run.cfg.task.mode, reward, chain, ("--reward", "--chain"))
    if problem:
        raise SoftarError(problem)
    pol = Policy(policy, sigma or run.cfg.rl.sigma, temperature, max_answer or run.cfg.task.max_answer_tokens)
    try:
        pol.check(run.model, max(len(data.encoder.prompt(ex, data.encoder.final_stage(), chain == "thoughts"))
                                 for ex in data.examples["eval"]))
    except ValueError as e:
        raise SoftarError(f"--policy: {e}") from None
    return {"policy": policy, "temperature": temperature, "max_answer": pol.max_answer, "step": run.step,
            "reward_name": reward, "chain": chain, "depths": depths,
            **pass_rates(run.model, data, "eval", pol, samples, None, seed, reward, chain)}
