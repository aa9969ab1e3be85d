"""SoftAR and training with the soft-token objectives: the two-pass window, frozen spaces stay frozen, soft inputs
train and resume exactly, old checkpoints load."""

import pytest
import torch
from safetensors.torch import load_file

from softar import SoftarError
from softar.config import LossConfig, ModelConfig, SoftConfig
from softar.faults import logged_losses
from softar.soft.model import SoftAR, upgrade_param_name
from softar.train import train

from .conftest import decoding, soft_model


def weights(run_dir):
    name = (run_dir / "checkpoints/latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / name / "model.safetensors"))


def tiny_model(soft: SoftConfig | None = None, **loss) -> SoftAR:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, d_embed=8, block_size=8, vocab_size=11, vector_head=True,
                      collapse_head=True)
    return soft_model(cfg, loss=LossConfig(**loss), soft=soft)


def test_objective_is_the_weighted_sum_of_parts_computed_by_hand():
    """Each part against its formula written out here (CE from log-softmax, MSE per coordinate, 1 - cosine,
    InfoNCE over the whole vocabulary at temperature 0.25, the collapse head's MSE), and the loss against their
    weighted sum."""
    model = tiny_model(ce=1.0, mse=2.0, cosine=0.5, infonce=0.25, infonce_temperature=0.25, collapse=3.0)
    x, y = torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8))
    loss, parts = model(x, targets=y)
    with torch.no_grad():
        out = model.step(model.E[x])
        target = model.E[y]
        unit = lambda v: v / v.norm(dim=-1, keepdim=True)  # noqa: E731
        by_hand = {
            "ce": -out.logits.log_softmax(-1).gather(-1, y[..., None]).mean(),
            "mse": ((out.y - target) ** 2).sum(-1).mean() / 8,
            "cosine": (1 - (unit(out.y) * unit(target)).sum(-1)).mean(),
            "infonce": -(unit(out.y) @ unit(model.E).T / 0.25).log_softmax(-1).gather(-1, y[..., None]).mean(),
            "collapse": ((out.c - target) ** 2).sum(-1).mean() / 8,
        }
    assert set(parts) == set(by_hand)
    for k, v in by_hand.items():
        torch.testing.assert_close(parts[k].detach(), v, rtol=1e-5, atol=1e-6)
    weights = {"ce": 1.0, "mse": 2.0, "cosine": 0.5, "infonce": 0.25, "collapse": 3.0}
    torch.testing.assert_close(loss.detach(), sum(weights[k] * v for k, v in by_hand.items()), rtol=1e-5, atol=1e-6)


def test_regression_never_moves_E_through_its_target():
    model = tiny_model(ce=0.0, mse=1.0)
    x, y = torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8))
    loss, _ = model(model.E.detach()[x], targets=y)  # inputs detached too
    loss.backward()
    assert model.E.grad is None and model.lm.vector_head.proj.weight.grad is not None


@pytest.mark.parametrize("kind", ["expected", "regress"])
def test_soft_inputs_replace_the_chosen_fraction(kind):
    """Every input but the first is the model's own soft token for it, from a first pass over the true tokens;
    with half the positions chosen, each input is either the truth or that guess."""
    model = tiny_model(SoftConfig(kind=kind)).eval()
    x = torch.randint(0, 11, (3, 8))
    tokens = model.E[x]
    with torch.no_grad():
        first = model.lm.heads(model.lm.hidden(tokens))
        guess = first.logits.softmax(-1) @ model.E if kind == "expected" else first.y
        expected = torch.cat([tokens[:, :1], guess[:, :-1]], dim=1)
        torch.testing.assert_close(model.fill_window(tokens, soft_fraction=1.0), expected, rtol=0, atol=0)
        assert torch.equal(model.fill_window(tokens, soft_fraction=0.0), tokens)
        torch.manual_seed(3)
        half = model.fill_window(tokens, soft_fraction=0.5)
    is_truth, is_guess = ((half == ref).all(-1) for ref in (tokens, expected))
    assert (is_truth | is_guess).all() and is_truth[:, 0].all()
    assert 0 < is_guess[:, 1:].float().mean() < 1


def test_legacy_parameter_names_map_onto_today():
    model = tiny_model()
    names = set(model.state_dict())
    legacy = {n.removeprefix("lm.") for n in names}  # what the GPT at the top of the model called them
    assert {upgrade_param_name(n) for n in legacy} == names
    assert all(upgrade_param_name(n) == n for n in names)  # today's names pass through


@pytest.mark.parametrize("embedding", ["random", "learned"])
def test_frozen_space_stays_frozen(tiny_cfg, tmp_path, embedding):
    out = tmp_path / embedding
    train(tiny_cfg(**{"model.embedding": f'"{embedding}"', "model.vector_head": "true", "loss.mse": 1.0}), out,
          quiet=True)
    E = weights(out)["lm.embed.weight"]
    from softar.model.embedding import frozen_random_table

    frozen = frozen_random_table(*E.shape, seed=0)
    assert torch.equal(E, frozen) == (embedding == "random")


def test_embedding_from_another_run(tiny_cfg, tmp_path):
    donor = tmp_path / "donor"
    train(tiny_cfg(), donor, quiet=True)
    out = tmp_path / "taker"
    train(tiny_cfg(**{"model.embedding": '"checkpoint"', "model.embedding_from": f'"{donor}"'}), out, quiet=True)
    assert torch.equal(weights(out)["lm.embed.weight"], weights(donor)["lm.embed.weight"])
    with pytest.raises(SoftarError, match=r"model.embedding_from: E in .* is \[61, 32\], this model needs \[61, 16\] "):
        train(tiny_cfg(**{"model.embedding": '"checkpoint"', "model.embedding_from": f'"{donor}"',
                          "model.d_embed": 16}), tmp_path / "bad", quiet=True)


def test_soft_input_training_resumes_exactly(tiny_cfg, tmp_path):
    extra = {"loss.soft_inputs": 0.5, "soft.noise": '"gaussian"', "soft.noise_scale": 0.1, "soft.kind": '"moi"',
             "soft.args": "{beta = 2.0}"}
    train(tiny_cfg(**extra), tmp_path / "full", quiet=True)
    train(tiny_cfg(**extra, **{"train.max_iters": 3}), tmp_path / "split", quiet=True)
    train(tiny_cfg(**extra), tmp_path / "split", resume=True, quiet=True)
    assert logged_losses(tmp_path / "full") == logged_losses(tmp_path / "split")


def layout_model(**context) -> SoftAR:
    from softar.config import ContextConfig

    torch.manual_seed(0)
    ctx = ContextConfig(**{"aggregate": 1, "segments": 1, "soft": 4, "segment_len": 4, "project": True, **context})
    return soft_model(ModelConfig(n_layer=2, n_head=2, d_model=16, block_size=14, vocab_size=11), ctx).eval()


def test_rollout_filled_soft_region_equals_step_by_step_generation():
    """The soft region evaluation fills is what generation feeds back: from the same hard tokens, soft generation
    (expected embeddings, nothing collapsed in place) puts the same vectors in the same slots, and the logits
    at every token slot are the generation's next-token logits."""

    model = layout_model()
    ids = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(1))  # 8 hard + 4 soft token slots
    hard, n_soft = 8, 4
    with torch.no_grad():
        window = model.fill_window(model.E[ids], soft_fill="rollout")
        soft_slots = window[:, -n_soft:]
        dec = decoding(mode="soft", collapse="lm_argmax", max_new_tokens=n_soft)
        g = dec.run(model, ids[:, :hard], return_vectors=True)
        gen_window = model.window(torch.cat([model.E[ids[:, :hard]], g.vectors], 1), n_soft=n_soft)
    assert torch.allclose(soft_slots, gen_window[:, -n_soft:], atol=1e-5)
    assert torch.allclose(window, gen_window, atol=1e-5)
    with torch.no_grad():  # the rollout differs from the one-step guess once a soft slot reads soft slots
        one_step = model.fill_window(model.E[ids], soft_fill="one_step")
    assert torch.allclose(one_step[:, -n_soft], window[:, -n_soft], atol=1e-5)  # first soft slot: the same guess
    assert not torch.equal(one_step[:, -1], window[:, -1])


def test_evaluation_reads_the_rollout_and_training_can_too():
    """Without targets the model fills its soft region by a rollout; training keeps the one-step guess unless
    context.soft_fill = "rollout", and with context.fill_draw = 1 every batch sees a partly full hard region."""
    model = layout_model()
    ids = torch.randint(0, 11, (2, 13), generator=torch.Generator().manual_seed(2))
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        assert torch.equal(model(x), model.read(model.fill_window(model.E[x], soft_fill="rollout")).logits)
        rolled = model(x, soft_fill="rollout")
        stepped = model(x, soft_fill="one_step")
    assert not torch.equal(rolled[:, -1], stepped[:, -1])
    model.train()
    loss_one_step = model(x, y)[0]
    model.context_cfg.soft_fill = "rollout"
    loss_rollout = model(x, y)[0]
    loss_rollout.backward()
    assert loss_one_step.item() != loss_rollout.item() and model.lm.E.grad is not None
    model.context_cfg.fill_draw = 1.0
    seen = []
    model.read = (lambda read: lambda window, last=False: (seen.append(window.shape[1]), read(window, last))[1])(
        model.read)
    torch.manual_seed(0)
    for _ in range(6):
        model(x, y)
    assert all(2 + 1 + 4 <= n < 14 for n in seen) and len(set(seen)) > 1  # summary + 1..7 hard + 4 soft


def test_fill_draw_needs_two_hard_slots():
    from softar import config
    from softar.config import ConfigError

    with pytest.raises(ConfigError, match="context.fill_draw"):
        config.load(None, ["model.block_size=6", "context.soft=5", "context.fill_draw=0.5"])
    with pytest.raises(ConfigError, match="context.fill_draw"):
        config.load(None, ["context.fill_draw=1.5"])
    with pytest.raises(ConfigError, match="context.soft_fill"):
        config.load(None, ['context.soft_fill="twice"'])
