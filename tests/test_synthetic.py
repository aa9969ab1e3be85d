"""Synthetic data with a known optimum: the forward algorithm against brute-force enumeration of state paths, the
sampler against the model's exact joint distribution, the HMM oracle through the engine against the exact k-step
prediction, and hostile data folders."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from softar import SoftarError, config
from softar.data.dataset import load_split, random_windows
from softar.data.synthetic import (
    HMM,
    Bag,
    BagSpec,
    Binding,
    BindingSpec,
    HMMSpec,
    bayes_loss,
    load_language,
    parameter_file,
    prepare_synthetic,
)
from softar.evaluate.soft_tokens import open_loop_loss
from softar.model.oracle import HMMOracle
from softar.soft.model import SoftAR
from softar.train import train

from .conftest import tiny_overrides
from .test_cli import assert_one_line_error, softar, tree


def random_hmm(S: int, V: int, seed: int) -> HMM:
    """A dense random HMM whose initial distribution is its chain's stationary one (unlike the generator's sticky,
    block-structured ones)."""
    rng = np.random.default_rng(seed)
    A = rng.dirichlet(np.ones(S), size=S)
    B = rng.dirichlet(np.ones(V), size=S)
    vals, vecs = np.linalg.eig(A.T)
    pi = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
    return HMM(pi / pi.sum(), A, B)


def path_probability(hmm: HMM, xs: list[int]) -> float:
    """P(x_0..x_n) by summing over every state path: the definition, no recursion shared with the code."""
    total = 0.0
    for path in itertools.product(range(hmm.states), repeat=len(xs)):
        p = hmm.initial[path[0]] * hmm.emission[path[0], xs[0]]
        for t in range(1, len(xs)):
            p *= hmm.transition[path[t - 1], path[t]] * hmm.emission[path[t], xs[t]]
        total += p
    return total


def test_forward_algorithm_equals_enumeration_of_state_paths():
    hmm = random_hmm(3, 4, seed=0)
    xs = [2, 0, 3, 3, 1]
    logp = hmm.teacher_forced(torch.tensor([xs]))[0]  # log p(x_{t+1} | x_<=t)
    for t in range(len(xs) - 1):
        exact = path_probability(hmm, xs[: t + 2]) / path_probability(hmm, xs[: t + 1])
        assert logp[t].item() == pytest.approx(math.log(exact), abs=1e-12)
    # the whole-split loss carries the belief across its chunks: the same as one pass
    full = -sum(math.log(path_probability(hmm, xs[: t + 2]) / path_probability(hmm, xs[: t + 1]))
                for t in range(len(xs) - 1)) / (len(xs) - 1)
    assert hmm.loss_full(np.array(xs), chunk=2) == pytest.approx(full, abs=1e-12)


def test_open_loop_ceiling_equals_marginalising_the_unseen_symbols():
    hmm = random_hmm(2, 3, seed=1)
    xs = [1, 0, 2, 2, 0]  # prefix x_0..x_1, then 3 steps ahead
    logp = hmm.open_loop(torch.tensor([xs]), prefix=1, horizon=3)[0]
    p_prefix = path_probability(hmm, xs[:2])
    for k in range(3):  # p(x_{2+k} | x_0, x_1): every symbol in between summed out
        between = itertools.product(range(hmm.symbols), repeat=k)
        joint = sum(path_probability(hmm, xs[:2] + list(mid) + [xs[2 + k]]) for mid in between)
        assert logp[k].item() == pytest.approx(math.log(joint / p_prefix), abs=1e-12)


def test_sampler_matches_the_exact_joint_of_neighbouring_symbols():
    hmm = HMM.from_spec(HMMSpec(states=3, symbols=6, stickiness=0.8, overlap=0.4))
    x = hmm.sample(300_000, np.random.default_rng(0))
    counts = np.zeros((6, 6))
    np.add.at(counts, (x[:-1], x[1:]), 1)
    pi, A, B = hmm.initial, hmm.transition, hmm.emission
    exact = (pi[:, None] * B).T @ A @ B  # P(x_t = a, x_t+1 = b)
    assert np.abs(counts / counts.sum() - exact).max() < 0.003  # about 6 standard errors of the largest cell
    assert exact.sum() == pytest.approx(1.0)


def test_the_oracle_through_the_engine_feeds_back_exactly_the_bayes_prediction():
    """Its expected embedding fed back (soft feedback) is the exact k-step prediction, computed by matrix powers;
    one sampled rollout is worse and averaging rollouts closes in: the effect the positive control must show."""
    for hmm in (random_hmm(3, 5, seed=2), HMM.from_spec(HMMSpec(states=4, symbols=8))):  # dense; sticky
        data = hmm.sample(5000, np.random.default_rng(1))
        oracle = SoftAR(HMMOracle(hmm), 24)
        r = open_loop_loss(oracle, data, 8, data, windows=64, averaged=(1, 2, 4, 16), bayes=hmm.open_loop)
        assert np.allclose(r["per_window"]["soft_expected"], r["per_window"]["bayes"], atol=1e-5)
        ids = random_windows(data, 25, 64, 0, "cpu")  # the windows open_loop_loss draws; the prefix ends at 16
        assert np.allclose(r["per_window"]["teacher"], -hmm.teacher_forced(ids)[:, 16:].mean(1).numpy(), atol=1e-5)
    assert r["sampled_avg_1"] > r["sampled_avg_2"] > r["sampled_avg_16"] > r["bayes"]  # the sticky one
    assert r["vs_soft"]["sampled_avg_2"]["lo"] > 0 and r["effective_samples_range"] == "above"


def test_bayes_loss_scores_the_same_targets_as_the_model(tmp_path):
    """Windows read from their start: the first target of each window is predicted from one symbol."""
    hmm = random_hmm(2, 3, seed=3)
    data = np.array([0, 1, 2, 2, 1, 0, 0])
    by_hand = []
    for start in range(0, len(data) - 1, 3):  # windows of 3 inputs, the last shorter
        w = data[start : start + 4]
        by_hand += [-math.log(path_probability(hmm, w[: t + 2].tolist()) / path_probability(hmm, w[: t + 1].tolist()))
                    for t in range(len(w) - 1)]
    assert bayes_loss(hmm, data, 3) == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-12)


@pytest.fixture(scope="module")
def hmm_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "hmm"
    prepare_synthetic(out, HMMSpec(tokens=20_000, states=4, symbols=8))
    return out


def test_prepare_writes_a_char_dataset_whose_parameters_match_its_tokens(hmm_data, tmp_path):
    hmm = load_language(hmm_data)
    assert hmm.symbols == 8 and hmm.states == 4
    train_ids = load_split(hmm_data, "train")
    assert len(train_ids) == 18_000 and len(load_split(hmm_data, "val")) == 2000
    again = tmp_path / "again"
    proc = softar("prepare", "--synthetic", "hmm", "--tokens", 20_000, "--states", 4, "--symbols", 8, "--out", again)
    assert proc.returncode == 0, proc.stderr
    assert (again / "train.bin").read_bytes() == (hmm_data / "train.bin").read_bytes()  # seeded: reproducible
    assert json.loads(proc.stdout.splitlines()[-1])["synthetic"]["overlap"] == 0.3


@pytest.mark.parametrize("damage", ["missing", "corrupt", "rows", "tokens", "symbols", "stationary"])
def test_a_synthetic_folder_that_disagrees_with_its_parameters_is_one_line_and_exit_2(hmm_data, tmp_path, damage):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(hmm_data, data)
    path = data / "hmm.json"
    raw = json.loads(path.read_text())
    if damage == "missing":
        path.unlink()
    elif damage == "corrupt":
        path.write_text("{not json")
    elif damage == "rows":
        raw["emission"][0][0] += 0.5
    elif damage == "symbols":
        raw["emission"] = [[v / sum(row[:-1]) for v in row[:-1]] for row in raw["emission"]]  # 7 symbols, not 8
    elif damage == "stationary":
        raw["initial"] = [1.0] + [0.0] * (len(raw["initial"]) - 1)
    elif damage == "tokens":  # a token changed within the vocabulary: meta.json still agrees, the checksum does not
        ids = np.fromfile(data / "val.bin", dtype=np.uint16)
        ids[5] = (ids[5] + 1) % 8
        ids.tofile(data / "val.bin")
    if damage in ("rows", "symbols", "stationary"):
        path.write_text(json.dumps(raw))
    with pytest.raises(SoftarError):
        load_language(data)
    if damage in ("missing", "tokens"):  # and through the CLI, on a run trained on the undamaged data
        run = tmp_path / "run"
        train(config.load(None, tiny_overrides(hmm_data)), run, quiet=True)
        before = tree(run)
        assert_one_line_error(softar("eval", run, "--data", data), "hmm.json" if damage == "missing" else "sha256")
        assert tree(run) == before


def test_eval_reports_the_bayes_ceiling_and_the_positive_control(hmm_data, tmp_path):
    run = tmp_path / "run"
    train(config.load(None, tiny_overrides(hmm_data)), run, quiet=True)
    proc = softar("eval", run, "--windows", 8, "--horizons", "4")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.splitlines()[-1])
    hmm = load_language(hmm_data)
    assert r["bayes_loss"] == pytest.approx(bayes_loss(hmm, load_split(hmm_data, "val"), 16))
    assert r["bayes_gap"] == pytest.approx(r["loss"] / r["bayes_loss"] - 1)
    assert r["bayes_loss_full"] <= r["bayes_loss"] < r["loss"]  # more context never hurts the optimum
    ol, control = r["open_loop"]["4"], r["positive_control"]["4"]
    assert r["bayes_open_loop"]["4"] == ol["bayes"] == control["bayes"]  # the same windows
    assert "sampled_avg_64" in ol and ol["bayes"] < ol["sampled_avg_64"]
    assert control["soft_expected"] == pytest.approx(control["bayes"], abs=1e-5)


def test_plain_data_has_no_ceiling_and_synthetic_flags_need_synthetic(char_data, tmp_path):
    assert load_language(char_data) is None
    assert_one_line_error(softar("prepare", "--states", 4, "--out", tmp_path / "x"), "--synthetic")
    assert_one_line_error(softar("prepare", "--synthetic", "hmm", "--corpus", "x.txt", "--out", tmp_path / "x"),
                          "--corpus")
    assert_one_line_error(softar("prepare", "--synthetic", "hmm", "--states", 9, "--symbols", 8,
                                 "--out", tmp_path / "x"), "--symbols")
    assert not (tmp_path / "x").exists()


def bag_by_hand(bag: Bag, w: list[int]) -> list[float]:
    """log p of each next token of a window from its start, by the definition: a document ends after a token with
    probability hazard; its tokens are a Dirichlet-multinomial (Polya urn) of the ones since the last separator."""
    V, a, h = bag.symbols, bag.concentration, bag.hazard
    out = []
    for t in range(len(w) - 1):
        doc = list(itertools.takewhile(lambda x: x != V, reversed(w[: t + 1])))
        if w[t] == V:
            out.append(-math.inf if w[t + 1] == V else -math.log(V))
        elif w[t + 1] == V:
            out.append(math.log(h))
        else:
            out.append(math.log(1 - h) + math.log(a + doc.count(w[t + 1])) - math.log(V * a + len(doc)))
    return out


def test_bag_optimum_is_the_polya_urn_of_the_document_so_far():
    bag = Bag(5, 0.3, 0.1)
    data = bag.sample(4000, np.random.default_rng(0))
    assert data[0] != 5 and (data == 5).any()
    starts = np.random.default_rng(1).integers(0, len(data) - 40, 16)
    windows = torch.from_numpy(np.stack([data[s : s + 40] for s in starts]))
    want = torch.tensor([bag_by_hand(bag, w.tolist()) for w in windows], dtype=torch.float64)
    assert torch.allclose(bag.teacher_forced(windows), want, rtol=0, atol=1e-12)
    assert bag.loss_full(data[:300]) == pytest.approx(-np.mean(bag_by_hand(bag, data[:300].tolist())), abs=1e-12)


def test_bag_sampler_matches_the_polya_urn_it_is_scored_by():
    """The second token of a document repeats the first with probability (1 - h)(alpha + 1) / (V alpha + 1)."""
    bag = Bag(4, 0.5, 0.25)
    x = bag.sample(400_000, np.random.default_rng(2))
    second = np.flatnonzero((x[:-2] == 4) & (x[1:-1] != 4)) + 2  # the token after a document's first
    p = (1 - 0.25) * (0.5 + 1) / (4 * 0.5 + 1)
    got = (x[second] == x[second - 1]).mean()
    assert abs(got - p) < 4 * math.sqrt(p * (1 - p) / len(second))
    assert abs((x[second] == 4).mean() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(second))


@pytest.mark.parametrize("nodes", [5, 9])
def test_binding_documents_bind_each_key_to_one_value_and_query_each_key_once(nodes):
    lang = Binding(pairs=5, nodes=nodes)  # tokens: nodes 0..nodes-1, ";" then the start symbol
    assert lang.vocab == nodes + 2 and len(lang.chars()) == lang.vocab and lang.doc_length == 31
    x = lang.sample(4000 * 31, np.random.default_rng(0)).reshape(4000, 31)
    for doc in x[:10]:
        assert doc[0] == nodes + 1 and (doc[1:] != nodes + 1).all()
        facts, queries = doc[1:16].reshape(5, 3), doc[16:].reshape(5, 3)
        assert (facts[:, 2] == nodes).all() and (queries[:, 2] == nodes).all()  # every fact and query ends in ";"
        assert len(set(facts[:, 0])) == 5 and (facts[:, :2] < nodes).all()  # distinct keys, nodes for all
        assert sorted(queries[:, 0]) == sorted(facts[:, 0])
        assert all(dict(facts[:, :2].tolist())[k] == v for k, v in queries[:, :2].tolist())
    # a value is any node, whatever its key (the key itself included): uniform and independent
    key, value = x[:, 1:16:3].ravel(), x[:, 2:16:3].ravel()
    for chosen in (value, value[key == 0]):
        p = np.bincount(chosen, minlength=nodes) / len(chosen)
        assert len(p) == nodes and abs(p - 1 / nodes).max() < 4 * math.sqrt(1 / nodes / len(chosen))


@pytest.mark.parametrize("nodes", [4, 7])
def test_binding_queries_past_the_window_and_what_a_reader_of_the_window_can_know(nodes):
    lang = Binding(pairs=4, nodes=nodes)  # documents of 1 + 12 + 12 = 25 tokens
    ids = torch.from_numpy(lang.sample(200, np.random.default_rng(3)))[None]
    prefix, window = 60, 9
    got = lang.query_targets(ids, prefix, window)
    x = ids[0].tolist()
    for k, t in enumerate(range(prefix, 200)):  # by hand: a query's value is the token after a key past the facts
        s = t - (t % 25)
        value_pos = s + 2 + 3 * x[s + 1 : s + 13 : 3].index(x[t - 1]) if t % 25 in (14, 17, 20, 23) else None
        expect = value_pos is not None and value_pos < t - window
        assert bool(got["mask"][0, k]) == expect
        assert bool(got["in_sight"][0, k]) == (value_pos is not None and value_pos - 1 >= t - window)
        if value_pos is not None:
            assert x[t] == x[value_pos]
        if expect:
            assert got["window_loss"][0, k].item() == pytest.approx(math.log(nodes))
            assert got["window_accuracy"][0, k].item() == pytest.approx(1 / nodes)
            # the bag reader, by enumeration: every way to give the document's values to its keys that agrees with
            # the facts and queries the window shows whole, each equally likely
            keys, values = x[s + 1 : s + 13 : 3], x[s + 2 : s + 13 : 3]
            shown = {x[p] for p in range(s + 1, s + 25) if x[p] in keys and p in range(t - window, t - 1)
                     and (p - s) % 3 == 1 and p != t - 1}
            ways = [w for w in set(itertools.permutations(values))
                    if all(w[keys.index(q)] == values[keys.index(q)] for q in shown)]
            p_true = sum(w[keys.index(x[t - 1])] == x[t] for w in ways) / len(ways)
            assert got["bag_loss"][0, k].item() == pytest.approx(-math.log(p_true))


def test_query_targets_train_only_the_values_whose_fact_the_context_holds():
    """The sampler of data.targets = "queries": each kept target is a query's value whose fact, key and value, lies
    in the window or the history that counts, found here by reading the split; every other target is -1; the
    windows are the WindowSampler's own draws."""
    from softar.data.dataset import WindowSampler
    from softar.workloads import QueryTargets

    lang = Binding(pairs=4, nodes=7)  # documents of 25 tokens
    data = lang.sample(5000, np.random.default_rng(1))
    fact = torch.from_numpy(lang.fact_positions(data))
    kept = 0
    for history in (0, 40):
        plain = WindowSampler(data, 30, 16, seed=5, history=history)
        masked = QueryTargets(WindowSampler(data, 30, 16, seed=5, history=history), fact)
        for _ in range(5):
            want, got = plain.next_batch(), masked.next_batch()
            x, y = want[:2]
            assert torch.equal(got[0], x) and all(torch.equal(a, b) for a, b in zip(want[2:], got[2:], strict=True))
            for r in range(len(x)):
                s = next(i for i in range(len(data)) if (data[i : i + 31] == np.r_[x[r], y[r, -1]]).all())
                first = s - (int(want[3][r]) if history else 0)
                for t in range(30):
                    p = s + t + 1  # the target's place in the split
                    doc, offset = p - p % 25, p % 25
                    keep = False
                    if offset in (14, 17, 20, 23):  # a query's value: its fact is "key value ;" with that key
                        key_at = doc + 1 + 3 * [data[doc + 1 + 3 * i] for i in range(4)].index(data[p - 1])
                        keep = key_at >= first and data[key_at + 1] == data[p]
                    assert int(got[1][r, t]) == (int(y[r, t]) if keep else -1)
                    kept += keep
    assert kept > 100


@pytest.mark.parametrize("kind", ["bag", "binding"])
def test_prepare_and_eval_a_retention_language(kind, tmp_path):
    data, run = tmp_path / kind, tmp_path / "run"
    spec = BagSpec(tokens=20_000, symbols=6) if kind == "bag" else BindingSpec(tokens=20_000, pairs=4, nodes=6)
    prepare_synthetic(data, spec)
    lang = load_language(data)
    assert type(lang) is (Bag if kind == "bag" else Binding)
    if kind == "bag":  # the loss on the queries alone is binding's: elsewhere a one-line error, nothing written
        queries = tiny_overrides(data, **{"data.targets": '"queries"'})
        assert_one_line_error(softar("train", "configs/shakespeare_char.toml", *queries, "--out", tmp_path / "q"),
                              "data.targets")
        assert not (tmp_path / "q").exists()
    targets = {"data.targets": '"queries"'} if kind == "binding" else {}
    train(config.load(None, tiny_overrides(data, **targets)), run, quiet=True)
    proc = softar("eval", run, "--windows", 8, "--gap", f"{run}:4", str(run))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.splitlines()[-1])
    ret = r["retention"]
    if kind == "bag":
        assert r["bayes_loss"] == pytest.approx(bayes_loss(lang, load_split(data, "val"), 16))
        bayes = ret["bayes"]["loss"]
        assert bayes["history"] <= bayes["long"] <= bayes["short"] + 1e-9  # more of the document never hurts
    else:
        assert "bayes_loss" not in r
        q = ret["queries"]
        assert q["targets"] > 0 and 0 <= q["accuracy"]["long"] <= 1 and q["window_optimum"]["loss"] > 0
    (data / parameter_file(kind)).write_text("{}")
    assert_one_line_error(softar("eval", run), "kind")


def test_retention_flags_belong_to_their_language(tmp_path):
    assert_one_line_error(softar("prepare", "--synthetic", "bag", "--pairs", 3, "--out", tmp_path / "x"),
                          "--pairs")
    assert_one_line_error(softar("prepare", "--synthetic", "binding", "--concentration", 1, "--out", tmp_path / "x"),
                          "--concentration")
    assert_one_line_error(softar("prepare", "--synthetic", "bag", "--concentration", 0, "--out", tmp_path / "x"),
                          "--concentration")
    assert not (tmp_path / "x").exists()


def test_query_targets_redraw_alike_on_every_rank_and_refuse_what_cannot_train(tmp_path):
    """Short windows often hold no query with its fact: the redraw is decided on the global batch, so the ranks'
    samplers stay in step and their slices together are one process's batch. Bad uses are one-line errors."""
    from softar.config import ConfigError
    from softar.data.dataset import WindowSampler
    from softar.workloads import QueryTargets

    lang = Binding(pairs=4, nodes=7)
    data = lang.sample(5000, np.random.default_rng(1))
    fact = torch.from_numpy(lang.fact_positions(data))
    one = QueryTargets(WindowSampler(data, 5, 8, seed=3), fact)
    ranks = [QueryTargets(WindowSampler(data, 5, 4, seed=3, rank=r, world=2), fact) for r in range(2)]
    for _ in range(30):
        whole, parts = one.next_batch(), [q.next_batch() for q in ranks]
        assert all(torch.equal(torch.cat([p[i] for p in parts]), whole[i]) for i in range(2))
    assert torch.equal(ranks[0].state(), ranks[1].state())
    with pytest.raises(ConfigError, match="data.targets"):
        config.load(None, ['data.targets="queries"', "context.fill_draw=0.5"])
    prepare_synthetic(tmp_path / "b", BindingSpec(tokens=5000, pairs=4, nodes=7))
    raw = json.loads((tmp_path / "b" / "binding.json").read_text())
    raw["pairs"] = raw["spec"]["pairs"] = 5  # the same vocabulary and token files, other documents
    (tmp_path / "b" / "binding.json").write_text(json.dumps(raw))
    with pytest.raises(SoftarError, match="binding.json: train.bin does not hold documents of 5 facts"):
        load_language(tmp_path / "b")
