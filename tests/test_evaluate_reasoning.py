"""Reasoning tasks end to end: a task run trains, evaluates and resumes exactly like a language-model run, and
`softar eval --task` reports accuracy with its breakdowns; bad input is one line and exit 2."""

import json

import pytest
import torch

from softar import SoftarError, config
from softar.evaluate.reasoning import TaskData, evaluate_task_run
from softar.rundir import load_run
from softar.train import train

from .conftest import task_overrides
from .test_cli import assert_one_line_error, softar, tree
from .test_train import final_weights, train_losses


def test_a_task_run_trains_reports_accuracy_and_resumes_exactly(task_data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    result = train(config.load(None, task_overrides(task_data)), full, quiet=True)
    assert result["step"] == 4 and result["stage"] == 2 and result["examples_per_s"] > 0
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows if r["kind"] == "eval"] == [1, 2]  # the stage just trained
    final = next(r for r in rows if r["kind"] == "full_val")["report"]
    assert {f"stage_{k}" for k in range(3)} <= set(final) and final["examples"] == 8
    assert len(final["correct"]) == 8 and result["val_accuracy"] == sum(final["correct"]) / 8  # the final stage's
    assert final["correct"] == final["stage_2"]["correct"]
    train(config.load(None, task_overrides(task_data, **{"train.max_iters": 2, "train.lr_decay_iters": 4})),
          split, quiet=True)
    train(config.load(None, task_overrides(task_data, **{"train.lr_decay_iters": 4})), split, resume=True,
          quiet=True)
    assert train_losses(full) == train_losses(split)
    a, b = final_weights(full), final_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["no_cot", "cot", "cot_reversed", "pause"])
def test_every_mode_trains_on_its_own_sequences(task_data, tmp_path, mode):
    """Each mode's sequences hold what it says between <bot> and <eot> and after <eot>, and the val loss the run
    reports is the cross-entropy on what follows <eot>, recomputed here with a plain forward per question."""
    result = train(config.load(None, task_overrides(task_data, **{"task.mode": f'"{mode}"',
                                                                  "train.max_iters": 2})), tmp_path / mode, quiet=True)
    assert result["stage"] == 0
    run = load_run(tmp_path / mode, torch.device("cpu"))
    data = TaskData.open(run.cfg)
    enc, lm = data.encoder, run.model.lm
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in data.examples["valid"]:
            seq, eot = enc.sequence(ex, 0)
            ids = torch.tensor(seq)
            logp = lm.heads(lm.hidden(run.model.E[ids[None, :-1]])).logits[0].log_softmax(-1)
            total -= logp[eot:].gather(-1, ids[eot + 1 :, None]).sum().item()
            count += len(seq) - 1 - eot
        ex = data.examples["valid"][0]
        seq, eot = enc.sequence(ex, 0)
    assert result["val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert seq[len(ex.question) : eot] == ([enc.id["<pause>"]] * 6 if mode == "pause" else [])
    steps = {"cot": ex.steps, "cot_reversed": ex.steps[::-1]}.get(mode, [])
    assert seq[eot + 1 :] == [t for step in steps for t in step] + ex.answer


def test_eval_reports_accuracy_by_steps_stage_tokens_time_norms_and_the_probe(task_data, tmp_path):
    run = tmp_path / "run"
    train(config.load(None, task_overrides(task_data)), run, quiet=True)
    proc = softar("eval", run, "--task", "prosqa", "--data", task_data / "test.json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r == json.loads((run / "eval_prosqa_test.json").read_text())
    assert r["examples"] == 8 and r["mode"] == "thoughts" and 0 <= r["accuracy"] <= 1
    assert r["thought_tokens"] == 2 and len(r["correct"]) == 8 and r["accuracy"] == sum(r["correct"]) / 8
    assert len(r["named_option"]) == 8 and r["option_rate"] == sum(r["named_option"]) / 8
    assert all(n >= c for n, c in zip(r["named_option"], r["correct"], strict=True))  # right implies an option
    assert r["stage_0"]["thought_tokens"] == 0 and r["stage_1"]["thought_tokens"] == 1
    assert set(r["accuracy_by_steps"]) <= {"3", "4", "5", "6"} and r["seconds_per_question"] > 0
    assert r["thought_norm"] > 0 and r["embedding_norm"] > 0
    for row in r["probe"].values():
        assert 0 <= row["held"] <= row["frontier"] and row["chance"] > 0
    again = evaluate_task_run(run, "prosqa", task_data / "test.json")  # greedy: deterministic
    assert again["correct"] == r["correct"] and again["stage_1"]["correct"] == r["stage_1"]["correct"]


def test_bad_task_input_is_one_line_and_exit_2(task_data, char_data, tmp_path):
    run = tmp_path / "run"
    train(config.load(None, task_overrides(task_data, **{"task.mode": '"cot"', "train.max_iters": 1})), run,
          quiet=True)
    before = tree(run)
    assert_one_line_error(softar("eval", run, "--task", "pathfind", "--data", task_data / "test.json"),
                          "trained on 'prosqa'")
    assert_one_line_error(softar("eval", run, "--task", "prosqa"), "--task needs --data FILE.json")
    assert_one_line_error(softar("eval", run), "trained on the prosqa task; evaluate it with --task prosqa")
    assert_one_line_error(softar("eval", run, "--task", "prosqa", "--data", tmp_path / "none.json"), "not found")
    (tmp_path / "bad.json").write_text('[{"question": 1}]')
    assert_one_line_error(softar("eval", run, "--task", "prosqa", "--data", tmp_path / "bad.json"),
                          "record 0", "'question' must be str")
    assert tree(run) == before
    assert_one_line_error(softar("train", "configs/reasoning/prosqa_cot.toml", f"data.dir={char_data}",
                                 "--out", tmp_path / "r2"), "no task dataset in", "softar task prepare")
    assert_one_line_error(softar("train", "configs/reasoning/prosqa_cot.toml", f"data.dir={task_data}",
                                 "model.block_size=64", "--out", tmp_path / "r3"),
                          "model.block_size (train.json): its longest sequence needs", "the model has 64")
    assert_one_line_error(softar("train", "configs/reasoning/prosqa_cot.toml", "context.soft=4", "--out",
                                 tmp_path / "r4"), "task.name", "plain model")
    assert_one_line_error(softar("train", "configs/reasoning/prosqa_coconut.toml", f"data.dir={task_data}",
                                 "train.max_iters=100000000000", "--out", tmp_path / "r5"),
                          "train.max_iters: must be at most")
    assert not any((tmp_path / name).exists() for name in ("r2", "r3", "r4", "r5"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert_one_line_error(softar("task", "prepare", "prosqa", "--out", tmp_path / "mine", "--train", 5),
                          "which softar did not write")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(SoftarError, match="language-model run"):
        lm = tmp_path / "lm"
        from .conftest import tiny_overrides

        train(config.load(None, tiny_overrides(char_data, **{"train.max_iters": 1})), lm, quiet=True)
        evaluate_task_run(lm, "prosqa", task_data / "test.json")


def test_pathfind_trains_and_its_paths_are_checked(tmp_path):
    from softar.tasks.data import prepare_task

    data = tmp_path / "pathfind"
    prepare_task("pathfind", data, {"train": 32, "valid": 4, "test": 4})
    cfg = config.load(None, task_overrides(data, **{"task.name": '"pathfind"', "task.mode": '"cot"',
                                                    "train.max_iters": 2}))
    result = train(cfg, tmp_path / "run", quiet=True)
    assert result["stage"] == 0 and 0 <= result["val_accuracy"] <= 1
    with pytest.raises(SoftarError, match="task.render: pathfind offers symbolic, not 'text'"):
        train(config.load(None, task_overrides(data, **{"task.name": '"pathfind"', "task.render": '"text"'})),
              tmp_path / "run2", quiet=True)
