"""`softar prepare`: corpus -> tokenizer + train.bin / val.bin memmaps + meta.json."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from softar import SoftarError
from softar.data.corpus import read_corpus
from softar.data.dataset import META_FILE, SPLITS, load_meta, load_split, token_dtype
from softar.data.glove import PRETRAINED_FILE, glove_vectors, pretrained_table
from softar.data.tokenizer import TOKENIZER_FILE, BPETokenizer, CharTokenizer, WordTokenizer, load_tokenizer
from softar.disk import check_owned, claim, clean_stale_temps, sha256_bytes, staged_folder

VAL_FRACTION = 0.1


def prepare(corpus: str, out: str | Path, tokenizer: str = "char", vocab_size: int = 1024,
            force: bool = False, hf: str | Path | None = None) -> dict:
    """Convert, tokenize and write a dataset folder; returns its meta. Writes into a temp folder first so
    a failure leaves nothing half-written, and refuses to replace a different dataset unless `force`, and anything
    softar did not write (its manifest, `softar.disk.check_owned`) even then. `tokenizer="hf"`: the `tokenizer.json`
    of the Hugging Face model folder `hf`, copied into the dataset byte for byte (`model.hf` trains on it)."""
    out = Path(out).absolute()
    if tokenizer not in ("char", "bpe", "glove", "hf"):
        raise SoftarError(f"--tokenizer: expected 'char', 'bpe', 'glove' or 'hf', got {tokenizer!r}")
    if (tokenizer == "hf") != (hf is not None):
        raise SoftarError("--hf DIR goes with --tokenizer hf, and --tokenizer hf needs --hf DIR")
    pretrained = pretrained_tokenizer(hf) if hf is not None else None
    claim_out(out)
    text, source = read_corpus(corpus)
    text_sha = sha256_bytes(text.encode("utf-8"))
    sized = tokenizer in ("bpe", "glove")
    old = existing_dataset(out, force, lambda old: old.get("text_sha256") == text_sha and old.get("tokenizer") ==
                           tokenizer and (not sized or old.get("requested_vocab_size",
                                                               old.get("vocab_size")) == vocab_size)
                           and (pretrained is None or old.get("tokenizer_sha256") == sha256_bytes(pretrained.source)))
    if old is not None:
        return old  # already prepared: nothing to do

    split = int(len(text) * (1 - VAL_FRACTION))  # by position: first 90% train, last 10% val
    train_text, val_text = text[:split], text[split:]
    if len(val_text) < 2:
        raise SoftarError(f"--corpus: {len(text)} characters are too few to split into train and val")
    table = None
    if tokenizer == "char":
        tok = CharTokenizer.train(text)  # the whole text's alphabet, as nanoGPT does
    elif tokenizer == "bpe":
        tok = BPETokenizer.train(train_text, vocab_size)  # BPE merges are learned on train only
    elif pretrained is not None:
        tok = pretrained
    else:  # words that have GloVe vectors, by frequency in train; E is saved beside the tokens
        words, vectors = glove_vectors()
        tok = WordTokenizer.train(train_text, vocab_size, set(words))
        table = pretrained_table(tok.words, words, vectors)
    meta = {
        "source": source,
        "tokenizer": tokenizer,
        "requested_vocab_size": vocab_size if sized else None,
        **({"tokenizer_sha256": sha256_bytes(pretrained.source), "hf": str(hf)} if pretrained is not None else {}),
        "characters": {"train": len(train_text), "val": len(val_text)},
        "text_sha256": text_sha,
        "val_fraction": VAL_FRACTION,
    }
    files = {PRETRAINED_FILE: lambda path: save_file({"E": table}, str(path))} if table is not None else {}
    return write_dataset(out, force, tok, {"train": tok.encode_array(train_text), "val": tok.encode_array(val_text)},
                         meta, files)


def pretrained_tokenizer(folder: str | Path) -> BPETokenizer:
    """The fast tokenizer (`tokenizer.json`) of a Hugging Face model folder."""
    from softar.hf_folder import check_folder

    check_folder(folder)
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise SoftarError(f"--hf: {folder} has no {TOKENIZER_FILE} (save a fast tokenizer there with "
                          "tokenizer.save_pretrained)")
    return BPETokenizer.from_file(path)


def claim_out(out: Path) -> None:
    """--out must be a folder (or absent) in a folder softar can write in: checked before any work."""
    if out.is_symlink() or out.exists() and not out.is_dir():
        raise SoftarError(f"--out {out} exists and is not a directory")
    claim(out.parent, (), f"--out {out}")


def existing_dataset(out: Path, force: bool, same: Callable[[dict], bool]) -> dict | None:
    """The meta of the complete dataset already in `out` when `same(meta)` says it is the one asked for (nothing to
    do), else None when `out` may be written: empty, or with `force` a folder softar wrote. Anything else is an
    error; what a killed prepare of this --out left is cleaned first."""
    clean_stale_temps(out.parent, (out.name, out.name + ".old"))
    if not (out.is_dir() and any(out.iterdir())):
        return None
    old = None if force else _complete_dataset(out)
    if old is not None and same(old):
        return old
    check_owned(out, "--out")  # never replace or delete what softar did not write
    if not force:
        raise SoftarError(f"{out} already holds a different or incomplete dataset; choose another --out or "
                          "pass --force to replace it")
    return None


def write_dataset(out: Path, force: bool, tok, splits: dict[str, np.ndarray], meta: dict,
                  files: dict[str, Callable[[Path], None]]) -> dict:
    """Write a dataset folder at once (`staged_folder`): each split's ids as train.bin / val.bin, the tokenizer,
    `files` (name -> a writer of that path) and meta.json (`meta` plus the vocabulary, dtype and token counts);
    returns the meta."""
    dtype = token_dtype(tok.vocab_size)
    meta = {**meta, "vocab_size": tok.vocab_size, "dtype": dtype.name,
            "tokens": {name: len(ids) for name, ids in splits.items()}}
    with staged_folder(out, force, "dataset") as tmp:
        for name, ids in splits.items():
            ids.astype(dtype).tofile(tmp / f"{name}.bin")
        tok.save(tmp / TOKENIZER_FILE)
        for name, write in files.items():
            write(tmp / name)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


def _complete_dataset(out: Path) -> dict | None:
    """The dataset's meta if every file of it is there and consistent, else None."""
    try:
        meta = load_meta(out)
        for split in SPLITS:
            load_split(out, split)
        load_tokenizer(out, meta["vocab_size"])
    except SoftarError:
        return None
    return meta
