import json
import math

import pytest
import torch
from safetensors.torch import load_file

from softar import SoftarError, config
from softar.data.prepare import prepare
from softar.rundir import load_run
from softar.train import lr_at, train

from .conftest import tiny_overrides


def train_losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    name = (run_dir / "checkpoints/latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / name / "model.safetensors"))


def test_lr_schedule():
    t = config.load(None, ["train.lr=1.0", "train.min_lr=0.1", "train.warmup_iters=10",
                           "train.lr_decay_iters=110"]).train
    assert lr_at(0, t) == pytest.approx(1 / 11)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == lr_at(500, t) == pytest.approx(0.1)
    # two phases (a recall warm-up of 50 steps, then the task): each warms up and decays on its own
    assert lr_at(0, t, 50) == pytest.approx(1 / 11) and lr_at(30, t, 50) == pytest.approx(0.55)
    assert lr_at(49, t, 50) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 39 / 40)))
    assert lr_at(50, t, 50) == pytest.approx(1 / 11) and lr_at(60, t, 50) == pytest.approx(1.0)
    assert lr_at(85, t, 50) == pytest.approx(0.55) and lr_at(110, t, 50) == pytest.approx(0.1)
    # the warm-up at its own peak (task.recall_lr): its phase scaled to it, the task's phase as before
    assert lr_at(0, t, 50, 2.0) == pytest.approx(2 / 11) and lr_at(10, t, 50, 2.0) == pytest.approx(2.0)
    assert lr_at(30, t, 50, 2.0) == pytest.approx(0.1 + 0.5 * 1.9) and lr_at(49, t, 50, 2.0) > 0.1
    assert [lr_at(s, t, 50, 2.0) for s in (50, 60, 85, 110)] == [lr_at(s, t, 50) for s in (50, 60, 85, 110)]


def test_train_writes_a_complete_run(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_cfg(), out, quiet=True)
    assert result["step"] == 8 and result["val_loss"] > 0
    assert json.loads((out / "result.json").read_text()) == result
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 1337 and len(run["data"]["text_sha256"]) == 64 and run["versions"]["torch"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["vocab_size"] > 0 and cfg["train"]["lr_decay_iters"] == 8  # resolved values saved
    assert sorted(train_losses(out)) == list(range(1, 9))
    assert any((out / "tb").iterdir())


@pytest.mark.parametrize("extra", [{}, {"model.dropout": 0.2, "train.grad_accum": 2}])
def test_resume_is_exact(tiny_cfg, tmp_path, extra):
    """N steps in one go == k steps, stop, resume to N: the same loss at every step and the same weights."""
    full, split = tmp_path / "full", tmp_path / "split"
    train(tiny_cfg(**extra), full, quiet=True)
    train(tiny_cfg(**extra, **{"train.max_iters": 5}), split, quiet=True)  # lr_decay_iters stays 8
    train(tiny_cfg(**extra), split, resume=True, quiet=True)
    assert train_losses(full) == train_losses(split)
    a, b = final_weights(full), final_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_activation_checkpointing_recomputes_exactly(tiny_cfg, tmp_path):
    """train.checkpointing keeps no activations inside the blocks and recomputes them in backward, dropout masks
    included: the same loss at every step and the same weights as without."""
    from softar.soft.model import build_model

    extra = {"model.dropout": 0.2, "model.n_layer": 3}
    model = build_model(config.resolve(tiny_cfg(**extra), 65))
    calls = []
    model.lm.backbone.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model.lm.checkpoint_activations()
    model.lm.hidden(torch.randn(2, 8, model.E.shape[1])).last.sum().backward()
    assert len(calls) == 2  # the block ran again in backward
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    train(tiny_cfg(**extra), plain, quiet=True)
    train(tiny_cfg(**extra, **{"train.checkpointing": "true"}), recomputed, quiet=True)
    assert train_losses(plain) == train_losses(recomputed)
    a, b = final_weights(plain), final_weights(recomputed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_directory_refusals(tiny_cfg, tmp_path, small_corpus):
    out = tmp_path / "run"
    with pytest.raises(SoftarError, match="nothing to resume"):
        train(tiny_cfg(), out, resume=True, quiet=True)
    train(tiny_cfg(), out, quiet=True)
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SoftarError, match="already holds a run"):
        train(tiny_cfg(), out, quiet=True)
    with pytest.raises(SoftarError, match=r"holds a different run \(differs in train.lr\)"):
        train(tiny_cfg(**{"train.lr": 0.5}), out, resume=True, quiet=True)
    other = tmp_path / "other_data"
    prepare(str(small_corpus), other, "bpe", 300)
    with pytest.raises(SoftarError, match=r"differs in model.vocab_size, data.dir"):
        train(config.load(None, tiny_overrides(other)), out, resume=True, quiet=True)
    with pytest.raises(SoftarError, match="vocabulary mismatch: .* trained with 61 tokens, .* has 300"):
        load_run(out, torch.device("cpu"), str(other))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot  # nothing touched
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(SoftarError, match="not empty"):
        train(tiny_cfg(), tmp_path / "full", quiet=True)


def test_block_size_larger_than_split_is_refused(tiny_cfg, tmp_path):
    with pytest.raises(SoftarError, match="model.block_size"):
        train(tiny_cfg(**{"model.block_size": 100_000}), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
