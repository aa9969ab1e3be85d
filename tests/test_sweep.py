import csv
import json
import statistics

from softar.experiments.sweep import flatten, sweep

from .conftest import tiny_overrides


def test_sweep_tables_are_the_mean_and_std_of_its_runs(char_data, tmp_path):
    for name, extra in (("a", ""), ("b", "[model]\nvector_head = true\n[loss]\nmse = 1.0\n")):
        (tmp_path / f"{name}.toml").write_text(extra)
    overrides = tiny_overrides(char_data, **{"train.max_iters": 4, "train.eval_interval": 2})
    out = tmp_path / "sweep"
    result = sweep([str(tmp_path / "a.toml"), str(tmp_path / "b.toml")], 2, overrides, out, windows=4,
                   horizons=(2, 4))
    assert result["configs"] == ["a", "b"]
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


def test_claims_need_a_win_beyond_the_spread_and_a_close_baseline():
    from softar.experiments.sweep import claims

    def cols(loss, soft, greedy, sampled):
        out = {"loss": (loss, 0.01)}
        for k in (8, 32):
            out |= {f"open_loop.{k}.soft_expected": soft, f"open_loop.{k}.greedy": greedy,
                    f"open_loop.{k}.sampled": sampled}
        return out

    table = {"char_ce": cols(2.0, (3.0, 0.1), (3.5, 0.1), (3.6, 0.1)),
             "char_close": cols(2.0, (3.0, 0.3), (3.5, 0.3), (3.6, 0.1)),  # within the spread
             "char_worse": cols(2.1, (3.0, 0.1), (3.5, 0.1), (3.6, 0.1))}  # val loss 5% above the baseline
    lines = claims(table, (8, 32))
    assert [line.split("**: ")[1].split(" (")[0] for line in lines] == ["holds", "does not hold", "does not hold"]
    assert "+5.0% vs baseline" in lines[2]


def test_context_study_gap_and_tradeoff(char_data, tmp_path):
    """The context study: the short and long windows close 0 and 1 of their own gap exactly; threshold 0 collapses
    every soft token and inf none; the report holds both sections and the trade-off plot."""
    configs = {"short": "[model]\nblock_size = 8\n", "long": "[model]\nblock_size = 16\n",
               "slots": "[model]\nblock_size = 11\n[context]\naggregate = 1\nsegments = 2\nsegment_len = 4\n"
                        "max_history = 32\n",
               "seed": "[model]\nblock_size = 16\n[context]\naggregate = 1\nsegments = 1\nsoft = 3\n"
                       "segment_len = 4\nmax_history = 32\n"}
    for name, text in configs.items():
        (tmp_path / f"{name}.toml").write_text(text)
    overrides = [o for o in tiny_overrides(char_data, **{"train.max_iters": 4, "train.eval_interval": 2})
                 if not o.startswith("model.block_size")]
    out, report = tmp_path / "sweep", tmp_path / "docs" / "context.md"
    result = sweep([str(tmp_path / f"{n}.toml") for n in configs], 1, overrides, out, windows=4, horizons=(2, 4),
                   report=report, gap=("short", "long"), generation=("seed", "long"))
    table = result["table"]
    assert table["short"]["gap_closed"] == [0.0, 0.0] and table["long"]["gap_closed"] == [1.0, 0.0]  # 1 seed: std 0
    assert "recovery.512.aggregate.recall_at_k" in table["slots"] and "passkey.16.accuracy" in table["short"]
    rows = json.loads((out / "runs" / "seed_s1337" / "generation.json").read_text())
    assert rows[0]["threshold"] == 0.0 and rows[0]["soft_fraction"] == 0.0
    assert rows[-1]["threshold"] == float("inf") and rows[-1]["soft_fraction"] == 1.0
    text = report.read_text()
    assert "## Fraction of the gap closed" in text and "## Coherence against nuance" in text
    assert (report.parent / "context" / "tradeoff.png").stat().st_size > 0
