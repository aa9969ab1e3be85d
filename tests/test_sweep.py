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
