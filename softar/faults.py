"""Fault injection against real `softar train` processes: kill -9 at random moments, SIGTERM preemption, and
injected non-finite steps. Used by the tests and by `softar bench faults`, which writes the table in
docs/reliability.md. Every figure comes from runs it starts and kills itself.

Non-finite steps are injected from outside the production code: `python -m softar.inject --nan-steps 5,6 train ...`
runs `softar train ...` with a forward hook that turns those steps' losses into NaN (`nan_steps`)."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from softar.checkpoint import latest_checkpoint, load_checkpoint
from softar.disk import clean_stale_temps, temp_name, write_owned
from softar.rundir import CHECKPOINTS, CONFIG_FILE, METRICS_FILE
from softar.train import Trainer


def train_command(config: str, overrides: list[str], out: Path, resume: bool, nan: list[int] = ()) -> list[str]:
    """The command line of a real `softar train` process (with `nan`: through this module, poisoning those steps)."""
    entry = ["softar.inject", "--nan-steps", ",".join(map(str, nan))] if nan else ["softar"]
    return [sys.executable, "-m", *entry, "train", config, *overrides, "--out", str(out), "--quiet"] + (
        ["--resume"] if resume else [])


@contextlib.contextmanager
def nan_steps(steps: set[int]):
    """While active, every Trainer's optimizer steps numbered in `steps` (1-based) get a NaN loss: a forward hook
    on the model multiplies its loss by NaN, so the gradients are non-finite too."""
    original = Trainer.train_step

    def train_step(self: Trainer):
        if self.step + 1 not in steps:
            return original(self)
        poison = self.net.register_forward_hook(lambda module, args, out: (out[0] * float("nan"), out[1]))
        try:
            return original(self)
        finally:
            poison.remove()

    Trainer.train_step = train_step
    try:
        yield
    finally:
        Trainer.train_step = original


def logged_losses(out: Path) -> dict[int, float]:
    path = out / METRICS_FILE
    if not path.is_file():
        return {}
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by kill -9
            rows.append(json.loads(line))
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def checkpoint_step(out: Path) -> int:
    """The latest checkpoint's step after loading it completely (sha256 checked); 0 if there is none yet."""
    path = latest_checkpoint(out / CHECKPOINTS)
    return load_checkpoint(path).meta["step"] if path else 0


def interrupt(config: str, overrides: list[str], out: Path, sig: int, delay: float, after_step: int = 0) -> dict:
    """Start (or resume) a run, send `sig` once `delay` seconds have passed and the run has logged
    `after_step`, and report what survived."""
    resume = (out / CONFIG_FILE).is_file()
    proc = subprocess.Popen(train_command(config, overrides, out, resume), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    while proc.poll() is None and (time.monotonic() - start < delay or max(logged_losses(out), default=0) < after_step):
        time.sleep(0.01)
    progress = max(logged_losses(out), default=0)
    proc.send_signal(sig)  # a no-op if it has exited meanwhile
    stdout, stderr = proc.communicate(timeout=300)
    # what happened, not what a poll saw: the run may end between a poll and the signal
    finished = proc.returncode == 0 and "softar: stopped by" not in stderr
    progress = max(progress, max(logged_losses(out), default=0))  # SIGTERM logs the step it finishes
    saved = checkpoint_step(out)  # raises if the latest checkpoint cannot be loaded
    return {"signal": signal.Signals(sig).name, "delay_s": round(delay, 3), "finished_first": finished,
            "returncode": proc.returncode, "progress_step": progress, "checkpoint_step": saved,
            "lost_steps": max(0, progress - saved), "stderr": stderr.strip().splitlines()[-1:] if stderr else []}


def inject(config: str, overrides: list[str], workdir: Path, kills: int = 5, sig: int = signal.SIGKILL,
           seed: int = 0, max_delay: float = 6.0) -> dict:
    """Interrupt a run `kills` times at random moments, finish it, and compare every step's loss with an
    uninterrupted run of the same config."""
    rng = random.Random(seed)
    ref, run = workdir / "reference", workdir / "interrupted"
    subprocess.run(train_command(config, overrides, ref, False), check=True, capture_output=True)
    events = [interrupt(config, overrides, run, sig, rng.uniform(0.5, max_delay)) for _ in range(kills)]
    subprocess.run(train_command(config, overrides, run, (run / CONFIG_FILE).is_file()), check=True,
                   capture_output=True)
    a, b = logged_losses(ref), logged_losses(run)
    return {"signal": signal.Signals(sig).name, "injected": sum(not e["finished_first"] for e in events),
            "events": events, "max_lost_steps": max((e["lost_steps"] for e in events), default=0),
            "identical_to_uninterrupted": a == b and len(a) > 0}


def inject_nan(config: str, overrides: list[str], workdir: Path, steps: list[int]) -> dict:
    """Make `steps` non-finite; report how the run handled them."""
    out = workdir / f"nan_{'_'.join(map(str, steps))}"
    proc = subprocess.run(train_command(config, overrides, out, False, nan=steps), capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    return {"steps": steps, "returncode": proc.returncode, "checkpoint_step": checkpoint_step(out),
            "skipped_steps": result["skipped_steps"] if result else None,
            "message": proc.stderr.strip().splitlines()[-1] if proc.returncode else ""}


def fault_report(config_path: str, overrides: list[str], cfg, out: Path, kills: int) -> dict:
    """`softar bench faults`: kill -9 and SIGTERM `kills` times each at random moments, plus injected
    non-finite steps; returns the figures and writes them as a Markdown table to out/faults.md."""
    import shutil

    clean_stale_temps(out, ("faults_work",))  # what a killed report left
    work = temp_name(out / "faults_work")  # this process's own: never a folder of the user's
    work.mkdir(parents=True)
    t = cfg.train
    ckpt_interval = t.ckpt_interval or t.eval_interval
    rows = []
    for sig in (signal.SIGKILL, signal.SIGTERM):
        rep = inject(config_path, overrides, work / signal.Signals(sig).name, kills, sig, seed=sig)
        rows.append({"fault": f"{rep['signal']} at a random moment", "injected": rep["injected"],
                     "max_lost_steps": rep["max_lost_steps"], "bound": ckpt_interval if sig == signal.SIGKILL else 0,
                     "resumed_run_identical": rep["identical_to_uninterrupted"]})
    one = inject_nan(config_path, overrides, work, [ckpt_interval + 1])
    rows.append({"fault": "one non-finite step", "injected": 1, "max_lost_steps": 0, "bound": 0,
                 "resumed_run_identical": None, "outcome": f"skipped {one['skipped_steps']}, run completed"})
    streak = list(range(ckpt_interval + 1, ckpt_interval + 1 + t.max_bad_steps))
    many = inject_nan(config_path, overrides, work, streak)
    rows.append({"fault": f"{t.max_bad_steps} consecutive non-finite steps", "injected": 1, "max_lost_steps": 0,
                 "bound": 0, "resumed_run_identical": None,
                 "outcome": f"exit {many['returncode']}, latest checkpoint step {many['checkpoint_step']}"})
    lines = ["| fault | injected | steps lost (max) | allowed | resumed run identical to an uninterrupted one |",
             "|---|---|---|---|---|"]
    for r in rows:
        same = {True: "yes", False: "NO", None: r.get("outcome", "")}[r["resumed_run_identical"]]
        lines.append(f"| {r['fault']} | {r['injected']} | {r['max_lost_steps']} | {r['bound']} | {same} |")
    write_owned({out / "faults.md": ("\n".join(lines) + "\n").encode("utf-8")}, "--out")
    shutil.rmtree(work)
    return {"bench": "faults", "ckpt_interval": ckpt_interval, "rows": rows}
