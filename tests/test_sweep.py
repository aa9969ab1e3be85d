import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from softar import SoftarError
from softar.checkpoint import latest_checkpoint
from softar.experiments.sweep import flatten, sweep

from .conftest import tiny_overrides


def test_sweep_tables_are_the_mean_and_std_of_its_runs(char_data, tmp_path):
    for name, extra in (("a", ""), ("b", "[model]\nvector_head = true\n[loss]\nmse = 1.0\n")):
        (tmp_path / f"{name}.toml").write_text(extra)
    overrides = tiny_overrides(char_data, **{"train.max_iters": 4, "train.eval_interval": 2})
    out = tmp_path / "sweep"
    report = tmp_path / "docs" / "soft.md"
    result = sweep([str(tmp_path / "a.toml"), str(tmp_path / "b.toml")], 2, overrides, out, windows=4,
                   horizons=(2, 4), report=report)
    assert result["configs"] == ["a", "b"]
    text = report.read_text()
    for section in ("### Nuance at K = 2", "### Nuance at K = 4", "### Representation", "## The seed's claim"):
        assert section in text
    assert "| b | soft_expected " in text and (report.parent / "soft" / "results.csv").is_file()
    runs = [flatten(json.loads((out / "runs" / f"b_s{s}" / "eval.json").read_text())) for s in (1337, 1338)]
    mean, std = result["table"]["b"]["open_loop.4.soft_regress"]
    values = [r["open_loop.4.soft_regress"] for r in runs]
    assert mean == statistics.fmean(values) and std == statistics.stdev(values)
    assert "soft_regress" not in "".join(result["table"]["a"])  # a has no vector head
    rows = list(csv.reader((out / "results.csv").read_text().splitlines()))
    assert [r[0] for r in rows[1:]] == ["a", "b"]
    assert (out / "results.md").read_text().count("\n") == 4
    assert (out / "loss_curves.png").stat().st_size > 0 and (out / "metrics.png").stat().st_size > 0
    before = (out / "runs" / "a_s1337" / "eval.json").stat().st_mtime
    sweep([str(tmp_path / "a.toml")], 1, overrides, out, windows=4, horizons=(2, 4))  # done runs are reused
    assert (out / "runs" / "a_s1337" / "eval.json").stat().st_mtime == before


def test_first_seed_names_the_runs_seeds_them_and_is_what_the_report_says(char_data, tmp_path):
    """`softar sweep --first-seed 42 --seeds 2`: runs a_s42 and a_s43, trained with train.seed 42 and 43."""
    from softar.cli import main

    (tmp_path / "a.toml").write_text("")
    out, report = tmp_path / "sweep", tmp_path / "docs" / "soft.md"
    assert main(["sweep", str(tmp_path / "a.toml"), *tiny_overrides(char_data, **{"train.max_iters": 2}),
                 "--seeds", "2", "--first-seed", "42", "--windows", "2", "--horizons", "2", "--out", str(out),
                 "--report", str(report)]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["a_s42", "a_s43"]
    for seed in (42, 43):
        assert json.loads((out / "runs" / f"a_s{seed}" / "config.json").read_text())["train"]["seed"] == seed
    assert "2 seeds (train.seed = 42, 43)" in report.read_text()


def test_claims_need_paired_wins_over_averaged_rollouts_and_constants():
    """The seed's claim holds for a config only when its soft feedback beats sampled_avg_2 and every constant
    vector at every horizon with paired intervals below 0, and its val loss is within 2% of the baseline's."""
    from softar.experiments.soft_study import claims, paired

    rng = np.random.default_rng(0)

    def run(soft_shift):
        base = rng.normal(4.0, 0.5, 64)  # per-window losses shared by every mode: pairing removes them
        modes = {"sampled_avg_2": base, "constant_mean": base + 0.1, "constant_unigram": base + 0.2,
                 "zero": base + 0.3, "soft_expected": base + soft_shift + rng.normal(0, 0.01, 64)}
        return {"loss": 2.0, "brier": {"per_window": {"brier1": (0.3 - soft_shift + 0 * base).tolist()}},
                "open_loop": {str(k): {"soft_feedback": "soft_expected",
                                       "per_window": {m: v.tolist() for m, v in modes.items()}} for k in (8, 32)}}

    raw = {"char_ce": [run(-0.2), run(-0.2)], "char_tie": [run(0.0), run(0.0)], "char_worse": [run(-0.2)]}
    table = {"char_ce": {"loss": (2.0, 0.0)}, "char_tie": {"loss": (2.0, 0.0)}, "char_worse": {"loss": (2.1, 0.0)}}
    d = paired(raw["char_ce"], 8, "soft_expected", "sampled_avg_2")
    assert d["hi"] < 0 and d["diff"] == pytest.approx(-0.2, abs=0.01)
    lines = claims(table, raw, (8, 32))
    assert "holds for soft_expected" in lines[0]
    assert "does not hold" in lines[1]
    assert "pays for it" in lines[2] and "+5.0% vs baseline" in lines[2]
    from softar.experiments.soft_study import against_baseline_section

    rows = [line for line in against_baseline_section(table, raw, (8, 32)) if line.startswith("| char_tie")]
    cells = rows[0].split(" | ")
    assert cells[1] == "+0.0000 ± 0.0000" and cells[4].startswith("-0.200")  # Brier-1 paired window by window


@pytest.mark.slow
def test_retention_study_and_tradeoff(char_data, tmp_path):
    """The retention study against two plain configs, listed after a layout config that is scored against them
    (the references train first): each reference scores itself, so the short one closes none of the gap and the long
    one all of it, exactly; a layout config gets the ablations; the trade-off still runs beside it; the report holds
    every section and the context curve. The same weights at two contexts (long:8 long) make a second study."""
    configs = {"slots": "[model]\nblock_size = 11\n[context]\naggregate = 1\nsegments = 2\nsegment_len = 4\n"
                        "max_history = 32\n",
               "short": "[model]\nblock_size = 8\n", "long": "[model]\nblock_size = 16\n",
               "seed": "[model]\nblock_size = 16\n[context]\naggregate = 1\nsegments = 1\nsoft = 3\n"
                       "segment_len = 4\nmax_history = 32\n"}
    for name, text in configs.items():
        (tmp_path / f"{name}.toml").write_text(text)
    overrides = [o for o in tiny_overrides(char_data, **{"train.max_iters": 4, "train.eval_interval": 2})
                 if not o.startswith("model.block_size")]
    out, report = tmp_path / "sweep", tmp_path / "docs" / "context.md"
    with pytest.raises(SoftarError, match="has a context layout"):
        sweep([str(tmp_path / f"{n}.toml") for n in configs], 1, overrides, out, gap=("slots", "long"))
    result = sweep([str(tmp_path / f"{n}.toml") for n in configs], 1, overrides, out, windows=4, horizons=(2, 4),
                   report=report, gap=("short", "long:16"), generation=("seed", "long"))
    table = result["table"]
    assert table["long"]["retention.gap_closed"] == [1.0, 0.0]  # 1 seed: std 0
    assert table["short"]["retention.gap_closed"] == [0.0, 0.0]
    assert table["slots"]["retention.ablation.shuffled.diff"] == [0.0, 0.0]  # sums: the order inside a span is lost
    assert "recovery.512.aggregate.recall_at_k" in table["slots"]
    rows = json.loads((out / "runs" / "seed_s1337" / "generation.json").read_text())["collapse_uncertain"]
    assert rows[0]["threshold"] == 0.0 and rows[0]["soft_fraction"] == 0.0
    assert rows[-1]["threshold"] == "inf" and rows[-1]["soft_fraction"] == 1.0  # strict JSON
    text = report.read_text()
    for section in ("## The gap, on identical targets", "## Ablations of the same weights", "## Copy probe",
                    "## Recovery against the frequency prior", "## Coherence against nuance"):
        assert section in text
    assert "**Verdict: " in text and (report.parent / "context" / "results.csv").is_file()
    assert (report.parent / "context" / "tradeoff.png").stat().st_size > 0
    assert (report.parent / "context" / "context_curve.png").stat().st_size > 0
    same = sweep([str(tmp_path / f"{n}.toml") for n in ("long", "slots")], 1, overrides, tmp_path / "same",
                 windows=4, gap=("long:8", "long"))["table"]  # one set of weights at two contexts
    assert same["long"]["retention.gap_closed"] == [1.0, 0.0] and "retention.gap" in same["slots"]


def test_report_paths_are_checked_before_any_run(char_data, tmp_path):
    """A report whose assets folder would be --out, or holds someone else's files, or sits under a file or in a
    folder that cannot be written, is refused with one line before anything trains."""
    from softar import SoftarError

    (tmp_path / "a.toml").write_text("")
    overrides = tiny_overrides(char_data, **{"train.max_iters": 2, "train.eval_interval": 2})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "results.csv").write_text("my precious csv")
    (tmp_path / "afile").write_text("x")
    for report, out, fragment in ((tmp_path / "sw.md", tmp_path / "sw", "--out itself"),
                                  (tmp_path / "notes.md", tmp_path / "o1", "holds notes, which softar did not write"),
                                  (tmp_path / "afile" / "r.md", tmp_path / "o2", "not a directory"),
                                  # a folder nobody may write in (even root): refused before training, not after
                                  (Path("/proc/self/softar/r.md"), tmp_path / "o3", "cannot write in /proc/")):
        with pytest.raises(SoftarError, match=fragment):
            sweep([str(tmp_path / "a.toml")], 1, overrides, out, windows=2, horizons=(2,), report=report)
        assert not (out / "runs").exists()
    assert (tmp_path / "notes" / "results.csv").read_text() == "my precious csv"


def test_a_reasoning_sweep_reports_accuracy_against_cot_paired_by_seed_and_question(task_data, char_data, tmp_path):
    from softar import SoftarError

    from .conftest import task_overrides

    for name, mode in (("cot", "cot"), ("coconut", "thoughts")):
        (tmp_path / f"{name}.toml").write_text(f'[task]\nmode = "{mode}"\n')
    overrides = [o for o in task_overrides(task_data, **{"train.max_iters": 2}) if not o.startswith("task.mode")]
    out, report = tmp_path / "sweep", tmp_path / "docs" / "reasoning.md"
    configs = [str(tmp_path / "cot.toml"), str(tmp_path / "coconut.toml")]
    result = sweep(configs, 2, overrides, out, report=report)
    text = report.read_text()
    for section in ("## Accuracy", "## By number of reasoning steps", "## By curriculum stage",
                    "## Thought vectors and the superposition probe", "## What it shows", "Budget here"):
        assert section in text
    runs = [json.loads((out / "runs" / f"{n}_s{s}" / "eval.json").read_text()) for n in ("cot", "coconut")
            for s in (1337, 1338)]
    assert all(r["examples"] == 8 and r["data"].endswith("test.json") for r in runs)  # the test split
    cot = np.array([r["correct"] for r in runs[:2]])
    coconut = np.array([r["correct"] for r in runs[2:]])
    diff = (coconut - cot).mean()
    assert "| coconut | thoughts (hidden) | " in text and f"{diff:+.3f} [" in text
    assert result["table"]["coconut"]["accuracy"][0] == pytest.approx(coconut.mean())
    assert (out / "accuracy_curves.png").stat().st_size > 0 and (report.parent / "reasoning" / "results.csv").is_file()
    with pytest.raises(SoftarError, match="separate sweeps"):
        (tmp_path / "lm.toml").write_text(f'[data]\ndir = "{char_data}"\n')
        (tmp_path / "task.toml").write_text(f'[data]\ndir = "{task_data}"\n[task]\nname = "prosqa"\n')
        sweep([str(tmp_path / "lm.toml"), str(tmp_path / "task.toml")], 1, [], tmp_path / "mixed")


def test_beyond_chance_is_the_accuracy_among_answers_that_name_an_option():
    from softar.experiments.reasoning_study import beyond_chance

    runs = [{"named_option": [1, 1, 0, 1] * 25, "correct": [1, 0, 0, 1] * 25} for _ in range(3)]
    r = beyond_chance(runs)
    assert r["mean"] == pytest.approx(2 / 3) and r["option_rate"] == 0.75 and r["lo"] < 2 / 3 < r["hi"]
    assert beyond_chance([{"correct": [1]}]) is None
    assert beyond_chance([{"named_option": [0, 0], "correct": [0, 0]}]) is None


def test_a_fine_tuning_config_needs_its_start_before_any_run(char_data, tmp_path):
    """train.init_from must name a finished run, or a run of a config listed before it (which trains first)."""
    (tmp_path / "base.toml").write_text("[model]\nblock_size = 8\n")
    start = f"{tmp_path}/out/runs/base_s{{seed}}"
    (tmp_path / "ft.toml").write_text(f'[model]\nblock_size = 8\n[train]\ninit_from = "{start}"\n')
    overrides = [o for o in tiny_overrides(char_data) if not o.startswith("model.block_size")]
    with pytest.raises(SoftarError, match="neither a finished run nor a run of a config listed before it"):
        sweep([str(tmp_path / "ft.toml"), str(tmp_path / "base.toml")], 1, overrides, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_jobs_train_the_very_runs_one_process_trains(char_data, tmp_path):
    """--jobs 2 trains each run in its own process, a fine-tuning run after the run it starts from: every run's
    weights equal those of `softar train` run by run in this process."""
    from softar import config
    from softar.train import train

    out, alone = tmp_path / "out", tmp_path / "alone"
    (tmp_path / "base.toml").write_text("[model]\nblock_size = 8\n")
    (tmp_path / "ft.toml").write_text(f'[model]\nblock_size = 8\n[train]\ninit_from = "{out}/runs/base_s{{seed}}"\n')
    overrides = [o for o in tiny_overrides(char_data) if not o.startswith("model.block_size")]
    sweep([str(tmp_path / "base.toml"), str(tmp_path / "ft.toml")], 2, overrides, out, windows=2, horizons=(2,),
          jobs=2)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["base_s1337", "base_s1338", "ft_s1337", "ft_s1338"]
    for seed in (1337, 1338):
        for name, start in (("base", []), ("ft", [f'train.init_from="{alone}/base_s{{seed}}"'])):
            cfg = config.load(str(tmp_path / f"{name}.toml"), [*overrides, f"train.seed={seed}", *start])
            train(cfg, alone / f"{name}_s{seed}", quiet=True)
            theirs, ours = (latest_checkpoint(d / f"{name}_s{seed}" / "checkpoints") for d in (alone, out / "runs"))
            tensors = sorted(p.name for p in ours.glob("*.safetensors"))
            assert len(tensors) >= 2  # the model's and the optimizer's
            assert all((ours / t).read_bytes() == (theirs / t).read_bytes() for t in tensors)
            assert (out / "runs" / f"{name}_s{seed}" / "eval.json").is_file()
    start = json.loads((out / "runs" / "ft_s1338" / "run.json").read_text())["init_from"]
    assert "base_s1338" in json.dumps(start)


def test_the_depth_report_applies_the_gate_the_control_and_the_preregistered_rule():
    """Per-question results built by hand (depths 1 and 2, 40 questions each, 2 seeds): no-CoT passes the gate and
    fails at depth 2, CoT answers everything, the reversed chain is no better than no-CoT; the rule's verdict then
    follows Coconut's figures, and a Coconut below the floor gets no conclusion."""
    import dataclasses

    from softar.config import Config
    from softar.experiments.reasoning_study import depth_sections, gate_passes

    steps = [1] * 40 + [2] * 40
    half = [1, 0] * 20

    def runs(d1: list[int], d2: list[int]) -> list[dict]:
        return [{"question_steps": steps, "correct": d1 + d2} for _ in range(2)]

    def cfg(mode: str, kind: str = "hidden") -> Config:
        c = Config()
        return dataclasses.replace(c, task=dataclasses.replace(c.task, mode=mode),
                                   soft=dataclasses.replace(c.soft, kind=kind))

    cfgs = {"nc": cfg("no_cot"), "cot": cfg("cot"), "rev": cfg("cot_reversed"), "coco": cfg("thoughts")}
    raw = {"nc": runs([1] * 40, half), "cot": runs([1] * 40, [1] * 40), "rev": runs([1] * 40, half),
           "coco": runs([1] * 40, [1] * 40)}
    text = "\n".join(depth_sections(raw, cfgs))
    assert "| nc | no CoT | 1.000, 1.000 | passes |" in text
    assert "At depth 2, the largest where no-CoT fails (accuracy 0.500), CoT minus no-CoT is +0.500 [" in text
    assert "the apparatus sees the effect" in text and "the order of the lookups is what helps" in text
    assert "coco minus cot at depth 2: +0.000 [+0.000, +0.000] -> **equivalent" in text and "pilot" in text
    raw["coco"] = runs(half, [0] * 40)  # below the floor: the rule is not applied
    text = "\n".join(depth_sections(raw, cfgs))
    assert "| coco | thoughts (hidden) | 0.500, 0.500 | below the floor |" in text
    assert "-> no conclusion (Coconut below the floor)" in text
    assert gate_passes(raw) == {"nc": True, "cot": True, "rev": True, "coco": False}  # what "What it shows" reads
    raw["nc"] = runs(half, half)  # no-CoT below the floor: no control, so no verdict either
    text = "\n".join(depth_sections(raw, cfgs))
    assert "Not interpretable" in text and "the positive control does not hold" in text
    assert depth_sections({"nc": [{"question_steps": [3, 4], "correct": [1, 0]}]}, cfgs) == []  # no depth 1: ProsQA
    raw = {"nc": runs([1] * 40, half), "cot": runs([1] * 40, [1] * 40), "coco": runs([1] * 40, [1] * 40)[:1]}
    text = "\n".join(depth_sections(raw, cfgs))  # a seed short: reported, not a crash
    assert "the runs are not comparable" in text and "1 of the 5 pre-registered seeds" in text
    raw["cot"] = [{"question_steps": steps}] * 2  # no per-question results
    assert "| cot | CoT | no per-question results | below the floor |" in "\n".join(depth_sections(raw, cfgs))


def test_the_gate_shows_each_seeds_warm_up_read_from_its_metrics(tmp_path):
    """The recall accuracy at step task.recall_iters, from each run's metrics.jsonl: a seed whose warm-up did not
    take shows as such; a run without that eval shows '-'; a config without a warm-up has no row."""
    import dataclasses

    from softar.config import Config
    from softar.experiments.reasoning_study import depth_sections

    def run(name: str, evals: dict[int, float]) -> Path:
        d = tmp_path / name
        d.mkdir()
        rows = [{"kind": "train", "step": 300, "loss": 1.0}]
        rows += [{"kind": "eval", "step": k, "val_accuracy": 0.0, "recall_accuracy": v} for k, v in evals.items()]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d

    c = Config()
    warm = dataclasses.replace(c, task=dataclasses.replace(c.task, mode="cot", recall_iters=300))
    cold = dataclasses.replace(c, task=dataclasses.replace(c.task, mode="no_cot"))
    steps = [1] * 4
    raw = {"cot": [{"question_steps": steps, "correct": [1] * 4}] * 3,
           "nc": [{"question_steps": steps, "correct": [1] * 4}] * 3}
    dirs = {"cot": [run("a", {150: 0.2, 300: 1.0, 600: 0.3}), run("b", {300: 0.2486}), run("c", {600: 0.9})],
            "nc": [run("d", {300: 0.5})] * 3}
    text = "\n".join(depth_sections(raw, {"cot": warm, "nc": cold}, dirs))
    assert "| cot | 1.00, 0.25, - |" in text and "| nc |" not in text.split("each seed |")[-1]
    assert "warm-up" not in "\n".join(depth_sections(raw, {"cot": warm, "nc": cold}))  # no folders, no rows


def test_the_budget_counts_question_steps_apart_from_recall():
    from softar import config
    from softar.experiments.reasoning_study import task_steps

    over = ["task.name=twins", "train.max_iters=1200", "task.recall_iters=300"]
    assert task_steps(config.load(None, over)) == 900
    assert task_steps(config.load(None, [*over, "task.recall_every=2"])) == 450  # every other step after 300
    assert task_steps(config.load(None, [*over, "task.recall_every=3"])) == 600
    assert task_steps(config.load(None, ["train.max_iters=50"])) == 50


def test_rl_findings_say_below_the_floor_when_the_start_solves_nothing():
    from softar.experiments.rl_study import findings

    def runs(right: list[int]) -> list[dict]:
        sampled = {"samples": 4, "right": right}
        return [{"sampled": {p: {**sampled, "pass@1": sum(right) / (4 * len(right))} for p in ("hard", "soft")}}
                for _ in range(2)]

    lines = findings(["rl"], {"rl": runs([1, 0, 0, 0])}, runs([0, 0, 0, 0]), None, (1, 4), options=False)
    assert lines[0].startswith("- **Below the floor at this budget**: the supervised start solves under 0.05")
    lines = findings(["rl"], {"rl": runs([4, 4, 0, 0])}, runs([2, 2, 1, 1]), None, (1, 4), options=False)
    assert not any("Below the floor" in line for line in lines)  # a start at 0.375 has something to sharpen


def test_rl_findings_state_the_positive_control_before_comparing_soft_with_hard():
    from softar.experiments.rl_study import findings

    def runs(right: list[int]) -> list[dict]:
        sampled = {"samples": 4, "right": right}
        return [{"sampled": {p: {**sampled, "pass@1": sum(right) / (4 * len(right))} for p in ("hard", "soft")}}
                for _ in range(2)]

    start = runs([1, 1, 0, 0] * 10)
    better, same = runs([4, 4, 3, 3] * 10), runs([1, 1, 0, 0] * 10)
    lines = findings(["hard", "soft"], {"hard": better, "soft": same}, start, "hard", (1, 4), options=False)
    control = next(line for line in lines if "Positive control" in line)
    assert control.endswith("holds.") and "+0.750" in control  # 0.875 - 0.125, every question paired
    lines = findings(["hard", "soft"], {"hard": same, "soft": better}, start, "hard", (1, 4), options=False)
    assert "does not hold" in next(line for line in lines if "Positive control" in line)
