"""Tokenizers: character-level, and byte-level BPE through HF `tokenizers`. Both save to `tokenizer.json`."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from softar import SoftarError
from softar.disk import read_json
from softar.hf_folder import transformers_module

TOKENIZER_FILE = "tokenizer.json"


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise SoftarError(f"character {e.args[0]!r} is not in the tokenizer's vocabulary") from None

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path for whole corpora: a lookup table over code points."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(max(map(ord, self.chars)) + 1, -1, dtype=np.int64)
        table[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        ids = table[np.minimum(codes, len(table) - 1)]
        bad = (ids < 0) | (codes >= len(table))
        if bad.any():
            raise SoftarError(f"character {chr(codes[bad.argmax()])!r} is not in the tokenizer's vocabulary")
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"type": "char", "chars": self.chars}), encoding="utf-8")


class BPETokenizer:
    """A `tokenizers` tokenizer: softAR's own byte-level BPE, or a pretrained model's `tokenizer.json`, kept byte
    for byte (`source`) so that the data's file is the model's. Text is encoded without special tokens."""

    kind = "bpe"

    def __init__(self, tok, source: bytes | None = None):  # tok: tokenizers.Tokenizer
        self.tok, self.source = tok, source

    @classmethod
    def from_file(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        source = path.read_bytes()
        try:
            return cls(Tokenizer.from_str(source.decode("utf-8")), source)
        except Exception as e:  # the Rust parser's errors: a malformed or unknown tokenizer file
            raise SoftarError(f"tokenizer {path}: not a valid tokenizer ({str(e).splitlines()[0][:80]})") from None

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet):
            raise SoftarError(f"--vocab-size {vocab_size} is below the 256 byte symbols byte-level BPE needs")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
        # train on lines so one huge string does not become one "sentence"
        tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        lines = text.splitlines(keepends=True)
        ids = [e.ids for e in self.tok.encode_batch(lines, add_special_tokens=False)]
        return np.fromiter((i for line in ids for i in line), dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def save(self, path: Path) -> None:
        if self.source is not None:
            path.write_bytes(self.source)
        else:
            self.tok.save(str(path))


class WordTokenizer:
    """Lower-case words and punctuation over a fixed vocabulary (for pretrained word vectors such as GloVe), with
    <unk> for words outside it and <nl> for line breaks. Decoding joins words with spaces: it is lossy."""

    kind = "word"
    UNK, NL = "<unk>", "<nl>"
    PATTERN = re.compile(r"\n|[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")

    def __init__(self, words: list[str]):
        self.words = words
        self.stoi = {w: i for i, w in enumerate(words)}

    @classmethod
    def split(cls, text: str) -> list[str]:
        return [cls.NL if w == "\n" else w for w in cls.PATTERN.findall(text.lower())]

    @classmethod
    def train(cls, text: str, vocab_size: int, known: set[str] | None = None) -> WordTokenizer:
        """The `vocab_size - 2` most frequent words of `text` (among `known`, if given), after <unk> and <nl>."""
        counts = Counter(w for w in cls.split(text) if w != cls.NL and (known is None or w in known))
        return cls([cls.UNK, cls.NL] + [w for w, _ in counts.most_common(max(0, vocab_size - 2))])

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, 0) for w in self.split(text)]

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids).replace(f" {self.NL} ", "\n").replace(self.NL, "\n")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"type": "word", "words": self.words}), encoding="utf-8")


class TaskTokenizer:
    """A reasoning task's fixed, case-kept vocabulary of words, punctuation and <special> tokens (`softar.tasks`).
    A word outside it is an error, not <unk>: a task's text is generated, so an unknown word is a wrong file."""

    kind = "task"
    PATTERN = re.compile(r"<[a-z]+>|[A-Za-z0-9]+|[^\sA-Za-z0-9]")

    def __init__(self, words: list[str]):
        self.words = words
        self.stoi = {w: i for i, w in enumerate(words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[w] for w in self.PATTERN.findall(text)]
        except KeyError as e:
            raise SoftarError(f"word {e.args[0]!r} is not in the task's vocabulary") from None

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    encode_prompt = encode  # a task's question starts without BOS

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids).replace(" .", ".").replace(" ?", "?")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"type": "task", "words": self.words}), encoding="utf-8")


TASK_MARKERS = ["<bot>", "<eot>", "<thought>", "<pause>", "<ans>"]  # `softar.tasks.base.SPECIALS` but <eos>
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")


class HFTokenizer:
    """The folder's own tokenizer, behind softAR's encode / decode. Its files must be there: without them
    transformers makes a stand-in tokenizer of one token, which would encode every prompt to nothing."""

    def __init__(self, path: str | Path):
        if not any((Path(path) / name).is_file() for name in HF_TOKENIZER_FILES):
            raise SoftarError(f"--hf: {path} holds no tokenizer (none of {', '.join(HF_TOKENIZER_FILES)}); save it "
                              "beside the model with tokenizer.save_pretrained")
        try:
            self.tok = transformers_module().AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # whatever transformers raises on a missing or broken tokenizer
            raise SoftarError(f"--hf: no usable tokenizer in {path}: "
                              f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None
        if len(self.tok) < 2:
            raise SoftarError(f"--hf: the tokenizer in {path} has {len(self.tok)} token; it cannot encode text")
        self.added: list[int] = []

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def add_task_tokens(self) -> HFTokenizer:
        """A reasoning task's markers (<bot>, <eot>, <thought>, <pause>, <ans>) as special tokens after the folder's
        own, in that fixed order (a run's ids are the same at every load); <eos> is the tokenizer's own EOS, or a
        new special token where it has none. -> self."""
        before = len(self.tok)
        if self.tok.eos_token_id is None:
            self.tok.add_special_tokens({"eos_token": "<eos>"})
        self.tok.add_tokens(TASK_MARKERS, special_tokens=True)
        self.added = list(range(before, len(self.tok)))  # the ids new to the folder's tokenizer
        return self

    @property
    def stoi(self) -> dict[str, int]:
        """The ids of a task's special tokens (after `add_task_tokens`), as the task tokenizer's `stoi` has them."""
        ids = dict(zip(TASK_MARKERS, self.tok.convert_tokens_to_ids(TASK_MARKERS), strict=True))
        return {"<eos>": self.tok.eos_token_id, **ids}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as the model expects one: with the BOS token its tokenizer adds (Llama's; GPT-2 adds none)."""
        return self.tok(text)["input_ids"]

    @property
    def eos_id(self) -> int | None:
        """Where generation stops, as `transformers.generate` stops."""
        return self.tok.eos_token_id

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


Tokenizer = CharTokenizer | BPETokenizer | WordTokenizer | TaskTokenizer | HFTokenizer


def _strings(raw: dict, key: str, path: Path, length: int | None) -> list[str]:
    items = raw.get(key)
    if not isinstance(items, list) or not items or not all(isinstance(c, str) and c for c in items) \
            or len(set(items)) != len(items) or (length and any(len(c) != length for c in items)):
        raise SoftarError(f"tokenizer {path}: {key!r} must be a list of distinct non-empty strings"
                          + (f" of length {length}" if length else ""))
    return items


def load_tokenizer(data_dir: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """The dataset's tokenizer, checked: a corrupt file, or one whose vocabulary is not `vocab_size` (meta.json's),
    is a one-line error."""
    path = Path(data_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise SoftarError(f"no tokenizer in {data_dir} (expected {path}; run `softar prepare`)")
    raw = read_json(path, "tokenizer")
    if not isinstance(raw, dict):
        raise SoftarError(f"tokenizer {path}: expected a JSON object")
    if raw.get("type") == "char":
        tok = CharTokenizer(_strings(raw, "chars", path, 1))
    elif raw.get("type") == "word":
        tok = WordTokenizer(_strings(raw, "words", path, None))
    elif raw.get("type") == "task":
        tok = TaskTokenizer(_strings(raw, "words", path, None))
    else:
        tok = BPETokenizer.from_file(path)
    if vocab_size is not None and tok.vocab_size != vocab_size:
        raise SoftarError(f"tokenizer {path} has {tok.vocab_size} tokens, but meta.json says {vocab_size}")
    return tok
