import json
import os
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softar import SoftarError
from softar.config import TaskConfig
from softar.data.tokenizer import TaskTokenizer, load_tokenizer
from softar.tasks import VOCABULARY, get_task
from softar.tasks.data import Encoder, TaskSampler, check_stats, graph_stats, load_records, prepare_task
from softar.tasks.graphs import distances
from softar.tasks.prosqa import make_record

TOK = TaskTokenizer(VOCABULARY)
PROSQA = get_task("prosqa")
# a record written by hand in Coconut's format (its graph: Tom -> wumpus -> yumpus -> rempus; zumpus -> impus)
COCONUT = {"question": "Every wumpus is a yumpus. Every zumpus is a impus. Tom is a wumpus. Every yumpus is a "
                       "rempus. Is Tom a impus or rempus?",
           "answer": "Tom is a rempus.", "steps": ["Tom is a wumpus.", "Every wumpus is a yumpus.",
                                                  "Every yumpus is a rempus."],
           "edges": [[1, 2], [4, 5], [0, 1], [2, 3]], "root": 0, "target": 3, "neg_target": 5,
           "idx_to_symbol": ["Tom", "wumpus", "yumpus", "rempus", "zumpus", "impus"]}


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_record(rng) for _ in range(n)]


def test_generated_records_keep_their_invariants_and_coconuts_statistics():
    rs = records(1000)
    orders = set()
    for r in rs:
        sym, n, edges = r["idx_to_symbol"], len(r["idx_to_symbol"]), [tuple(e) for e in r["edges"]]
        dist = distances(n, edges, r["root"])
        assert dist[r["target"]] == len(r["steps"]) and dist[r["neg_target"]] is None
        degree = [(sum(b == v for _, b in edges), sum(a == v for a, _ in edges))
                  for v in (r["target"], r["neg_target"])]
        assert degree[0] == degree[1]  # no shortcut: both options are in and out of as many facts
        body, ask = r["question"].rsplit(" Is ", 1)
        facts = {f.strip() for f in re.findall(r"[^.]+\.", body)}
        assert len(facts) == len(edges)
        name, at = sym[r["root"]], r["root"]
        for i, step in enumerate(r["steps"]):  # a chain of given facts from the person to the target
            assert step in facts
            words = step[:-1].split()
            assert words[: len(words) - 3] == ([name] if i == 0 else ["Every", sym[at]])
            nxt = sym.index(words[-1])
            assert (at, nxt) in edges
            at = nxt
        assert at == r["target"] and r["answer"] == f"{name} is a {sym[r['target']]}."
        options = ask[len(name) + 3 : -1].split(" or ")
        assert sorted(options) == sorted([sym[r["target"]], sym[r["neg_target"]]])
        orders.add(options[0] == sym[r["target"]])
    assert orders == {True, False}  # the reachable option comes first and second
    stats = graph_stats(rs)
    check_stats(stats, len(rs))
    assert 21 <= stats["nodes"]["mean"] <= 25 and 33 <= stats["edges"]["mean"] <= 39
    assert 3.5 <= stats["steps"]["mean"] <= 4.1


def test_loader_reads_the_generators_files_and_a_coconut_record(tmp_path):
    meta = prepare_task("prosqa", tmp_path / "d", {"train": 20, "valid": 5, "test": 5}, seed=3)
    assert meta["counts"] == {"train": 20, "valid": 5, "test": 5}
    assert load_records(tmp_path / "d" / "train.json", PROSQA) == records(20, 3)
    assert load_tokenizer(tmp_path / "d", meta["vocab_size"]).words == VOCABULARY
    assert prepare_task("prosqa", tmp_path / "d", {"train": 20, "valid": 5, "test": 5}, seed=3) == meta  # reused
    with pytest.raises(SoftarError, match="different or incomplete task dataset"):
        prepare_task("prosqa", tmp_path / "d", {"train": 21, "valid": 5, "test": 5}, seed=3)
    for missing in ("test.json", "task.json"):  # an incomplete dataset is refused, not reused or half-written
        (tmp_path / "d" / missing).rename(tmp_path / missing)
        with pytest.raises(SoftarError, match="different or incomplete task dataset"):
            prepare_task("prosqa", tmp_path / "d", {"train": 20, "valid": 5, "test": 5}, seed=3)
        (tmp_path / missing).rename(tmp_path / "d" / missing)
    path = tmp_path / "coconut.json"
    path.write_text(json.dumps([COCONUT]))
    (r,) = load_records(path, PROSQA)
    task, cfg = get_task("prosqa"), TaskConfig(name="prosqa")
    text = Encoder(task, TOK, "text", cfg).example(r)
    assert TOK.decode(text.question) == COCONUT["question"] + " <bot>"
    assert [TOK.decode(s) for s in text.steps] == COCONUT["steps"]
    sym = Encoder(task, TOK, "symbolic", cfg).example(r)
    words = lambda ids: " ".join(TOK.words[i] for i in ids)  # noqa: E731
    assert words(sym.question) == "n1 n2 ; n4 n5 ; n0 n1 ; n2 n3 ; ? n0 n5 n3 <bot>"  # options in the asked order
    assert [words(s) for s in sym.steps] == ["n0 n1 ;", "n1 n2 ;", "n2 n3 ;"]
    assert words(sym.answer) == "<ans> n3 <eos>"


@pytest.mark.parametrize("bad, match", [
    ("[]", "non-empty JSON list"), ("{}", "non-empty JSON list"), ("[1]", "expected a JSON object"),
    (json.dumps([{**COCONUT, "edges": [[0, 9]]}]), r"edges must be pairs of node indices in \[0, 6\)"),
    (json.dumps([{**COCONUT, "target": -1}]), "target -1 is not a node index"),
    (json.dumps([{**COCONUT, "root": True}]), "'root' must be int"),
    (json.dumps([{k: v for k, v in COCONUT.items() if k != "steps"}]), "missing 'steps'"),
    ("[{", "not valid JSON"),
])
def test_loader_refuses_malformed_records(tmp_path, bad, match):
    path = tmp_path / "bad.json"
    path.write_text(bad)
    with pytest.raises(SoftarError, match=match):
        load_records(path, PROSQA)


def test_unknown_words_special_tokens_and_a_question_without_options_are_errors_naming_the_record():
    enc = Encoder(get_task("prosqa"), TOK, "text", TaskConfig(name="prosqa"))
    with pytest.raises(SoftarError, match="record 0: word 'Zed' is not in the task's vocabulary"):
        enc.example({**COCONUT, "question": "Zed is a wumpus."}, "record 0")
    with pytest.raises(SoftarError, match="record 0: word 'Zed' is not in the task's vocabulary"):
        enc.example({**COCONUT, "idx_to_symbol": [*COCONUT["idx_to_symbol"], "Zed"]}, "record 0")  # a lone node
    for field, text in (("question", "<thought> " + COCONUT["question"]), ("steps", ["Tom is a <ans> wumpus."]),
                        ("answer", "Tom is a <eos> rempus.")):
        with pytest.raises(SoftarError, match="record 3: its text holds a special token"):
            enc.example({**COCONUT, field: text}, "record 3")
    symbolic = Encoder(get_task("prosqa"), TOK, "symbolic", TaskConfig(name="prosqa"))
    with pytest.raises(SoftarError, match="record 1: its question does not end 'Is NAME a A or B"):
        symbolic.example({**COCONUT, "question": "Every wumpus is a yumpus."}, "record 1")


def test_a_changed_split_or_tokenizer_is_refused(tmp_path):
    from softar.tasks.data import load_task_meta

    prepare_task("prosqa", tmp_path / "d", {"train": 5, "valid": 2, "test": 2})
    load_task_meta(tmp_path / "d")
    (tmp_path / "d" / "valid.json").write_text(json.dumps([COCONUT]))
    with pytest.raises(SoftarError, match="valid.json is not the file task.json records"):
        load_task_meta(tmp_path / "d")
    prepare_task("prosqa", tmp_path / "e", {"train": 5, "valid": 2, "test": 2})
    TaskTokenizer(VOCABULARY[::-1]).save(tmp_path / "e" / "tokenizer.json")
    with pytest.raises(SoftarError, match="not softar's task vocabulary"):
        load_task_meta(tmp_path / "e")


def test_checkers_on_right_wrong_and_malformed_answers():
    prosqa, path = get_task("prosqa"), get_task("pathfind")
    words = lambda text: TOK.PATTERN.findall(text)  # noqa: E731
    assert prosqa.check(COCONUT, words("Tom is a rempus ."), "text")
    assert prosqa.check(COCONUT, words("rempus"), "text")  # the final concept is what counts
    for wrong in ("Tom is a impus .", "Tom is a rempus or impus", "", "Tom is", "Every is a ."):
        assert not prosqa.check(COCONUT, words(wrong), "text")
    assert prosqa.check(COCONUT, ["n3"], "symbolic") and not prosqa.check(COCONUT, ["n5"], "symbolic")
    assert prosqa.options(COCONUT) == (3, 5) and prosqa.answer_node(COCONUT, words("Tom is a impus ."), "text") == 5
    assert prosqa.answer_node(COCONUT, words("Tom is a"), "text") == 0  # the person is a node too
    assert prosqa.answer_node(COCONUT, [], "text") is None
    assert not prosqa.check(COCONUT, ["rempus"], "symbolic")
    assert path.check(COCONUT, ["n0", "n1", "n2", "n3"])
    for wrong in ("n0 n1 n3", "n1 n2 n3", "n0 n1 n2", "n0 n1 n2 n3 n99", "n0 x n3", ""):
        assert not path.check(COCONUT, wrong.split())
    assert path.reward(COCONUT, ["n0", "n1", "n2", "n3"]) == 1.0
    assert path.reward(COCONUT, ["n0", "n1", "n5"]) == pytest.approx(1 / 3)  # one hop of three toward the goal
    assert path.reward(COCONUT, ["n0", "n1", "n2", "n9"]) == pytest.approx(2 / 3)
    assert path.reward(COCONUT, ["n0"]) == 0.0
    assert path.reward(COCONUT, ["n1", "n2", "n3"]) == 0.0  # not from the start
    wander = {**COCONUT, "edges": [*COCONUT["edges"], [1, 4], [4, 0]]}  # a cycle away from the goal
    assert path.reward(wander, ["n0", "n1", "n4", "n0", "n1", "n4"]) == 0.0  # no credit for wandering
    assert path.render(COCONUT, "symbolic").answer == "n0 n1 n2 n3"


def test_the_curriculum_replaces_exactly_k_steps_at_stage_k():
    cfg = TaskConfig(name="prosqa", mode="thoughts", thoughts_per_step=2, max_stage=4, stage_iters=5)
    enc = Encoder(get_task("prosqa"), TOK, "symbolic", cfg)
    ex = enc.example(COCONUT)
    t, eot = enc.id["<thought>"], enc.id["<eot>"]
    for k in range(5):
        seq, at = enc.sequence(ex, k)
        assert seq[: len(ex.question)] == ex.question and seq[at] == eot
        assert seq[len(ex.question) : at] == [t] * (2 * k)
        assert seq[at + 1 :] == [i for s in ex.steps[k:] for i in s] + ex.answer  # steps 1..k gone, the rest kept
    assert [enc.stage_at(s, 100) for s in (0, 4, 5, 14, 15, 19, 20, 99)] == [0, 0, 1, 2, 3, 3, 4, 4]
    x, y = enc.batch([ex], 2)
    assert (y[0, : len(ex.question) + 4] == -1).all() and y[0, len(ex.question) + 4] == ex.steps[2][0]
    for mode, middle in (("cot", []), ("no_cot", []), ("pause", [enc.id["<pause>"]] * 3)):
        e = Encoder(get_task("prosqa"), TOK, "symbolic", TaskConfig(name="prosqa", mode=mode, pauses=3))
        seq, at = e.sequence(ex, 0)
        assert seq[len(ex.question) : at] == middle
        assert seq[at + 1 :] == ([i for s in ex.steps for i in s] if mode == "cot" else []) + ex.answer


def test_sampler_batches_share_a_question_length_and_resume_exactly():
    cfg = TaskConfig(name="prosqa", mode="thoughts", max_stage=3, stage_iters=2)
    enc = Encoder(get_task("prosqa"), TOK, "symbolic", cfg)
    exs = [enc.example(r) for r in records(200)]
    a = TaskSampler(enc, exs, 4, seed=7, max_iters=100, grad_accum=2)
    for _ in range(5):
        x, _ = a.next_batch()
        starts = (x == enc.id["<thought>"]).int().argmax(1)
        assert len(set(starts.tolist())) == 1
    state = a.state()
    b = TaskSampler(enc, exs, 4, seed=0, max_iters=100, grad_accum=2)
    b.load_state(state)
    assert b.stage == a.stage == 1  # 5 micro-batches of 2 per step: step 2
    for _ in range(4):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # two ranks of 2 draw what one process of 4 draws, each its own half (padded to its own longest)
    whole = TaskSampler(enc, exs, 4, seed=7, max_iters=100).next_batch()[0]
    for r in (0, 1):
        part = TaskSampler(enc, exs, 2, seed=7, max_iters=100, rank=r, world=2).next_batch()[0]
        L = part.shape[1]
        assert torch.equal(part, whole[2 * r : 2 * r + 2, :L]) and (whole[2 * r : 2 * r + 2, L:] == 0).all()


# -- a record accepted at load never fails later -------------------------------------------------------------------
_NAMES = st.sampled_from(["Tom", "wumpus", "Every is", "is", ".", "n3", "<ans>", "Zed", "rempus yumpus", "Tom"])
_MUTATIONS = st.one_of(
    st.tuples(st.just("name"), st.integers(0, 30), _NAMES),
    st.tuples(st.just("question"), st.sampled_from(["drop_ask", "swap_options", "other_root", "no_mark", "keep"])),
    st.tuples(st.just("edge"), st.integers(0, 30), st.integers(0, 30)),
    st.tuples(st.just("drop_edge"), st.integers(0, 60)),
    st.tuples(st.just("index"), st.sampled_from(["root", "target", "neg_target"]), st.integers(0, 30)),
    st.tuples(st.just("steps"), st.integers(0, 6)),
)


def mutate(record: dict, mutation: tuple) -> dict:
    r = json.loads(json.dumps(record))
    kind, *args = mutation
    n = len(r["idx_to_symbol"])
    if kind == "name":
        r["idx_to_symbol"][args[0] % n] = args[1]
    elif kind == "question":
        body, _, ask = r["question"].rpartition(" Is ")
        root, a, b = ask.removesuffix("?").split()[::2][:3] if ask.count(" ") == 4 else ("x", "y", "z")
        r["question"] = {"drop_ask": body, "swap_options": f"{body} Is {root} a {b} or {a}?",
                         "other_root": f"{body} Is {r['idx_to_symbol'][(r['root'] + 1) % n]} a {a} or {b}?",
                         "no_mark": f"{body} Is {root} a {a} or {b}", "keep": r["question"]}[args[0]]
    elif kind == "edge":
        r["edges"].append([args[0] % n, args[1] % n])
    elif kind == "drop_edge" and r["edges"]:
        r["edges"].pop(args[0] % len(r["edges"]))
    elif kind == "index":
        r[args[0]] = args[1] % n
    elif kind == "steps":
        r["steps"] = r["steps"][: args[0]]
    return r


@settings(max_examples=int(os.environ.get("SOFTAR_FUZZ_EXAMPLES", 150)), deadline=None)
@given(seed=st.integers(0, 3), task_name=st.sampled_from(["prosqa", "pathfind"]),
       mutations=st.lists(_MUTATIONS, max_size=3), answer=st.lists(st.sampled_from(VOCABULARY), max_size=6))
def test_a_record_accepted_at_load_never_fails_later(tmp_path_factory, seed, task_name, mutations, answer):
    """What TaskData.open does at load (`load_records`, then encoding in every rendering) either refuses a record
    with a one-line error naming it, or everything done with the record later runs: rendering, scoring any answer,
    the reward, and the probe that reads the nodes' embeddings."""
    from softar.evaluate.reasoning import node_readout

    task = get_task(task_name)
    record = COCONUT if seed == 0 else records(1, seed)[0]
    for m in mutations:
        record = mutate(record, m)
    path = tmp_path_factory.mktemp("rec") / "r.json"
    path.write_text(json.dumps([record]))
    try:
        (r,) = load_records(path, task)
        encoders = [Encoder(task, TOK, rendering, TaskConfig(name=task_name, mode="thoughts"))
                    for rendering in task.renders]
        examples = [enc.example(r, "record 0") for enc in encoders]
    except SoftarError as e:
        assert "record 0" in str(e) and "\n" not in str(e)
        return
    model = type("M", (), {"E": torch.randn(len(VOCABULARY), 8)})()
    for enc, ex in zip(encoders, examples, strict=True):
        assert isinstance(task.check(r, answer, enc.rendering), bool)
        assert enc.sequence(ex, enc.final_stage())[0][-1] == enc.id["<eos>"]
        names, scores, fronts = node_readout(model, enc, r, torch.randn(3, 8))
        assert scores.shape == (3, len(r["idx_to_symbol"])) and r["target"] in set().union(*fronts)
    if task_name == "pathfind":
        assert 0.0 <= task.reward(r, answer) <= 1.0


@pytest.mark.parametrize("change, match", [
    ({"idx_to_symbol": ["Tom", "wumpus", "yumpus", "rempus", "Every is", "impus"]}, "node name 'Every is'"),
    ({"question": "Every wumpus is a yumpus. Tom is a wumpus."}, "does not end 'Is NAME a A or B?'"),
    ({"edges": [[1, 2], [4, 5], [0, 1], [2, 3], [3, 1]]}, "cycle"),
    ({"edges": [[1, 2], [4, 5], [0, 1], [2, 3], [3, 4]]}, "negative target is reachable"),
    ({"target": 4}, "target is not reachable"),
    ({"idx_to_symbol": ["Tom", "wumpus", "yumpus", "rempus", "wumpus", "impus"]}, "names a node twice"),
    # the text a model trains on must say what the graph says
    ({"answer": "Tom is a impus."}, "its answer is not 'Tom is a rempus.'"),
    ({"answer": ""}, "its answer is not"),
    ({"steps": []}, "its steps do not end at the target"),
    ({"steps": ["Tom is a wumpus.", "Every zumpus is a impus."]}, "not a chain of its facts from the root"),
    ({"question": "Every wumpus is a yumpus. Is Tom a impus or rempus?"}, "its question's facts are not the facts"),
])
def test_records_that_used_to_crash_later_are_refused_at_load(tmp_path, change, match):
    path = tmp_path / "valid.json"
    path.write_text(json.dumps([COCONUT, {**COCONUT, **change}]))
    with pytest.raises(SoftarError, match=f"valid.json: record 1: .*{re.escape(match)}"):
        load_records(path, PROSQA)


# -- the leak audit ----------------------------------------------------------------------------------------------------
def test_the_audit_catches_planted_leaks_one_and_two_hops_away():
    from softar.tasks.audit import audit

    clean = records(300, seed=4)
    one_hop = [{**r, "edges": [*r["edges"], [r["root"], r["target"]]]} for r in clean]  # the target gains a parent
    two_hop = []
    for r in clean:  # a parent of the target gains a parent: only a statistic two hops out sees it
        parent = next(a for a, b in r["edges"] if b == r["target"])
        two_hop.append({**r, "edges": [*r["edges"], [r["root"], parent]]})
    rules = {name: audit({"x": rs}, PROSQA)["x"]["rules"] for name, rs in
             (("clean", clean), ("one_hop", one_hop), ("two_hop", two_hop))}
    assert rules["one_hop"]["in_degree"] == 1.0 and rules["one_hop"]["facts_mentioning"] == 1.0
    assert rules["two_hop"]["in_degree"] == 0.5 and rules["two_hop"]["parents_in_degree_sum"] == 1.0
    assert max(rules["clean"].values()) < 0.6


def test_the_generator_does_not_leak():
    """The two options are images of each other in isomorphic twins, so every structural rule ties exactly on every
    question (0.5); the order-based rules sit near 0.5 by shuffling (n = 2000: 0.6 is 9 standard errors away)."""
    from softar.tasks.audit import audit

    result = audit({"train": records(2000, seed=11)}, PROSQA)["train"]
    structural = {k: v for k, v in result["rules"].items() if k not in ("first_mention", "asked_first")}
    assert set(structural.values()) == {0.5} and len(structural) == 9
    assert result["max"] <= 0.6


def test_task_audit_cli(task_data, tmp_path, capsys):
    from softar import cli

    assert cli.main(["task", "audit", str(task_data)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["audit"]) == {"train", "valid", "test"} and out["audit"]["train"]["questions"] == 64
    assert json.loads((task_data / "task.json").read_text())["audit"] == out["audit"]  # what prepare printed
    assert cli.main(["task", "audit", str(tmp_path)]) == 2
    assert "no task dataset" in capsys.readouterr().err
