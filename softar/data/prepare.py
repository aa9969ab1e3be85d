"""`softar prepare`: corpus -> tokenizer + train.bin / val.bin memmaps + meta.json."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from softar import SoftarError
from softar.data.corpus import read_corpus
from softar.data.dataset import META_FILE, SPLITS, load_meta, load_split, token_dtype
from softar.data.glove import PRETRAINED_FILE, glove_vectors, pretrained_table
from softar.data.tokenizer import TOKENIZER_FILE, BPETokenizer, CharTokenizer, WordTokenizer, load_tokenizer
from softar.disk import check_owned, claim, clean_stale_temps, sha256_bytes, staged_folder

VAL_FRACTION = 0.1


def prepare(corpus: str, out: str | Path, tokenizer: str = "char", vocab_size: int = 1024,
            force: bool = False) -> dict:
    """Convert, tokenize and write a dataset folder; returns its meta. Writes into a temp folder first so
    a failure leaves nothing half-written, and refuses to replace a different dataset unless `force`, and anything
    softar did not write (its manifest, `softar.disk.check_owned`) even then."""
    out = Path(out).absolute()
    if tokenizer not in ("char", "bpe", "glove"):
        raise SoftarError(f"--tokenizer: expected 'char', 'bpe' or 'glove', got {tokenizer!r}")
    if out.is_symlink() or out.exists() and not out.is_dir():
        raise SoftarError(f"--out {out} exists and is not a directory")
    claim(out.parent, (), f"--out {out}")  # a folder softar can write in, before any tokenizing
    text, source = read_corpus(corpus)
    text_sha = sha256_bytes(text.encode("utf-8"))
    clean_stale_temps(out.parent, (out.name, out.name + ".old"))  # what a killed prepare of this --out left
    if out.is_dir() and any(out.iterdir()):
        old = None if force else _complete_dataset(out)
        if old is not None and old.get("text_sha256") == text_sha and old.get("tokenizer") == tokenizer and (
                tokenizer == "char" or old.get("requested_vocab_size", old.get("vocab_size")) == vocab_size):
            return old  # already prepared: nothing to do
        check_owned(out, "--out")  # never replace or delete what softar did not write
        if not force:
            raise SoftarError(f"{out} already holds a different or incomplete dataset; choose another --out or "
                              "pass --force to replace it")

    split = int(len(text) * (1 - VAL_FRACTION))  # by position: first 90% train, last 10% val
    train_text, val_text = text[:split], text[split:]
    if len(val_text) < 2:
        raise SoftarError(f"--corpus: {len(text)} characters are too few to split into train and val")
    table = None
    if tokenizer == "char":
        tok = CharTokenizer.train(text)  # the whole text's alphabet, as nanoGPT does
    elif tokenizer == "bpe":
        tok = BPETokenizer.train(train_text, vocab_size)  # BPE merges are learned on train only
    else:  # words that have GloVe vectors, by frequency in train; E is saved beside the tokens
        words, vectors = glove_vectors()
        tok = WordTokenizer.train(train_text, vocab_size, set(words))
        table = pretrained_table(tok.words, words, vectors)
    dtype = token_dtype(tok.vocab_size)

    with staged_folder(out, force, "dataset") as tmp:
        counts = {}
        for name, part in (("train", train_text), ("val", val_text)):
            ids = tok.encode_array(part)
            ids.astype(dtype).tofile(tmp / f"{name}.bin")
            counts[name] = len(ids)
        tok.save(tmp / TOKENIZER_FILE)
        if table is not None:
            save_file({"E": table}, str(tmp / PRETRAINED_FILE))
        meta = {
            "source": source,
            "tokenizer": tokenizer,
            "vocab_size": tok.vocab_size,
            "requested_vocab_size": None if tokenizer == "char" else vocab_size,
            "dtype": dtype.name,
            "tokens": counts,
            "characters": {"train": len(train_text), "val": len(val_text)},
            "text_sha256": text_sha,
            "val_fraction": VAL_FRACTION,
        }
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
