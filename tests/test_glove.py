"""Word-level data with pretrained GloVe vectors (the optional `glove` extra, installed in CI)."""

import numpy as np
import torch
from safetensors.torch import load_file

from softar.data.glove import glove_vectors, pretrained_table
from softar.data.prepare import prepare
from softar.data.tokenizer import WordTokenizer, load_tokenizer
from softar.train import train

from .conftest import tiny_overrides


def test_word_tokenizer():
    tok = WordTokenizer.train("The cat, the dog.\nThe end thou'rt", 6, known={"the", "cat", ",", "dog", "."})
    assert tok.words == ["<unk>", "<nl>", "the", "cat", ",", "dog"]  # by frequency, ties in first-seen order
    ids = tok.encode("THE dog, the cat\nzebra")
    assert tok.decode(ids) == "the dog , the cat\n<unk>"
    assert WordTokenizer.split("Don't stop.") == ["don't", "stop", "."]


def test_pretrained_table_takes_known_rows_and_fills_the_rest():
    words, vectors = ["a", "b", "c"], np.array([[3.0, 4.0], [0.0, 5.0], [6.0, 8.0]], dtype=np.float32)
    table = pretrained_table(["<unk>", "c", "a"], words, vectors)
    assert torch.equal(table[1], torch.tensor([6.0, 8.0])) and torch.equal(table[2], torch.tensor([3.0, 4.0]))
    assert abs(table[0].norm().item() - 7.5) < 1e-5  # the mean norm of the rows it found (10 and 5)


def test_glove_dataset_and_a_frozen_pretrained_space(small_corpus, tmp_path):
    out = tmp_path / "glove"
    meta = prepare(str(small_corpus), out, "glove", 300)
    assert meta["tokenizer"] == "glove" and meta["vocab_size"] == 300
    tok = load_tokenizer(out)
    E = load_file(str(out / "embedding.safetensors"))["E"]
    words, vectors = glove_vectors()
    row = {w: i for i, w in enumerate(words)}
    for i in (2, 50, 299):
        assert torch.equal(E[i], torch.from_numpy(np.array(vectors[row[tok.words[i]]])))
    run = tmp_path / "run"
    train_cfg = tiny_overrides(out, **{"model.embedding": '"pretrained"', "model.d_embed": 50})
    from softar import config

    train(config.load(None, train_cfg), run, quiet=True)
    name = (run / "checkpoints/latest").read_text().strip()
    assert torch.equal(load_file(str(run / "checkpoints" / name / "model.safetensors"))["lm.embed.weight"], E)
