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
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from softar import SoftarError
from softar.disk import (
    check_fields,
    clean_stale_temps,
    fsync_path,
    read_json,
    read_text,
    sha256_file,
    temp_name,
    write_text_atomic,
)

LATEST = "latest"
STEP_NAME = re.compile(r"step_\d{6,}")
MANIFEST = "manifest.json"
TRAINER_JSON = "trainer.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]  # file stem -> tensors, e.g. "model" -> state_dict
    meta: dict  # the contents of trainer.json


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on the CPU, each with memory of its own: safetensors refuses tensors that share it (a Hugging Face
    model's LM head tied to its embeddings), so a second name of the same memory is saved as a copy, which loads
    back into the same parameter."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    return out


def save_checkpoint(ckpt_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict,
                    keep_last: int) -> Path:
    """Write one checkpoint atomically, point `latest` at it, and prune to the newest `keep_last`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    clean_stale_temps(ckpt_dir)  # leftovers of writers that were killed midway
    tmp = temp_name(ckpt_dir / name)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    for stem, tdict in tensors.items():
        path = tmp / f"{stem}.safetensors"
        save_file(unshared(tdict), str(path))
        fsync_path(path)
        files[path.name] = sha256_file(path)
    path = tmp / TRAINER_JSON
    path.write_text(json.dumps({**meta, "step": step}, indent=1), encoding="utf-8")
    fsync_path(path)
    files[path.name] = sha256_file(path)
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "sha256": files}, indent=1), encoding="utf-8")
    fsync_path(tmp / MANIFEST)
    fsync_path(tmp)

    final = ckpt_dir / name
    if final.exists():  # the same step saved again (e.g. after a resume): swap it out, never half-replace
        old = temp_name(ckpt_dir / f"{name}.old")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    fsync_path(ckpt_dir)
    write_text_atomic(ckpt_dir / LATEST, name + "\n")
    _prune(ckpt_dir, keep_last, keep=name)
    return final


def step_folders(ckpt_dir: Path) -> list[Path]:
    """The run's checkpoint folders (step_NNNNNN, real folders, no links), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if STEP_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    for p in step_folders(ckpt_dir)[:-keep_last]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` names, which must be a step folder of this run's own `checkpoints/`. Without
    `latest` (deleted by hand, say), the newest step folder whose manifest verifies, with a warning; None when
    there is no checkpoint at all."""
    pointer = ckpt_dir / LATEST
    if not pointer.exists() and not pointer.is_symlink():
        folders = step_folders(ckpt_dir)
        for path in reversed(folders):
            try:
                verify(path)
            except SoftarError:
                continue
            print(f"softar: warning: {pointer} is missing; using the newest valid checkpoint, {path.name}",
                  file=sys.stderr)
            return path
        if folders:  # checkpoints exist but none verifies: never start over on top of them
            raise SoftarError(f"{pointer} is missing and no checkpoint in {ckpt_dir} verifies "
                              f"({', '.join(p.name for p in folders[-3:])})")
        return None
    if pointer.is_symlink() or not pointer.is_file():
        raise SoftarError(f"{pointer} is not a plain file")
    name = read_text(pointer, "checkpoint pointer", limit=4096).strip()
    path = ckpt_dir / name
    if not STEP_NAME.fullmatch(name):
        raise SoftarError(f"{pointer} names {name[:40]!r}, not a step folder of this run's checkpoints")
    if path.is_symlink() or not path.is_dir():
        raise SoftarError(f"{pointer} names {name}, which does not exist")
    return path


def verify(path: Path) -> dict:
    """Check every file of a checkpoint folder against its manifest; returns the manifest."""
    manifest = read_json(path / MANIFEST, f"checkpoint {path.name}", {"step": int, "sha256": dict})
    digests = manifest["sha256"]
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    if present != set(digests) or not all(isinstance(d, str) for d in digests.values()):
        raise SoftarError(f"checkpoint {path}: files {sorted(present)} do not match its manifest")
    for fname, digest in digests.items():
        if (path / fname).is_symlink() or sha256_file(path / fname) != digest:
            raise SoftarError(f"checkpoint {path}: sha256 mismatch for {fname} (corrupt or modified)")
    if manifest["step"] != int(path.name.removeprefix("step_")):
        raise SoftarError(f"checkpoint {path}: its manifest says step {manifest['step']}")
    return manifest


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder after checking every file against its manifest. Never unpickles."""
    manifest = verify(path)
    tensors = {}
    for p in sorted(path.glob("*.safetensors")):
        try:
            tensors[p.name.removesuffix(".safetensors")] = load_file(str(p), device=str(map_location))
        except Exception as e:  # safetensors parses a header and raw bytes only: anything else is refused
            raise SoftarError(f"checkpoint {path}: {p.name} is not a valid safetensors file ({e})") from None
    meta = read_json(path / TRAINER_JSON, f"checkpoint {path.name}", {"step": int})
    if meta["step"] != manifest["step"]:
        raise SoftarError(f"checkpoint {path}: {TRAINER_JSON} says step {meta['step']}, its manifest "
                          f"{manifest['step']}")
    return Checkpoint(path, tensors, meta)


def check_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], where: str) -> None:
    """Loading is strict: the same names, shapes and dtypes as the model expects, or a one-line error."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise SoftarError(f"{where}: " + "; ".join(
            f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for what, names in (("missing", missing), ("unexpected", extra)) if names))
    for name, t in expected.items():
        if got[name].shape != t.shape or got[name].dtype != t.dtype:
            raise SoftarError(f"{where}: {name} is {list(got[name].shape)} {got[name].dtype}, the model needs "
                              f"{list(t.shape)} {t.dtype}")


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


def check_optimizer_state(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], plain: dict,
                          groups: list[dict], where: str) -> None:
    """The optimizer state belongs to these parameters and this optimizer: every '<name>/<field>' names one of
    them, a moment has its parameter's shape, a step count is a count, and every setting of the saved parameter
    groups but the learning rate (set each step) equals the fresh optimizer's `groups`."""
    check_fields(plain, {"param_groups": list, "scalars": dict}, f"{where}: optimizer")
    saved = plain["param_groups"]
    if len(saved) != len(groups) or not all(isinstance(g, dict) for g in saved):
        raise SoftarError(f"{where}: the optimizer has other parameter groups than this run's")
    for g, fresh in zip(saved, groups, strict=True):
        for key, value in fresh.items():
            got = tuple(g[key]) if isinstance(g.get(key), list) else g.get(key, value)
            if key not in ("params", "lr") and got != value:
                raise SoftarError(f"{where}: the optimizer's {key} is {got!r}, this run's is {value!r}")
    for key, value in tensors.items():
        owner, _, field = key.rpartition("/")
        if owner not in params:
            raise SoftarError(f"{where}: optimizer state for unknown parameter {owner[:60]!r}")
        if field in ("exp_avg", "exp_avg_sq") and value.shape != params[owner].shape:
            raise SoftarError(f"{where}: optimizer {field} of {owner} is {list(value.shape)}, the parameter is "
                              f"{list(params[owner].shape)}")
        if field == "step" and (value.numel() != 1 or not bool(torch.isfinite(value).all()) or value.item() < 0):
            raise SoftarError(f"{where}: optimizer step count of {owner} is not a count")
    named = {n for g in plain["param_groups"] if isinstance(g, dict) for n in g.get("params", [])}
    if named != {n for n, p in params.items() if p.requires_grad}:
        raise SoftarError(f"{where}: the optimizer's parameter groups do not name this model's parameters")
