"""Task datasets: `softar task prepare` writes train/valid/test JSON in Coconut's format; loading checks every
record; examples become token sequences [question] <bot> [thoughts | pauses] <eot> [steps] <ans> [answer] <eos>;
`TaskSampler` draws training batches, with Coconut's curriculum stage following the step."""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from softar import SoftarError
from softar.data.tokenizer import TOKENIZER_FILE, HFTokenizer, TaskTokenizer, load_tokenizer
from softar.disk import (
    check_fields,
    check_owned,
    claim,
    clean_stale_temps,
    read_json,
    sha256_bytes,
    sha256_file,
    staged_folder,
)
from softar.tasks import get_task
from softar.tasks.audit import audit
from softar.tasks.base import MAX_NODES, VOCABULARY, Task
from softar.tasks.graphs import EDGES, NODES
from softar.tasks.modes import MODES, Mode
from softar.tasks.recall import recall_batch

TASK_FILE = "task.json"
SPLITS = {"train": 17_000, "valid": 300, "test": 500}  # about Coconut's ProsQA sizes (17,886 / 300 / 500)
RECORD_FIELDS = {"question": str, "answer": str, "steps": list, "edges": list, "root": int, "target": int,
                 "neg_target": int, "idx_to_symbol": list}
MAX_RECORDS = 10**7


def check_record(r: dict, where: str, fields: dict = RECORD_FIELDS) -> None:
    """A record with `fields` (default a graph task's, Coconut's ProsQA format, with a consistent graph); anything
    else is a one-line error."""
    check_fields(r, fields, where)
    if len(r["steps"]) > 1000 or not all(isinstance(s, str) for s in r["steps"]):
        raise SoftarError(f"{where}: steps must be a list of at most 1000 strings")
    if "edges" not in fields:
        return
    sym = r["idx_to_symbol"]
    n = len(sym)
    if not 2 <= n <= MAX_NODES or not all(isinstance(s, str) and s for s in sym):
        raise SoftarError(f"{where}: idx_to_symbol must be 2 to {MAX_NODES} non-empty strings")
    if len(r["edges"]) > 100_000 or not all(
            isinstance(e, list) and len(e) == 2 and all(type(x) is int and 0 <= x < n for x in e) for e in r["edges"]):
        raise SoftarError(f"{where}: edges must be pairs of node indices in [0, {n})")
    for key in ("root", "target", "neg_target"):
        if not 0 <= r[key] < n:
            raise SoftarError(f"{where}: {key} {r[key]} is not a node index in [0, {n})")


def load_records(path: str | Path, task: Task) -> list[dict]:
    """The records of a task JSON file (a list of objects in Coconut's format), each checked: its fields
    (`check_record`) and what the task needs of it (`Task.validate`)."""
    path = Path(path)
    if not path.exists():
        raise SoftarError(f"task data {path} not found")
    records = read_json(path, "task data")
    if not isinstance(records, list) or not records or len(records) > MAX_RECORDS:
        raise SoftarError(f"task data {path}: expected a non-empty JSON list of records")
    for i, r in enumerate(records):
        where = f"task data {path}: record {i}"
        check_record(r, where, getattr(task, "fields", RECORD_FIELDS))
        try:
            task.validate(r)
        except SoftarError as e:
            raise SoftarError(f"{where}: {e}") from None
    return records


def graph_stats(records: list[dict], keys: tuple[str, ...] = ("nodes", "edges", "steps")) -> dict:
    """Nodes, edges and reasoning steps per record (those of `keys`): min, mean, max."""
    def summary(xs: list[int]) -> dict:
        return {"min": min(xs), "mean": statistics.fmean(xs), "max": max(xs)}

    field = {"nodes": "idx_to_symbol", "edges": "edges", "steps": "steps"}
    return {k: summary([len(r[field[k]]) for r in records]) for k in keys}


def check_stats(stats: dict, records: int) -> None:
    """The generator's statistics must match Coconut's ProsQA: 14-28 nodes (mean about 23), 16-54 edges (about
    36), chains of 3-6 steps (about 3.8); the means only over 1,000 records or more, where they are stable."""
    want = {"nodes": (*NODES, 23.0, 1.5), "edges": (*EDGES, 36.0, 3.0), "steps": (3, 6, 3.8, 0.3)}
    for key, (low, high, mean, tol) in want.items():
        s = stats[key]
        if s["min"] < low or s["max"] > high or records >= 1000 and abs(s["mean"] - mean) > tol:
            raise SoftarError(f"generated {key}: {s} is outside [{low}, {high}] with mean {mean} ± {tol}")


def prepare_task(name: str, out: str | Path, counts: dict[str, int] | None = None, seed: int = 0,
                 force: bool = False, generator: dict | None = None, files: dict[str, Path] | None = None) -> dict:
    """Generate a task's splits into `out` (its split files, tokenizer.json, task.json), written into a temp folder
    first; an existing different dataset is replaced only with `force`, and only what softar wrote (its manifest,
    `softar.disk.check_owned`). A task that generates its training questions (`online`) writes valid and test only,
    `counts` per depth, and records its `generator` parameters (default the task's) in task.json. A free-text task
    (qa) takes its splits from the user's `files` (train and valid, test optional), each record checked."""
    task = get_task(name)
    online = getattr(task, "online", False)
    text = not getattr(task, "own_vocabulary", True)
    if text != bool(files):
        raise SoftarError(f"{name}: give its records as --files train=T.json valid=V.json [test=X.json]" if text else
                          f"{name} generates its records; --files is for a free-text task (qa)")
    if text:
        if not {"train", "valid"} <= set(files) <= set(SPLITS):
            raise SoftarError(f"--files: expected train=FILE and valid=FILE (test=FILE optional), got "
                              f"{', '.join(sorted(files))}")
        if counts or generator:
            raise SoftarError(f"{name} reads the records of --files; nothing to count or generate")
        loaded = {s: load_records(f, task) for s, f in files.items()}
        counts = {s: len(rs) for s, rs in loaded.items()}
    elif online:
        generator = generator or task.generator()
        task.check_generator(generator)
        counts = counts or dict(task.counts)
        if "train" in counts:
            raise SoftarError(f"{name} generates its training questions afresh every batch: no train split to count")
    elif generator:
        raise SoftarError(f"{name} reads fixed splits: generator parameters are for a task that generates its own")
    counts = counts or dict(SPLITS)
    out = Path(out).absolute()
    if out.is_symlink() or out.exists() and not out.is_dir():
        raise SoftarError(f"--out {out} exists and is not a directory")
    claim(out.parent, (), f"--out {out}")  # a folder softar can write in, before any generating
    clean_stale_temps(out.parent, (out.name, out.name + ".old"))
    if out.is_dir() and any(out.iterdir()):
        try:
            old = None if force else load_task_meta(out)
        except SoftarError:
            old = None
        if old and old["task"] == name and old["seed"] == seed and old["counts"] == counts and \
                old.get("generator") == generator and all((out / f"{s}.json").is_file() for s in counts) and \
                (not text or old["sha256"] == {s: sha256_bytes(json.dumps(rs).encode()) for s, rs in loaded.items()}):
            return old  # already prepared, every file there and as recorded
        check_owned(out, "--out")  # never replace or delete what softar did not write
        if not force:
            raise SoftarError(f"{out} already holds a different or incomplete task dataset; choose another --out "
                              "or pass --force to replace it")
    rng = random.Random(seed)
    if text:
        splits = loaded
        stats = graph_stats(splits["train"], ("steps",))
    elif online:
        splits = task.splits(rng, counts, generator)
        stats = graph_stats([r for rs in splits.values() for r in rs])
    else:
        from softar.tasks.prosqa import make_record

        splits = {split: [make_record(rng) for _ in range(k)] for split, k in counts.items()}
        stats = graph_stats(splits["train"])
        check_stats(stats, len(splits["train"]))
    leaks = {} if text else audit(splits, question_task(name))
    with staged_folder(out, force, "task dataset") as tmp:
        for split, records in splits.items():
            (tmp / f"{split}.json").write_text(json.dumps(records), encoding="utf-8")
        if not text:  # a free-text task's tokenizer is the model's (model.hf)
            TaskTokenizer(VOCABULARY).save(tmp / TOKENIZER_FILE)
        meta = {"task": name, "seed": seed, "counts": counts, **({"generator": generator} if online else {}),
                "vocab_size": 0 if text else len(VOCABULARY), "stats": stats, "audit": leaks,
                "sha256": {s: sha256_file(tmp / f"{s}.json") for s in splits}}
        (tmp / TASK_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


def question_task(name: str) -> Task:
    """The task that poses a dataset's two-option question: its own, or ProsQA's for path finding's graphs."""
    task = get_task(name)
    return task if hasattr(task, "options_in_order") else get_task("prosqa")


def audit_task_dir(data_dir: str | Path) -> dict:
    """The leak audit (`softar.tasks.audit`) of every split of a task dataset, each record checked as at load."""
    meta = load_task_meta(data_dir)
    if not getattr(get_task(meta["task"]), "own_vocabulary", True):
        raise SoftarError(f"{data_dir}: {meta['task']} questions have no options for the audit's rules to pick from")
    question = question_task(meta["task"])
    splits = {s: Path(data_dir) / f"{s}.json" for s in SPLITS}
    return audit({s: load_records(p, question) for s, p in splits.items() if p.exists()}, question)


TASK_META_FIELDS = {"task": str, "seed": int, "counts": dict, "vocab_size": int, "sha256": dict}


def is_task_dir(data_dir: str | Path) -> bool:
    return (Path(data_dir) / TASK_FILE).is_file()


def load_task_meta(data_dir: str | Path) -> dict:
    """task.json, checked against the files beside it."""
    path = Path(data_dir) / TASK_FILE
    if not path.exists():
        raise SoftarError(f"no task dataset in {data_dir} (expected {path}; run `softar task prepare`)")
    meta = read_json(path, "task dataset", TASK_META_FIELDS)
    get_task(meta["task"])
    if not (set(meta["counts"]) <= set(SPLITS) and all(type(v) is int and v > 0 for v in meta["counts"].values())):
        raise SoftarError(f"task dataset {path}: counts must map train/valid/test to positive record counts")
    task = get_task(meta["task"])
    online = getattr(task, "online", False)
    if online:
        try:
            task.check_generator(meta.get("generator"))
        except SoftarError as e:
            raise SoftarError(f"task dataset {path}: {e}") from None
    elif "generator" in meta:
        raise SoftarError(f"task dataset {path}: {meta['task']} reads fixed splits; a generator is for a task that "
                          "generates its questions")
    for split in ("train", "valid", "test"):
        file = Path(data_dir) / f"{split}.json"
        if split == "train" and online and file.exists():
            raise SoftarError(f"task dataset {data_dir}: {meta['task']} generates its training questions; a "
                              "train.json there is not its own")
        if split != "test" and not (split == "train" and online) and not file.exists():
            raise SoftarError(f"task dataset {data_dir}: missing {split}.json")
        if file.exists() and sha256_file(file) != meta["sha256"].get(split):
            raise SoftarError(f"task dataset {data_dir}: {split}.json is not the file task.json records (changed "
                              "since `softar task prepare`?)")
    if getattr(task, "own_vocabulary", True) != bool(meta["vocab_size"]):
        raise SoftarError(f"task dataset {path}: vocab_size {meta['vocab_size']} is wrong for {meta['task']} (0 for "
                          "free text, which the model's tokenizer reads)")
    if meta["vocab_size"]:
        tok = load_tokenizer(data_dir, meta["vocab_size"])
        if getattr(tok, "words", None) != VOCABULARY:
            raise SoftarError(f"task dataset {data_dir}: its tokenizer is not softar's task vocabulary")
    return meta


def task_tokenizer(cfg, data_dir: str | Path | None = None):
    """What a task run reads its records with: softAR's task vocabulary, or with model.hf the model's own tokenizer
    with the task's markers added (`HFTokenizer.add_task_tokens`), the text tokenized as the model reads text."""
    if cfg.model.hf:
        return HFTokenizer(cfg.model.hf).add_task_tokens()
    if data_dir is None:
        return TaskTokenizer(VOCABULARY)
    meta = load_task_meta(data_dir)
    if not meta["vocab_size"]:
        raise SoftarError(f"task dataset {data_dir}: {meta['task']} records are free text, which only a model's "
                          "own tokenizer reads: set model.hf")
    return load_tokenizer(data_dir, meta["vocab_size"])


def training_depths(task, meta: dict) -> list[int]:
    """The depths a task config (task.depths, task.depth_iters) trains on, from its dataset's task.json: task.depths,
    else every depth of the dataset's generator; [] for a task with fixed splits. Depths it cannot train on are a
    one-line error."""
    gen = meta.get("generator")  # only a generating task's dataset holds one (`load_task_meta`)
    if (task.depths or task.depth_iters) and not gen:
        raise SoftarError(f"task.{'depths' if task.depths else 'depth_iters'}: {meta['task']} reads fixed splits; "
                          "choosing depths needs a task that generates its questions")
    if gen and set(task.depths) - set(gen["depths"]):
        raise SoftarError(f"task.depths: {task.depths} are not all among the dataset's depths {gen['depths']}")
    return sorted(task.depths or (gen or {}).get("depths", []))


def depths_at(task, generator: dict, step: int) -> list[int]:
    """The depths a generating task draws from at an optimizer step: task.depths (else all its `generator`'s), and
    with task.depth_iters the shallowest of them for the first depth_iters steps after the recall warm-up, one more
    every depth_iters steps."""
    depths = sorted(task.depths or generator["depths"])
    if not task.depth_iters:
        return depths
    return depths[: max(step - task.recall_iters, 0) // task.depth_iters + 1]


def batch_generator(task: Task, generator: dict, cfg) -> Callable[[random.Random, int, int], list[dict]]:
    """A generating task's training batches, `(rng, n, step)` -> n fresh questions at the depths `depths_at` admits
    at the step; a curriculum mode's all at one depth (one question length, so its thought slots line up)."""
    aligned = MODES[cfg.mode].curriculum
    return lambda rng, n, step: task.generate(rng, {**generator, "depths": depths_at(cfg, generator, step)}, n, aligned)


def recall_at(task, step: int) -> bool:
    """Whether an optimizer step trains associative recall: the warm-up's first task.recall_iters steps, and after
    them every task.recall_every-th step (replay)."""
    after = step - task.recall_iters
    return after < 0 or bool(task.recall_every) and after % task.recall_every == task.recall_every - 1


def stage_iters(task, max_iters: int) -> int:
    """Optimizer steps per curriculum stage: task.stage_iters, or the steps after the recall warm-up over
    (max_stage + 1) when it is 0 (a resolved config holds the number, so a resumed run keeps its curriculum)."""
    return task.stage_iters or max(1, (max_iters - task.recall_iters) // (task.max_stage + 1))


@dataclass(frozen=True)
class Example:
    """A record as token ids: question + <bot>, each step, <ans> + answer + <eos>."""

    question: list[int]
    steps: list[list[int]]
    answer: list[int]


class Encoder:
    """Renders a task's records and builds the token sequences of each training mode and curriculum stage."""

    def __init__(self, task: Task, tokenizer, rendering: str, cfg):
        if rendering not in task.renders:
            raise SoftarError(f"task.render: {task.name} offers {', '.join(task.renders)}, not {rendering!r}")
        self.task, self.tok, self.rendering, self.cfg = task, tokenizer, rendering, cfg
        self.id = {w: tokenizer.stoi[w] for w in ("<eos>", "<bot>", "<eot>", "<thought>", "<pause>", "<ans>")}
        self.bos = len(tokenizer.encode_prompt(""))  # tokens a prompt starts with (Llama's BOS), its own

    def example(self, record: dict, where: str = "") -> Example:
        """A record as ids; a word outside the vocabulary, or a special token (<thought>, <ans>, ...) written in
        its text, is a one-line error naming the record."""
        try:
            r = self.task.render(record, self.rendering)
            ex = Example(self.tok.encode_prompt(r.question) + [self.id["<bot>"]],
                         [self.tok.encode(s) for s in r.steps],
                         [self.id["<ans>"], *self.tok.encode(r.answer), self.id["<eos>"]])
            if self.probe_ids(record) is None and isinstance(self.tok, TaskTokenizer):  # the probe must work here
                raise SoftarError("a node name is not one word of the task's vocabulary")
        except SoftarError as e:
            raise SoftarError(f"{where}: {e}") from None
        specials = set(self.id.values())
        question = ex.question[self.bos : -1]
        if any(i in specials for i in question + [i for s in ex.steps for i in s] + ex.answer[1:-1]):
            raise SoftarError(f"{where}: its text holds a special token ({', '.join(self.id)})")
        return ex

    def probe_ids(self, record: dict) -> list[int] | None:
        """The token of each node 0..n-1 (the superposition probe reads their embeddings); None where a name is
        not one token (a Hugging Face tokenizer splits most of them) or the task has no graph."""
        names = self.task.node_tokens(record, self.rendering)
        ids = [self.tok.encode(name) for name in names]
        return [i[0] for i in ids] if names and all(len(i) == 1 for i in ids) else None

    def answer_at(self, ids: list[int]) -> int:
        """Where the answer's <ans> is among generated ids: the last one; len(ids) without one."""
        ans = self.id["<ans>"]
        return len(ids) - 1 - ids[::-1].index(ans) if ans in ids else len(ids)

    def split_answer(self, ids: list[int]) -> tuple[list[str], list[str]]:
        """Generated ids (without <eos>) as the task's words: (the steps, before `answer_at`; the answer, after
        it, empty without <ans>: malformed). Words as the task tokenizer splits them, whatever tokenizer wrote
        them."""
        at = self.answer_at(ids)
        return self.words(ids[:at]), self.words(ids[at + 1 :])

    def words(self, ids: list[int]) -> list[str]:
        return TaskTokenizer.PATTERN.findall(self.tok.decode(ids))

    @property
    def mode(self) -> Mode:
        return MODES[self.cfg.mode]

    def middle(self, stage: int) -> tuple[list[int], int]:
        """The slots between <bot> and <eot> at a curriculum stage, and how many steps they replace."""
        m = self.mode
        return [self.id[m.slot]] * m.slots(self.cfg, stage) if m.slot else [], m.replaced(stage)

    def prompt(self, ex: Example, stage: int, chain_slots: bool = False) -> list[int]:
        """What generation starts from: question, <bot>, the thought or pause slots, <eot>; with `chain_slots`,
        then one <thought> slot where each token of the chain would be written, and <ans> (RL's rl.chain =
        "thoughts": the policy fills the chain's slots, the model writes the answer; the chain's length and its end
        are given, so what is learned is the chain's content)."""
        prompt = ex.question + self.middle(stage)[0] + [self.id["<eot>"]]
        if chain_slots:
            prompt += [self.id["<thought>"]] * sum(len(s) for s in ex.steps) + [self.id["<ans>"]]
        return prompt

    def sequence(self, ex: Example, stage: int) -> tuple[list[int], int]:
        """The whole training sequence and the index of its <eot> (the loss covers what follows it)."""
        mid, skip = self.middle(stage)
        written = ex.steps[skip:][::-1] if self.mode.reversed_steps else ex.steps[skip:]
        steps = [t for s in written for t in s] if self.mode.writes_steps else []
        prompt = ex.question + mid + [self.id["<eot>"]]
        return prompt + steps + ex.answer, len(prompt) - 1

    def stage_at(self, step: int, max_iters: int) -> int:
        """The curriculum stage at an optimizer step (0 for a mode without a curriculum, and during the recall
        warm-up): stage k for stage_iters steps each after the warm-up, the last stage for the rest."""
        c = self.cfg
        if not self.mode.curriculum:
            return 0
        return min(max(step - c.recall_iters, 0) // stage_iters(c, max_iters), c.max_stage)

    def final_stage(self) -> int:
        return self.cfg.max_stage if self.mode.curriculum else 0

    def batch(self, examples: list[Example], stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets [B, L] (right-padded with <eos> and -1); targets are -1 up to <eot>."""
        seqs = [self.sequence(ex, stage) for ex in examples]
        L = max(len(s) for s, _ in seqs) - 1
        x = torch.full((len(seqs), L), self.id["<eos>"], dtype=torch.long)
        y = torch.full((len(seqs), L), -1, dtype=torch.long)
        for i, (s, eot) in enumerate(seqs):
            t = torch.tensor(s)
            x[i, : len(s) - 1], y[i, eot : len(s) - 1] = t[:-1], t[eot + 1 :]
        return x, y


class TaskSampler:
    """Random training batches of examples whose questions have one length, so the thought slots of a batch sit
    at the same positions and continuous thoughts run through the KV cache for the whole batch (an example is
    drawn uniformly, then its batch from its length group). A task with a generator (`generate(rng, n, step)` -> n
    records, at the depths of the step's curriculum) draws fresh questions instead, each batch from its own seeded
    generator; the recall warm-up's batches and its replays are recall (`recall_at`, `softar.tasks.recall`). Under data
    parallelism every rank draws the same global batch and keeps its own slice. Its state (a generator and the
    batches drawn, which set the curriculum stage and the depths) checkpoints as one uint8 tensor and resumes
    exactly."""

    def __init__(self, encoder: Encoder, examples: list[Example], batch_size: int, seed: int, max_iters: int,
                 grad_accum: int = 1, rank: int = 0, world: int = 1,
                 generate: Callable[[random.Random, int, int], list[dict]] | None = None):
        self.enc, self.examples, self.batch_size = encoder, examples, batch_size
        self.max_iters, self.grad_accum, self.rank, self.world = max_iters, grad_accum, rank, world
        self.seed, self.generate = seed, generate
        groups: dict[int, list[int]] = {}
        for i, ex in enumerate(examples):
            groups.setdefault(len(ex.question), []).append(i)
        self.group_of = [groups[len(ex.question)] for ex in examples]
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn = 0

    @property
    def stage(self) -> int:
        return self.enc.stage_at(self.drawn // self.grad_accum, self.max_iters)

    def stage_begins(self, step: int) -> bool:
        """Whether a curriculum stage other than the first begins at this optimizer step."""
        return step > 0 and self.enc.stage_at(step, self.max_iters) != self.enc.stage_at(step - 1, self.max_iters)

    def next_indices(self) -> list[int]:
        """This rank's examples of the next batch, as indices into `examples`."""
        n = self.batch_size * self.world
        first = int(torch.randint(len(self.examples), (1,), generator=self.gen))
        group = self.group_of[first]
        picks = torch.randint(len(group), (n,), generator=self.gen).tolist()
        self.drawn += 1
        return [group[j] for j in self.mine(picks)]

    def batch_rng(self) -> random.Random:
        """The next batch's own generator (a resume draws the same batch again), the batch counted as drawn."""
        rng = random.Random(f"{self.seed}:{self.drawn}")
        self.drawn += 1
        return rng

    def mine(self, rows):
        """This rank's slice of a global batch."""
        return rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        stage, cfg, n = self.stage, self.enc.cfg, self.batch_size * self.world  # stage: of the batch to draw
        if recall_at(cfg, self.drawn // self.grad_accum):
            x, y = recall_batch(self.batch_rng(), self.enc.tok.stoi, n, cfg.recall_pairs)
            return self.mine(x), self.mine(y)
        if self.generate is not None:
            step = self.drawn // self.grad_accum
            records = self.mine(self.generate(self.batch_rng(), n, step))
            return self.enc.batch([self.enc.example(r, "a generated question") for r in records], stage)
        return self.enc.batch([self.examples[i] for i in self.next_indices()], stage)

    def state(self) -> torch.Tensor:
        count = torch.from_numpy(np.array([self.drawn], dtype=np.int64).view(np.uint8).copy())
        return torch.cat([self.gen.get_state(), count])

    def load_state(self, state: torch.Tensor) -> None:
        self.gen.set_state(state[:-8].clone())
        self.drawn = int(state[-8:].numpy().view(np.int64)[0])

