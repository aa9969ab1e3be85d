"""`softar eval`: every metric for a run directory's latest checkpoint, written to RUN_DIR/eval_<split>.json."""

from __future__ import annotations

from pathlib import Path

from softar import SoftarError
from softar.data.dataset import load_meta, load_split
from softar.device import autocast, pick_device
from softar.disk import read_json
from softar.evaluate.context import fraction_of_gap, passkey_probe, recovery_probe
from softar.evaluate.generation import COLLAPSE_THRESHOLDS, generation_report
from softar.evaluate.lm import evaluate_split
from softar.evaluate.soft_tokens import BRIER_N, brier_lm, nn_spacing, open_loop_loss, soft_output_metrics
from softar.evaluate.stats import at_bound
from softar.model.embedding import embedding_stats
from softar.rundir import RESULT_FILE, load_run

DEFAULT_HORIZONS = (8, 32)


def evaluate_run(run_dir, split: str = "val", data_dir: str | None = None, windows: int = 256,
                 horizons: tuple[int, ...] | None = None, seed: int = 0, device_name: str = "auto",
                 gap_runs: tuple[str, str] | None = None, reference: str | None = None,
                 thresholds: tuple[float, ...] = COLLAPSE_THRESHOLDS) -> dict:
    """Every metric `softar eval` reports, for a run directory's latest checkpoint. Without `horizons`, the
    open-loop loss is measured at those of 8 and 32 that fit in the model's window. `gap_runs` (a short-window and
    a long-window run) adds the fraction of the gap closed; `reference` (a plain run) adds the generation report."""
    device = pick_device(device_name)
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
    chars = load_meta(data_dir)["characters"][split]
    amp = autocast(device, run.cfg.train.dtype)
    metrics = evaluate_split(model, data, lay.token_slots, device, amp, chars, history=lay.history, soft=lay.soft)
    if lay.soft:  # the figure training used to report: soft slots guessed in one pass from the true tokens
        one_step = evaluate_split(model, data, lay.token_slots, device, amp, chars, history=lay.history,
                                  soft=lay.soft, soft_fill="one_step")
        metrics["loss_soft_slots_one_step"] = one_step["loss_soft_slots"]
    kw = dict(windows=windows, seed=seed, device=device)
    result = {"run_dir": str(run_dir), "step": run.step, "split": split, **metrics,
              "embedding": {**embedding_stats(model.E), "nn_spacing": nn_spacing(model.E)},
              "passkey": passkey_probe(model, data, windows=min(windows, 64), seed=seed, device=device)}
    if model.regression_only:  # load_run fitted it
        result["readout"] = {"kind": "cosine", "temperature": model.cosine_readout,
                             "at_bound": at_bound(model.cosine_readout)}
    if lay.plain:  # these read the model through a plain window (and a KV cache)
        result.update(soft_outputs=soft_output_metrics(model, data, **kw),
                      open_loop={str(k): open_loop_loss(model, data, k, train_data, **kw) for k in horizons})
        if block >= BRIER_N:  # BrierLM reads 4-grams inside the window
            result["brier"] = brier_lm(model, data, **kw)
    if lay.n_summary:
        result["recovery"] = recovery_probe(model, data, windows=min(windows, 64), seed=seed, device=device)
    if gap_runs is not None:
        losses = []
        for other in gap_runs:
            path = Path(other) / RESULT_FILE
            if not path.is_file():
                raise SoftarError(f"--gap: {other} has no {RESULT_FILE} (a finished training run)")
            losses.append(read_json(path, "--gap result", {"val_loss": float})["val_loss"])
        if losses[0] == losses[1]:
            raise SoftarError("--gap: the short and long runs have the same val loss: there is no gap to close")
        result["gap_closed"] = fraction_of_gap(losses[0], metrics["loss"], losses[1])
    if reference is not None:
        if lay.plain:
            raise SoftarError("--reference: the generation report is for a run with a context layout; this run has "
                              "none")
        ref = load_run(reference, device, data_dir)
        if not ref.model.layout.plain:
            raise SoftarError(f"--reference: {reference} has a context layout; it must be a plain hard-token run")
        result["generation"] = generation_report(model, ref.model, data, thresholds, seed=seed)
    return result
