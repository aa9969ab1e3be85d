"""A Hugging Face model folder (a local `save_pretrained` folder; nothing is ever fetched from a hub): the checks
and metadata softAR needs before it loads the model (`softar.model.hf`) or trains on it (`model.hf`)."""

from __future__ import annotations

import os
from pathlib import Path

from softar import SoftarError


def transformers_module():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched, ever
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers
    except ImportError:
        raise SoftarError("--hf needs the optional extra: pip install 'softar[hf]'") from None
    transformers.utils.logging.set_verbosity_error()  # softar speaks for itself: one line per error
    transformers.utils.logging.disable_progress_bar()
    return transformers


def check_folder(path: str | Path, what: str = "--hf") -> None:
    """A local folder (never a hub id: nothing is downloaded) whose every entry is a plain file or folder: a FIFO or
    a device there would hang whatever reads it."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and len(path.parts) <= 2:  # "gpt2", "openai/gpt2"
        raise SoftarError(f"{what}: {path} is not a local folder (hub ids are not downloaded; save the model with "
                          "save_pretrained and pass its folder)")
    if not path.is_dir():
        raise SoftarError(f"{what}: {path} is not a folder ({'it does not exist' if not path.exists() else 'a file'}"
                          "; a model folder written by save_pretrained)")
    odd = sorted(p.name for p in path.iterdir() if not (p.is_file() or p.is_dir()))
    if odd:
        raise SoftarError(f"{what}: {path / odd[0]} is neither a regular file nor a folder")


def hf_config(path: str | Path, what: str = "--hf"):
    """The folder's `config.json` as transformers reads it, or a one-line error naming `what` gave the folder."""
    check_folder(path, what)
    if not (Path(path) / "config.json").is_file():
        raise SoftarError(f"{what}: {path} holds no Hugging Face model (no config.json; write it with save_pretrained)")
    try:
        return transformers_module().AutoConfig.from_pretrained(str(path), local_files_only=True,
                                                                trust_remote_code=False)
    except Exception as e:  # whatever transformers raises on a broken config
        raise SoftarError(f"{what}: cannot read the model config in {path}: "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None


def positions_of(c) -> int:
    """The positions a transformers config's model reads."""
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", 1024)


def hf_shape(path: str | Path) -> dict[str, int]:
    """softAR's model.* fields for the folder's network, so that a run's config says what it trained."""
    c = hf_config(path, "model.hf")
    try:
        shape = {"n_layer": c.num_hidden_layers, "n_head": c.num_attention_heads, "d_model": c.hidden_size,
                 "vocab_size": c.vocab_size}
    except AttributeError as e:
        raise SoftarError(f"model.hf: {path}/config.json lacks {e.name}; not a causal LM softAR knows") from None
    return {**shape, "d_embed": shape["d_model"]}


def hf_param_count(path: str | Path) -> int:
    """The parameters of the folder's network, counted from its config (under a meta device, nothing is allocated)."""
    model = transformers_module().AutoModelForCausalLM.from_config(hf_config(path, "model.hf"))
    return sum(p.numel() for p in model.parameters())


def folder_sha256(path: str | Path) -> str:
    """One checksum of a model folder: every file's name and sha256, in name order (what a run trained from)."""
    from softar.disk import sha256_bytes, sha256_file

    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    return sha256_bytes("\n".join(f"{p.relative_to(path)} {sha256_file(p)}" for p in files).encode())
