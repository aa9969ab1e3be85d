"""The training loop: AdamW with decay groups, warmup + cosine LR, clipping, accumulation, periodic evals,
metrics (metrics.jsonl + TensorBoard + tqdm), atomic checkpoints and exact resume; data parallel under torchrun;
a clean stop on SIGTERM/SIGINT; non-finite steps skipped, counted, and fatal when they persist."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import softar
from softar import RECEIVED, Preempted, SoftarError
from softar.checkpoint import (
    TRAINER_JSON,
    check_optimizer_state,
    check_state,
    latest_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
)
from softar.config import Config, ConfigError, diff, resolve
from softar.device import autocast, set_threads
from softar.disk import check_fields, read_jsonl, write_text_atomic
from softar.distributed import World, init_world, no_sync, wrap
from softar.losses import part_names
from softar.rundir import (
    CHECKPOINTS,
    CONFIG_FILE,
    METRICS_FILE,
    RESULT_FILE,
    RUN_FILE,
    RunLock,
    check_data,
    check_hf,
    data_fingerprint,
    hf_source,
    load_embedding,
    load_init_weights,
    load_model_checkpoint,
    read_config,
)
from softar.soft.model import SoftAR, build_model
from softar.soft.window import Layout
from softar.workloads import open_workload

# keys a resumed run may change without changing its history (batch_size: per rank, when the world size changes
# and the global batch stays the same, which _load checks)
RESUMABLE_KEYS = {"train.max_iters", "train.batch_size", "train.check_memory",
                  "model.hf"}  # a moved folder: check_hf compares its files' checksum instead
# trainer.json: the training state a checkpoint carries beside its tensors
TRAINER_FIELDS = {"step": int, "wall_s": float, "train_s": float, "skipped_steps": int, "world_size": int,
                  "optimizer": dict, "config": {"train": {"batch_size": int}}}


def lr_at(step: int, t, restart: int = 0, first_lr: float = 0.0) -> float:
    """Linear warmup, then cosine decay from lr to min_lr over lr_decay_iters (nanoGPT's schedule). With `restart`
    (the end of a recall warm-up) the run has two phases, each on its own schedule, warm-up included: the first
    decays over `restart` steps (from `first_lr` if set, else lr), the second over the steps left, as a fine-tuning
    run would start afresh."""
    if restart:
        first = step < restart
        step, decay = (step, restart) if first else (step - restart, max(1, t.lr_decay_iters - restart))
        t = dataclasses.replace(t, lr_decay_iters=decay, lr=first_lr if first and first_lr else t.lr)
    if step < t.warmup_iters:
        return t.lr * (step + 1) / (t.warmup_iters + 1)
    if step >= t.lr_decay_iters:
        return t.min_lr
    ratio = (step - t.warmup_iters) / max(1, t.lr_decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)


def warn_if_warm_up_failed(row: dict) -> None:
    """One stderr line if the eval at the recall warm-up's end shows it did not take: the task phase would start
    without the lookup its questions are made of, and no comparison of that run would be above the floor."""
    from softar.tasks.recall import WARM_UP_TOOK

    acc = row.get("recall_accuracy")
    if acc is not None and acc < WARM_UP_TOOK:
        print(f"softar: warning: step {row['step']}: the recall warm-up ended at recall accuracy {acc:.2f}, below "
              f"{WARM_UP_TOOK}: it did not take, and the task starts without the lookup (docs/reasoning.md)",
              file=sys.stderr)


def make_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.AdamW:
    """Weight decay on matrices (linear weights, embeddings); none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")


def optimizer_step(model: torch.nn.Module, fwd, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, ...]],
                   grad_clip: float, amp, world: World | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The one training step, which `softar bench train` times too: forward and backward over the micro-batches
    (x, y[, history ids, history lengths]), gradients synchronised on the last one only, then `apply_update`. `fwd`
    is `model` or its compiled form. Returns (mean loss over ranks, mean loss parts over ranks [P] in the
    objective's order, skipped)."""
    world = world or World()
    sums = None
    for micro, (x, y, *hist) in enumerate(batches):
        with no_sync(model, micro == len(batches) - 1):  # FSDP2 reads it during backward
            with amp:
                loss, parts = fwd(x, targets=y, history=tuple(hist) or None)
                loss = loss / len(batches)
            loss.backward()
        stacked = torch.stack([loss.detach(), *(v.detach() / len(batches) for v in parts.values())])
        sums = stacked if sums is None else sums + stacked
    means = world.mean(sums)
    return means[0], means[1:], apply_update(model, opt, sums[0], grad_clip, world)


def apply_update(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float,
                 world: World) -> bool:
    """With the gradients of `loss` in place (and synchronised): clipping, then the optimizer step unless the loss
    or the gradient norm is non-finite on any rank; the gradients are cleared either way. -> whether it skipped."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    device = next(model.parameters()).device
    bad = world.any(not (math.isfinite(loss.item()) and math.isfinite(norm.item())), device)
    if not bad:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return bad


STARTUP_FILES = {RUN_FILE}  # all a run directory holds if a start was killed before its config was saved


def _check_run_dir(out: Path, cfg: Config, resume: bool, derived_decay: bool = False, hf: dict | None = None) -> None:
    """Refuse to mix runs: a fresh run needs an empty directory (or the leftovers of a killed start); a resume
    needs the same config and data (train.max_iters may change, and with it train.lr_decay_iters when that is
    derived from it: `derived_decay`) and, for `model.hf`, the same folder (`hf`: its `hf_source`)."""
    if out.exists() and not out.is_dir() or out.is_symlink():
        raise SoftarError(f"--out {out} exists and is not a directory")
    for name, want_dir in ((CHECKPOINTS, True), ("tb", True), (METRICS_FILE, False), (CONFIG_FILE, False),
                           (RUN_FILE, False), (RESULT_FILE, False)):
        entry = out / name  # a link could lead writes (and pruning) into another folder
        if entry.is_symlink() or entry.exists() and entry.is_dir() != want_dir:
            raise SoftarError(f"{entry} is a link or not a plain {'folder' if want_dir else 'file'}; this run "
                              "directory was tampered with")
    if (out / CONFIG_FILE).is_file():
        if not resume:
            raise SoftarError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        resumable = RESUMABLE_KEYS | ({"train.lr_decay_iters"} if derived_decay else set())
        changed = [k for k in diff(read_config(out), cfg) if k not in resumable]
        if changed:
            raise SoftarError(f"{out} holds a different run (differs in {', '.join(changed)})")
        check_data(out, cfg.data.dir)
        check_hf(out, cfg, hf)
    elif resume:
        raise SoftarError(f"nothing to resume in {out} (no {CONFIG_FILE})")
    elif out.exists() and any(p.name not in STARTUP_FILES and not p.name.startswith(".") for p in out.iterdir()):
        raise SoftarError(f"{out} exists and is not empty; choose another --out")


class MetricsLog:
    """metrics.jsonl (every step's loss, every eval) plus TensorBoard scalars."""

    def __init__(self, run_dir: Path, start_step: int):
        self.path = run_dir / METRICS_FILE
        if self.path.is_file():  # drop what was logged after the checkpoint we resume from
            rows, torn = read_jsonl(self.path, "metrics")
            if torn:
                print(f"softar: warning: {self.path} ended in a torn line (a write cut short); dropped it",
                      file=sys.stderr)
            keep = [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= start_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k not in ("step", "kind") and isinstance(v, int | float):
                self.tb.add_scalar(f"{row['kind']}/{k}", v, row["step"])

    def flush(self) -> None:
        self.file.flush()
        self.tb.flush()

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def _full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state (keyed by parameter name): the same at any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)


def _load_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, model_sd: dict, opt_sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    set_optimizer_state_dict(model, opt, opt_sd, options=opts)


def _rng_states(world: World, device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG state (dropout draws differ per rank), gathered for rank 0 to save."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for kind, state in states.items():
        gathered = [state]
        if world.active:  # NCCL gathers device tensors only
            import torch.distributed as dist

            local = state.to(device)
            gathered = [torch.empty_like(local) for _ in range(world.size)]
            dist.all_gather(gathered, local)
        for r, g in enumerate(gathered):
            out[f"rng_{kind}_rank{r}"] = g.cpu()
    return out


def _set_rng_states(states: dict[str, torch.Tensor], world: World, device: torch.device, fallback_seed: int) -> None:
    """Restore this rank's RNG; a rank the checkpoint did not have (the world grew) gets a fresh seed."""
    if f"rng_cpu_rank{world.rank}" not in states:
        torch.manual_seed(fallback_seed + world.rank)
        return
    torch.set_rng_state(states[f"rng_cpu_rank{world.rank}"].cpu())
    if device.type == "cuda" and f"rng_cuda_rank{world.rank}" in states:
        torch.cuda.set_rng_state(states[f"rng_cuda_rank{world.rank}"].cpu(), device)


class Preemption:
    """SIGTERM/SIGINT while training set a flag: the loop finishes its step, saves and exits cleanly. In the
    phases around it (`immediate`: startup, the final evaluation) they raise `Preempted` at once."""

    def __init__(self):
        self.signum: int | None = None
        self.immediate = True
        self._old = {}

    def __enter__(self) -> Preemption:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        if RECEIVED:  # the command took a signal whose Preempted was lost: stop now, as it would have
            self.__exit__()
            raise Preempted(RECEIVED[0])
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        if self.immediate:
            raise Preempted(signum)

    def set_immediate(self, immediate: bool) -> None:
        self.immediate = immediate
        if immediate and self.signum is not None:
            raise Preempted(self.signum)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """One training run in one run directory, on one process or under torchrun."""

    def __init__(self, cfg: Config, out: str | Path, resume: bool = False, quiet: bool = False,
                 stack: contextlib.ExitStack | None = None):
        """`stack` keeps the run directory's lock until the caller is done with the run."""
        self.out, self.quiet = Path(out), quiet
        self.workload = open_workload(cfg)  # a text corpus or a reasoning task: its data, batches and evaluations
        self.hf = hf_source(cfg) if cfg.model.hf else None  # the pretrained folder, checked against the data
        derived_decay = cfg.train.lr_decay_iters == 0
        cfg = resolve(cfg, self.workload.vocab_size)
        self.world, self.device = init_world(cfg.train.device)
        _check_run_dir(self.out, cfg, resume, derived_decay, self.hf)  # every rank checks before any writes
        self.cfg, m, t = cfg, cfg.model, cfg.train
        self.layout = Layout.from_config(cfg.context, m.block_size)
        self.workload.check(cfg, self.layout)
        asked_resume = resume
        resume = resume and latest_checkpoint(self.out / CHECKPOINTS) is not None  # none yet: start at step 0
        self.world.barrier()
        set_threads(t.threads)

        if t.check_memory:
            check_memory(cfg, self.device)
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.net: SoftAR = build_model(cfg).to(self.device)  # the model; self.model may be its DDP/FSDP wrapper
        self.net.train()  # a pretrained model loads in eval mode: its dropout is on from the first step, as after evals
        if t.checkpointing:
            self.net.lm.checkpoint_activations()
        self.part_names = part_names(cfg.loss)  # the loss parts logged beside the total
        if m.embedding in ("checkpoint", "pretrained"):
            load_embedding(self.net, cfg)
        self.init_source = load_init_weights(self.net, cfg) if t.init_from and not resume else None
        self.params, self.flops_per_token = self.net.num_params(), self.net.flops_per_token()
        self.model = wrap(self.net, self.world, self.device, t.parallel, self.net.lm.shard_units())  # FSDP2: in place
        self.opt = make_optimizer(self.model, t, self.device)
        torch.manual_seed(t.seed + self.world.rank)  # dropout draws differ per rank
        self.sampler = self.workload.sampler(cfg, self.world, self.layout)
        self.fwd = torch.compile(self.model) if t.compile else self.model
        self.amp = autocast(self.device, t.dtype)
        self.step, self.wall_before, self.train_s, self.skipped = 0, 0.0, 0.0, 0
        if resume and (self.out / METRICS_FILE).exists():
            read_jsonl(self.out / METRICS_FILE, "metrics")  # a damaged log fails now, before anything is written
        if self.world.is_main:  # the first write: from here on this process owns the run directory
            (stack or contextlib.ExitStack()).enter_context(RunLock(self.out))
            _check_run_dir(self.out, cfg, asked_resume, derived_decay, self.hf)  # again, under the lock
        if resume:
            self._load()
        elif self.world.is_main:
            self._start_run_dir()
        if self.world.is_main:
            write_text_atomic(self.out / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2))  # max_iters may grow
        self.world.barrier()

    def _start_run_dir(self) -> None:
        info = {
            "seed": self.cfg.train.seed,
            "argv": sys.argv,
            "data": data_fingerprint(self.cfg.data.dir),
            "versions": {"softar": softar.__version__, "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "platform": platform.platform(),
            "device": str(self.device),
            "world_size": self.world.size,
            "params": self.params,
            "flops_per_token": self.flops_per_token,
            **({"init_from": self.init_source} if self.init_source else {}),
            **({"hf": self.hf} if self.hf else {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_text_atomic(self.out / RUN_FILE, json.dumps(info, indent=2))

    def _load(self) -> None:
        ckpt = load_model_checkpoint(latest_checkpoint(self.out / CHECKPOINTS))
        meta = ckpt.meta
        where = f"checkpoint {ckpt.path}"
        check_fields(meta, TRAINER_FIELDS, f"{where}: {TRAINER_JSON}")
        if meta["world_size"] < 1 or min(meta["wall_s"], meta["train_s"], meta["skipped_steps"]) < 0:
            raise SoftarError(f"{where}: {TRAINER_JSON} holds an impossible state")
        if not 0 <= meta["step"] <= self.cfg.train.max_iters:
            raise SoftarError(f"{where}: step {meta['step']} is outside 0..train.max_iters={self.cfg.train.max_iters}")
        if set(ckpt.tensors) != {"model", "optimizer", "state"} or "sampler" not in ckpt.tensors["state"]:
            raise SoftarError(f"{where}: expected model, optimizer and state tensors")
        check_state(self.net.state_dict(), ckpt.tensors["model"], where)
        check_optimizer_state(dict(self.net.named_parameters()), ckpt.tensors["optimizer"], meta["optimizer"],
                              self.opt.state_dict()["param_groups"], where)
        rng_shape = torch.get_rng_state().shape
        for name, state in ckpt.tensors["state"].items():
            if name.startswith("rng_cpu") and (state.dtype != torch.uint8 or state.shape != rng_shape):
                raise SoftarError(f"{where}: {name} is not a random generator state")
        sampler = ckpt.tensors["state"]["sampler"]
        if sampler.dtype != torch.uint8 or sampler.shape != self.sampler.state().shape:
            raise SoftarError(f"{where}: the sampler state is not a generator state")
        saved_global = meta["config"]["train"]["batch_size"] * meta["world_size"]
        if saved_global != self.cfg.train.batch_size * self.world.size:
            raise SoftarError(f"train.batch_size: {self.cfg.train.batch_size} per rank x {self.world.size} ranks "
                              f"changes the global batch of {saved_global} this run was trained with")
        try:
            opt_sd = optimizer_from_tensors(ckpt.tensors["optimizer"], ckpt.meta["optimizer"])
            _load_full_state(self.model, self.opt, ckpt.tensors["model"], opt_sd)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise SoftarError(f"{where}: its optimizer state does not load ({str(e).splitlines()[0][:80]})") from None
        self.sampler.load_state(ckpt.tensors["state"]["sampler"])
        _set_rng_states(ckpt.tensors["state"], self.world, self.device, self.cfg.train.seed + meta["step"])
        self.step, self.wall_before, self.train_s = meta["step"], meta["wall_s"], meta["train_s"]
        self.skipped = meta["skipped_steps"]

    def save(self, wall: float) -> None:
        model_sd, opt_sd = _full_state(self.model, self.opt)  # collective under FSDP: every rank calls it
        if not all(torch.isfinite(t).all() for t in model_sd.values() if t.is_floating_point()):
            last = latest_checkpoint(self.out / CHECKPOINTS)
            raise SoftarError(f"stopped at step {self.step}: the weights are no longer finite (a learning rate too "
                              f"high?); the last good checkpoint is {last.name if last else 'none'}")
        rng = _rng_states(self.world, self.device)
        if self.world.is_main:
            opt_tensors, opt_plain = optimizer_to_tensors(opt_sd)
            tensors = {"model": model_sd, "optimizer": opt_tensors, "state": {"sampler": self.sampler.state(), **rng}}
            meta = {"step": self.step, "wall_s": wall, "train_s": self.train_s, "skipped_steps": self.skipped,
                    "world_size": self.world.size, "optimizer": opt_plain, "config": self.cfg.to_dict()}
            save_checkpoint(self.out / CHECKPOINTS, self.step, tensors, meta, keep_last=self.cfg.train.keep_last)
        self.world.barrier()

    def evaluate(self) -> dict:
        """The periodic evaluation (the workload's), as a metrics row."""
        return {"kind": "eval", "step": self.step, **self.workload.evaluate(self)}

    def final_evaluation(self) -> dict:
        """The final evaluation (the workload's) on the whole valid split: at least its "loss"."""
        return self.workload.final(self)

    def schedule(self) -> None:
        """This step's learning rate (`lr_at`) on every parameter group. The first step after a recall warm-up
        starts the task as a fine-tuning run would: AdamW's moments cleared, the schedule begun again (carried over,
        the warm-up's state and a learning rate already high wiped the lookup it had learned). With
        task.stage_reset the moments are cleared again as each later curriculum stage begins."""
        k, restart = self.cfg.task, self.cfg.task.recall_iters
        new_stage = k.stage_reset and self.sampler.stage_begins(self.step)
        if restart and self.step == restart or new_stage:
            self.opt.state.clear()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.cfg.train, restart, k.recall_lr)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step over grad_accum micro-batches at this step's learning rate: (mean loss over ranks,
        mean loss parts, whether it was skipped as non-finite)."""
        t = self.cfg.train
        self.schedule()
        batches = [tuple(v.to(self.device, non_blocking=True) for v in self.sampler.next_batch())
                   for _ in range(t.grad_accum)]
        loss, parts, bad = optimizer_step(self.model, self.fwd, self.opt, batches, t.grad_clip, self.amp, self.world)
        self.step += 1
        return loss, parts, bad

    def run(self, preempt: Preemption) -> dict:
        t = self.cfg.train
        main = self.world.is_main
        log = MetricsLog(self.out, self.step) if main else None
        unit = self.workload.unit  # throughput counts predicted tokens, or examples for a task (their lengths vary)
        tokens_per_step = t.batch_size * t.grad_accum * self.world.size * self.workload.units_per_batch(self.layout)
        pending: list[tuple[int, float, torch.Tensor]] = []  # [loss, *parts] stays on device until a log flush
        bar = tqdm(total=t.max_iters, initial=self.step, disable=self.quiet or not main or None,
                   dynamic_ncols=True, unit="it")
        clock = {"t": time.perf_counter(), "step": self.step, "other": 0.0}  # throughput window, evals excluded
        t0, last_eval, bad_run = time.perf_counter(), None, 0

        def flush() -> None:
            if not pending:
                return
            now = time.perf_counter()
            busy = max(now - clock["t"] - clock["other"], 1e-9)
            self.train_s += busy
            tok_s = (self.step - clock["step"]) * tokens_per_step / busy
            values = torch.stack([p[2] for p in pending]).tolist()  # one device sync per flush
            losses = [v[0] for v in values]
            if main:
                for (s, lr_s, _), v in zip(pending, values, strict=True):
                    log.write({"kind": "train", "step": s, "loss": v[0], "lr": lr_s,
                               **dict(zip(self.part_names, v[1:], strict=True))})
                log.write({"kind": "perf", "step": self.step, f"{unit}_per_s": tok_s,
                           "wall_s": self.wall_before + now - t0})  # since the run began, resumes included
                log.flush()
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tok_s:,.0f}")
            bar.update(len(pending))
            pending.clear()
            clock.update(t=now, step=self.step, other=0.0)

        preempt.set_immediate(False)  # while training: finish the step, save, stop
        while self.step < t.max_iters:
            loss, parts, bad = self.train_step()
            pending.append((self.step, self.opt.param_groups[0]["lr"], torch.cat([loss[None], parts])))
            if bad:
                self.skipped += 1
                bad_run += 1
                if main:
                    log.write({"kind": "skip", "step": self.step, "skipped_steps": self.skipped})
                if bad_run >= t.max_bad_steps:
                    flush()
                    last = latest_checkpoint(self.out / CHECKPOINTS)
                    raise SoftarError(
                        f"stopped at step {self.step}: {bad_run} consecutive steps with non-finite loss or "
                        f"gradients; the last good checkpoint is {last.name if last else 'none'}")
            else:
                bad_run = 0
            stop = self.world.any(preempt.signum is not None, self.device)
            is_last = self.step == t.max_iters
            warm_up_ends = self.step == self.cfg.task.recall_iters  # evaluated whatever eval_interval: did it take?
            do_eval = self.step % t.eval_interval == 0 or is_last or warm_up_ends
            # no periodic save inside a run of skipped steps: the latest checkpoint stays the last good one
            do_save = ((self.step % t.ckpt_interval == 0 or is_last) and bad_run == 0) or stop
            if self.step % t.log_interval == 0 or do_eval or do_save:
                flush()
            e0 = time.perf_counter()
            if do_eval and not stop:
                last_eval = self.evaluate()
                if main:
                    log.write(last_eval)
                if main and not self.quiet:
                    bar.write(f"step {self.step}: " + ", ".join(
                        f"{k.replace('_', ' ')} {last_eval[k]:.4f}" for k in ("train_loss", "val_loss", "val_accuracy")
                        if k in last_eval))
            if main and warm_up_ends and not stop:
                warn_if_warm_up_failed(last_eval)
            if do_save:
                self.save(self.wall_before + time.perf_counter() - t0)
            clock["other"] += time.perf_counter() - e0
            if stop:
                bar.close()
                if main:
                    log.close()
                name = signal.Signals(preempt.signum).name if preempt.signum else "a signal on another rank"
                return {"run_dir": str(self.out), "step": self.step, "preempted": True, "signal": name,
                        "checkpoint": str(latest_checkpoint(self.out / CHECKPOINTS))}
        bar.close()
        train_wall = self.wall_before + time.perf_counter() - t0

        try:  # the checkpoint of the last step is saved: a signal now stops at once, and --resume evaluates
            preempt.set_immediate(True)
            full_val = self.final_evaluation()
        except Preempted as stopped:
            if main:
                log.close()
            return {"run_dir": str(self.out), "step": self.step, "preempted": True, "signal": str(stopped),
                    "phase": "the final evaluation", "checkpoint": str(latest_checkpoint(self.out / CHECKPOINTS))}
        if not math.isfinite(full_val["loss"]):
            last = latest_checkpoint(self.out / CHECKPOINTS)
            raise SoftarError(f"the run ended at step {self.step} with a non-finite val loss (diverged weights, a "
                              f"learning rate too high?); the latest checkpoint is {last.name if last else 'none'}")
        result = {
            "run_dir": str(self.out),
            "step": self.step,
            "val_loss": full_val["loss"],
            **self.workload.result(full_val),
            "val_loss_sampled": last_eval.get("val_loss") if last_eval else None,
            "train_loss_sampled": last_eval.get("train_loss") if last_eval else None,
            "skipped_steps": self.skipped,
            "world_size": self.world.size,
            "train_wall_s": train_wall,
            f"{unit}_per_s": self.step * tokens_per_step / self.train_s if self.train_s > 0 else None,
            "params": self.params,
        }
        if main:
            log.write({"kind": "full_val", "step": self.step, **full_val})
            log.close()
            write_text_atomic(self.out / RESULT_FILE, json.dumps(result, indent=2))
        return result


def train(cfg: Config, out: str | Path, resume: bool = False, quiet: bool = False,
          trainer: type[Trainer] = Trainer) -> dict:
    """Train (or resume) a run in `out`, holding its lock; returns the result also written to `out/result.json`,
    or one with `preempted` when SIGTERM/SIGINT stopped it with its state saved. A signal before training starts
    raises `Preempted`."""
    with Preemption() as preempt, contextlib.ExitStack() as stack:
        return trainer(cfg, out, resume, quiet, stack).run(preempt)


def check_memory(cfg: Config, device: torch.device) -> None:
    """Refuse, before allocating, a run that cannot fit: weights, gradients and AdamW's two moments in fp32, the
    activations a training step keeps for backward, and the logits of an evaluation batch, against the memory
    available now (MemAvailable on CPU, free device memory on CUDA). Rough by design: it catches sizes that are
    off by a large factor; `train.check_memory = false` skips it."""
    with torch.device("meta"):  # shapes only: nothing is allocated, no weights are read
        if cfg.model.hf:
            from softar.hf_folder import hf_param_count

            params = hf_param_count(cfg.model.hf)
        else:
            params = build_model(cfg).num_params()
    m, t, lay = cfg.model, cfg.train, cfg.context
    B, T, d, L, V, H = t.batch_size, m.block_size, m.d_model, m.n_layer, m.vocab_size, m.n_head
    two_pass = 2 if lay.soft or cfg.loss.soft_inputs > 0 else 1
    activations = 4 * B * T * (L * (16 * d + 2 * H * T) + 3 * V) * two_pass
    evaluation = 4 * 64 * T * V * 2
    need = 16 * params + max(activations, evaluation)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable"))
            free = int(line.split()[1]) * 1024
        except (OSError, StopIteration, ValueError, IndexError):
            return  # no way to tell on this system
    if need > free:
        raise ConfigError(f"train.check_memory: this run needs about {need / 2**30:.1f} GiB ({params:,} parameters "
                          f"with gradients and AdamW state, activations for train.batch_size={B}), but "
                          f"{free / 2**30:.1f} GiB is available on {device.type}; make the model or batch smaller, "
                          "or set train.check_memory=false")
