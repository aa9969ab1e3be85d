"""`softar quickstart`: prepare the bundled Shakespeare, train nanoGPT's CPU recipe, evaluate, sample."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from softar import config
from softar.data.prepare import prepare
from softar.device import pick_device
from softar.generate import generate
from softar.rundir import CONFIG_FILE, load_run
from softar.train import train

QUICKSTART_CONFIG = "shakespeare_char.toml"


def config_path(name: str) -> Path:
    """A preset shipped in softar/configs (also reachable as configs/ in a checkout)."""
    return Path(str(resources.files("softar") / "configs" / name))


def quickstart(out: Path, data: Path, overrides: list[str] = ()) -> dict:
    cfg = config.load(config_path(QUICKSTART_CONFIG), [f"data.dir={json.dumps(str(data))}", *overrides])
    print(f"[1/3] preparing character-level Shakespeare in {data}", flush=True)
    meta = prepare("shakespeare", data, "char")
    print(f"      {meta['characters']['train'] + meta['characters']['val']:,} characters, "
          f"{meta['vocab_size']} symbols", flush=True)

    resume = (out / CONFIG_FILE).is_file()  # a second quickstart continues (or just re-reports) the first
    print(f"[2/3] training {QUICKSTART_CONFIG} into {out}" + (" (resuming)" if resume else ""), flush=True)
    result = train(cfg, out, resume=resume)

    # training ends with the loss over the whole val split (result["val_loss"]): no second pass here
    print("[3/3] sampling 300 characters from the saved checkpoint", flush=True)
    device = pick_device(cfg.train.device)
    run = load_run(out, device)
    gen = torch.Generator(device).manual_seed(cfg.train.seed)
    prompt = torch.tensor([run.tokenizer.encode("\n")], device=device)
    text = run.tokenizer.decode(generate(run.model, prompt, 300, 0.8, 200, gen)[0].tolist())
    print("-" * 60 + text + "\n" + "-" * 60)
    print(f"val loss on the whole val split {result['val_loss']:.4f} ({result['val_bits_per_char']:.3f} bits/char) "
          f"after {result['step']} steps, "
          f"{result['train_wall_s']:.0f} s, {result['tokens_per_s']:,.0f} tokens/s")
    print(f"data:        {data}\nrun:         {out}\nconfig:      {out / CONFIG_FILE}\n"
          f"metrics:     {out / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {out / 'tb'})\n"
          f"checkpoints: {out / 'checkpoints'}\n"
          f"next:        softar sample {out} --prompt 'ROMEO:'   |   softar eval {out}")
    summary = {"data_dir": str(data), **result}
    print(json.dumps(summary))
    return summary
