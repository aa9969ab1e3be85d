"""A run directory: its files, its recorded config and data, and loading its latest model for eval/sample."""

from __future__ import annotations

import fcntl
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from softar import SoftarError
from softar.checkpoint import Checkpoint, check_state, latest_checkpoint, load_checkpoint, rename_params
from softar.config import Config, from_dict, seeded
from softar.data.dataset import load_meta, load_split
from softar.data.glove import PRETRAINED_FILE
from softar.data.tokenizer import TOKENIZER_FILE, HFTokenizer, Tokenizer, load_tokenizer
from softar.disk import read_json, sha256_file
from softar.soft.model import SoftAR, build_model, upgrade_param_name
from softar.tasks.data import TASK_FILE, is_task_dir, load_task_meta, task_tokenizer

CONFIG_FILE = "config.json"  # the resolved config
RUN_FILE = "run.json"  # seed, versions, data fingerprint, command line
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"  # what `softar train` printed
CHECKPOINTS = "checkpoints"


def data_fingerprint(data_dir: str | Path) -> dict:
    if is_task_dir(data_dir):  # a reasoning task's JSON splits: task.json holds their checksums
        meta = load_task_meta(data_dir)
        tokenizer = Path(data_dir) / TOKENIZER_FILE  # none for free text (qa): the model's reads it
        return {"text_sha256": sha256_file(Path(data_dir) / TASK_FILE),
                "tokenizer_sha256": sha256_file(tokenizer) if meta["vocab_size"] else "",
                "vocab_size": meta["vocab_size"], "tokens": meta["counts"]}
    meta = load_meta(data_dir)
    return {"text_sha256": meta["text_sha256"], "tokenizer_sha256": sha256_file(Path(data_dir) / TOKENIZER_FILE),
            "vocab_size": meta["vocab_size"], "tokens": meta["tokens"]}


def read_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise SoftarError(f"{run_dir} is not a softar run (no {CONFIG_FILE})")
    return from_dict(read_json(path, "run config"))


RUN_FIELDS = {"data": {"text_sha256": str, "tokenizer_sha256": str, "vocab_size": int, "tokens": dict}}


def check_data(run_dir: Path, data_dir: str | Path) -> None:
    """The data must be what the run was trained on: same text, same tokenizer, same vocabulary."""
    recorded = read_json(run_dir / RUN_FILE, "run record", RUN_FIELDS)["data"]
    current = data_fingerprint(data_dir)
    if recorded["vocab_size"] != current["vocab_size"]:
        raise SoftarError(f"vocabulary mismatch: {run_dir} was trained with {recorded['vocab_size']} tokens, "
                          f"{data_dir} has {current['vocab_size']}")
    if recorded != current:
        raise SoftarError(f"data in {data_dir} differs from the data {run_dir} was trained on")


def hf_source(cfg: Config) -> dict:
    """For `model.hf`: the folder and its checksum (the run record keeps them), once a corpus is checked to be
    tokenized with the folder's tokenizer (a task's records are text, tokenized with it at load)."""
    from softar.hf_folder import check_folder, folder_sha256

    folder = Path(cfg.model.hf)
    check_folder(folder, "model.hf")
    theirs = folder / TOKENIZER_FILE
    if not theirs.is_file():
        raise SoftarError(f"model.hf: {folder} has no {TOKENIZER_FILE} (save a fast tokenizer there with "
                          "tokenizer.save_pretrained)")
    if not cfg.task.name and sha256_file(theirs) != data_fingerprint(cfg.data.dir)["tokenizer_sha256"]:
        raise SoftarError(f"data.dir: {cfg.data.dir} was not tokenized with the tokenizer of model.hf {folder} "
                          f"(prepare it with softar prepare --tokenizer hf --hf {folder})")
    return {"path": str(folder), "sha256": folder_sha256(folder)}


def check_hf(run_dir: Path, cfg: Config, current: dict | None = None) -> None:
    """A run of a Hugging Face model reads its folder again (the network's code and config): it must be the folder
    the run trained from. `current`: `hf_source(cfg)` when the caller has it (a large folder takes a while to
    hash)."""
    if not cfg.model.hf:
        return
    recorded = read_json(run_dir / RUN_FILE, "run record").get("hf")
    current = current or hf_source(cfg)
    if not isinstance(recorded, dict) or recorded.get("sha256") != current["sha256"]:
        raise SoftarError(f"model.hf: {cfg.model.hf} is not the folder {run_dir} trained from (its files changed "
                          "since, or the run record lacks its checksum)")


def load_model_checkpoint(path: Path, device: torch.device | str = "cpu") -> Checkpoint:
    """A checkpoint with today's parameter names, whatever softar version wrote it."""
    return rename_params(load_checkpoint(path, device), upgrade_param_name)


def load_latest(run_dir: Path, device: torch.device | str = "cpu", tries: int = 5) -> Checkpoint:
    """The run's latest checkpoint, read while the run may still be training: a checkpoint pruned or replaced
    under the reader is read again from the new `latest`."""
    for attempt in range(tries):
        path = latest_checkpoint(run_dir / CHECKPOINTS)
        if path is None:
            raise SoftarError(f"{run_dir} has no checkpoint yet")
        try:
            return load_model_checkpoint(path, device)
        except (SoftarError, FileNotFoundError) as e:
            moved = not path.is_dir() or latest_checkpoint(run_dir / CHECKPOINTS) != path
            if not moved or attempt == tries - 1:
                if isinstance(e, FileNotFoundError):
                    raise SoftarError(f"{path} disappeared while it was read (the run pruned it)") from None
                raise
    raise AssertionError("unreachable")


def load_embedding(model: SoftAR, cfg: Config) -> None:
    """Copy a frozen E into `model`: another run's (model.embedding = "checkpoint") or the data's pretrained vectors
    (model.embedding = "pretrained"), checking its shape."""
    if cfg.model.embedding == "checkpoint":
        key, source = "model.embedding_from", Path(cfg.model.embedding_from)
        path = latest_checkpoint(source / CHECKPOINTS)
        if path is None:
            raise SoftarError(f"model.embedding_from: {source} has no checkpoint to take E from")
        E = load_model_checkpoint(path).tensors.get("model", {}).get("lm.embed.weight")
        if E is None:
            raise SoftarError(f"model.embedding_from: {path} holds no embedding table")
    else:
        key, source = "model.embedding", Path(cfg.data.dir) / PRETRAINED_FILE
        if not source.is_file():
            raise SoftarError(f"model.embedding: 'pretrained' needs {source} (softar prepare --tokenizer glove)")
        try:
            E = load_file(str(source))["E"]
        except Exception as e:  # safetensors parses a header and raw bytes only: anything else is refused
            raise SoftarError(f"model.embedding: {source} is not a valid embedding file ({str(e)[:80]})") from None
    if E.shape != model.E.shape:
        raise SoftarError(f"{key}: E in {source} is {list(E.shape)}, this model needs "
                          f"{list(model.E.shape)} (model.d_embed sets m)")
    with torch.no_grad():
        model.E.copy_(E)


def load_init_weights(model: SoftAR, cfg: Config) -> dict:
    """Fine-tuning (train.init_from): the run's latest weights into `model`. Every tensor of the checkpoint must
    fit one of the model's; the model's own that the checkpoint lacks (summary-slot modules the config adds) keep
    their fresh initialisation. -> {"checkpoint", "step"}: what was loaded, for the run record."""
    source = Path(seeded(cfg.train.init_from, cfg.train.seed))
    if not (source / RUN_FILE).is_file():
        raise SoftarError(f"train.init_from: {source} is not a softar run (it has no {RUN_FILE})")
    if not (source / RESULT_FILE).is_file():
        raise SoftarError(f"train.init_from: {source} has not finished training (no {RESULT_FILE})")
    check_data(source, cfg.data.dir)
    check_hf(source, read_config(source))
    ckpt = load_latest(source)
    got, own = ckpt.tensors.get("model", {}), model.state_dict()
    extra = sorted(set(got) - set(own))
    if extra:
        raise SoftarError(f"train.init_from: {ckpt.path} holds {extra[0]}, which this model does not have")
    check_state({k: own[k] for k in got}, got, f"train.init_from: checkpoint {ckpt.path}")
    if not all(torch.isfinite(t).all() for t in got.values() if t.is_floating_point()):
        raise SoftarError(f"train.init_from: checkpoint {ckpt.path} holds non-finite weights")
    model.load_state_dict(got, strict=False)
    return {"checkpoint": str(ckpt.path), "step": ckpt.meta["step"]}


@dataclass
class LoadedRun:
    cfg: Config
    model: SoftAR
    tokenizer: Tokenizer
    step: int


def load_run(run_dir: str | Path, device: torch.device, data_dir: str | None = None) -> LoadedRun:
    """The latest checkpoint's model, in eval mode, with the run's tokenizer; a regression-only model with its
    cosine readout fitted on the train split."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    data_dir = data_dir or cfg.data.dir
    check_data(run_dir, data_dir)
    check_hf(run_dir, cfg)
    vocab = data_fingerprint(data_dir)["vocab_size"]
    if not cfg.model.vocab_size >= vocab:
        raise SoftarError(f"{run_dir / CONFIG_FILE}: model.vocab_size {cfg.model.vocab_size} does not cover the "
                          f"data's {vocab} tokens (not a config softar train wrote)")
    ckpt = load_latest(run_dir, device)
    model = build_model(cfg).to(device)
    check_state(model.state_dict(), ckpt.tensors.get("model", {}), f"checkpoint {ckpt.path}")
    if not all(torch.isfinite(t).all() for t in ckpt.tensors["model"].values() if t.is_floating_point()):
        raise SoftarError(f"checkpoint {ckpt.path} holds non-finite weights (a diverged run?)")
    model.load_state_dict(ckpt.tensors["model"])
    model.eval()
    if model.regression_only:  # its LM head never trained: every reader goes through the cosine readout
        model.fit_cosine_readout(load_split(data_dir, "train"))
    if cfg.task.name:
        tokenizer = task_tokenizer(cfg, data_dir)
    elif cfg.model.hf:  # the same vocabulary as the data's (hf_source checked it), with the model's BOS and EOS
        tokenizer = HFTokenizer(cfg.model.hf)
    else:
        tokenizer = load_tokenizer(data_dir, vocab)
    return LoadedRun(cfg, model, tokenizer, ckpt.meta["step"])


class RunLock:
    """An advisory lock on a run directory (fcntl on RUN_DIR/.softar.lock, which holds the holder's pid), so that
    two processes never write one run. Re-entrant within a process (a sweep holds its run while it trains it);
    released when the holder exits, however it exits."""

    FILE = ".softar.lock"
    _held: dict[Path, list] = {}  # resolved run dir -> [fd, depth]

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def __enter__(self) -> RunLock:
        key = self.run_dir.resolve()
        if key in self._held:
            self._held[key][1] += 1
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / self.FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise SoftarError(f"cannot use {self.run_dir} as a run directory: {e.strerror or e}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a planted link to someone's file: never write it
            os.close(fd)
            raise SoftarError(f"{self.run_dir / self.FILE} is not softar's lock file (a link or not a plain file)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SoftarError(f"{self.run_dir} is in use by another softar process (pid {holder}); wait for it "
                              "or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._held[key] = [fd, 1]
        return self

    def __exit__(self, *exc) -> None:
        key = self.run_dir.resolve()
        self._held[key][1] -= 1
        if self._held[key][1] == 0:
            fd = self._held.pop(key)[0]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def load_hf(path: str | Path, device: torch.device, overrides: list[str] = ()) -> LoadedRun:
    """A Hugging Face causal LM saved with `save_pretrained`, as a SoftAR: the window defaults to the model's
    positions; `context.*`, `soft.*` and `model.block_size` overrides give it a layout and soft tokens. Kind
    embeddings are off unless asked for: an untrained slot encoder would only perturb a pretrained model."""
    from softar import config
    from softar.hf_folder import hf_config, positions_of
    from softar.model.hf import HFVectorLM

    for ov in overrides:
        if not ov.split("=", 1)[0].strip().startswith(("context.", "soft.", "model.block_size")):
            raise SoftarError(f"--hf: {ov!r}: only context.*, soft.* and model.block_size apply to a Hugging Face "
                              "model")
    cfg = config.load(None, [f"model.hf={json.dumps(str(path))}", f"model.block_size={positions_of(hf_config(path))}",
                             "context.kind_embeddings=false", *overrides])
    model = build_model(cfg, HFVectorLM.from_pretrained(path)).to(device).eval()
    tokenizer = HFTokenizer(path)
    if tokenizer.vocab_size > model.E.shape[0]:
        raise SoftarError(f"--hf: the tokenizer in {path} has {tokenizer.vocab_size} tokens, the model's vocabulary "
                          f"{model.E.shape[0]}")
    return LoadedRun(cfg, model, tokenizer, 0)


def export_pretrained(run_dir: str | Path, out: str | Path) -> dict:
    """`softar export RUN --hf OUT`: a run of `model.hf` as a Hugging Face folder (its trained weights, the source
    folder's config and tokenizer) that `from_pretrained` loads; written whole into a new folder, never over one.
    The network is all it holds: a context layout or soft-token spec of the run is softAR's, not the model's."""
    from softar.device import pick_device
    from softar.disk import claim, staged_folder
    from softar.model.hf import HFVectorLM

    out = Path(out).absolute()
    if out.is_symlink():
        raise SoftarError(f"--hf {out}: a symbolic link; choose a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SoftarError(f"--hf {out}: exists and is not an empty folder; choose a new one")
    claim(out.parent, (), f"--hf {out}")
    run = load_run(run_dir, pick_device("cpu"))
    if not isinstance(run.model.lm, HFVectorLM):
        raise SoftarError(f"{run_dir}: a run of softAR's own GPT; only runs of a Hugging Face model (model.hf) export "
                          "to its format")
    tokenizer = run.tokenizer.tok  # the folder's, with a task's markers added
    with staged_folder(out, False, "model", flag="--hf") as tmp:
        run.model.lm.merged().save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return {"run_dir": str(run_dir), "hf": str(out), "step": run.step, "source": run.cfg.model.hf,
            "layout_not_exported": not run.cfg.context.plain}
