"""The `softar` command end to end: results as JSON on the last line, and bad input as one line on stderr with exit
code 2 and nothing written. The trained run these tests share and the quickstart run as real subprocesses
(`python -m softar`); the rest call the command's `main` in this process, which is the same code without an
interpreter's start-up each time."""

import contextlib
import io
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from .conftest import tiny_overrides


def softar_process(*args, cwd=None) -> subprocess.CompletedProcess:
    """`python -m softar ARGS` as a real subprocess."""
    return subprocess.run([sys.executable, "-m", "softar", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def softar(*args, cwd=None) -> subprocess.CompletedProcess:
    """`softar ARGS` through `softar.cli.main` in this process, its exit code, stdout and stderr captured as a
    subprocess's would be."""
    from softar import cli

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as e:  # argparse's own exits
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["softar", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("softar: error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def tree(path) -> dict:
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = softar_process("train", "configs/shakespeare_char.toml", *tiny_overrides(char_data), "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 8 and result == json.loads((out / "result.json").read_text())
    return out


def test_eval_and_sample(trained_run):
    proc = softar("eval", trained_run, "--split", "val")
    assert proc.returncode == 0, proc.stderr
    ev = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ev["split"] == "val" and ev["step"] == 8 and ev["loss"] > 0 and "bits_per_char" in ev
    assert json.loads((trained_run / "eval_val.json").read_text()) == ev
    # every registered soft token is measured, Mixture of Inputs included, without being named anywhere but the
    # registry
    assert {"expected", "hidden", "gated", "moi"} <= set(ev["soft_outputs"])
    assert {"soft_expected", "soft_moi"} <= set(ev["open_loop"]["8"])
    a = softar("sample", trained_run, "--prompt", "ROMEO:", "--max-new-tokens", 40, "--seed", 7)
    b = softar("sample", trained_run, "--prompt", "ROMEO:", "--max-new-tokens", 40, "--seed", 7)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("ROMEO:") and len(a.stdout) >= 46
    soft = softar("sample", trained_run, "--mode", "soft", "--prompt", "RO", "--max-new-tokens", 5, "--show-soft")
    assert soft.returncode == 0, soft.stderr
    rows = soft.stdout.strip().splitlines()[-5:]
    assert [int(r.split()[0]) for r in rows] == [2, 3, 4, 5, 6] and all("nearest:" in r for r in rows)
    # bfloat16 weights for decoding (tests/test_precision.py checks what they decode against float32)
    bf16 = softar("sample", trained_run, "--prompt", "RO", "--max-new-tokens", 20, "--dtype", "bfloat16")
    assert bf16.returncode == 0 and bf16.stdout.startswith("RO") and len(bf16.stdout) >= 22, bf16.stderr
    # Mixture of Inputs, a registry entry only, is selectable with its parameter
    moi = softar("sample", trained_run, "--mode", "soft", "--soft", "moi", "--soft-arg", "beta=2", "--prompt", "RO",
                 "--max-new-tokens", 20, "--seed", 3)
    assert moi.returncode == 0 and moi.stdout.startswith("RO"), moi.stderr


def test_bench(char_data, tmp_path):
    for kind in ("train", "sample"):
        proc = softar("bench", kind, "configs/shakespeare_char.toml", *tiny_overrides(char_data), "--steps", 3,
                      "--new-tokens", 20, "--out", tmp_path)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result == json.loads((tmp_path / f"bench_{kind}.json").read_text())
    train_r = json.loads((tmp_path / "bench_train.json").read_text())
    assert train_r["tokens_per_s"] > 0 and train_r["fraction_of_peak"] > 0
    assert train_r["achieved_flops"] == pytest.approx(train_r["tokens_per_s"] * train_r["flops_per_token"])
    # float32 always, bfloat16 where the CPU has the units (tests/test_precision.py checks the detection against
    # /proc/cpuinfo); Hugging Face's GPT-2 of the same shape beside them
    from softar.device import bf16_hardware

    assert train_r["bf16_hardware"] == bf16_hardware(torch.device("cpu"))
    assert list(train_r["by_dtype"]) == ["float32", *(["bfloat16"] if train_r["bf16_hardware"] else [])]
    assert train_r["by_dtype"]["float32"]["tokens_per_s"] == train_r["tokens_per_s"]
    assert train_r["speedup_over_hf"] == pytest.approx(train_r["tokens_per_s"] / train_r["hf_tokens_per_s"])
    # the same shape: HF's GPT-2 differs only by its biases and its learned positions' table
    assert abs(train_r["hf_params"] - train_r["params"]) < 0.05 * train_r["params"]
    one = softar("bench", "train", "configs/shakespeare_char.toml", *tiny_overrides(char_data), "--steps", 1,
                 "--dtypes", "bfloat16", "--out", tmp_path / "bf16")
    assert list(json.loads(one.stdout.splitlines()[-1])["by_dtype"]) == ["bfloat16"], one.stderr
    for kind, dtypes, message in (("train", "float16", "float16"), ("sample", "bfloat16", "bench train")):
        bad = softar("bench", kind, "configs/shakespeare_char.toml", "--dtypes", dtypes, "--out", tmp_path / "no")
        assert bad.returncode == 2 and message in bad.stderr and not (tmp_path / "no").exists()
    sample = json.loads((tmp_path / "bench_sample.json").read_text())
    keys = ("tokens_per_s_batch1", "tokens_per_s_batch64", "hf_tokens_per_s_batch1", "hf_tokens_per_s_batch64")
    assert all(sample[k] > 0 for k in keys)


def test_prepare_bad_corpora(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    cases = [("missing.txt", "corpus not found"), ("empty.txt", "is empty"), ("latin1.txt", "not UTF-8")]
    for name, message in cases:
        proc = softar("prepare", "--corpus", tmp_path / name, "--out", tmp_path / "out")
        assert_one_line_error(proc, message)
    assert not (tmp_path / "out").exists()


def test_train_bad_input_writes_nothing(char_data, tmp_path, trained_run):
    out = tmp_path / "run"
    base = ["train", "configs/shakespeare_char.toml", *tiny_overrides(char_data), "--quiet", "--out"]
    assert_one_line_error(softar(*base, out, "model.n_heads=4"), "unknown config key model.n_heads")
    assert_one_line_error(softar(*base, out, "train.lr=fast"), "train.lr: expected float")
    assert_one_line_error(softar(*base, out, "model.n_head=3"), "does not divide")
    assert_one_line_error(softar("train", tmp_path / "nope.toml", "--out", out), "config file not found")
    assert_one_line_error(softar(*base, out, "data.dir=nowhere"), "no prepared data in nowhere")
    assert not out.exists()
    before = tree(trained_run)
    assert_one_line_error(softar(*base, trained_run), "already holds a run")
    assert_one_line_error(softar(*base, trained_run, "model.d_model=64", "--resume"), "differs in model.d_model")
    assert tree(trained_run) == before


def test_corrupt_checkpoint_is_refused(trained_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    ckpt = run / "checkpoints" / (run / "checkpoints/latest").read_text().strip()
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    assert_one_line_error(softar("eval", run), "sha256 mismatch for model.safetensors")
    assert_one_line_error(softar("sample", run), "sha256 mismatch")


def test_bad_flags(trained_run):
    assert_one_line_error(softar("sample", trained_run, "--temperature", "-1"), "--temperature")
    assert_one_line_error(softar("sample", trained_run, "--max-new-tokens", "0"), "--max-new-tokens")
    assert_one_line_error(softar("eval", trained_run, "--split", "test"), "--split")
    assert_one_line_error(softar("eval", trained_run.parent / "missing"), "is not a softar run")
    assert_one_line_error(softar("prepare", "--tokenizer", "bpe", "--vocab-size", "100", "--out", "x"), "256")


LAYOUT = ["context.aggregate=1", "context.segments=2", "context.soft=3", "context.segment_len=4",
          "context.max_history=40"]


def test_layout_run_end_to_end(char_data, tmp_path, trained_run):
    """Train the seed's layout (shrunk), evaluate it on the retention targets against one plain run at two
    contexts and with the generation report, sample with a collapse policy and the hierarchy shown, and bench its
    generation at two history lengths."""
    run = tmp_path / "layout"
    proc = softar("train", "configs/shakespeare_char.toml", *tiny_overrides(char_data), *LAYOUT, "--out", run,
                  "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert_one_line_error(softar("eval", run, "--gap", run, trained_run), "has a context layout")
    assert_one_line_error(softar("eval", run, "--gap", f"{trained_run}:0", trained_run), "the context must be in")
    assert_one_line_error(softar("eval", run, "--gap", trained_run, trained_run, "--analogies", tmp_path / "no.txt"),
                          "does not exist")
    proc = softar("eval", run, "--windows", 4, "--gap", f"{trained_run}:4", trained_run, "--reference", trained_run,
                  "--thresholds", "0,inf")
    assert proc.returncode == 0, proc.stderr
    ev = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(ev["recovery"]["64"]) == {"aggregate", "segment"}
    assert {"recall_minus_prior", "prior_recall_at_k"} <= set(ev["recovery"]["64"]["segment"])
    ret = ev["retention"]
    loss = ret["loss"]
    assert ret["targets"] == 4 * 32 and set(loss) == {"short", "long", "real", "swapped", "zeroed", "shuffled"}
    assert ret["gap"] == pytest.approx(loss["short"] - loss["long"])
    assert ret["gap_closed"] == pytest.approx((loss["short"] - loss["real"]) / (loss["short"] - loss["long"]))
    assert len(ret["gap_closed_ci"]) == 2 and set(ret["copy"]) == {"32", "96", "256", "512"}
    with np.load(run / "retention_val.npz") as arrays:  # the per-target log p's a study pools
        assert arrays["real"].shape == (4, 32) and -arrays["short"].mean() == pytest.approx(loss["short"])
    assert "open_loop" not in ev
    assert [r["soft_fraction"] for r in ev["generation"]["collapse_uncertain"]] == [0.0, 1.0]
    assert [r["soft_fraction"] for r in ev["generation"]["keep_uncertain"]] == [1.0, 0.0]
    assert ev["loss_soft_slots"] != ev["loss_soft_slots_one_step"]
    proc = softar("sample", run, "--mode", "soft", "--prompt", "RO", "--max-new-tokens", 12, "--show-soft",
                  "--collapse-threshold", "inf", "--soft-budget", 1)
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.strip().splitlines()[-12:]
    assert [r.split()[3] for r in rows] == ["hard"] * 9 + ["soft"] * 3
    # a budget of 1: every token that stayed soft until it aged out was collapsed by age, and one is still soft
    by_age = int(proc.stderr.split("; ")[-1].split()[0])
    entered_soft = sum("entered soft" in r for r in rows)
    assert entered_soft == by_age + 1
    assert f"collapse rate: {(12 - entered_soft) / 12:.3f} of 12" in proc.stderr
    proc = softar("bench", "sample", "configs/shakespeare_char.toml", *tiny_overrides(char_data), *LAYOUT,
                  "--new-tokens", 5, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    bench = json.loads(proc.stdout.strip().splitlines()[-1])
    assert bench["ms_per_token_history_1000"] > 0 and bench["ms_per_token_history_100000"] > 0
    assert bench["block_cache_speedup"] > 0 and bench["tokens_per_s_batch64"] > 0


def test_quickstart_end_to_end(tmp_path):
    """The README's first command, shrunk: both runs trained, one val prompt continued by each (ordinary sampling
    beside soft generation), the Brier-2 of each, the val losses side by side, and the known-answer table."""
    tiny = ["model.n_layer=1", "model.n_head=2", "model.d_model=16", "train.max_iters=2", "train.eval_interval=2",
            "train.eval_iters=1", "train.batch_size=2", "train.warmup_iters=1", "train.lr_decay_iters=2",
            "train.device=\"cpu\""]
    proc = softar_process("quickstart", *tiny, "--data", tmp_path / "data", "--out", tmp_path / "runs",
                          "--hmm-data", tmp_path / "hmm")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "--- baseline " in out and "--- seed_layout " in out and "Brier-2 of the shown text" in out
    summary = json.loads(out.strip().splitlines()[-1])
    for name in ("baseline", "seed_layout"):
        b = summary["brier2"][name]
        assert -1 <= b["mean"] <= 1 and b["se"] >= 0
    assert 0 <= summary["soft_fraction"] <= 1
    hmm = summary["hmm"]  # soft feedback where the answer is known: the oracle's is the Bayes ceiling exactly
    assert "Bayes ceiling (exact)" in out and hmm["run"]["step"] == 2
    assert hmm["oracle"]["soft_expected"] == pytest.approx(hmm["oracle"]["bayes"], abs=1e-5)
    assert hmm["model"]["bayes"] == hmm["oracle"]["bayes"] < hmm["oracle"]["sampled_avg_1"]
    command = shlex.split(summary["inspect"])  # the last line names the page's command, and it runs
    assert command[:2] == ["softar", "inspect"] and f"see it:      {summary['inspect']}" in out
    proc = softar(*command[1:])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "inspect.html").is_file() and (tmp_path / "runs" / "inspect.json").is_file()
