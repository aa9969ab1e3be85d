import json
from pathlib import Path

import numpy as np
import pytest

from softar import SoftarError
from softar.data.corpus import convert_play_markdown, read_corpus, shakespeare_text
from softar.data.dataset import WindowSampler, load_meta, load_split, sequential_windows
from softar.data.prepare import prepare
from softar.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

from .conftest import FIXTURES

EXPECTED_PLAY = """ALPHA:
Who's there? Stand-to,
and unfold yourself.

BETA:
Nay, answer me.
I'll speak on, though he be gone.

ALPHA:
A flourish of trumpets.
Then, two judges"""


def test_convert_play_markdown_fixture():
    md = (FIXTURES / "plays/comedies/a-tiny-play.md").read_text()
    assert convert_play_markdown(md) == EXPECTED_PLAY


def test_bundled_shakespeare_size_and_alphabet():
    text = shakespeare_text()
    assert 4_700_000 < len(text) < 4_850_000
    assert 65 <= len(set(text)) <= 75
    assert "_" not in text and "\\" not in text and "**" not in text and "#" not in text


def test_read_corpus_folder_and_errors(tmp_path):
    (tmp_path / "b.md").write_text("second\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "skip.csv").write_text("x")
    text, _ = read_corpus(str(tmp_path))
    assert text == "first\n\n\nsecond\n"
    with pytest.raises(SoftarError, match="not found"):
        read_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(SoftarError, match="empty"):
        read_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SoftarError, match="not UTF-8"):
        read_corpus(str(tmp_path / "latin1.txt"))


def test_char_tokenizer_round_trip(small_corpus):
    text = small_corpus.read_text()
    tok = CharTokenizer.train(text)
    ids = tok.encode_array(text)
    assert ids.tolist() == tok.encode(text)
    assert tok.decode(ids.tolist()) == text
    with pytest.raises(SoftarError, match="not in the tokenizer"):
        tok.encode("\u00e9")


def test_bpe_tokenizer_round_trip(small_corpus, tmp_path):
    text = small_corpus.read_text()
    tok = BPETokenizer.train(text, 300)
    assert tok.vocab_size == 300
    sample = text[:5000] + "unseen wörds ✓\n"
    assert tok.decode(tok.encode(sample)) == sample
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path)
    assert again.encode(sample) == tok.encode(sample)


def test_memmap_layout(char_data, small_corpus):
    meta = load_meta(char_data)
    text = small_corpus.read_text()
    split = int(len(text) * 0.9)
    tok = load_tokenizer(char_data)
    raw_train = np.fromfile(char_data / "train.bin", dtype=np.uint16)  # nanoGPT reads it exactly like this
    raw_val = np.fromfile(char_data / "val.bin", dtype=np.uint16)
    assert raw_train.tolist() == tok.encode(text[:split])
    assert raw_val.tolist() == tok.encode(text[split:])
    assert meta["dtype"] == "uint16" and meta["tokens"] == {"train": split, "val": len(text) - split}
    assert load_split(char_data, "val").tolist() == raw_val.tolist()


def test_prepare_bpe_and_refusals(small_corpus, tmp_path):
    out = tmp_path / "bpe"
    meta = prepare(str(small_corpus), out, "bpe", 300)
    assert meta["vocab_size"] == 300 and meta["tokenizer"] == "bpe"
    assert json.loads((out / "meta.json").read_text()) == meta
    before = (out / "train.bin").read_bytes()
    assert prepare(str(small_corpus), out, "bpe", 300) == meta  # same input: nothing to do
    other = tmp_path / "other.txt"
    other.write_text("different text entirely\n" * 50)
    with pytest.raises(SoftarError, match="already holds a different or incomplete dataset"):
        prepare(str(other), out, "char")
    assert (out / "train.bin").read_bytes() == before


def test_window_sampler_state_resumes_exactly(char_data):
    data = load_split(char_data, "train")
    a = WindowSampler(data, 16, 4, seed=1)
    a.next_batch()
    state = a.state().clone()
    expected = a.next_batch()
    b = WindowSampler(data, 16, 4, seed=99)
    b.load_state(state)
    got = b.next_batch()
    assert all((e == g).all() for e, g in zip(expected, got, strict=True))
    x, y = got
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are inputs shifted by one


def test_sequential_windows_cover_every_target_once():
    data = np.arange(103)
    targets = np.concatenate([y.flatten().numpy() for _, y in sequential_windows(data, 16, 3)])
    assert sorted(targets.tolist()) == list(range(1, 103))


def test_prepare_writes_nothing_on_bad_corpus(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SoftarError):
        prepare(str(bad), tmp_path / "out", "char")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in Path(tmp_path).iterdir()] == ["bad.txt"]
