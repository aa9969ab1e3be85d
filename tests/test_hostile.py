"""A hostile or careless user: every file the tool reads may be corrupt, every folder may hold someone's data, two
processes may share a run, and a signal may come at any moment. Each case asserts the error contract (exit 2, one
line on stderr starting `softar: error:`) and that the folders are byte-for-byte unchanged (a hash of the tree)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softar import cli
from softar.checkpoint import MANIFEST
from softar.data.prepare import prepare
from softar.disk import sha256_file

from .conftest import tiny_overrides

CONFIG = "configs/shakespeare_char.toml"


def tree_hash(*roots: Path) -> str:
    """sha256 over every path, file content and symlink target below the roots."""
    h = hashlib.sha256()
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            h.update(str(p).encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def refused(args, capsys, *roots, message: str = "") -> str:
    """Run the CLI in-process; assert exit 2, one `softar: error:` line, and the roots unchanged."""
    before = tree_hash(*roots)
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("softar: error: "), err
    assert message in err[0], err[0]
    assert tree_hash(*roots) == before
    return err[0]


def ok(args, capsys) -> dict:
    assert cli.main([str(a) for a in args]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def rehash(ckpt: Path) -> None:
    """What a careful attacker does after editing a checkpoint file: make the manifest agree."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["sha256"] = {f: sha256_file(ckpt / f) for f in manifest["sha256"]}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def data(char_data, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(char_data, copy)
    return copy


@pytest.fixture
def run(data, tmp_path, capsys) -> tuple[Path, list[str]]:
    out = tmp_path / "run"
    args = ["train", CONFIG, *tiny_overrides(data, **{"train.ckpt_interval": 4}), "--quiet", "--out", out]
    ok(args, capsys)
    return out, args


# -- prepare: write only what you own ----------------------------------------------------------------------------------
def test_prepare_force_never_deletes_unrelated_files(small_corpus, tmp_path, capsys):
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "meta.json").write_text("{}")
    (home / "thesis.tex").write_text("precious")
    refused(["prepare", "--corpus", small_corpus, "--out", home, "--force"], capsys, tmp_path,
            message="holds meta.json, photos, thesis.tex, which softar did not write")


def test_prepare_force_replaces_a_dataset_atomically_and_cleans_dead_temps(small_corpus, tmp_path, capsys):
    out = tmp_path / "d"
    prepare(str(small_corpus), out, "char")
    dead = tmp_path / ".d.softar-tmp-999999999"  # what a killed prepare left (no such pid)
    dead.mkdir()
    foreign = tmp_path / ".d.backup"  # not ours: stays
    foreign.mkdir()
    other = tmp_path / "other.txt"
    other.write_text("a different corpus\n" * 100)
    meta = ok(["prepare", "--corpus", other, "--out", out, "--force"], capsys)
    assert meta["text_sha256"] == json.loads((out / "meta.json").read_text())["text_sha256"]
    assert not dead.exists() and foreign.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.backup", "d", "other.txt"]


def test_prepare_notices_an_incomplete_dataset(small_corpus, tmp_path, capsys):
    out = tmp_path / "d"
    prepare(str(small_corpus), out, "char")
    (out / "train.bin").unlink()
    refused(["prepare", "--corpus", small_corpus, "--out", out], capsys, tmp_path,
            message="different or incomplete dataset")
    ok(["prepare", "--corpus", small_corpus, "--out", out, "--force"], capsys)
    assert (out / "train.bin").is_file()


def test_prepare_leaves_other_temps_and_folders_named_like_dataset_files(small_corpus, tmp_path, capsys):
    other = tmp_path / ".important.softar-tmp-999999999"  # not a temp of this --out
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    ok(["prepare", "--corpus", small_corpus, "--out", tmp_path / "newds"], capsys)
    assert (other / "thesis.tex").is_file()
    ds = tmp_path / "ds2"
    (ds / "train.bin").mkdir(parents=True)  # a folder where a dataset file would be
    (ds / "train.bin" / "thesis.tex").write_text("x")
    (ds / "meta.json").write_text("{}")
    refused(["prepare", "--corpus", small_corpus, "--out", ds, "--force"], capsys, tmp_path,
            message="holds meta.json, train.bin, which softar did not write")


def test_prepare_into_a_file(small_corpus, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    refused(["prepare", "--corpus", small_corpus, "--out", tmp_path / "f"], capsys, tmp_path,
            message="is not a directory")


# -- datasets read from disk -------------------------------------------------------------------------------------------
def _meta(data: Path, **change):
    meta = json.loads((data / "meta.json").read_text())
    meta.update(change)
    (data / "meta.json").write_text(json.dumps(meta))


DATASET_DAMAGE = {
    "meta not json": (lambda d: (d / "meta.json").write_text("{nope"), "not valid JSON"),
    "meta lacks keys": (lambda d: (d / "meta.json").write_text('{"vocab_size": 5}'), "missing 'dtype'"),
    "meta wrong dtype": (lambda d: _meta(d, dtype="float64"), "does not fit vocab_size"),
    "meta vocab too small": (lambda d: _meta(d, vocab_size=5), "has 61 tokens, but meta.json says 5"),
    "token id out of range": (lambda d: (d / "val.bin").write_bytes(b"\xff\xff" + (d / "val.bin").read_bytes()[2:]),
                              "holds token id 65535, outside the vocabulary of 61"),
    "meta vocab a string": (lambda d: _meta(d, vocab_size="61"), "'vocab_size' must be int"),
    "meta NaN": (lambda d: (d / "meta.json").write_text((d / "meta.json").read_text().replace(
        '"val_fraction": 0.1', '"val_fraction": NaN')), "non-finite"),
    "train.bin odd bytes": (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-1]),
                            "not a whole number of uint16 tokens"),
    "train.bin short": (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-20]),
                        "but meta.json says"),
    "tokenizer corrupt": (lambda d: (d / "tokenizer.json").write_text('{"type": "char", "chars": [1, 2]}'),
                          "list of distinct non-empty strings"),
    "tokenizer garbage": (lambda d: (d / "tokenizer.json").write_bytes(b"\xff\xfe\x00garbage"), "not UTF-8"),
    "tokenizer other size": (lambda d: (d / "tokenizer.json").write_text('{"type": "char", "chars": ["a", "b"]}'),
                             "has 2 tokens, but meta.json says 61"),
}


@pytest.mark.parametrize("case", sorted(DATASET_DAMAGE))
def test_train_refuses_a_damaged_dataset(case, data, tmp_path, capsys):
    damage, message = DATASET_DAMAGE[case]
    damage(data)
    refused(["train", CONFIG, *tiny_overrides(data), "--out", tmp_path / "r"], capsys, tmp_path, message=message)


# -- run directories ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["file", "devnull"])
def test_train_out_that_is_not_a_folder(target, data, tmp_path, capsys):
    out = Path("/dev/null") if target == "devnull" else tmp_path / "file"
    if target == "file":
        out.write_text("mine")
    refused(["train", CONFIG, *tiny_overrides(data), "--out", out], capsys, tmp_path, message="not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_train_out_in_a_read_only_folder(data, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    refused(["train", CONFIG, *tiny_overrides(data), "--out", ro / "run"], capsys, tmp_path, message="cannot")


def test_memory_estimate_refuses_before_allocating(data, tmp_path, capsys):
    refused(["train", CONFIG, *tiny_overrides(data, **{"model.d_model": 65536, "model.n_layer": 64}), "--out",
             tmp_path / "r"], capsys, tmp_path, message="train.check_memory: this run needs about")


def test_top_p_zero_is_refused(run, tmp_path, capsys):
    out, _ = run
    refused(["sample", out, "--top-p", "0"], capsys, tmp_path, message="--top-p")


# -- resume trusts nothing ---------------------------------------------------------------------------------------------
RESUME_DAMAGE = {
    "latest absolute": (lambda c: (c / "latest").write_text(str(c / "step_000004")), "not a step folder"),
    "latest outside": (lambda c: (c / "latest").write_text("../../elsewhere/step_000004"), "not a step folder"),
    "latest missing step": (lambda c: (c / "latest").write_text("step_000099"), "which does not exist"),
    "tensor missing": (lambda c: _drop_tensor(c / "step_000008"), "missing lm.backbone.ln_f.weight"),
    "negative step": (lambda c: _trainer(c / "step_000008", step=-1000), "says step -1000"),
    "step past the end": (lambda c: _trainer_and_manifest(c, 99), "outside 0..train.max_iters=12"),
    "manifest without sha256": (lambda c: (c / "step_000008" / MANIFEST).write_text('{"step": 8}'),
                                "missing 'sha256'"),
    "wall time a string": (lambda c: _trainer(c / "step_000008", wall_s="soon"), "'wall_s' must be float"),
}


def _drop_tensor(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["lm.backbone.ln_f.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    rehash(ckpt)


def _trainer(ckpt: Path, **change) -> None:
    meta = json.loads((ckpt / "trainer.json").read_text())
    meta.update(change)
    (ckpt / "trainer.json").write_text(json.dumps(meta))
    rehash(ckpt)


def _trainer_and_manifest(ckpts: Path, step: int) -> None:
    new = ckpts / f"step_{step:06d}"
    shutil.copytree(ckpts / "step_000008", new)
    manifest = json.loads((new / MANIFEST).read_text())
    manifest["step"] = step
    (new / MANIFEST).write_text(json.dumps(manifest))
    _trainer(new, step=step)
    (ckpts / "latest").write_text(new.name)


@pytest.mark.parametrize("case", sorted(RESUME_DAMAGE))
def test_resume_refuses_a_damaged_checkpoint(case, run, tmp_path, capsys):
    out, args = run
    damage, message = RESUME_DAMAGE[case]
    damage(out / "checkpoints")
    refused([*args, "--resume", "train.max_iters=12"], capsys, tmp_path, message=message)


def test_links_in_a_run_directory_are_refused(run, tmp_path, capsys):
    """A `checkpoints` link into another run would let a resume prune that run's checkpoints."""
    out, args = run
    other = tmp_path / "other"
    shutil.copytree(out, other)
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").symlink_to(other / "checkpoints")
    refused([*args, "--resume", "train.max_iters=20"], capsys, tmp_path, message="is a link or not a plain folder")


def test_a_planted_lock_link_never_truncates_its_target(run, tmp_path, capsys):
    out, args = run
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".softar.lock").unlink()
    os.link(victim, out / ".softar.lock")
    refused([*args, "--resume", "train.max_iters=10"], capsys, tmp_path, message="is not softar's lock file")
    assert victim.read_text() == "precious"


def test_no_valid_checkpoint_and_no_latest_never_starts_over(run, tmp_path, capsys):
    out, args = run
    (out / "checkpoints/latest").unlink()
    for step in ("step_000004", "step_000008"):
        (out / "checkpoints" / step / "model.safetensors").write_bytes(b"flipped")
    refused([*args, "--resume", "train.max_iters=10"], capsys, tmp_path, message="no checkpoint in")


def test_diverged_weights_stop_the_run(data, tmp_path, capsys):
    refused(["train", CONFIG, *tiny_overrides(data, **{"train.lr": 1e30, "train.warmup_iters": 0,
                                                      "train.max_iters": 1}), "--out", tmp_path / "r"], capsys,
            message="with a non-finite val loss (diverged weights")


def test_eval_reference_needs_a_layout_run(run, tmp_path, capsys):
    out, _ = run
    refused(["eval", out, "--reference", out], capsys, tmp_path, message="--reference: the generation report is for")


def test_newlines_in_paths_stay_on_one_line(tmp_path, capsys):
    refused(["train", tmp_path / "no\nsuch.toml"], capsys, tmp_path, message="no\\nsuch.toml")


def test_a_legacy_key_beside_its_new_name_is_refused(data, tmp_path, capsys):
    refused(["train", CONFIG, *tiny_overrides(data), "loss.soft_kind=gated", "soft.kind=moi", "--out",
             tmp_path / "r"], capsys, tmp_path, message="loss.soft_kind: moved to soft.kind")


def test_gated_sampling_of_a_run_trained_with_moi(data, tmp_path, capsys):
    out = tmp_path / "moi"
    ok(["train", CONFIG, *tiny_overrides(data, **{"soft.kind": '"moi"', "soft.args": "{beta = 2.0}"}), "--quiet",
        "--out", out], capsys)
    assert cli.main(["sample", str(out), "--mode", "soft", "--soft", "gated", "--max-new-tokens", "5", "--prompt",
                     "RO"]) == 0  # the run's beta belongs to moi, not to gated
    assert cli.main(["sample", str(out), "--mode", "soft", "--max-new-tokens", "5", "--prompt", "RO"]) == 0  # moi


def test_config_json_that_is_not_json(run, tmp_path, capsys):
    out, args = run
    (out / "config.json").write_text("{")
    refused([*args, "--resume"], capsys, tmp_path, message="not valid JSON")
    refused(["eval", out], capsys, tmp_path, message="not valid JSON")


def test_missing_latest_uses_the_newest_valid_checkpoint(run, capsys):
    out, args = run
    (out / "checkpoints/latest").unlink()
    (out / "checkpoints/step_000008/model.safetensors").write_bytes(b"corrupt")  # newest is broken: skip it
    assert cli.main([str(a) for a in [*args, "--resume", "train.max_iters=10"]]) == 0
    assert "using the newest valid checkpoint, step_000004" in capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 11))  # 5..10 again from step 4


def test_resume_before_the_first_checkpoint_starts_at_step_zero(run, capsys):
    """A run killed after its config was saved but before its first checkpoint: --resume starts it over."""
    out, args = run
    shutil.rmtree(out / "checkpoints")
    assert ok([*args, "--resume"], capsys)["step"] == 8
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))


def test_resume_with_more_steps_follows_the_derived_schedule(data, tmp_path, capsys):
    out = tmp_path / "r"
    base = ["train", CONFIG, *tiny_overrides(data, **{"train.lr_decay_iters": 0}), "--quiet", "--out", out]
    ok(base, capsys)
    result = ok([*base, "--resume", "train.max_iters=12"], capsys)
    assert result["step"] == 12
    assert json.loads((out / "config.json").read_text())["train"]["lr_decay_iters"] == 12


def test_a_torn_metrics_line_is_dropped_with_a_warning(run, capsys):
    out, args = run
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')
    assert cli.main([str(a) for a in [*args, "--resume", "train.max_iters=10"]]) == 0
    assert "torn line" in capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 11))


def test_a_corrupt_metrics_line_in_the_middle_is_an_error(run, tmp_path, capsys):
    out, args = run
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[2] = "not json"
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    refused([*args, "--resume", "train.max_iters=10"], capsys, tmp_path, message="line 3 is not a JSON object")


# -- sweeps ------------------------------------------------------------------------------------------------------------
def test_sweep_refuses_runs_made_with_other_overrides(data, tmp_path, capsys):
    out = tmp_path / "sw"
    common = ["sweep", CONFIG, *tiny_overrides(data), "--seeds", "1", "--windows", "2", "--horizons", "4",
              "--out", out]
    ok(common, capsys)
    refused([*common, "train.lr=0.002"], capsys, tmp_path, message="was made with other settings (differs in "
                                                                   "train.lr)")


def test_sweep_never_overwrites_files_it_did_not_make(data, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.md").write_text("my notes")
    common = [CONFIG, *tiny_overrides(data), "--seeds", "1", "--windows", "2", "--horizons", "4"]
    refused(["sweep", *common, "--out", out], capsys, tmp_path, message="holds results.md, which softar did not write")
    # ownership is a manifest softar wrote, never the text: a user's notes that look like a report stay theirs
    (tmp_path / "results.md").write_text("# Results: my own notes\n")
    refused(["sweep", *common, "--out", tmp_path / "sw", "--report", tmp_path / "results.md"], capsys, tmp_path,
            message="holds results.md, which softar did not write")
    refused(["sweep", *common, "--out", tmp_path / "results.md"], capsys, tmp_path, message="not a directory")


# -- two writers, real processes ---------------------------------------------------------------------------------------
def softar_proc(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "softar", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_writers_on_one_run(data, tmp_path):
    """Two trains started together on one empty folder: one runs, the other is refused with one line; a --resume
    beside the running one is refused naming its pid; the runner's log and checkpoints lose nothing."""
    out = tmp_path / "race"
    args = ["train", CONFIG, *tiny_overrides(data, **{"train.max_iters": 100_000, "train.lr_decay_iters": 100_000,
                                                       "train.ckpt_interval": 5}), "--quiet", "--out", out]
    pair = [softar_proc(*args), softar_proc(*args)]
    deadline = time.monotonic() + 120
    while all(p.poll() is None for p in pair) and time.monotonic() < deadline:
        time.sleep(0.05)
    loser = next(p for p in pair if p.poll() is not None)
    winner = next(p for p in pair if p is not loser)
    _, err = loser.communicate(timeout=60)
    assert loser.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert f"is in use by another softar process (pid {winner.pid})" in err or "already holds a run" in err, err
    while not (out / "checkpoints/latest").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    resume = softar_proc(*args, "--resume")
    _, err = resume.communicate(timeout=120)
    assert resume.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert f"is in use by another softar process (pid {winner.pid})" in err
    assert winner.poll() is None  # still running, untouched
    winner.send_signal(signal.SIGTERM)
    _, err = winner.communicate(timeout=120)
    assert winner.returncode == 0 and "stopped by SIGTERM" in err, err
    step = int((out / "checkpoints/latest").read_text().strip().removeprefix("step_"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, step + 1))  # nothing lost


# -- signals -----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_during_the_final_evaluation(small_corpus, tmp_path):
    """The last step's checkpoint is saved before the final evaluation; a SIGTERM during it stops at once with a
    message and exit 0, and --resume only evaluates."""
    big = tmp_path / "big.txt"
    big.write_text(small_corpus.read_text() * 40)  # a long val split: the final evaluation takes a while
    data = tmp_path / "bigdata"
    prepare(str(big), data, "char")
    out = tmp_path / "run"
    args = ["train", CONFIG, *tiny_overrides(data, **{"model.d_model": 64, "model.n_layer": 4}), "--quiet",
            "--out", out]
    proc = softar_proc(*args)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints/step_000008").is_dir() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    if (out / "result.json").exists():  # the evaluation won the race: nothing to test this time
        pytest.skip("the final evaluation finished before the signal")
    assert "stopped by SIGTERM during the final evaluation after step 8" in stderr
    resumed = subprocess.run([sys.executable, "-m", "softar", *map(str, args), "--resume"], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0 and json.loads((out / "result.json").read_text())["step"] == 8


def test_sigterm_during_a_sweep_keeps_what_finished(data, tmp_path):
    out = tmp_path / "sw"
    args = ["sweep", CONFIG, *tiny_overrides(data, **{"train.max_iters": 100_000, "train.lr_decay_iters": 100_000,
                                                       "train.ckpt_interval": 5}), "--seeds", "1", "--out", out]
    proc = softar_proc(*args)
    run = out / "runs" / "shakespeare_char_s1337"
    deadline = time.monotonic() + 120
    while not (run / "checkpoints/latest").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err.strip().splitlines()[-1].startswith("softar: stopped by SIGTERM; everything finished so far is saved; "
                                                   "run the same softar sweep command again to continue"), err
    assert (run / "checkpoints/latest").is_file() and not (run / "eval.json").exists()


def parallel_sweep_training(data, tmp_path) -> tuple[subprocess.Popen, list[Path], list[int]]:
    """A `--jobs 2` sweep of two long runs, once both have saved a checkpoint: the process, the runs, and the pid of
    each run's trainer (from its lock)."""
    out = tmp_path / "sw"
    args = ["sweep", CONFIG, *tiny_overrides(data, **{"train.max_iters": 100_000, "train.lr_decay_iters": 100_000,
                                                       "train.ckpt_interval": 5}), "--seeds", "2", "--jobs", "2",
            "--out", out]
    proc = softar_proc(*args)
    runs = [out / "runs" / f"shakespeare_char_s{s}" for s in (1337, 1338)]
    deadline = time.monotonic() + 120
    while not all((r / "checkpoints/latest").exists() for r in runs) and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, runs, [int((r / ".softar.lock").read_text()) for r in runs]


def test_sigterm_during_a_parallel_sweep_saves_every_run_it_was_training(data, tmp_path):
    """--jobs 2: SIGTERM to the sweep reaches both training processes, each saves its step and exits; the sweep
    says how to continue and leaves no process behind."""
    proc, runs, pids = parallel_sweep_training(data, tmp_path)
    assert proc.pid not in pids
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err.strip().splitlines()[-1].startswith("softar: stopped by SIGTERM; everything finished so far is saved; "
                                                   "run the same softar sweep command again to continue"), err
    for r, pid in zip(runs, pids, strict=True):
        assert (r / "checkpoints/latest").is_file() and not (r / "eval.json").exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_parallel_sweep_stops_at_a_run_it_cannot_train(data, tmp_path, capsys):
    """A run held by another process (a second sweep on the same folder): the sweep names it in one line and exits
    2; the runs it finished before are kept."""
    from softar.rundir import RunLock

    out = tmp_path / "sw"
    args = ["sweep", CONFIG, *tiny_overrides(data), "--windows", "2", "--horizons", "2", "--out", out]
    ok([*args, "--seeds", "1"], capsys)
    done = out / "runs" / "shakespeare_char_s1337" / "eval.json"
    before = done.read_bytes()
    held = out / "runs" / "shakespeare_char_s1338"
    with RunLock(held):
        refused([*args, "--seeds", "3", "--jobs", "2"], capsys, tmp_path / "data",
                message=f"{held} is in use by another softar process")
    assert done.read_bytes() == before


def test_a_parallel_sweep_whose_run_starts_from_itself_ends_in_one_line(data, tmp_path):
    """train.init_from naming the run's own (finished) folder: refused as the one-process sweep refuses it, never a
    wait on a run that cannot train."""
    out = tmp_path / "sw"
    common = [*tiny_overrides(data), "--windows", "2", "--horizons", "2", "--out", out]
    first = subprocess.run([sys.executable, "-m", "softar", "sweep", CONFIG, "--seeds", "1", *map(str, common)],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    mine = tmp_path / "shakespeare_char.toml"
    start = f'[train]\ninit_from = "{out}/runs/shakespeare_char_s{{seed}}"'
    mine.write_text(Path(CONFIG).read_text().replace("[train]", start, 1))
    again = subprocess.run([sys.executable, "-m", "softar", "sweep", mine, "--seeds", "1", "--jobs", "2",
                            *map(str, common)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "made with other settings" in again.stderr


def test_a_parallel_sweep_killed_takes_its_runs_with_it(data, tmp_path):
    """kill -9 of a --jobs sweep: its training processes save and stop rather than train on as orphans holding the
    runs' locks."""
    proc, runs, pids = parallel_sweep_training(data, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)

    def alive(pid: int) -> bool:  # a zombie (exited, not yet reaped by whoever adopted it) is not
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
        except (FileNotFoundError, ProcessLookupError):
            return False

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(map(alive, pids)):
        time.sleep(0.05)
    assert not any(map(alive, pids))
    for r in runs:
        assert (r / "checkpoints/latest").is_file()


# -- fuzzing every file a run or dataset folder holds ------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_run(char_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(char_data, root / "data")
    from softar import config
    from softar.train import train

    train(config.load(None, tiny_overrides(root / "data", **{"train.max_iters": 2})), root / "run", quiet=True)
    return root


READ_FILES = ["data/meta.json", "data/tokenizer.json", "data/train.bin", "data/val.bin", "run/config.json",
              "run/run.json", "run/checkpoints/latest", "run/checkpoints/step_000002/manifest.json",
              "run/checkpoints/step_000002/trainer.json", "run/checkpoints/step_000002/model.safetensors"]
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                     max_leaves=8)


@settings(max_examples=int(os.environ.get("SOFTAR_FUZZ_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(READ_FILES), content=st.one_of(st.binary(max_size=64), _json.map(
    lambda v: json.dumps(v).encode())))
def test_fuzz_every_file_read(fuzz_run, tmp_path_factory, name, content, capsys):
    root = tmp_path_factory.mktemp("case")
    shutil.copytree(fuzz_run, root, dirs_exist_ok=True)
    (root / name).write_bytes(content)
    before = tree_hash(root)
    code = cli.main(["eval", str(root / "run"), "--data", str(root / "data"), "--windows", "2", "--horizons", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (0, 2), err
    if code == 2:
        assert len(err) == 1 and err[0].startswith("softar: error: "), err
        assert tree_hash(root) == before


# -- no read ever hangs ------------------------------------------------------------------------------------------------
def test_a_fifo_wherever_a_file_is_read_is_refused_not_waited_on(run, task_data, small_corpus, tmp_path):
    """A FIFO (or a device) where softar reads a file would block the reader forever: every read checks for a
    regular file on the open descriptor first. Real processes, each with a timeout that a hang would hit."""
    out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    ckpt = sorted((copy / "checkpoints").glob("step_*"))[-1]
    data_copy = tmp_path / "data_fifo"
    shutil.copytree(tmp_path / "data", data_copy)

    def fifo(path: Path) -> Path:
        path.unlink(missing_ok=True)
        os.mkfifo(path)
        return path

    cases = [
        (["train", fifo(tmp_path / "c.toml"), "--out", tmp_path / "new"], "is not a regular file"),
        (["prepare", "--corpus", fifo(tmp_path / "corpus.txt"), "--out", tmp_path / "ds"], "not a regular file"),
        (["eval", copy, "--windows", "2", "--data", data_copy], "not a regular file"),
    ]
    fifo(data_copy / "meta.json")
    before = tree_hash(out, copy, task_data)
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "softar", *map(str, args)], capture_output=True, text=True,
                              timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("softar: error: "), proc.stderr
        assert message in lines[0], lines[0]
    records = subprocess.run([sys.executable, "-c", "from softar.tasks import get_task; from softar.tasks.data import "
                              f"load_records; load_records({str(fifo(tmp_path / 't.json'))!r}, get_task('prosqa'))"],
                             capture_output=True, text=True, timeout=120)  # what eval/train --task read
    assert "is not a regular file" in records.stderr.strip().splitlines()[-1], records.stderr
    for name in ("config.json", f"checkpoints/{ckpt.name}/model.safetensors"):
        target = tmp_path / "copy2"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(out, target)
        fifo(target / name)
        proc = subprocess.run([sys.executable, "-m", "softar", "eval", str(target), "--windows", "2"],
                              capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "not a regular file" in lines[0], (name, proc.stderr)
    assert tree_hash(out, copy, task_data) == before


def test_names_that_look_like_softars_temps_are_still_the_users(small_corpus, tmp_path, capsys):
    """Only a temp of a name softar lists is softar's: `notes.softar-tmp-1` of a user's is kept, and refused."""
    out = tmp_path / "d"
    prepare(str(small_corpus), out, "char")
    (out / "notes.softar-tmp-1").write_text("mine")
    (out / ".thesis.softar-tmp-1").write_text("mine too")
    refused(["prepare", "--corpus", small_corpus, "--out", out, "--force"], capsys, tmp_path,
            message=".thesis.softar-tmp-1, notes.softar-tmp-1, which softar did not write")


def test_a_faults_report_never_touches_a_users_folder_of_its_old_working_name(tmp_path, monkeypatch):
    from softar import config, faults

    monkeypatch.setattr(faults, "inject", lambda *a, **k: {"signal": "SIGKILL", "injected": 0, "max_lost_steps": 0,
                                                           "identical_to_uninterrupted": True})
    monkeypatch.setattr(faults, "inject_nan", lambda *a, **k: {"skipped_steps": 1, "returncode": 2,
                                                               "checkpoint_step": 0})
    (tmp_path / "faults_work").mkdir()
    (tmp_path / "faults_work" / "thesis.txt").write_text("mine")
    faults.fault_report(CONFIG, [], config.load(CONFIG, []), tmp_path, kills=1)
    assert (tmp_path / "faults_work" / "thesis.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".softar-manifest.json", "faults.md", "faults_work"]


def test_numbers_python_cannot_parse_are_one_line_errors(run, tmp_path, capsys):
    """An integer of more digits than Python parses (a ValueError, not a JSON or TOML error) anywhere softar reads
    a number: an override, a TOML or JSON config, a run's files."""
    out, _ = run
    huge = "9" * 5000
    refused(["train", CONFIG, f"train.seed={huge}", "--out", tmp_path / "a"], capsys, tmp_path,
            message="train.seed")
    (tmp_path / "c.toml").write_text(f"[train]\nseed = {huge}\n")
    (tmp_path / "c.json").write_text(f'{{"train": {{"seed": {huge}}}}}')
    for name in ("c.toml", "c.json"):
        refused(["train", tmp_path / name, "--out", tmp_path / "b"], capsys, tmp_path, message="not a valid config")
    (out / "config.json").write_text(f'{{"train": {{"seed": {huge}}}}}')
    refused(["eval", out], capsys, tmp_path, message="not valid JSON")


def test_ownership_checks_fail_closed_on_a_link(tmp_path):
    from softar import SoftarError
    from softar.disk import write_owned

    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "sweep.json").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "theirs")
    with pytest.raises(SoftarError, match="a link or not a directory"):
        write_owned({tmp_path / "link" / "sweep.json": b"over"}, "--out")
    assert (tmp_path / "theirs" / "sweep.json").read_text() == "mine"
