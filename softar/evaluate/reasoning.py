"""Reasoning tasks: greedy answers (continuous thoughts through the KV cache), exact-match accuracy overall, by
number of reasoning steps and by curriculum stage, thought and step tokens, time per question, thought norms against
the embeddings', and a probe of superposition: how many breadth-first frontier nodes each thought holds."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from softar import SoftarError
from softar.config import Config
from softar.decode import decode
from softar.evaluate.stats import mean_se
from softar.soft.collapse import Sampling
from softar.soft.feeds import HardFeed, SoftFeed
from softar.soft.thoughts import task_loss
from softar.tasks import Task, get_task
from softar.tasks.data import Encoder, Example, load_records, load_task_meta, task_tokenizer
from softar.tasks.graphs import frontiers


@dataclass
class TaskData:
    """A task run's data: the task, its tokenizer and encoder, and the examples of its splits."""

    task: Task
    encoder: Encoder
    meta: dict
    records: dict[str, list[dict]]
    examples: dict[str, list[Example]]

    @classmethod
    def open(cls, cfg: Config, data_dir: str | Path | None = None, splits: tuple[str, ...] = ("train", "valid"),
             files: dict[str, Path] | None = None) -> TaskData:
        """The task of `cfg.task` on `data_dir` (default cfg.data.dir); `files` maps a split name to another file
        in the same format (e.g. `softar eval --data FILE.json`)."""
        data_dir = Path(data_dir or cfg.data.dir)
        meta = load_task_meta(data_dir)
        if meta["task"] != cfg.task.name:
            raise SoftarError(f"task.name: {cfg.task.name!r}, but {data_dir} holds the {meta['task']!r} task")
        task = get_task(cfg.task.name)
        encoder = Encoder(task, task_tokenizer(cfg, data_dir), cfg.task.render, cfg.task)
        if getattr(task, "online", False):  # it generates its training questions: no train split to read
            splits = tuple(s for s in splits if s != "train")
        paths = {s: data_dir / f"{s}.json" for s in splits} | (files or {})
        records = {s: load_records(p, task) for s, p in paths.items()}
        examples = {s: [encoder.example(r, f"{paths[s]}: record {i}") for i, r in enumerate(rs)]
                    for s, rs in records.items()}
        return cls(task, encoder, meta, records, examples)

    def keep_depths(self, split: str, depths: list[int], where: str) -> None:
        """Keep only a split's questions whose chain has one of `depths` steps; none left is a one-line error."""
        keep = [i for i, r in enumerate(self.records[split]) if len(r["steps"]) in depths]
        if not keep:
            raise SoftarError(f"{where}: no question of depth {', '.join(map(str, depths))} in the {split} split")
        self.records[split] = [self.records[split][i] for i in keep]
        self.examples[split] = [self.examples[split][i] for i in keep]

    def longest(self, split: str) -> int:
        """Slots the longest sequence of a split needs, at any curriculum stage."""
        enc = self.encoder
        return max(len(enc.sequence(ex, k)[0]) - 1 for ex in self.examples[split]
                   for k in range(enc.final_stage() + 1))

    def check_fits(self, split: str, slots: int, what: str) -> None:
        need = self.longest(split)
        if need > slots:
            raise SoftarError(f"{what}: its longest sequence needs {need} slots, the model has {slots} "
                              "(model.block_size)")


MAX_BATCH = 256  # questions decoded at once


def solve(model, encoder: Encoder, examples: list[Example], stage: int, max_new: int, use_cache: bool = True,
          seed: int = 0, top_k: int = 0) -> list[dict]:
    """Greedy answers at a curriculum stage: each prompt (question, <bot>, thought or pause slots, <eot>) is read
    with its thoughts filled (`SoftFeed.thoughts`), then decoded greedily until <eos>, `max_new` tokens or the end
    of the window (`softar.decode`, MAX_BATCH prompts at a time). Returns per example: generated ids (without
    <eos>), thoughts [n, m], seconds (its batch's time over its size); with `top_k` (at most `TRACE_TOP_K`), also
    each step's next-token distribution: "top" (ids [N, k], probabilities [N, k]) and "entropy" [N], <eos>
    included."""
    eos, W = encoder.id["<eos>"], model.window_slots
    prompts = [encoder.prompt(ex, stage) for ex in examples]
    too_long = [len(p) for p in prompts if len(p) + 1 > W]
    if too_long:
        raise SoftarError(f"a prompt of {too_long[0]} tokens leaves no room to answer in the model's {W} slots")
    results: list[dict] = []
    for i in range(0, len(prompts), MAX_BATCH):
        batch = prompts[i : i + MAX_BATCH]
        t0 = time.perf_counter()
        g = decode(model, batch, HardFeed(Sampling(temperature=0.0)), [min(max_new, W - len(p)) for p in batch],
                   stop=[eos], seed=seed, thoughts=SoftFeed.thoughts(model), use_cache=use_cache,
                   return_trace=bool(top_k))
        seconds = (time.perf_counter() - t0) / len(batch)
        for j in range(len(batch)):
            n = int(g.lengths[j])
            ids = g.tokens[j, :n].tolist()
            result = {"ids": ids[:-1] if g.stopped[j] else ids, "thoughts": g.thoughts[j].float().cpu(),
                      "seconds": seconds}
            if top_k:
                result["top"] = (g.top_ids[j, :n, :top_k].cpu(), g.top_probs[j, :n, :top_k].cpu())
                result["entropy"] = g.entropy[j, :n].cpu()
            results.append(result)
    return results


def node_readout(model, encoder: Encoder, record: dict,
                 thoughts: torch.Tensor) -> tuple[list[str], torch.Tensor, list[set[int]]]:
    """How thoughts [n, m] read as this graph's nodes: (the node tokens, scores [n, nodes]: each thought's dot product
    with the node embeddings, the LM head's reading for Coconut's thoughts, and the breadth-first frontiers from the
    root, frontier d being the nodes at distance d). Thought t stands for step t // thoughts_per_step, so its
    frontier is at depth t // thoughts_per_step + 1."""
    names = encoder.task.node_tokens(record, encoder.rendering)
    ids = torch.tensor(encoder.probe_ids(record))
    scores = thoughts.float() @ model.E.detach().float().cpu()[ids].T  # [n_thoughts, n_nodes]
    return names, scores, frontiers(len(names), [tuple(e) for e in record["edges"]], record["root"])


def frontier_probe(model, encoder: Encoder, record: dict, thoughts: torch.Tensor) -> list[dict]:
    """For the last thought of each replaced step k (thoughts k*c .. k*c + c-1, c = thoughts_per_step): of the |F|
    nodes it scores highest (`node_readout`), how many lie in the breadth-first frontier F at depth k + 1; and the
    count expected by chance, |F|^2 / n."""
    names, scores, fronts = node_readout(model, encoder, record, thoughts)
    rows, c = [], encoder.cfg.thoughts_per_step
    for k in range(thoughts.shape[0] // c):
        if k + 1 >= len(fronts) or not fronts[k + 1]:
            break
        F_k = fronts[k + 1]
        top = set(scores[k * c + c - 1].topk(len(F_k)).indices.tolist())
        rows.append({"depth": k + 1, "frontier": len(F_k), "held": len(top & F_k),
                     "chance": len(F_k) ** 2 / len(names)})
    return rows


def evaluate_task(model, data: TaskData, split: str, stages: list[int] | None = None, limit: int | None = None,
                  seed: int = 0) -> dict:
    """Accuracy and its breakdowns on a split at each stage in `stages` (default: the mode's final stage, which is
    the headline), over the first `limit` examples (default all). Greedy and deterministic under `seed`."""
    enc, cfg = data.encoder, data.encoder.cfg
    final = enc.final_stage()
    stages = stages if stages is not None else [final]
    records, examples = data.records[split][:limit], data.examples[split][:limit]
    was_training = model.training
    model.eval()
    report: dict = {"split": split, "examples": len(examples), "mode": cfg.mode, "render": enc.rendering,
                    "question_steps": [len(r["steps"]) for r in records]}  # per question: comparisons at one depth
    try:
        for stage in stages:
            res = solve(model, enc, examples, stage, cfg.max_answer_tokens, seed=seed)
            correct, by_steps, steps_tok, probe, named = [], {}, [], {}, []
            for r, out in zip(records, res, strict=True):
                words = enc.split_answer(out["ids"])[1]
                ok = float(enc.task.check(r, words, enc.rendering))
                correct.append(ok)
                if hasattr(enc.task, "options"):  # a choice between options: did it name one at all?
                    named.append(float(enc.task.answer_node(r, words, enc.rendering) in enc.task.options(r)))
                by_steps.setdefault(len(r["steps"]), []).append(ok)
                steps_tok.append(enc.answer_at(out["ids"]))
                if out["thoughts"].shape[0] and enc.probe_ids(r) is not None:
                    for row in frontier_probe(model, enc, r, out["thoughts"]):
                        probe.setdefault(row["depth"], []).append(row)
            acc, acc_se = mean_se(correct)
            entry = {"accuracy": acc, "accuracy_se": acc_se,
                     "accuracy_by_steps": {str(k): statistics.fmean(v) for k, v in sorted(by_steps.items())},
                     "thought_tokens": len(enc.middle(stage)[0]) if enc.mode.slot == "<thought>" else 0,
                     "pause_tokens": len(enc.middle(stage)[0]) if enc.mode.slot == "<pause>" else 0,
                     "step_tokens": statistics.fmean(steps_tok),
                     "seconds_per_question": statistics.fmean(o["seconds"] for o in res),
                     "correct": correct}  # per question, in file order: paired comparisons across runs
            if named:  # chance is 0.5 among the answers that name an option
                entry["option_rate"] = statistics.fmean(named)
                entry["accuracy_when_option"] = (sum(correct) / sum(named)) if sum(named) else None
                entry["named_option"] = named
            thoughts = [o["thoughts"] for o in res if o["thoughts"].shape[0]]
            if thoughts:
                norms = torch.cat(thoughts).norm(dim=-1)
                entry["thought_norm"] = norms.mean().item()
                entry["embedding_norm"] = model.E.detach().float().norm(dim=-1).mean().item()
                entry["probe"] = {str(d): {k: statistics.fmean(r[k] for r in rows) for k in ("frontier", "held",
                                                                                            "chance")}
                                  for d, rows in sorted(probe.items())}
            report[f"stage_{stage}"] = entry
        report.update(report[f"stage_{final}"] if final in stages else {})
    finally:
        model.train(was_training)
    return report


@torch.no_grad()
def task_loss_on(model, data: TaskData, split: str, stage: int, batch_size: int, limit: int | None,
                 device) -> float:
    """Mean cross-entropy on what follows <eot>, over the first `limit` examples of a split at a stage."""
    was_training = model.training
    model.eval()
    exs = data.examples[split][:limit]
    groups: dict[int, list[Example]] = {}
    for ex in exs:
        groups.setdefault(len(ex.question), []).append(ex)
    total, count = 0.0, 0
    try:
        for group in groups.values():
            for i in range(0, len(group), batch_size):
                x, y = data.encoder.batch(group[i : i + batch_size], stage)
                n = int((y >= 0).sum())
                total += task_loss(model, x.to(device), y.to(device))[0].item() * n
                count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


def evaluate_task_run(run_dir: str | Path, task: str, data_file: str | Path, device_name: str = "auto",
                      seed: int = 0) -> dict:
    """`softar eval RUN --task NAME --data FILE.json`: a task run's latest checkpoint on any file in the task's
    format; in thoughts mode at every curriculum stage (the headline is the last)."""
    from softar.device import pick_device
    from softar.rundir import load_run

    run = load_run(run_dir, pick_device(device_name))
    if not run.cfg.task.name:
        raise SoftarError(f"{run_dir} is a language-model run, not a reasoning task's; evaluate it without --task")
    if task != run.cfg.task.name:
        raise SoftarError(f"--task {task}: {run_dir} was trained on {run.cfg.task.name!r}")
    data = TaskData.open(run.cfg, splits=(), files={"eval": Path(data_file)})
    data.check_fits("eval", run.model.window_slots, f"--data {data_file}")
    final = data.encoder.final_stage()
    stages = list(range(final + 1))
    report = evaluate_task(run.model, data, "eval", stages, seed=seed)
    loss = task_loss_on(run.model, data, "eval", final, run.cfg.train.batch_size, None, run.model.E.device)
    return {"run_dir": str(run_dir), "step": run.step, "data": str(data_file), "loss": loss, **report}
