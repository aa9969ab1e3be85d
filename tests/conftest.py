"""Shared fixtures: a small prepared dataset and tiny model configs, so the suite runs in a few minutes."""

from __future__ import annotations

from pathlib import Path

import pytest

from softar import config
from softar.config import Config, ContextConfig, LossConfig, ModelConfig, SoftConfig
from softar.data.prepare import prepare
from softar.soft.model import SoftAR, build_model

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_overrides(data_dir: Path, **extra) -> list[str]:
    """A 2-layer, d=32 model with short windows: seconds per run on 2 cores."""
    values = {
        "data.dir": f'"{data_dir}"',
        "model.n_layer": 2, "model.n_head": 2, "model.d_model": 32, "model.block_size": 16,
        "train.batch_size": 4, "train.max_iters": 8, "train.warmup_iters": 2, "train.lr_decay_iters": 8,
        "train.eval_interval": 4, "train.eval_iters": 2, "train.log_interval": 1, "train.threads": 1,
        "train.device": '"cpu"',
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """About 40k characters of Shakespeare, the start of the real bundled corpus."""
    from softar.data.corpus import shakespeare_text

    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(shakespeare_text()[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, small_corpus) -> Path:
    out = tmp_path_factory.mktemp("data") / "char"
    prepare(str(small_corpus), out, "char")
    return out


@pytest.fixture
def tiny_cfg(char_data):
    def make(**extra):
        return config.load(None, tiny_overrides(char_data, **extra))

    return make


def soft_model(cfg: ModelConfig, context: ContextConfig | None = None, loss: LossConfig | None = None,
               soft: SoftConfig | None = None) -> SoftAR:
    """softAR's GPT with a layout, made by `softar.soft.model.build_model`."""
    return build_model(Config(model=cfg, context=context or ContextConfig(), loss=loss or LossConfig(),
                              soft=soft or SoftConfig()))


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> Path:
    """A small ProsQA-format dataset (`softar task prepare`), 64 train questions."""
    from softar.tasks.data import prepare_task

    out = tmp_path_factory.mktemp("task") / "prosqa"
    prepare_task("prosqa", out, {"train": 64, "valid": 8, "test": 8}, seed=0)
    return out


def task_overrides(data_dir: Path, **extra) -> list[str]:
    """A 1-layer, d=32 model on the symbolic rendering, thoughts mode with a 2-stage curriculum."""
    values = {
        "data.dir": f'"{data_dir}"', "task.name": '"prosqa"', "task.render": '"symbolic"', "task.mode": '"thoughts"',
        "task.max_stage": 2, "task.stage_iters": 1, "task.eval_examples": 4, "task.max_answer_tokens": 8,
        "model.n_layer": 1, "model.n_head": 2, "model.d_model": 32, "model.block_size": 200,
        "train.batch_size": 4, "train.max_iters": 4, "train.warmup_iters": 1, "train.eval_interval": 2,
        "train.log_interval": 1, "train.threads": 1, "train.device": '"cpu"', "soft.kind": '"hidden"',
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def decoding(mode: str = "hard", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             soft: SoftConfig | None = None, collapse: str = "nn_l2", policy=None, max_new_tokens: int = 64,
             stop_tokens: tuple[int, ...] = ()):
    """A `softar.decode.Decoding` from the settings `softar sample` takes: a hard or a soft feed."""
    from softar.decode import Decoding
    from softar.soft.collapse import CollapsePolicy, Sampling
    from softar.soft.feeds import HardFeed, SoftFeed

    sampling = Sampling(temperature, top_k, top_p)
    feed = HardFeed(sampling) if mode == "hard" else SoftFeed(soft or SoftConfig(), collapse=collapse,
                                                              sampling=sampling)
    return Decoding(feed, policy or CollapsePolicy(), max_new_tokens, tuple(stop_tokens))
