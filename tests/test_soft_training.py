"""Training with the soft-token objectives: frozen spaces stay frozen, two-pass soft inputs train and resume exactly."""

import pytest
import torch
from safetensors.torch import load_file

from softar import SoftarError
from softar.config import LossConfig, ModelConfig
from softar.faults import logged_losses
from softar.losses import training_objective
from softar.model import GPT
from softar.train import train


def weights(run_dir):
    name = (run_dir / "checkpoints/latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / name / "model.safetensors"))


def tiny_model(**loss) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, d_embed=8, block_size=8, vocab_size=11, vector_head=True,
                      collapse_head=True)
    return GPT(cfg, LossConfig(**loss))


def test_objective_sums_its_weighted_parts():
    model = tiny_model(ce=1.0, mse=2.0, cosine=0.5, infonce=0.25, vmf=0.1, collapse=3.0)
    x, y = torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8))
    loss, parts = model(x, targets=y)
    assert set(parts) == {"ce", "mse", "cosine", "infonce", "vmf", "collapse"}
    weights_ = {"ce": 1.0, "mse": 2.0, "cosine": 0.5, "infonce": 0.25, "vmf": 0.1, "collapse": 3.0}
    torch.testing.assert_close(loss, sum(weights_[k] * v for k, v in parts.items()))


def test_regression_never_moves_E_through_its_target():
    model = tiny_model(ce=0.0, mse=1.0)
    x, y = torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8))
    loss, _ = training_objective(model, model.embed.weight.detach()[x], y, model.loss_cfg)  # inputs detached too
    loss.backward()
    assert model.embed.weight.grad is None and model.vector_head.proj.weight.grad is not None


def test_soft_inputs_replace_the_chosen_fraction():
    model = tiny_model(soft_inputs=1.0)
    x = torch.randint(0, 11, (2, 8))
    inputs = model.embed(x)
    torch.manual_seed(0)
    with torch.no_grad():
        a, _ = training_objective(model, inputs, x, model.loss_cfg)
        b, _ = training_objective(model, inputs, x, model.loss_cfg.__class__(soft_inputs=0.0))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("embedding", ["random", "learned"])
def test_frozen_space_stays_frozen(tiny_cfg, tmp_path, embedding):
    out = tmp_path / embedding
    train(tiny_cfg(**{"model.embedding": f'"{embedding}"', "model.vector_head": "true", "loss.mse": 1.0}), out,
          quiet=True)
    E = weights(out)["embed.weight"]
    from softar.model.embedding import frozen_random_table

    frozen = frozen_random_table(*E.shape, seed=0)
    assert torch.equal(E, frozen) == (embedding == "random")


def test_embedding_from_another_run(tiny_cfg, tmp_path):
    donor = tmp_path / "donor"
    train(tiny_cfg(), donor, quiet=True)
    out = tmp_path / "taker"
    train(tiny_cfg(**{"model.embedding": '"checkpoint"', "model.embedding_from": f'"{donor}"'}), out, quiet=True)
    assert torch.equal(weights(out)["embed.weight"], weights(donor)["embed.weight"])
    with pytest.raises(SoftarError, match=r"model.embedding_from: E in .* is \[61, 32\], this model needs \[61, 16\] "):
        train(tiny_cfg(**{"model.embedding": '"checkpoint"', "model.embedding_from": f'"{donor}"',
                          "model.d_embed": 16}), tmp_path / "bad", quiet=True)


def test_soft_input_training_resumes_exactly(tiny_cfg, tmp_path):
    extra = {"loss.soft_inputs": 0.5, "loss.noise": '"gaussian"', "loss.noise_scale": 0.1}
    train(tiny_cfg(**extra), tmp_path / "full", quiet=True)
    train(tiny_cfg(**extra, **{"train.max_iters": 3}), tmp_path / "split", quiet=True)
    train(tiny_cfg(**extra), tmp_path / "split", resume=True, quiet=True)
    assert logged_losses(tmp_path / "full") == logged_losses(tmp_path / "split")
