"""A run directory: its files, its recorded config and data, and loading its latest model for eval/sample."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from softar import SoftarError
from softar.checkpoint import latest_checkpoint, load_checkpoint
from softar.config import Config, from_dict
from softar.data.dataset import load_meta, sha256_file
from softar.data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from softar.model import GPT
from softar.model.embedding import PRETRAINED_FILE

CONFIG_FILE = "config.json"  # the resolved config
RUN_FILE = "run.json"  # seed, versions, data fingerprint, command line
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"  # what `softar train` printed
CHECKPOINTS = "checkpoints"


def data_fingerprint(data_dir: str | Path) -> dict:
    meta = load_meta(data_dir)
    return {"text_sha256": meta["text_sha256"], "tokenizer_sha256": sha256_file(Path(data_dir) / TOKENIZER_FILE),
            "vocab_size": meta["vocab_size"], "tokens": meta["tokens"]}


def read_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise SoftarError(f"{run_dir} is not a softar run (no {CONFIG_FILE})")
    return from_dict(json.loads(path.read_text(encoding="utf-8")))


def check_data(run_dir: Path, data_dir: str | Path) -> None:
    """The data must be what the run was trained on: same text, same tokenizer, same vocabulary."""
    recorded = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))["data"]
    current = data_fingerprint(data_dir)
    if recorded["vocab_size"] != current["vocab_size"]:
        raise SoftarError(f"vocabulary mismatch: {run_dir} was trained with {recorded['vocab_size']} tokens, "
                          f"{data_dir} has {current['vocab_size']}")
    if recorded != current:
        raise SoftarError(f"data in {data_dir} differs from the data {run_dir} was trained on")


def load_embedding(model: GPT, cfg: Config) -> None:
    """Copy a frozen E into `model`: another run's (model.embedding = "checkpoint") or the data's pretrained vectors
    (model.embedding = "pretrained"), checking its shape."""
    if cfg.model.embedding == "checkpoint":
        key, source = "model.embedding_from", Path(cfg.model.embedding_from)
        path = latest_checkpoint(source / CHECKPOINTS)
        if path is None:
            raise SoftarError(f"model.embedding_from: {source} has no checkpoint to take E from")
        E = load_checkpoint(path).tensors["model"]["embed.weight"]
    else:
        key, source = "model.embedding", Path(cfg.data.dir) / PRETRAINED_FILE
        if not source.is_file():
            raise SoftarError(f"model.embedding: 'pretrained' needs {source} (softar prepare --tokenizer glove)")
        E = load_file(str(source))["E"]
    if E.shape != model.embed.weight.shape:
        raise SoftarError(f"{key}: E in {source} is {list(E.shape)}, this model needs "
                          f"{list(model.embed.weight.shape)} (model.d_embed sets m)")
    with torch.no_grad():
        model.embed.weight.copy_(E)


@dataclass
class LoadedRun:
    cfg: Config
    model: GPT
    tokenizer: Tokenizer
    step: int


def load_run(run_dir: str | Path, device: torch.device, data_dir: str | None = None) -> LoadedRun:
    """The latest checkpoint's model, in eval mode, with the run's tokenizer."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    data_dir = data_dir or cfg.data.dir
    check_data(run_dir, data_dir)
    path = latest_checkpoint(run_dir / CHECKPOINTS)
    if path is None:
        raise SoftarError(f"{run_dir} has no checkpoint yet")
    ckpt = load_checkpoint(path, device)
    model = GPT(cfg.model, cfg.loss, cfg.context).to(device)
    model.load_state_dict(ckpt.tensors["model"])
    model.eval()
    return LoadedRun(cfg, model, load_tokenizer(data_dir), ckpt.meta["step"])
