"""`softar quickstart`: prepare the bundled Shakespeare, train nanoGPT's CPU recipe and the seed's context layout at
the same token budget, generate with soft tokens, and compare the two val losses; then, on a hidden Markov model's
symbols where the best possible figure is known, soft feedback against averaged rollouts against the Bayes ceiling."""

from __future__ import annotations

import json
import shlex
from importlib import resources
from pathlib import Path

from softar import config
from softar.config import SoftConfig
from softar.data.dataset import load_split, random_windows
from softar.data.prepare import claim_out, prepare
from softar.data.synthetic import HMMSpec, bayes_loss, load_language, prepare_synthetic
from softar.decode import Decoding
from softar.device import pick_device
from softar.evaluate.generation import shown_brier
from softar.evaluate.soft_tokens import AVERAGED_KNOWN, CONSTANTS, format_effective, open_loop_loss
from softar.model.oracle import HMMOracle
from softar.rundir import CONFIG_FILE, load_run
from softar.soft.collapse import CollapsePolicy, Sampling
from softar.soft.feeds import HardFeed, SoftFeed
from softar.soft.model import SoftAR, check_names
from softar.train import train

QUICKSTART_CONFIG = "shakespeare_char.toml"  # the baseline: nanoGPT's CPU recipe
HMM_CONFIG = "synthetic/hmm.toml"  # soft feedback where the answer is known: a hidden Markov model's symbols
HMM_HORIZON, HMM_WINDOWS = 8, 128  # open-loop steps and val windows of the known-answer table
SEED_CONFIG = "shakespeare_char_seed.toml"  # the seed's context layout at the same token budget
SOFT_THRESHOLD = 2.5  # nats: the soft generation collapses a soft token in place above this entropy
PROMPT_LEN, BRIER_PROMPTS = 64, 64  # val prompts: the one both runs continue is the first


def config_path(name: str) -> Path:
    """A preset shipped in softar/configs (also reachable as configs/ in a checkout)."""
    return Path(str(resources.files("softar") / "configs" / name))


def _train(name: str, cfg: config.Config, out: Path, step: str) -> dict:
    resume = (out / CONFIG_FILE).is_file()  # a second quickstart continues (or just re-reports) the first
    print(f"{step} training {name} into {out}" + (" (resuming)" if resume else ""), flush=True)
    return train(cfg, out, resume=resume)  # ends with the loss over the whole val split


def mark_soft(tokenizer, ids: list[int], soft: list[bool]) -> str:
    """Decode ids with every run of tokens that re-entered the context soft wrapped in [ ]."""
    out, run = [], []
    for i, is_soft in zip(ids, soft, strict=True):
        if is_soft:
            run.append(i)
            continue
        if run:
            out.append("[" + tokenizer.decode(run) + "]")
            run = []
        out.append(tokenizer.decode([i]))
    if run:
        out.append("[" + tokenizer.decode(run) + "]")
    return "".join(out)


def inspect_command(run_dir: Path, page: Path) -> str:
    """The `softar inspect` command that draws a soft generation of the seed layout with the quickstart's decoding
    (temperature 0.8, top-k 200, the collapse threshold), from the prompt ROMEO: rather than the val window."""
    return (f"softar inspect {shlex.quote(str(run_dir))} --prompt ROMEO: --mode soft --collapse lm_sample "
            f"--collapse-threshold {SOFT_THRESHOLD} --max-new-tokens 300 --out {shlex.quote(str(page))}")


def known_answer(run_dir: Path, data: Path, device) -> dict:
    """Soft feedback of the trained HMM model and of the HMM itself (the positive control), against averaged
    sampled rollouts and the Bayes ceiling, at `HMM_HORIZON` steps open loop on the same val windows."""
    run, hmm = load_run(run_dir, device), load_language(data)
    val, train_ids = load_split(data, "val"), load_split(data, "train")
    block = run.model.window_slots
    models = {"model": run.model, "oracle": SoftAR(HMMOracle(hmm).to(device), block)}
    return {name: open_loop_loss(m, val, HMM_HORIZON, train_ids, windows=HMM_WINDOWS, device=device,
                                 averaged=AVERAGED_KNOWN, bayes=hmm.open_loop) for name, m in models.items()} | \
        {"bayes_loss": bayes_loss(hmm, val, block)}


def print_known_answer(result: dict, val_loss: float) -> None:
    model, oracle = result["model"], result["oracle"]
    print(f"\nsoft feedback where the answer is known: {HMM_HORIZON} steps open loop on {HMM_WINDOWS} val windows of "
          f"a hidden Markov model's symbols (nats per step, lower is better)")
    print(f"{'':38}{'trained GPT':>13}{'the HMM itself':>16}")
    rows = [("teacher forced (val loss; Bayes)", val_loss, result["bayes_loss"]),
            ("soft feedback (expected embedding)", model["soft_expected"], oracle["soft_expected"])]
    rows += [(f"{S} sampled rollout{'s' if S > 1 else ''} averaged", model[f"sampled_avg_{S}"],
              oracle[f"sampled_avg_{S}"]) for S in AVERAGED_KNOWN]
    const = min(CONSTANTS, key=lambda c: model[c])
    rows += [(f"constant vector fed back ({const})", model[const], oracle[const]),
             ("Bayes ceiling (exact)", model["bayes"], oracle["bayes"])]
    for label, a, b in rows:
        print(f"{label:38}{a:>13.4f}{b:>16.4f}")
    s_star = [format_effective(r["effective_samples"], r["effective_samples_range"]) for r in (model, oracle)]
    print(f"{'rollouts soft feedback is worth (S*)':38}{s_star[0]:>13}{s_star[1]:>16}")
    d = model["vs_soft"]["sampled_avg_2"]
    print(f"the GPT's soft feedback minus 2 averaged rollouts: {-d['diff']:+.4f} [{-d['hi']:+.4f}, {-d['lo']:+.4f}] "
          "(paired bootstrap 95% over windows). The HMM's own filter fed its expected symbol is the exact belief "
          "(the positive control: soft feedback must win there); the GPT shows how much of that it keeps.")


def quickstart(out: Path, data: Path, overrides: list[str] = (), hmm_data: Path = Path("data/hmm")) -> dict:
    base_cfg, seed_cfg = (config.load(config_path(name), [f"data.dir={json.dumps(str(data))}", *overrides])
                          for name in (QUICKSTART_CONFIG, SEED_CONFIG))  # bad overrides fail before anything is written
    hmm_cfg = config.load(config_path(HMM_CONFIG), [f"data.dir={json.dumps(str(hmm_data))}", *overrides])
    for cfg in (base_cfg, seed_cfg, hmm_cfg):
        check_names(cfg)
    claim_out(hmm_data.absolute())  # step 5 writes there: a path it cannot use fails before any training
    print(f"[1/5] preparing character-level Shakespeare in {data}", flush=True)
    meta = prepare("shakespeare", data, "char")
    print(f"      {meta['characters']['train'] + meta['characters']['val']:,} characters, "
          f"{meta['vocab_size']} symbols", flush=True)
    base_dir, seed_dir = out / "baseline", out / "seed_layout"
    base = _train(QUICKSTART_CONFIG, base_cfg, base_dir, "[2/5]")
    seed = _train(SEED_CONFIG, seed_cfg, seed_dir, "[3/5]")

    print(f"[4/5] the same val prompt continued by both runs: the baseline's ordinary sampling, and the seed "
          f"layout's soft generation, in which [ ] marks characters that re-entered the context as soft tokens (the "
          f"rest were collapsed in place: entropy > {SOFT_THRESHOLD} nats)", flush=True)
    device = pick_device(seed_cfg.train.device)
    runs = {"baseline": load_run(base_dir, device), "seed_layout": load_run(seed_dir, device)}
    sampling = Sampling(temperature=0.8, top_k=200)
    decodings = {"baseline": Decoding(HardFeed(sampling), max_new_tokens=300),
                 "seed_layout": Decoding(SoftFeed(SoftConfig(), collapse="lm_sample", sampling=sampling),
                                         CollapsePolicy(threshold=SOFT_THRESHOLD), max_new_tokens=300)}
    val = load_split(data, "val")
    prompts = random_windows(val, PROMPT_LEN + 2, BRIER_PROMPTS, seed=0, device=device)
    tokenizer = runs["seed_layout"].tokenizer
    print(f"prompt: {tokenizer.decode(prompts[0, :PROMPT_LEN].tolist())!r}")
    brier, soft = {}, []
    for name, run in runs.items():
        g = decodings[name].run(run.model, prompts[:1, :PROMPT_LEN], seed=run.cfg.train.seed)
        ids = g.tokens[0].tolist()
        marks = (~g.collapsed[0]).tolist()  # what re-entered soft (nothing, in hard mode)
        soft = marks if name == "seed_layout" else soft
        brier[name] = shown_brier(run.model, prompts[:, :PROMPT_LEN], prompts[:, PROMPT_LEN:], decodings[name])
        print(f"--- {name} " + "-" * 48 + "\n" + mark_soft(tokenizer, ids, marks))
    print("-" * 60)
    print(f"{sum(soft)} of {len(soft)} characters of the seed layout's text re-entered soft")
    print(f"Brier-2 of the shown text against the true continuation ({BRIER_PROMPTS} val prompts x 16 draws; higher "
          "is better, 1 is perfect): " + ", ".join(f"{n} {m:.4f} ± {se:.4f}" for n, (m, se) in brier.items()))
    print(f"\nwhole val split{'':13}{'val loss':>10}{'bits/char':>11}{'hard slots':>12}{'soft slots':>12}"
          f"{'steps':>7}{'train s':>9}{'tokens/s':>10}")
    for name, r in (("baseline (plain, 64 slots)", base), ("seed layout (128 slots)", seed)):
        regions = "".join(f"{r[k]:>12.4f}" if k in r else f"{'-':>12}"
                          for k in ("val_loss_hard_slots", "val_loss_soft_slots"))
        print(f"{name:28}{r['val_loss']:>10.4f}{r['val_bits_per_char']:>11.3f}{regions}{r['step']:>7}"
              f"{r['train_wall_s']:>9.0f}{r['tokens_per_s']:>10,.0f}")
    print("(soft slots read the model's own expected embeddings instead of the true characters, so their loss is an "
          "open-loop loss)")
    print(f"\ndata:        {data}\nruns:        {base_dir}, {seed_dir}\n"
          f"metrics:     <run>/metrics.jsonl (TensorBoard: tensorboard --logdir {out})\n"
          f"next:        softar sample {seed_dir} --mode soft --show-soft   |   softar eval {seed_dir}")
    see = inspect_command(seed_dir, out / "inspect.html")
    print(f"see it:      {see}")

    print(f"\n[5/5] soft feedback where the answer is known: a hidden Markov model's symbols in {hmm_data}",
          flush=True)
    prepare_synthetic(hmm_data, HMMSpec())
    hmm_dir = out / "hmm"
    hmm_run = _train(HMM_CONFIG, hmm_cfg, hmm_dir, "     ")
    known = known_answer(hmm_dir, hmm_data, device)
    print_known_answer(known, hmm_run["val_loss"])
    print(f"the study behind it (3 seeds, K = 8 and 32, intervals): softar sweep configs/synthetic/hmm*.toml --seeds 3 "
          f"--report REPORT.md; every figure of one run: softar eval {hmm_dir}")
    summary = {"data_dir": str(data), "baseline": base, "seed_layout": seed, "soft_fraction": sum(soft) / len(soft),
               "brier2": {name: {"mean": m, "se": se} for name, (m, se) in brier.items()},
               "hmm": {"run": hmm_run, "bayes_loss": known["bayes_loss"],
                       **{name: {k: v for k, v in known[name].items() if k not in ("per_window", "per_step")}
                          for name in ("model", "oracle")}},
               "inspect": see}  # the last line names the command that draws the soft generation as a page
    print(json.dumps(summary))
    return summary
