"""`softar eval`: every metric for a run directory's latest checkpoint, written to RUN_DIR/eval_<split>.json."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from softar import SoftarError
from softar.data.dataset import load_meta, load_split
from softar.data.synthetic import EXACT, HMM, Bag, bayes_loss, load_language
from softar.device import autocast, pick_device
from softar.disk import commit, read_json, stage_bytes
from softar.evaluate.analogies import analogy_accuracy, read_analogies
from softar.evaluate.context import recovery_probe, token_frequencies
from softar.evaluate.generation import COLLAPSE_THRESHOLDS, generation_report
from softar.evaluate.lm import evaluate_split
from softar.evaluate.retention import (
    PREFIX,
    STRETCHES,
    bow_probe,
    context_curve,
    prefix_needed,
    retention_eval,
    split_context,
    stretches,
    target_scores,
)
from softar.evaluate.soft_tokens import (
    AVERAGED_KNOWN,
    BRIER_N,
    brier_lm,
    nn_spacing,
    open_loop_loss,
    soft_output_metrics,
)
from softar.evaluate.stats import at_bound
from softar.model.embedding import embedding_stats
from softar.model.oracle import HMMOracle
from softar.rundir import RESULT_FILE, load_run
from softar.soft.model import SoftAR

DEFAULT_HORIZONS = (8, 32)


_REFERENCE_SCORES: dict[tuple, object] = {}  # --gap references' log p, per process


def parse_gap_run(spec: str) -> tuple[str, int | None]:
    """--gap's RUN or RUN:CONTEXT -> (run directory, context or None for the run's whole window). A directory
    whose own name ends in ':N' is that directory."""
    return (spec, None) if Path(spec).is_dir() else split_context(spec)


def bayes_ceiling(lang: HMM | Bag, data: np.ndarray, window: int, loss: float) -> dict:
    """The exact optimum of synthetic data beside a model's loss: `bayes_loss` on the very targets the model's loss
    scores, each read from its window's start as the model reads it; `bayes_loss_full`, each given the whole split
    before it (what no window reaches); `bayes_gap`, the model's loss over `bayes_loss` minus 1 (the soft-feedback
    study's gate: at most 0.02)."""
    bayes = bayes_loss(lang, data, window)
    return {"bayes_loss": bayes, "bayes_loss_full": lang.loss_full(data), "bayes_gap": loss / bayes - 1}


def evaluate_run(run_dir, split: str = "val", data_dir: str | None = None, windows: int = 256,
                 horizons: tuple[int, ...] | None = None, seed: int = 0, device_name: str = "auto",
                 gap_runs: tuple[str, str] | None = None, reference: str | None = None,
                 thresholds: tuple[float, ...] = COLLAPSE_THRESHOLDS, arrays_out: Path | None = None,
                 analogies: str | None = None, soft_metrics: bool = True, whole_split: bool = True) -> dict:
    """Every metric `softar eval` reports, for a run directory's latest checkpoint. Without `horizons`, the
    open-loop loss is measured at those of 8 and 32 that fit in the model's window. `gap_runs` (SHORT and LONG,
    each a plain run, optionally RUN:CONTEXT: the same weights may be both) adds the retention metrics on identical
    targets (`softar.evaluate.retention`), their per-target arrays saved to `arrays_out` (.npz); `reference` (a
    plain run) adds the generation report; `analogies` (a file of analogy questions) the 3CosAdd accuracy of the
    run's embedding space. `soft_metrics=False` skips a plain run's soft-output, open-loop and BrierLM metrics (the
    retention study reads none of them); `whole_split=False` takes the whole val split's loss from the run's own
    final measurement (result.json) when that was made with this checkpoint."""
    device = pick_device(device_name)
    sections = read_analogies(analogies) if analogies is not None else None  # a bad file fails before the work
    run = load_run(run_dir, device, data_dir)
    if run.cfg.task.name:
        raise SoftarError(f"{run_dir} trained on the {run.cfg.task.name} task; evaluate it with --task "
                          f"{run.cfg.task.name} --data FILE.json")
    data_dir = data_dir or run.cfg.data.dir
    model = run.model
    lay = model.layout
    block = model.window_slots
    if horizons is None:
        horizons = tuple(k for k in DEFAULT_HORIZONS if k < block)
    for k in horizons:
        if not 1 <= k < block:
            raise SoftarError(f"--horizons: {k} must be in [1, model.block_size={block})")
    data, train_data = load_split(data_dir, split), load_split(data_dir, "train")
    lang = load_language(data_dir)  # synthetic data: the exact optimum beside every figure
    hmm = lang if isinstance(lang, HMM) else None
    chars = load_meta(data_dir)["characters"][split]
    amp = autocast(device, run.cfg.train.dtype)
    ended = read_json(Path(run_dir) / RESULT_FILE, "run result") if (Path(run_dir) / RESULT_FILE).is_file() else {}
    if not whole_split and split == "val" and not lay.soft and data_dir == run.cfg.data.dir and \
            isinstance(ended, dict) and isinstance(ended.get("val_loss"), float) and ended.get("step") == run.step:
        # the whole val split as the run itself measured it with this very checkpoint at the end of training
        metrics = {"loss": ended["val_loss"], "bits_per_token": ended.get("val_bits_per_token"),
                   "bits_per_char": ended.get("val_bits_per_char"), "whole_split_from": RESULT_FILE}
    else:
        metrics = evaluate_split(model, data, lay.token_slots, device, amp, chars, history=lay.history,
                                 soft=lay.soft)
    if lay.soft:  # the figure training used to report: soft slots guessed in one pass from the true tokens
        one_step = evaluate_split(model, data, lay.token_slots, device, amp, chars, history=lay.history,
                                  soft=lay.soft, soft_fill="one_step")
        metrics["loss_soft_slots_one_step"] = one_step["loss_soft_slots"]
    kw = dict(windows=windows, seed=seed, device=device)
    result = {"run_dir": str(run_dir), "step": run.step, "split": split, **metrics,
              "embedding": {**embedding_stats(model.E), "nn_spacing": nn_spacing(model.E)}}
    if isinstance(lang, EXACT):
        result.update(bayes_ceiling(lang, data, lay.token_slots, metrics["loss"]))
    known = {"averaged": AVERAGED_KNOWN, "bayes": hmm.open_loop} if hmm is not None else {}
    if model.regression_only:  # load_run fitted it
        result["readout"] = {"kind": "cosine", "temperature": model.cosine_readout,
                             "at_bound": at_bound(model.cosine_readout)}
    if lay.plain and soft_metrics:  # these read the model through a plain window (and a KV cache)
        result.update(soft_outputs=soft_output_metrics(model, data, **kw),
                      open_loop={str(k): open_loop_loss(model, data, k, train_data, **kw, **known)
                                  for k in horizons})
        if block >= BRIER_N:  # BrierLM reads 4-grams inside the window
            result["brier"] = brier_lm(model, data, **kw)
        if hmm is not None:
            result["bayes_open_loop"] = {k: ol["bayes"] for k, ol in result["open_loop"].items()}
            oracle = SoftAR(HMMOracle(hmm).to(device), block)  # the positive control: the same code, the same windows
            result["positive_control"] = {str(k): open_loop_loss(oracle, data, k, train_data, **kw, **known)
                                          for k in horizons}
    prior = token_frequencies(train_data, model.E.shape[0])  # the frequency prior of every probe below
    if lay.n_summary and model.memory is None:  # the slots are pure arithmetic: what can be read back out
        result["recovery"] = recovery_probe(model, data, prior, windows=min(windows, 64), seed=seed, device=device)
    if sections is not None:
        result["analogies"] = analogy_accuracy(model.E, run.tokenizer, sections)
    if gap_runs is not None:
        count = min(windows, STRETCHES)
        refs, contexts = [], []
        for spec in gap_runs:
            path, context = parse_gap_run(spec)
            try:
                loaded = run if Path(path).resolve() == Path(run_dir).resolve() else load_run(path, device, data_dir)
            except SoftarError as e:
                raise SoftarError(f"--gap: {e}") from None
            if not loaded.model.layout.plain:
                raise SoftarError(f"--gap: {path} has a context layout; the references are plain runs")
            window = loaded.model.window_slots
            if context is not None and not 1 <= context <= window:
                raise SoftarError(f"--gap: {spec}: the context must be in [1, {window}] (its window)")
            refs.append((path, loaded))
            contexts.append(window if context is None else context)
        prefix = max(PREFIX, prefix_needed(model), *contexts)
        ids = stretches(data, prefix, count, seed, device)
        scores = []
        for (path, loaded), context in zip(refs, contexts, strict=True):
            key = (str(Path(path).resolve()), loaded.step, context, split, str(data_dir), count, seed, prefix)
            if key not in _REFERENCE_SCORES:  # a sweep scores each reference once per seed
                _REFERENCE_SCORES[key] = target_scores(loaded.model, ids, prefix, context)
            scores.append(_REFERENCE_SCORES[key])
        retention, arrays = retention_eval(model, ids, prefix, scores[0], scores[1], tuple(contexts), seed, lang)
        retention.update(references=list(gap_runs), prefix=prefix)
        # the history before the short context; the probe's own check: the short context itself
        spans = {"history": (contexts[0], prefix - contexts[0]), "window": (0, contexts[0])}
        retention["bow_probe"] = bow_probe(model, train_data, data, spans, prior, seed=seed, device=device)
        if lay.plain:
            retention["context_curve"] = context_curve(model, ids, prefix)
        result["retention"] = retention
        if arrays_out is not None:
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            commit(stage_bytes(arrays_out, buf.getvalue()), arrays_out)
    if reference is not None:
        if lay.plain:
            raise SoftarError("--reference: the generation report is for a run with a context layout; this run has "
                              "none")
        ref = load_run(reference, device, data_dir)
        if not ref.model.layout.plain:
            raise SoftarError(f"--reference: {reference} has a context layout; it must be a plain hard-token run")
        result["generation"] = generation_report(model, ref.model, data, thresholds, seed=seed)
    return result
