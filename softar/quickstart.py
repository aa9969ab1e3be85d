"""`softar quickstart`: prepare the bundled Shakespeare, train nanoGPT's CPU recipe and the seed's context layout at
the same token budget, generate with soft tokens, and compare the two val losses."""

from __future__ import annotations

import json
import shlex
from importlib import resources
from pathlib import Path

from softar import config
from softar.config import SoftConfig
from softar.data.dataset import load_split, random_windows
from softar.data.prepare import prepare
from softar.decode import Decoding
from softar.device import pick_device
from softar.evaluate.generation import shown_brier
from softar.rundir import CONFIG_FILE, load_run
from softar.soft.collapse import CollapsePolicy, Sampling
from softar.soft.feeds import HardFeed, SoftFeed
from softar.soft.model import check_names
from softar.train import train

QUICKSTART_CONFIG = "shakespeare_char.toml"  # the baseline: nanoGPT's CPU recipe
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


def quickstart(out: Path, data: Path, overrides: list[str] = ()) -> dict:
    base_cfg, seed_cfg = (config.load(config_path(name), [f"data.dir={json.dumps(str(data))}", *overrides])
                          for name in (QUICKSTART_CONFIG, SEED_CONFIG))  # bad overrides fail before anything is written
    for cfg in (base_cfg, seed_cfg):
        check_names(cfg)
    print(f"[1/4] preparing character-level Shakespeare in {data}", flush=True)
    meta = prepare("shakespeare", data, "char")
    print(f"      {meta['characters']['train'] + meta['characters']['val']:,} characters, "
          f"{meta['vocab_size']} symbols", flush=True)
    base_dir, seed_dir = out / "baseline", out / "seed_layout"
    base = _train(QUICKSTART_CONFIG, base_cfg, base_dir, "[2/4]")
    seed = _train(SEED_CONFIG, seed_cfg, seed_dir, "[3/4]")

    print(f"[4/4] the same val prompt continued by both runs: the baseline's ordinary sampling, and the seed "
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
    summary = {"data_dir": str(data), "baseline": base, "seed_layout": seed, "soft_fraction": sum(soft) / len(soft),
               "brier2": {name: {"mean": m, "se": se} for name, (m, se) in brier.items()},
               "inspect": see}  # the last line names the command that draws the soft generation as a page
    print(json.dumps(summary))
    return summary
