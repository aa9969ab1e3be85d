"""Faults injected into real `softar train` subprocesses: SIGTERM, kill -9 at random moments, non-finite steps."""

import contextlib
import json
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from softar import SoftarError, config
from softar.faults import inject, inject_nan, interrupt, logged_losses, nan_steps, train_command
from softar.train import train

from .conftest import tiny_overrides

CONFIG = "configs/shakespeare_char.toml"


def long_run(char_data, steps: int = 400, **extra):
    return tiny_overrides(char_data, **{"train.max_iters": steps, "train.lr_decay_iters": steps,
                                        "train.eval_interval": 100, "train.ckpt_interval": 50, **extra})


def test_sigterm_saves_and_resume_is_exact(char_data, tmp_path):
    overrides = long_run(char_data, steps=150)
    ev = interrupt(CONFIG, overrides, tmp_path / "run", signal.SIGTERM, delay=0, after_step=10)
    assert not ev["finished_first"] and ev["returncode"] == 0
    assert "stopped by SIGTERM" in ev["stderr"][0] and "--resume" in ev["stderr"][0]
    assert ev["checkpoint_step"] == ev["progress_step"] and ev["lost_steps"] == 0  # saved the step it was on
    latest = (tmp_path / "run/checkpoints/latest").read_text().strip()
    assert latest == f"step_{ev['checkpoint_step']:06d}" and ev["checkpoint_step"] >= 10  # the step it stopped on
    subprocess.run(train_command(CONFIG, overrides, tmp_path / "run", True), check=True, capture_output=True)
    subprocess.run(train_command(CONFIG, overrides, tmp_path / "ref", False), check=True, capture_output=True)
    ref, got = logged_losses(tmp_path / "ref"), logged_losses(tmp_path / "run")
    assert len(ref) == 150 and got == ref


@pytest.mark.slow
def test_kill9_at_random_moments_loses_at_most_one_checkpoint_interval(char_data, tmp_path):
    report = inject(CONFIG, long_run(char_data, **{"train.ckpt_interval": 20}), tmp_path, kills=3, seed=1,
                    max_delay=5.0)
    assert report["identical_to_uninterrupted"]
    for ev in report["events"]:
        assert ev["lost_steps"] <= 20, ev
        assert ev["finished_first"] or ev["returncode"] == -signal.SIGKILL


def test_non_finite_steps_are_skipped_and_counted(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    with nan_steps({3, 4}):
        result = train(tiny_cfg(**{"train.ckpt_interval": 2, "train.keep_last": 10}), out, quiet=True)
    assert result["skipped_steps"] == 2 and result["step"] == 8
    losses = logged_losses(out)
    assert all(v != v for v in (losses[3], losses[4])) and all(losses[s] == losses[s] for s in (1, 2, 5, 8))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "skip"] == [3, 4]
    weights = lambda s: load_file(str(out / f"checkpoints/step_{s:06d}/model.safetensors"))  # noqa: E731
    assert not (out / "checkpoints/step_000004").exists()  # no save inside a run of skipped steps
    w2, w6 = weights(2), weights(6)
    assert any(not torch.equal(w2[k], w6[k]) for k in w2)  # steps 5 and 6 trained again


def test_persistent_non_finite_steps_stop_the_run(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    with nan_steps({5, 6, 7, 8}), pytest.raises(
            SoftarError, match="stopped at step 7: 3 consecutive steps with non-finite loss or gradients; "
                               "the last good checkpoint is step_000004"):
        train(tiny_cfg(**{"train.ckpt_interval": 2, "train.max_bad_steps": 3}), out, quiet=True)
    assert (out / "checkpoints/latest").read_text().strip() == "step_000004"


def test_injected_non_finite_steps_in_a_real_process(char_data, tmp_path):
    """The fault hook lives outside the production step: `python -m softar.inject --nan-steps` poisons a real
    `softar train` process."""
    rep = inject_nan(CONFIG, tiny_overrides(char_data, **{"train.ckpt_interval": 2}), tmp_path, [3])
    assert rep["returncode"] == 0 and rep["skipped_steps"] == 1 and rep["checkpoint_step"] == 8


@pytest.mark.parametrize("command", ["train", "prepare"])
def test_a_signal_whose_stop_a_library_swallows_still_stops_or_is_reported(command, char_data, tmp_path,
                                                                           monkeypatch, capsys):
    """CPython can lose the exception a signal handler raises (one raised while an import compiles its source):
    SIGTERM at start-up must still stop training before it writes anything, and a command with no phase of its
    own that finishes anyway must not exit 0 in silence."""
    from softar import cli

    real = cli.build_parser

    def swallowing_build_parser():
        with contextlib.suppress(BaseException):  # a catch-all drops what the CLI's handler raises here
            signal.raise_signal(signal.SIGTERM)
        return real()

    monkeypatch.setattr(cli, "build_parser", swallowing_build_parser)
    out = tmp_path / "out"
    args = ["train", CONFIG, *tiny_overrides(char_data), "--quiet", "--out", out] if command == "train" else \
        ["prepare", "--synthetic", "binding", "--out", out]
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 128 + signal.SIGTERM
    train(config.load(CONFIG, tiny_overrides(char_data, **{"train.max_iters": 1})), tmp_path / "next", quiet=True)
    if command == "train":
        assert err == ["softar: stopped by SIGTERM before anything was saved; run the command again"]
        assert not out.exists()
    else:
        assert err[-1] == "softar: SIGTERM arrived at start-up and was lost; the command ran to its end"
        assert any(out.iterdir())
