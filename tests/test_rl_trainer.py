"""`softar rl` end to end: GRPO from a trained task run through the same Trainer as `softar train`, with its metrics,
exact resume, and one-line errors for configs it cannot run."""

import json
from pathlib import Path

import pytest
import torch

from softar import config
from softar.train import train

from .conftest import task_overrides, tiny_overrides
from .test_cli import assert_one_line_error, softar
from .test_train import final_weights


@pytest.fixture(scope="module")
def init_run(task_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl") / "init"
    train(config.load(None, task_overrides(task_data)), out, quiet=True)
    return out


def rl_file(tmp_path, init, policy="noisy_soft", **extra) -> str:
    lines = ["[rl]", f'init_from = "{init}"', f'policy = "{policy}"', "group_size = 4", "eval_samples = 4",
             "inner_steps = 2", "kl_coef = 0.1", "[train]", "max_iters = 4", "batch_size = 2", "eval_interval = 2",
             "lr = 1e-3", "warmup_iters = 0", "threads = 1", "seed = 5", "[task]", "eval_examples = 2"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    path = tmp_path / f"rl_{policy}_{Path(init).name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def rows(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.parametrize("policy", ["noisy_soft", "gated"])
def test_an_rl_run_logs_its_metrics_and_resumes_exactly(init_run, tmp_path, policy):
    cfg = rl_file(tmp_path, init_run, policy)
    full, split = tmp_path / "full", tmp_path / "split"
    proc = softar("rl", cfg, "--out", full, "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 4 and 0 <= result["val_accuracy"] <= 1
    assert 0 <= result["val_sampled"]["pass@1"] <= result["val_sampled"]["pass@4"] <= 1
    train_rows = rows(full, "train")
    for r in train_rows:
        assert 0 <= r["reward"] <= 1 and r["kl"] >= 0 and 0 <= r["clipped"] <= 1 and r["rollout_tokens_per_s"] > 0
        assert 0 <= r["answer_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert train_rows[0]["thought_norm"] > 0 and train_rows[0]["kl"] == 0  # the first rollouts: the initial policy
    assert train_rows[-1]["kl"] > 0  # later ones: updated weights
    perf = rows(full, "perf")  # wall-clock time since the run began, with the throughput
    assert perf and all(0 < a["wall_s"] <= b["wall_s"] for a, b in zip(perf, perf[1:] + perf[-1:], strict=True))
    evals = rows(full, "eval")
    assert [e["step"] for e in evals] == [2, 4] and all({"val_pass@1", "val_pass@4"} <= set(e) for e in evals)
    assert all(e["val_pass@1"] <= e["val_pass@4"] and 0 <= e["val_accuracy_greedy_soft"] <= 1 for e in evals)
    # stopped after 2 steps and resumed: the same rollouts, the same updates, the same weights
    assert softar("rl", cfg, "train.max_iters=2", "train.lr_decay_iters=4", "--out", split, "--quiet").returncode == 0
    assert softar("rl", cfg, "train.lr_decay_iters=4", "--out", split, "--resume", "--quiet").returncode == 0
    assert [(r["step"], r["loss"], r["reward"]) for r in rows(split, "train")] == \
           [(r["step"], r["loss"], r["reward"]) for r in train_rows]
    a, b = final_weights(full), final_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("policy", ["hard", "soft"])
def test_every_policy_runs(init_run, tmp_path, policy):
    from softar.rl.trainer import RLTrainer, rl_config

    result = train(rl_config(rl_file(tmp_path, init_run, policy), ["train.max_iters=2"]), tmp_path / "run",
                   quiet=True, trainer=RLTrainer)
    assert result["step"] == 2 and len(rows(tmp_path / "run", "train")) == 2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["lr_decay_iters"] == saved["max_iters"] == 2  # the RL run's own schedule, not the initial run's 4


def test_rl_configs_it_cannot_run_are_one_line_errors(init_run, char_data, tmp_path):
    lm_run = tmp_path / "lm"
    train(config.load(None, tiny_overrides(char_data, **{"train.max_iters": 1})), lm_run, quiet=True)
    cfg = rl_file(tmp_path, init_run)
    cases = [
        ([cfg, "data.dir=" + json.dumps(str(char_data))], "rl.init_from: vocabulary mismatch"),
        ([rl_file(tmp_path, lm_run)], "is a language-model run; RL needs a reasoning-task run"),
        ([cfg, 'rl.init_from=""'], "rl.init_from: must name"),
        ([cfg, "model.n_layer=3"], "an RL run keeps the model"),
        ([cfg, "task.mode=cot"], "task.mode: an RL run keeps its initial run's task"),
        ([cfg, "rl.group_size=1"], "rl.group_size"),
        ([cfg, "rl.policy=beam"], "rl.policy"),
        ([cfg, "task.depths=[2]"], "task.depths: prosqa reads fixed splits"),
        ([cfg, 'rl.reward="path"'], "'path' reads each written step as one node; prosqa's steps are not"),
        ([cfg, "rl.loss_average=mean"], "rl.loss_average: expected one of"),
        ([cfg, "train.grad_accum=2"], "train.grad_accum: not used by an RL run"),
        ([cfg, 'train.parallel="fsdp"'], "train.parallel: an RL run replicates"),
        ([cfg, f'rl.init_from="{tmp_path / "nothing"}"'], "is not a softar run"),
    ]
    for args, message in cases:
        assert_one_line_error(softar("rl", *args, "--out", tmp_path / "out"), message)
        assert not (tmp_path / "out").exists()


def test_eval_reports_pass_at_k_under_any_thought_policy(init_run, task_data):
    proc = softar("eval", init_run, "--task", "prosqa", "--data", task_data / "test.json", "--samples", "4",
                  "--policy", "hard", "--temperature", "0.7")
    assert proc.returncode == 0, proc.stderr
    sampled = json.loads(proc.stdout.strip().splitlines()[-1])["sampled"]
    assert sampled == json.loads((init_run / "eval_prosqa_test_hard_n4_t0.7_s0.json").read_text())["sampled"]
    assert sampled["policy"] == "hard" and 0 <= sampled["pass@1"] <= sampled["pass@4"] <= 1
    assert sampled["pass@1"] == pytest.approx(sampled["reward"])  # prosqa's reward is 1 or 0: pass@1 is its mean
    assert_one_line_error(softar("eval", init_run, "--samples", "4"), "--samples: pass@k is for a reasoning-task")


def test_a_sweep_of_rl_configs_scores_every_policy_against_its_start(init_run, tmp_path):
    """`softar sweep` over RL configs: each seed's run starts from that seed's supervised run (rl.init_from with
    {seed}); both are scored on the test split under hard and soft inference, and a second call reuses it all."""
    from softar.experiments.sweep import sweep
    from softar.rundir import read_config

    (tmp_path / "init_s1337").symlink_to(init_run)
    configs = [rl_file(tmp_path, str(tmp_path / "init_s{seed}"), policy) for policy in ("hard", "soft")]
    report = tmp_path / "rl.md"
    first = sweep(configs, 1, [], tmp_path / "grid", report=report, command="softar sweep ...")
    text = report.read_text()
    for policy in ("hard", "soft"):
        name = f"rl_{policy}_init_s{{seed}}"
        run = tmp_path / "grid" / "runs" / f"{name}_s1337"
        assert read_config(run).rl.init_from == str(tmp_path / "init_s1337") and read_config(run).train.seed == 1337
        sampled = json.loads((run / "eval.json").read_text())["sampled"]
        assert set(sampled) == {"hard", "soft"}
        for s in sampled.values():  # 8 test questions, 4 samples each; a passing sample names an option
            pairs = list(zip(s["right"], s["named"], strict=True))
            assert len(pairs) == 8 and all(0 <= r <= m <= 4 for r, m in pairs) and s["options"] == 2
            assert s["pass@1"] == pytest.approx(sum(s["right"]) / 32) and s["max_answer"] == 8
            assert s["option_guess"]["pass@1"] == pytest.approx(sum(s["named"]) / 64)
        assert f"| `{name}` | {policy} | hard |" in text and f"| `{name}` | {policy} | soft |" in text
    start = json.loads((tmp_path / "grid" / "starts" / "init_s1337.json").read_text())
    assert start["key"]["max_answer"] == 8 and start["key"]["run"] == str(init_run.resolve())
    assert start["sampled"]["soft"]["max_answer"] == 8  # scored as the RL runs are, not with its own 64
    assert f"| start | supervised | soft | {start['sampled']['soft']['pass@1']:.3f} ± 0.000 |" in text
    assert "Against RL on hard thoughts" in text and "guessing null" in text
    assert (tmp_path / "rl" / "reward_curves.png").is_file()
    assert sweep(configs, 1, [], tmp_path / "grid", report=report, command="softar sweep ...") == first
    assert report.read_text() == text
    kept = tmp_path / "grid" / "runs" / "rl_hard_init_s{seed}_s1337" / "eval.json"
    old = json.loads(kept.read_text())
    for s in old["sampled"].values():  # as an older softar kept it: scored again (not trained again), the same
        del s["max_answer"], s["options"]
    kept.write_text(json.dumps(old))
    checkpoints = sorted(p.name for p in kept.parent.joinpath("checkpoints").iterdir())
    assert sweep(configs, 1, [], tmp_path / "grid", report=report, command="softar sweep ...") == first
    assert report.read_text() == text and "options" in json.loads(kept.read_text())["sampled"]["hard"]
    assert sorted(p.name for p in kept.parent.joinpath("checkpoints").iterdir()) == checkpoints


def test_rl_sweeps_refuse_grids_they_cannot_score(init_run, tmp_path):
    """One start per task: its configs must agree on what the start is scored with (the run, and how a sample
    passes); every seed's start must exist before anything trains."""
    (tmp_path / "init_s1337").symlink_to(init_run)
    hard = rl_file(tmp_path, str(tmp_path / "init_s{seed}"), "hard")
    (tmp_path / "x").mkdir()
    other = rl_file(tmp_path / "x", str(init_run), "soft")  # another start
    (tmp_path / "y").mkdir()
    scored = rl_file(tmp_path / "y", str(tmp_path / "init_s{seed}"), "soft", max_answer_tokens=3)  # scored apart
    for configs, seeds, message in [([hard, other], 1, "must share rl.init_from"),
                                    ([hard, scored], 1, "must share rl.init_from"),
                                    ([hard], 2, "init_s1338 is not a softar run")]:
        proc = softar("sweep", *configs, "--seeds", str(seeds), "--out", tmp_path / "grid")
        assert_one_line_error(proc, message)
    assert not (tmp_path / "grid").exists()


def test_the_start_is_scored_again_when_what_it_is_scored_with_changes(init_run, tmp_path):
    from softar.experiments.rl_study import start_results
    from softar.rl.trainer import rl_config

    cfg = rl_config(rl_file(tmp_path, init_run, "hard"))
    out = tmp_path / "grid"
    out.mkdir()
    first = start_results([init_run], cfg, out)
    path = out / "starts" / f"{init_run.name}.json"
    stamp = path.stat().st_mtime_ns
    assert start_results([init_run], cfg, out) == first and path.stat().st_mtime_ns == stamp  # reused
    shorter = rl_config(rl_file(tmp_path, init_run, "hard", max_answer_tokens=2))
    again = start_results([init_run], shorter, out)
    assert json.loads(path.read_text())["key"]["max_answer"] == 2 and again[0]["sampled"]["hard"]["max_answer"] == 2


def test_a_gated_runs_checkpoint_starts_only_a_gated_run(init_run, tmp_path):
    gated = tmp_path / "gated"
    assert softar("rl", rl_file(tmp_path, init_run, "gated"), "train.max_iters=1", "--out", gated,
                  "--quiet").returncode == 0
    proc = softar("rl", rl_file(tmp_path, gated, "hard"), "--out", tmp_path / "hard", "--quiet")
    assert_one_line_error(proc, "rl.init_from")
    assert not (tmp_path / "hard").exists()
    assert softar("rl", rl_file(tmp_path, gated, "gated"), "train.max_iters=1", "--out", tmp_path / "again",
                  "--quiet").returncode == 0  # a gated run continues from a gated run's gate


def test_diverging_rl_stops_with_one_line(init_run, tmp_path):
    """A learning rate that blows the weights up ends like `softar train`'s: one line, exit 2, no traceback."""
    proc = softar("rl", rl_file(tmp_path, init_run, "hard"), "train.lr=1e30", "train.max_iters=40", "--out",
                  tmp_path / "blown", "--quiet")
    assert_one_line_error(proc, "diverged")


def test_rl_refuses_a_config_train_refuses(init_run, tmp_path):
    """One validation path: a [task] that is not a table is refused by `softar rl` as by `softar train`."""
    path = Path(rl_file(tmp_path, init_run, "hard"))
    path.write_text("task = 5\n" + path.read_text().replace("[task]\neval_examples = 2\n", ""))
    for command in ("rl", "train"):
        assert_one_line_error(softar(command, path, "--out", tmp_path / command), "task")
        assert not (tmp_path / command).exists()


def test_sigterm_at_start_up_says_so(init_run, tmp_path):
    """SIGTERM as soon as `softar rl` can catch it (its handler is installed: /proc shows it, so there is no race)
    stops it with a message and exit 143, never silently."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "early"
    proc = subprocess.Popen([sys.executable, "-m", "softar", "rl", rl_file(tmp_path, init_run, "hard"), "--out",
                             out, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = Path(f"/proc/{proc.pid}/status")
    deadline = time.monotonic() + 60
    while not int(next(ln for ln in status.read_text().splitlines() if ln.startswith("SigCgt:")).split()[1], 16) \
            & (1 << (signal.SIGTERM - 1)):
        assert time.monotonic() < deadline
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("softar: stopped by SIGTERM"), err
    if "before anything was saved" in last:
        assert not out.exists()
