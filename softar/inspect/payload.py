"""What `softar inspect` shows, as one JSON-ready dict: a generation traced token by token, the window at each step,
and the run's training curves.

The payload (also written as PAGE.json; `PAYLOAD_VERSION` says its format):
- `run`: directory, step, model and layout; `decoding`: the settings; `policy`: the OOD score and threshold.
- `tokens`: every token of the sequence, prompt first. Each has its text, `source` (prompt | generated | thought),
  `entered` (soft | hard: what re-entered the context), `tier` when generation ended (soft | hard | segment |
  aggregate | gone; a token slot, in a plain window or a soft region, is as it entered) and `region` (segment0 is
  the newest segment), and `collapsed` (the policy collapsed it in place; `why`: at entry or by the budget). A
  generated token also has its log-probability and the model's next-token distribution there (temperature 1,
  unfiltered, as `decode`'s logprobs): its `entropy`, its `topk` ([text, p]), and the policy's OOD `score`; in
  soft mode the `nearest` vocabulary tokens to the vector that re-entered ([text, L2 distance]); a thought its
  `nodes` (the graph nodes it reads as, [name, score]), its `depth` and that depth's `frontier`.
- `steps`: the window before each generated token, then the last one: its regions, oldest first, each the token
  range [from, to) it covers and the slots it takes (a summary is one slot; hard, soft and plain token regions
  one slot per token), and which tokens of the soft region are collapsed.
- `metrics`: training loss, valid loss and the embedding diagnostics from the run's metrics.jsonl.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

import softar
from softar import SoftarError
from softar.decode import TRACE_TOP_K, Decoding, Generation, WindowView
from softar.disk import read_jsonl
from softar.rundir import METRICS_FILE, LoadedRun
from softar.soft.collapse import CollapsePolicy, nearest_k
from softar.soft.feeds import SoftFeed

PAYLOAD_VERSION = 1
NEAREST = 5  # vocabulary tokens listed per soft vector
NODES = 5  # graph nodes listed per thought
MAX_CURVE_POINTS = 2000  # per metric: longer curves are thinned evenly


def tier_name(region: str) -> str:
    """A region of `ContextState.regions` (or a plain window's `tokens`) as a tier: segment0 -> segment."""
    return "segment" if region.startswith("segment") else region


def region_of(view: WindowView, index: int) -> str:
    """The region of `view` holding token `index` (prompt tokens first), or gone."""
    age = view.seen - 1 - index
    return next((name for name, lo, hi in view.regions if lo <= age < hi), "gone")


def window_regions(view: WindowView, aggregate_all: bool) -> list[dict]:
    """The window's regions oldest first, as token ranges [from, to) with the slots each takes."""
    out = []
    hard_end = next((hi for name, _, hi in view.regions if name == "hard"), 0)  # the end age of the hard region
    for name, lo, hi in reversed(view.regions):
        first, end = view.seen - hi, view.seen - lo
        summary = name == "aggregate" or name.startswith("segment")
        if name == "aggregate" and aggregate_all:  # it also holds every segment's tokens
            end = view.seen - hard_end
        out.append({"name": name, "from": first, "to": end, "slots": 1 if summary else hi - lo})
    return out


def _text(tokenizer, i: int) -> str:
    return tokenizer.decode([int(i)])


def _nearest(vectors: torch.Tensor, E: torch.Tensor, tokenizer) -> list[list[list]]:
    """For each vector [n, m]: its NEAREST vocabulary tokens by L2, [text, distance]."""
    dists, ids = nearest_k(vectors.float(), E.float(), NEAREST)
    return [[[_text(tokenizer, t), round(d, 4)] for d, t in zip(ds, ts, strict=True)]
            for ds, ts in zip(dists.tolist(), ids.tolist(), strict=True)]


def _topk(tokenizer, ids: list[int], probs: list[float]) -> list[list]:
    return [[_text(tokenizer, i), round(p, 5)] for i, p in zip(ids, probs, strict=True) if i >= 0]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _plottable(value) -> float | None:
    """A logged number a chart can draw (finite, and small enough that a range over it stays finite), or None."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return value if math.isfinite(value) and abs(value) < 1e100 else None


def read_curves(run_dir: Path) -> dict:
    """Training curves from metrics.jsonl: {name: [[step, value], ...]} for the training loss (train_loss_step),
    each periodic eval metric and the embedding diagnostics (E_*). A missing or unreadable log leaves the curves
    empty, with the reason."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return {"curves": {}, "note": f"no {METRICS_FILE}"}
    try:
        rows, _ = read_jsonl(path, "metrics")
    except SoftarError as e:
        return {"curves": {}, "note": str(e)}
    curves: dict[str, list] = {}
    for row in rows:
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or row.get("kind") not in ("train", "eval"):
            continue  # the periodic rows only: a run's final report is one point, not a curve
        names = ("loss",) if row.get("kind") == "train" else tuple(k for k in row if k not in ("kind", "step"))
        for name in names:
            value = _plottable(row.get(name))
            if value is not None:
                curves.setdefault("train_loss_step" if name == "loss" else name, []).append([step, value])
    for name, points in curves.items():
        if len(points) > MAX_CURVE_POINTS:
            stride = math.ceil(len(points) / MAX_CURVE_POINTS)
            curves[name] = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    return {"curves": curves, "note": ""}


def _run_info(run: LoadedRun, run_dir: str | Path) -> dict:
    m, lay = run.cfg.model, run.model.layout
    return {"dir": str(run_dir), "step": run.step, "softar": softar.__version__,
            "model": {**run.model.lm.describe(), "block_size": m.block_size, "vocab_size": run.model.E.shape[0],
                      "embedding_dim": run.model.E.shape[1]},
            "layout": {"plain": lay.plain, "aggregate": lay.aggregate, "segments": list(lay.segments),
                       "hard": lay.hard, "soft": lay.soft, "op": lay.op, "aggregate_all": lay.aggregate_all,
                       "window_slots": run.model.window_slots}}


def _decoding_info(dec: Decoding) -> dict:
    feed = dec.feed
    soft = isinstance(feed, SoftFeed)
    s = feed.sampling
    return {"mode": feed.name, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
            "soft": feed.spec.kind if soft else None, "noise": feed.spec.noise if soft else None,
            "collapse": feed.collapse if soft else None, "max_new_tokens": dec.max_new_tokens}


def collapse_reason(policy: CollapsePolicy, score: float) -> str:
    """Why the policy collapsed a soft token in place: its score passed the threshold as it entered, or the budget
    collapsed it later."""
    sign = "<" if policy.keep_uncertain else ">"
    if bool(policy.at_entry(torch.tensor(score))):
        return f"at entry: {policy.score} {score:.3f} {sign} threshold {policy.threshold:g}"
    return f"later, by the budget: at most {policy.budget} soft tokens stay uncollapsed"


def text_payload(run: LoadedRun, run_dir: str | Path, prompt: list[int], dec: Decoding, seed: int,
                 shift_every: int | None = None) -> dict:
    """One generation from `prompt` under `dec` (seed as `softar sample --seed`), traced."""
    model, tok, E = run.model, run.tokenizer, run.model.E
    g: Generation = dec.run(model, [prompt], seed=seed, return_vectors=True, shift_every=shift_every,
                            return_trace=True)
    n, P = int(g.lengths[0]), len(prompt)
    views = g.windows[0]
    final = views[-1]
    soft_mode = isinstance(dec.feed, SoftFeed)

    def tier_of(region: str, entered: str) -> str:
        if region in ("tokens", "soft"):  # a token slot holds what re-entered (hard mode: hard tokens throughout)
            return entered
        return tier_name(region)

    tokens = []
    for i, t in enumerate(prompt):
        region = region_of(final, i)
        tokens.append({"i": i, "text": _text(tok, t), "source": "prompt", "entered": "hard",
                       "tier": tier_of(region, "hard"), "region": region, "collapsed": False})
    entered = "soft" if soft_mode else "hard"
    nearest = _nearest(g.vectors[0, :n], E, tok) if soft_mode else [None] * n
    ids, logprobs, entropy = g.tokens[0, :n].tolist(), g.logprobs[0, :n].tolist(), g.entropy[0, :n].tolist()
    ood, collapsed = g.ood[0, :n].tolist(), g.collapsed[0, :n].tolist()
    top_ids, top_probs = g.top_ids[0, :n].tolist(), g.top_probs[0, :n].tolist()
    for j in range(n):
        region = region_of(final, P + j)
        entry = {"i": P + j, "text": _text(tok, ids[j]), "source": "generated", "entered": entered,
                 "tier": tier_of(region, entered), "region": region,
                 "collapsed": soft_mode and not model.layout.plain and collapsed[j],
                 "logprob": round(logprobs[j], 5), "entropy": round(entropy[j], 5), "score": _finite(round(ood[j], 5)),
                 "topk": _topk(tok, top_ids[j], top_probs[j])}
        if entry["collapsed"]:
            entry["why"] = collapse_reason(dec.policy, ood[j])
        if soft_mode:  # the vector that re-entered (a token collapsed at entry re-entered as itself)
            entry["nearest"] = nearest[j]
        tokens.append(entry)
    agg_all = model.layout.aggregate_all
    steps = [{"regions": window_regions(v, agg_all), "soft_collapsed": v.soft_collapsed} for v in views]
    policy = dec.policy
    return {"softar_inspect": PAYLOAD_VERSION, "kind": "text", "run": _run_info(run, run_dir),
            "decoding": _decoding_info(dec), "seed": seed, "prompt_tokens": P, "generated_tokens": n,
            "stopped": bool(g.stopped[0]),
            "policy": {"score": policy.score, "threshold": _finite(policy.threshold), "budget": policy.budget,
                       "keep_uncertain": policy.keep_uncertain, "applies": soft_mode and not model.layout.plain},
            "tokens": tokens, "steps": steps, "metrics": read_curves(Path(run_dir))}


def task_payload(run: LoadedRun, run_dir: str | Path, file: Path, index: int, seed: int = 0) -> dict:
    """Record `index` of a task file solved greedily at the run's final curriculum stage, as `softar eval --task`
    solves it: the question, each continuous thought (the nodes it reads as and the breadth-first frontier at its
    depth), and the answer with each step's distribution."""
    from softar.evaluate.reasoning import TaskData, node_readout, solve

    data = TaskData.open(run.cfg, splits=(), files={"example": file})
    records = data.records["example"]
    if not index < len(records):
        raise SoftarError(f"--task-example {file}:{index}: the file holds {len(records)} records (0 to "
                          f"{len(records) - 1})")
    data.check_fits("example", run.model.window_slots, f"--task-example {file}")
    enc, record, example = data.encoder, records[index], data.examples["example"][index]
    stage = enc.final_stage()
    solved = solve(run.model, enc, [example], stage, run.cfg.task.max_answer_tokens, seed=seed, top_k=TRACE_TOP_K)[0]
    prompt, thoughts = enc.prompt(example, stage), solved["thoughts"]
    probed = thoughts.shape[0] and enc.probe_ids(record) is not None
    names, scores, fronts = node_readout(run.model, enc, record, thoughts) if probed else ([], None, [])
    nearest = _nearest(thoughts, run.model.E.detach().cpu(), run.tokenizer) if thoughts.shape[0] else []
    c = enc.cfg.thoughts_per_step
    tokens, t = [], 0
    for i, token in enumerate(prompt):
        entry = {"i": i, "text": enc.tok.decode([token]), "source": "prompt", "entered": "hard", "tier": "hard",
                 "region": "tokens", "collapsed": False}
        if token == run.model.thought_id and enc.mode.slot == "<thought>":
            depth = t // c + 1
            entry.update(source="thought", entered="soft", tier="soft", text=f"thought {t + 1}", nearest=nearest[t],
                         norm=round(float(thoughts[t].norm()), 4), depth=depth)
            if probed:  # the graph's nodes it reads as, beside the frontier at its depth
                top = scores[t].topk(min(NODES, len(names)))
                frontier = sorted(fronts[depth]) if depth < len(fronts) else []
                entry.update(nodes=[[names[j], round(v, 4)] for v, j in zip(top.values.tolist(),
                                                                            top.indices.tolist(), strict=True)],
                             frontier=[names[j] for j in frontier])
            t += 1
        tokens.append(entry)
    answer = solved["ids"] + ([enc.id["<eos>"]] if len(solved["entropy"]) > len(solved["ids"]) else [])
    top_ids, top_probs = (x.tolist() for x in solved["top"])
    for j, token in enumerate(answer):
        tokens.append({"i": len(prompt) + j, "text": enc.tok.decode([token]), "source": "generated", "entered": "hard",
                       "tier": "hard", "region": "tokens", "collapsed": False,
                       "entropy": round(float(solved["entropy"][j]), 5), "score": None,
                       "topk": _topk(run.tokenizer, top_ids[j], top_probs[j])})
    answer_words = enc.split_answer(solved["ids"])[1]
    steps = [{"regions": [{"name": "tokens", "from": 0, "to": n, "slots": n}], "soft_collapsed": []}
             for n in range(len(prompt), len(prompt) + len(answer) + 1)]
    return {"softar_inspect": PAYLOAD_VERSION, "kind": "task", "run": _run_info(run, run_dir),
            "decoding": {"mode": "greedy", "task_mode": enc.cfg.mode, "stage": stage},
            "seed": seed, "prompt_tokens": len(prompt), "generated_tokens": len(answer),
            "stopped": len(answer) > len(solved["ids"]),
            "task": {"name": run.cfg.task.name, "file": str(file), "index": index, "question": record["question"],
                     "target": enc.task.render(record, enc.rendering).answer, "answer": " ".join(answer_words),
                     "correct": bool(enc.task.check(record, answer_words, enc.rendering))},
            "policy": {"score": "none", "threshold": None, "budget": -1, "keep_uncertain": False, "applies": False},
            "tokens": tokens, "steps": steps, "metrics": read_curves(Path(run_dir))}
