"""What the Trainer trains on. A workload owns its data, draws its batches and evaluates the model, behind one small
interface, so the Trainer (`softar.train`) has no branch of its own for any of them:

- `LanguageModeling`: a corpus prepared by `softar prepare`; windows of the layout's token slots (with their
  history); sampled-batch losses during training, the whole val split at the end.
- `ReasoningTask`: a task dataset from `softar task prepare` (`cfg.task`); questions of one length per batch, with
  the curriculum stage following the step; greedy accuracy on valid during training, every stage at the end.

Every batch is (inputs, targets[, history ids, history lengths]), which the model's forward turns into (loss, parts).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np
import torch

from softar import SoftarError
from softar.config import Config, ConfigError
from softar.data.dataset import WindowSampler, load_meta, load_split
from softar.data.synthetic import Binding, load_language
from softar.data.tokenizer import load_tokenizer
from softar.distributed import World
from softar.evaluate.lm import estimate_loss, evaluate_split
from softar.evaluate.reasoning import TaskData, evaluate_task, task_loss_on
from softar.model.embedding import embedding_stats
from softar.soft.window import Layout
from softar.tasks.data import TaskSampler, batch_generator, training_depths
from softar.tasks.recall import recall_accuracy


class Trainer(Protocol):
    """What a workload's evaluations read of the run being trained (`softar.train.Trainer`)."""

    cfg: Config
    net: torch.nn.Module  # the SoftAR
    model: torch.nn.Module  # the SoftAR, or its DDP/FSDP wrapper
    fwd: torch.nn.Module  # `model`, or its compiled form
    amp: object  # the autocast context
    device: torch.device
    world: World
    step: int
    layout: Layout


class Workload:
    unit: ClassVar[str] = "tokens"  # what throughput counts
    vocab_size: int

    def check(self, cfg: Config, layout: Layout) -> None:
        """Before the model is built: a ConfigError if the data does not fit the resolved config."""

    def sampler(self, cfg: Config, world: World, layout: Layout):
        """The training batches: `next_batch()`, and a `state()` tensor that checkpoints with the run."""
        raise NotImplementedError

    def units_per_batch(self, layout: Layout) -> int:
        """`unit`s in one sequence of a batch."""
        raise NotImplementedError

    def evaluate(self, trainer: Trainer) -> dict:
        """The periodic evaluation's figures."""
        raise NotImplementedError

    def final(self, trainer: Trainer) -> dict:
        """The final evaluation on the whole valid split (never test): at least its "loss"."""
        raise NotImplementedError

    def result(self, final: dict) -> dict:
        """What of the final evaluation goes into result.json, beside val_loss."""
        return {}


class LanguageModeling(Workload):
    def __init__(self, cfg: Config):
        self.dir = cfg.data.dir
        self.meta = load_meta(self.dir)
        load_tokenizer(self.dir, self.meta["vocab_size"])  # a corrupt tokenizer fails now, not at sampling
        self.vocab_size = self.meta["vocab_size"]
        self.train_data: np.ndarray | None = None
        self.val_data: np.ndarray | None = None

    def check(self, cfg: Config, layout: Layout) -> None:
        self.train_data, self.val_data = load_split(self.dir, "train"), load_split(self.dir, "val")
        block = cfg.model.block_size
        for name, data in (("train", self.train_data), ("val", self.val_data)):
            if len(data) <= block:
                raise ConfigError(f"model.block_size: {block} is not smaller than the {name} split ({len(data)} "
                                  "tokens)")
        if len(self.train_data) <= layout.token_slots + layout.history:
            raise ConfigError(f"context.max_history: {layout.history} tokens of history plus a window do not fit in "
                              f"the train split ({len(self.train_data)} tokens)")
        # sampled evals: as much history as the (smaller) val split allows
        self.eval_history = min(layout.history, len(self.val_data) - layout.token_slots - 1)
        self.queries: torch.Tensor | None = None  # with data.targets = "queries": each train token's fact
        if cfg.data.targets == "queries":
            lang = load_language(self.dir)
            if not isinstance(lang, Binding):
                raise ConfigError(f"data.targets: 'queries' needs binding data (softar prepare --synthetic binding), "
                                  f"not {self.dir}")
            if layout.token_slots + layout.history < 4:  # the last fact's key, value, ";" and the first query's key
                raise ConfigError(f"data.targets: a context of {layout.token_slots} tokens plus "
                                  f"{layout.history} of history never holds a query together with its fact")
            self.queries = torch.from_numpy(lang.fact_positions(self.train_data))
            if not (self.queries >= 0).any():
                raise ConfigError(f"data.targets: the train split of {self.dir} holds no whole document")

    def sampler(self, cfg: Config, world: World, layout: Layout) -> WindowSampler:
        t = cfg.train
        windows = WindowSampler(self.train_data, layout.token_slots, t.batch_size, t.seed, world.rank, world.size,
                                layout.history)
        return windows if self.queries is None else QueryTargets(windows, self.queries)

    def units_per_batch(self, layout: Layout) -> int:
        return layout.token_slots

    def evaluate(self, trainer: Trainer) -> dict:
        t, step = trainer.cfg.train, trainer.step
        kw = dict(token_slots=trainer.layout.token_slots, batch_size=t.batch_size, iters=t.eval_iters,
                  device=trainer.device, autocast_ctx=trainer.amp, history=self.eval_history)
        E = trainer.net.E
        E = E.full_tensor() if hasattr(E, "full_tensor") else E  # FSDP2 shards it
        return {"train_loss": estimate_loss(trainer.fwd, self.train_data, seed=t.seed + step, **kw),
                "val_loss": estimate_loss(trainer.fwd, self.val_data, seed=t.seed + step + 1, **kw),
                **{f"E_{k}": v for k, v in embedding_stats(E).items()}}

    def final(self, trainer: Trainer) -> dict:
        if trainer.net.regression_only:  # its LM head never trained: the val loss goes through the cosine readout
            trainer.net.fit_cosine_readout(self.train_data)
        lay = trainer.layout
        return evaluate_split(trainer.model, self.val_data, lay.token_slots, trainer.device, trainer.amp,
                              self.meta["characters"]["val"], world=trainer.world, history=lay.history, soft=lay.soft)

    def result(self, final: dict) -> dict:
        return {"val_bits_per_token": final["bits_per_token"], "val_bits_per_char": final.get("bits_per_char"),
                **{f"val_{k}": final[k] for k in ("loss_hard_slots", "loss_soft_slots") if k in final}}


class QueryTargets:
    """A WindowSampler whose targets are -1 (not scored) except the binding queries' values whose fact (key and
    value) lies in the window or its counted history: dense supervision of the lookup. A global batch without one
    such target (possible only with short contexts) is drawn again, the same way on every rank."""

    REDRAWS = 1000

    def __init__(self, windows: WindowSampler, fact: torch.Tensor):
        self.windows, self.fact = windows, fact  # `Binding.fact_positions` of the windows' split

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        for _ in range(self.REDRAWS):
            starts, lens = self.windows.draw()
            first = starts if lens is None else starts - lens  # each context's first token
            fact = self.fact[starts[:, None] + 1 + torch.arange(self.windows.length)]  # [B, T] each target's fact
            keep = fact - 1 >= first[:, None]  # the fact's key is in the context too
            if keep.any():
                batch = self.windows.windows_at(*self.windows.mine(starts, lens))
                rows = self.windows.mine(torch.arange(len(starts)), None)[0]
                return (batch[0], torch.where(keep[rows], batch[1], -1), *batch[2:])
        raise SoftarError(f"data.targets: {self.REDRAWS} batches of windows held no query together with its fact")

    def state(self) -> torch.Tensor:
        return self.windows.state()

    def load_state(self, state: torch.Tensor) -> None:
        self.windows.load_state(state)


class ReasoningTask(Workload):
    unit = "examples"  # their lengths vary

    def __init__(self, cfg: Config):
        self.data = TaskData.open(cfg)
        self.vocab_size = self.data.encoder.tok.vocab_size  # with model.hf, the model's own and the task's markers

    def check(self, cfg: Config, layout: Layout) -> None:
        for split in self.data.examples:  # valid holds every depth a generating task trains on
            self.data.check_fits(split, cfg.model.block_size, f"model.block_size ({split}.json)")
        k = cfg.task
        depths = training_depths(k, self.data.meta)
        if k.depth_iters and k.recall_iters + k.depth_iters * (len(depths) - 1) >= cfg.train.max_iters:
            raise ConfigError(f"task.depth_iters: {k.depth_iters} steps per depth leave depth {max(depths)} "
                              f"untrained within train.max_iters ({cfg.train.max_iters})")
        recall = 6 * cfg.task.recall_pairs + 2
        if (cfg.task.recall_iters or cfg.task.recall_every) and recall > cfg.model.block_size:
            raise ConfigError(f"task.recall_pairs: {cfg.task.recall_pairs} pairs make {recall}-slot recall "
                              f"sequences, more than model.block_size ({cfg.model.block_size})")

    def sampler(self, cfg: Config, world: World, layout: Layout) -> TaskSampler:
        t, task, meta = cfg.train, self.data.task, self.data.meta
        generate = batch_generator(task, meta["generator"], cfg.task) if getattr(task, "online", False) else None
        return TaskSampler(self.data.encoder, self.data.examples.get("train", []), t.batch_size, t.seed,
                           t.max_iters, t.grad_accum, world.rank, world.size, generate)

    def units_per_batch(self, layout: Layout) -> int:
        return 1

    def evaluate(self, trainer: Trainer) -> dict:
        """The stage just trained: loss and greedy accuracy on the first task.eval_examples valid examples."""
        t = trainer.cfg.train
        k, limit = self.data.encoder.stage_at(max(trainer.step - 1, 0), t.max_iters), trainer.cfg.task.eval_examples
        report = evaluate_task(trainer.net, self.data, "valid", [k], limit)
        return {"stage": k, "val_loss": task_loss_on(trainer.net, self.data, "valid", k, t.batch_size, limit,
                                                     trainer.device),
                "val_accuracy": report[f"stage_{k}"]["accuracy"], **self.recall(trainer)}

    def recall(self, trainer: Trainer) -> dict:
        """With a recall warm-up: the model's accuracy on the fixed recall sequences (did the warm-up take?)."""
        task = trainer.cfg.task
        if not (task.recall_iters or task.recall_every):
            return {}
        return {"recall_accuracy": recall_accuracy(trainer.net, self.data.encoder.tok.stoi, task.recall_pairs,
                                                   trainer.device)}

    def final(self, trainer: Trainer) -> dict:
        """The loss and greedy accuracy at the mode's final stage, and with a curriculum the accuracy at each of its
        stages."""
        enc = self.data.encoder
        final = enc.final_stage()
        report = evaluate_task(trainer.net, self.data, "valid", list(range(final + 1)) if final else [final])
        loss = task_loss_on(trainer.net, self.data, "valid", final, trainer.cfg.train.batch_size, None,
                            trainer.device)
        return {"loss": loss, "accuracy": report["accuracy"], "stage": final, "report": report,
                **self.recall(trainer)}

    def result(self, final: dict) -> dict:
        return {"val_accuracy": final["accuracy"], "stage": final["stage"],
                **({"recall_accuracy": final["recall_accuracy"]} if "recall_accuracy" in final else {}),
                **({"val_sampled": final["sampled"]} if "sampled" in final else {})}


def open_workload(cfg: Config) -> Workload:
    """The workload a config trains on: its reasoning task (task.name), else its text corpus."""
    return ReasoningTask(cfg) if cfg.task.name else LanguageModeling(cfg)
