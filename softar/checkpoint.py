"""Checkpoints that load without unpickling and survive a kill at any moment.

Layout of `RUN_DIR/checkpoints/`:

    step_000250/            one checkpoint: *.safetensors (tensors) + trainer.json (plain data)
        manifest.json       sha256 of every other file, checked on load
    latest                  the name of the newest complete checkpoint

A checkpoint is written into a hidden temp folder, every file fsynced, then renamed into place; only then does
`latest` move (write, fsync, rename). A kill at any point leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from softar import SoftarError
from softar.data.dataset import sha256_file

LATEST = "latest"
MANIFEST = "manifest.json"
TRAINER_JSON = "trainer.json"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]  # file stem -> tensors, e.g. "model" -> state_dict
    meta: dict  # the contents of trainer.json


def save_checkpoint(ckpt_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict,
                    keep_last: int) -> Path:
    """Write one checkpoint atomically, point `latest` at it, and prune to the newest `keep_last`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = ckpt_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    for stem, tdict in tensors.items():
        path = tmp / f"{stem}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tdict.items()}, str(path))
        _fsync_path(path)
        files[path.name] = sha256_file(path)
    path = tmp / TRAINER_JSON
    path.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    _fsync_path(path)
    files[path.name] = sha256_file(path)
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "sha256": files}, indent=1), encoding="utf-8")
    _fsync_path(tmp / MANIFEST)
    _fsync_path(tmp)

    final = ckpt_dir / name
    if final.exists():  # the same step saved again (e.g. after a resume): swap it out, never half-replace
        old = ckpt_dir / f".old-{name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_path(ckpt_dir)
    write_text_atomic(ckpt_dir / LATEST, name + "\n")
    _prune(ckpt_dir, keep_last, keep=name)
    return final


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    done = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for p in done[:-keep_last]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_dir.iterdir():  # leftovers of writes that were killed midway
        if p.name.startswith((".tmp-", ".old-")) and not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_dir / pointer.read_text(encoding="utf-8").strip()
    if not path.is_dir():
        raise SoftarError(f"{pointer} names {path.name}, which does not exist")
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder after checking every file against its manifest. Never unpickles."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise SoftarError(f"checkpoint {path} has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise SoftarError(f"checkpoint {path}: {MANIFEST} is not valid JSON") from None
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    if present != set(manifest["sha256"]):
        raise SoftarError(f"checkpoint {path}: files {sorted(present)} do not match its manifest")
    for fname, digest in manifest["sha256"].items():
        if sha256_file(path / fname) != digest:
            raise SoftarError(f"checkpoint {path}: sha256 mismatch for {fname} (corrupt or modified)")
    tensors = {}
    for p in sorted(path.glob("*.safetensors")):
        try:
            tensors[p.name.removesuffix(".safetensors")] = load_file(str(p), device=str(map_location))
        except Exception as e:  # safetensors parses a header and raw bytes only: anything else is refused
            raise SoftarError(f"checkpoint {path}: {p.name} is not a valid safetensors file ({e})") from None
    meta = json.loads((path / TRAINER_JSON).read_text(encoding="utf-8"))
    return Checkpoint(path, tensors, meta)


def optimizer_to_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into flat tensors (for safetensors) and plain data (for JSON).
    State keys may be parameter indices or parameter names (which contain dots), so '/' separates the field."""
    tensors, scalars = {}, {}
    for key, state in sd["state"].items():
        for k, v in state.items():
            (tensors if torch.is_tensor(v) else scalars)[f"{key}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "int_keys": all(
        isinstance(k, int) for k in sd["state"])}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    """The inverse of optimizer_to_tensors: an optimizer state_dict."""
    state: dict = {}
    for key, v in list(tensors.items()) + list(plain["scalars"].items()):
        owner, k = key.rsplit("/", 1)
        state.setdefault(int(owner) if plain.get("int_keys", True) else owner, {})[k] = v
    # JSON turned tuples (AdamW's betas) into lists: turn them back so the state_dict is what was saved
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in plain["param_groups"]]
    return {"state": state, "param_groups": groups}


def rename_params(ckpt: Checkpoint, rename: Callable[[str], str]) -> Checkpoint:
    """The same checkpoint with every parameter name mapped through `rename`: the model's tensors and the
    optimizer's per-parameter state (whose keys are '<name>/<field>') and parameter groups."""
    def re_key(key: str) -> str:
        owner, sep, field = key.rpartition("/")
        return f"{rename(owner)}{sep}{field}" if sep else rename(key)

    tensors = dict(ckpt.tensors)
    if "model" in tensors:
        tensors["model"] = {rename(k): v for k, v in tensors["model"].items()}
    meta = ckpt.meta
    opt = meta.get("optimizer")
    if "optimizer" in tensors and opt and not opt.get("int_keys", True):
        tensors["optimizer"] = {re_key(k): v for k, v in tensors["optimizer"].items()}
        opt = {**opt, "scalars": {re_key(k): v for k, v in opt["scalars"].items()},
               "param_groups": [{**g, "params": [rename(p) for p in g["params"]]} for g in opt["param_groups"]]}
        meta = {**meta, "optimizer": opt}
    return replace(ckpt, tensors=tensors, meta=meta)
