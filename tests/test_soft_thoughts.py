import random

import pytest
import torch

from softar import config
from softar.data.tokenizer import TaskTokenizer
from softar.evaluate.reasoning import solve
from softar.soft.model import build_model
from softar.soft.thoughts import forward_thoughts
from softar.tasks import VOCABULARY, get_task
from softar.tasks.data import Encoder
from softar.tasks.prosqa import make_record


def task_model(kind: str = "hidden", pos_emb: str = "learned", **extra):
    cfg = config.load(None, ["task.name='prosqa'", "task.render='symbolic'", "task.mode='thoughts'",
                             "task.max_stage=3", "model.n_layer=2", "model.n_head=2", "model.d_model=32",
                             "model.block_size=200", f"model.pos_emb='{pos_emb}'", f"soft.kind='{kind}'",
                             *(f"{k}={v}" for k, v in extra.items())])
    cfg = config.resolve(cfg, len(VOCABULARY))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    enc = Encoder(get_task("prosqa"), TaskTokenizer(VOCABULARY), "symbolic", cfg.task)
    rng = random.Random(1)
    return model, enc, [enc.example(make_record(rng)) for _ in range(12)]


@pytest.mark.parametrize("kind", ["hidden", "expected", "gated", "moi", "collapse"])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_thought_generation_with_the_cache_equals_generation_without_it(kind, pos_emb):
    model, enc, exs = task_model(kind, pos_emb, **({"model.collapse_head": "true"} if kind == "collapse" else {}))
    a = solve(model, enc, exs, stage=3, max_new=8, use_cache=True, seed=5)
    b = solve(model, enc, exs, stage=3, max_new=8, use_cache=False, seed=5)
    for x, y in zip(a, b, strict=True):
        assert x["ids"] == y["ids"] and x["thoughts"].shape == (3, 32)
        torch.testing.assert_close(x["thoughts"], y["thoughts"], rtol=1e-4, atol=1e-5)


def test_training_forward_runs_one_pass_per_thought_and_matches_recomputation():
    """The cached training forward gives the logits a naive loop gets by recomputing the whole prefix for every
    thought, and a batch gives each row what the row gets alone."""
    model, enc, exs = task_model("expected")
    length = len(exs[0].question)
    same = [e for e in exs if len(e.question) == length] or exs[:1]
    x, _ = enc.batch(same, 2)
    logits, thoughts = forward_thoughts(model, x)
    start = length
    vectors = torch.nn.functional.embedding(x, model.E)
    for j in range(2):  # the reference: thought j, the expected embedding after a full forward over all before it
        out = model.read(vectors[:, : start + j], last=True)
        vectors = vectors.clone()
        vectors[:, start + j] = out.logits[:, -1].softmax(-1) @ model.E
    torch.testing.assert_close(thoughts, vectors[:, start : start + 2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, model.read(vectors).logits, rtol=1e-4, atol=1e-4)
    alone, _ = forward_thoughts(model, x[:1])
    torch.testing.assert_close(alone, logits[:1], rtol=1e-4, atol=1e-4)


def test_the_loss_trains_the_thoughts(monkeypatch):
    """The graph runs through every thought, as in Coconut: the loss on what follows <eot> has a gradient with
    respect to each thought, and each thought is a function of the weights (not detached)."""
    from softar.soft.feeds import SoftFeed

    model, enc, exs = task_model("hidden")
    model.train()
    made, real = [], SoftFeed.choose

    def spy(self, model, out, draw):
        choice = real(self, model, out, draw)
        choice.vector.retain_grad()
        made.append(choice.vector)
        return choice

    monkeypatch.setattr(SoftFeed, "choose", spy)
    x, y = enc.batch(exs[:1], 3)
    loss, parts = model(x, targets=y)
    loss.backward()
    assert len(made) == 3 and set(parts) == {"ce"}
    assert all(v.grad_fn is not None and v.grad is not None and v.grad.abs().sum() > 0 for v in made)


def test_thought_slots_must_line_up_in_a_batch():
    model, enc, exs = task_model()
    short, long = (sorted(exs, key=lambda e: len(e.question))[i] for i in (0, -1))
    x, _ = enc.batch([short, long], 2)
    with pytest.raises(ValueError, match="same positions in every row"):
        forward_thoughts(model, x)
