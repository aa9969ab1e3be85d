"""The depth-controlled twins task and the recall warm-up: generated questions against a by-hand walk of their graph,
the audit's ties, validation of hostile records, online batches that resume exactly, and the CLI end to end."""

import json
import random

import pytest
import torch

from softar import SoftarError, config
from softar.data.tokenizer import TaskTokenizer
from softar.tasks import VOCABULARY, get_task
from softar.tasks.audit import audit
from softar.tasks.data import Encoder, TaskSampler, batch_generator, depths_at, prepare_task, recall_at
from softar.tasks.recall import recall_batch
from softar.tasks.twins import make_record, question_text
from softar.train import train

from .conftest import task_overrides
from .test_cli import assert_one_line_error, softar

TWINS = get_task("twins")
TOK = TaskTokenizer(VOCABULARY)


def walk(record: dict) -> list[int]:
    """The person's chain, followed by hand: each node's children read off the edges (at most one)."""
    at, chain = record["root"], []
    while True:
        kids = [b for a, b in record["edges"] if a == at]
        assert len(kids) <= 1
        if not kids:
            return chain
        at = kids[0]
        chain.append(at)


@pytest.mark.parametrize("depth", [1, 2, 4, 7])
def test_a_question_at_depth_d_needs_d_lookups_and_says_so(depth):
    rng = random.Random(depth)
    for _ in range(50):
        r = make_record(rng, 8, depth)
        TWINS.validate(r)
        chain = walk(r)
        assert len(chain) == depth and chain[-1] == r["target"]  # the person reaches its sink in exactly D hops
        assert r["steps"] == [f"n{v}" for v in chain] and r["answer"] == f"n{r['target']}"
        facts, _, asked = r["question"].partition(" ? ")
        assert facts.split(" ; ")[0] == f"n{r['edges'][0][0]} n{r['edges'][0][1]}"
        words = asked.split()
        assert words[:depth] == [";"] * depth and words[-1] == f"n{r['root']}" and len(words) == depth + 3
        assert sorted(words[depth:-1]) == sorted([f"n{r['target']}", f"n{r['neg_target']}"])
        # the twin: some other source reaches the negative target in exactly D hops too (its person)
        assert any(v != r["root"] and not any(b == v for _, b in r["edges"])
                   and walk({**r, "root": v})[-1:] == [r["neg_target"]] and len(walk({**r, "root": v})) == depth
                   for v in range(16))


def test_every_structural_audit_rule_ties_on_the_twins():
    records = [make_record(random.Random(i), 8, 1 + i % 4) for i in range(1000)]
    result = audit({"x": records}, TWINS)["x"]
    structural = {k: v for k, v in result["rules"].items() if k not in ("first_mention", "asked_first")}
    assert set(structural.values()) == {0.5} and result["max"] <= 0.6  # 0.6: six standard errors at n = 1000


def test_hostile_twins_records_are_refused_with_the_reason():
    r = make_record(random.Random(0), 8, 3)
    a, b = r["edges"][0]
    extra = next(v for v in range(16) if v not in (a, b) and [a, v] not in r["edges"])
    bad = {
        "two children": ({**r, "edges": [*r["edges"], [a, extra]]}, "more than one child|question is not"),
        "a wrong depth mark": ({**r, "question": r["question"].replace(" ? ;", " ? ; ;", 1)}, "question is not"),
        "a wrong step": ({**r, "steps": r["steps"][::-1]}, "steps are not the chain"),
        "an option that is no sink": ({**r, "question": r["question"][: r["question"].rindex(" n")].rsplit(" ", 2)[0]
                                       + f" n{a} n{r['neg_target']} n{r['root']}"}, "options are not"),
        "a cycle": ({**r, "edges": [*r["edges"], [r["target"], r["root"]]]}, "cycle"),
        "other names": ({**r, "idx_to_symbol": ["Tom", *r["idx_to_symbol"][1:]]}, "n0, n1"),
    }
    source = next(v for v in range(16) if v != r["root"] and all(b != v for _, b in r["edges"])
                  and walk({**r, "root": v})[-1:] == [r["neg_target"]])  # a source in the negative's twin
    not_a_sink = {**r, "neg_target": source,
                  "question": question_text(r["edges"], [r["target"], source], r["root"], 3)}
    bad["a negative target that is not a sink"] = (not_a_sink, "not two twin components")
    for name, (record, match) in bad.items():
        with pytest.raises(SoftarError, match=match):
            TWINS.validate(record)
        assert name


def test_recall_sequences_ask_every_key_for_its_own_value():
    x, y = recall_batch(random.Random(3), TOK.stoi, 16, 10)
    words = [[TOK.words[i] for i in row] for row in x.tolist()]
    for w, t in zip(words, y.tolist(), strict=True):
        facts = w[: w.index("<bot>")]
        table = {facts[i]: facts[i + 1] for i in range(0, len(facts), 3)}
        assert len(table) == 10 and all(facts[i + 2] == ";" for i in range(0, 30, 3))
        assert len({*table, *table.values()}) <= 12 and all(k != v for k, v in table.items())
        asked = [(i, w[i]) for i in range(32, len(w), 3)]
        assert sorted(k for _, k in asked) == sorted(table)  # every key once
        for i, key in asked:  # the target at a key is that key's value; nothing else is scored
            assert TOK.words[t[i]] == table[key]
        assert sum(v >= 0 for v in t) == 10


def sampler(data, seed: int, recall: int, mode: str = "thoughts", depth_iters: int = 0, recall_every: int = 0,
            **kw) -> TaskSampler:
    cfg = config.load(None, task_overrides(data, **{"task.name": '"twins"', "task.mode": f'"{mode}"',
                                                    "task.max_stage": 4, "task.stage_iters": 2,
                                                    "task.recall_iters": recall, "task.depth_iters": depth_iters,
                                                    "task.recall_every": recall_every,
                                                    "train.max_iters": 20}))
    enc = Encoder(TWINS, TOK, "symbolic", cfg.task)
    meta = json.loads((data / "task.json").read_text())
    return TaskSampler(enc, [], 4, seed, 20, generate=batch_generator(TWINS, meta["generator"], cfg.task), **kw)


def test_online_batches_are_fresh_seeded_and_resume_exactly(twins_data):
    a, b = sampler(twins_data, 5, recall=2), sampler(twins_data, 5, recall=2)
    first = [a.next_batch() for _ in range(6)]
    assert all(torch.equal(u, v) for (u, _), (v, _) in zip(first, [b.next_batch() for _ in range(6)], strict=True))
    assert first[0][0].shape[1] == 6 * 14 + 2 and first[2][0].shape[1] != first[0][0].shape[1]  # recall, then task
    thought, mark = VOCABULARY.index("<thought>"), VOCABULARY.index(";")
    assert [int((x[0] == thought).sum()) for x, _ in first[2:]] == [0, 0, 1, 1]  # the curriculum after the warm-up
    assert all(len({int((row == mark).sum()) for row in x}) == 1 for x, _ in first[2:])  # thoughts: one depth
    mixed = sampler(twins_data, 5, recall=0, mode="cot")
    depths = {int((row == mark).sum()) - 14 for _ in range(4) for row in mixed.next_batch()[0]}
    assert len(depths) > 1 and depths <= {1, 2, 3, 4}  # other modes: depths mix within a batch
    c = sampler(twins_data, 5, recall=2)
    c.load_state(a.state())
    assert torch.equal(c.next_batch()[0], a.next_batch()[0])
    assert not torch.equal(sampler(twins_data, 6, recall=2).next_batch()[0], first[0][0])  # the seed matters
    # data parallelism: two ranks split one global batch
    r0, r1 = sampler(twins_data, 5, 0, rank=0, world=2), sampler(twins_data, 5, 0, rank=1, world=2)
    full = sampler(twins_data, 5, 0)
    full.batch_size = 8
    x0, x1, xf = r0.next_batch()[0], r1.next_batch()[0], full.next_batch()[0]
    assert torch.equal(torch.cat([x0, x1]), xf)


def test_a_depth_curriculum_admits_one_more_depth_every_depth_iters_steps(twins_data, task_data, tmp_path):
    mark = VOCABULARY.index(";")
    for mode in ("cot", "thoughts"):  # mixed depths, and one depth per batch
        s = sampler(twins_data, 5, recall=2, mode=mode, depth_iters=3)
        depths = [{int((row == mark).sum()) - 14 for row in s.next_batch()[0]} for _ in range(2 + 3 * 3 + 30)][2:]
        assert all(d <= {1} for d in depths[:3])  # the first 3 task steps: depth 1 only
        for k in (1, 2, 3):  # then every 3 steps one depth more, up to the dataset's deepest
            assert set().union(*depths[3 * k : 3 * k + 3]) <= set(range(1, k + 2))
        assert max(set().union(*depths[9:])) == 4
    over = {"task.name": '"twins"', "task.mode": '"no_cot"', "train.max_iters": 10}
    with pytest.raises(SoftarError, match="leave depth 4 untrained"):  # 3 x 4 steps to reach depth 4: more than 10
        train(config.load(None, task_overrides(twins_data, **over, **{"task.depth_iters": 4})), tmp_path / "a")
    with pytest.raises(SoftarError, match="reads fixed splits"):  # ProsQA's questions are not generated
        train(config.load(None, task_overrides(task_data, **{"task.depth_iters": 1})), tmp_path / "b")
    with pytest.raises(SoftarError, match=r"task.depths: \[5\] are not all among the dataset's depths"):
        train(config.load(None, task_overrides(twins_data, **over, **{"task.depths": "[5]"})), tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_recall_is_replayed_every_recall_every_steps_after_the_warm_up(twins_data):
    cfg = config.load(None, ["task.name=twins", "task.recall_iters=2", "task.recall_every=3"]).task
    assert [recall_at(cfg, step) for step in range(11)] == [True, True, False, False, True, False, False, True,
                                                             False, False, True]
    never = config.load(None, ["task.name=twins", "task.recall_iters=2"]).task
    assert [recall_at(never, step) for step in range(5)] == [True, True, False, False, False]
    s = sampler(twins_data, 5, recall=2, mode="cot", recall_every=3)
    widths = [s.next_batch()[0].shape[1] for _ in range(8)]
    assert [w == 6 * 14 + 2 for w in widths] == [True, True, False, False, True, False, False, True]


def test_depths_at_each_step_of_the_curriculum():
    """The depths drawn at each optimizer step, written out for 2 recall steps and 3 steps per depth."""
    gen = {"nodes": 8, "depths": [1, 2, 3, 4]}
    cfg = config.load(None, ["task.name=twins", "task.recall_iters=2", "task.depth_iters=3", "train.max_iters=20"]).task
    want = [[1]] * 5 + [[1, 2]] * 3 + [[1, 2, 3]] * 3 + [[1, 2, 3, 4]] * 4  # steps 0-1 recall (unused), 2-4 ...
    assert [depths_at(cfg, gen, step) for step in range(15)] == want
    chosen = config.load(None, ["task.name=twins", "task.depths=[4, 2]", "task.depth_iters=3"]).task
    assert [depths_at(chosen, gen, step) for step in (0, 2, 3, 9)] == [[2], [2], [2, 4], [2, 4]]
    plain = config.load(None, ["task.name=twins", "task.depths=[3]"]).task
    questions = batch_generator(TWINS, gen, plain)(random.Random(0), 50, 0)
    assert {len(q["steps"]) for q in questions} == {3}


@pytest.fixture(scope="module")
def twins_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("twins") / "twins"
    prepare_task("twins", out, {"valid": 3, "test": 5}, seed=1)
    return out


def test_a_twins_run_warms_up_trains_reports_accuracy_by_depth_and_starts_rl(twins_data, tmp_path):
    run = tmp_path / "run"
    cfg = config.load(None, task_overrides(twins_data, **{"task.name": '"twins"', "task.mode": '"cot"',
                                                          "task.recall_iters": 2, "task.recall_pairs": 6,
                                                          "train.max_iters": 4}))
    result = train(cfg, run, quiet=True)
    assert 0 <= result["recall_accuracy"] <= 1 and 0 <= result["val_accuracy"] <= 1
    assert not (twins_data / "train.json").exists()
    out = softar("eval", run, "--task", "twins", "--data", twins_data / "test.json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["examples"] == 20 and set(report["accuracy_by_steps"]) == {"1", "2", "3", "4"}
    assert report["accuracy"] == sum(report["correct"]) / 20

    # RL from it on generated questions at one depth the dataset holds, rewarded for the exact path
    rl = tmp_path / "rl.toml"
    rl.write_text(f'[rl]\ninit_from = "{run}"\npolicy = "hard"\ngroup_size = 4\neval_samples = 4\nreward = "path"\n'
                  'loss_average = "token"\nscale_advantages = false\nkl_coef = 0.1\n'
                  '[train]\nmax_iters = 4\nbatch_size = 2\neval_interval = 2\nwarmup_iters = 0\nthreads = 1\n'
                  '[task]\ndepths = [3]\neval_examples = 4\n')
    full, split = tmp_path / "rl", tmp_path / "rl_split"
    proc = softar("rl", rl, "--out", full, "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    from softar.rl.trainer import RLTrainer, rl_config

    trainer = RLTrainer(rl_config(rl), tmp_path / "rl_probe", quiet=True)
    records, examples = trainer.next_questions()
    assert [len(r["steps"]) for r in records] == [3, 3]  # task.depths = [3]: every prompt three hops deep
    assert [ex.question.count(VOCABULARY.index(";")) for ex in examples] == [14 + 3] * 2
    saved = json.loads((full / "config.json").read_text())["task"]
    assert saved["depths"] == [3] and saved["recall_iters"] == 0  # the warm-up was the supervised run's
    assert softar("rl", rl, "train.max_iters=2", "train.lr_decay_iters=4", "--out", split, "--quiet").returncode == 0
    assert softar("rl", rl, "train.lr_decay_iters=4", "--out", split, "--resume", "--quiet").returncode == 0
    losses = [[(r["step"], r["loss"], r["reward"]) for r in map(json.loads, (d / "metrics.jsonl").read_text()
               .splitlines()) if r["kind"] == "train"] for d in (full, split)]
    assert losses[0] == losses[1] and len(losses[0]) == 4  # generated prompts resume exactly
    coconut = tmp_path / "coconut"  # a run that writes no chain: the path rewards cannot score it
    train(config.load(None, task_overrides(twins_data, **{"task.name": '"twins"', "train.max_iters": 1})), coconut,
          quiet=True)
    for args, message in ((["task.depths=[5]"], "task.depths: [5] are not all among"),
                          (['rl.reward="beauty"'], "rl.reward: expected one of"),
                          ([f'rl.init_from="{coconut}"'], "'path' scores the whole chain written in order")):
        assert_one_line_error(softar("rl", rl, *args, "--out", tmp_path / "bad"), message)
    assert not (tmp_path / "bad").exists()


def test_a_chain_of_thoughts_is_the_written_chain_under_the_hard_policy_and_reads_as_a_path(twins_data, tmp_path):
    """rl.chain = "thoughts": a cot run's prompt gets one <thought> slot per step, then <ans>. Under the hard policy
    the slots hold E[y] for sampled y, so every action's log-probability equals a plain forward over the token
    sequence [question, y_1..y_D, <ans>, answer] that cot trains on; the soft policy shows each slot's LM-head
    argmax; the path reward reads the shown tokens. Then `softar rl` and `softar eval` run it end to end."""
    from softar.evaluate.reasoning import TaskData
    from softar.rl.rollout import Policy, replay, rollout
    from softar.rl.trainer import reward_of
    from softar.rundir import load_run

    run = tmp_path / "cot"
    train(config.load(None, task_overrides(twins_data, **{"task.name": '"twins"', "task.mode": '"cot"',
                                                          "task.recall_iters": 1, "train.max_iters": 3})), run,
          quiet=True)
    loaded = load_run(run, torch.device("cpu"))
    model, data = loaded.model.eval(), TaskData.open(loaded.cfg)
    enc, rec = data.encoder, next(r for r in data.records["valid"] if len(r["steps"]) == 3)
    ex = enc.example(rec)
    prompt = enc.prompt(ex, 0, chain_slots=True)
    ids = enc.id
    assert prompt == ex.question + [ids["<eot>"]] + [ids["<thought>"]] * 3 + [ids["<ans>"]]
    assert enc.prompt(ex, 0) == ex.question + [ids["<eot>"]]

    policy = Policy("hard", temperature=1.0, max_answer=4)
    acts = rollout(model, [prompt], 6, policy, ids["<eos>"], list(range(6)))
    logp, mask = replay(model, prompt, acts, policy, ids["<eos>"])
    for g in range(6):
        ys, answer = acts.thought_ids[g].tolist(), [a for a in acts.answers[g].tolist() if a >= 0]
        seq = torch.tensor([enc.prompt(ex, 0) + ys + [ids["<ans>"]] + answer[:-1]])
        ref = model.read(model.E[seq]).logits[0].log_softmax(-1)  # position t predicts token t + 1
        start = len(enc.prompt(ex, 0)) - 1  # <eot> predicts the first step
        want = [ref[start + t, y] for t, y in enumerate(ys)] + [ref[start + 4 + i, a] for i, a in enumerate(answer)]
        torch.testing.assert_close(logp[g][mask[g]], torch.stack(want), atol=1e-4, rtol=1e-4)

    soft = rollout(model, [prompt], 2, Policy("soft", max_answer=3), ids["<eos>"], [0, 1])
    logits = model.read(model.E[torch.tensor([prompt[:-4]])]).logits[0, -1]
    assert int(soft.thought_ids[0, 0]) == int(logits.argmax())  # the first slot shows the LM head's argmax
    steps = torch.tensor(enc.tok.encode(" ".join(rec["steps"])))
    right = torch.tensor([*enc.tok.encode(rec["answer"]), ids["<eos>"], -1])
    wrong = steps.flip(0)
    assert reward_of(data, rec, right, "path", steps) == 1.0 and reward_of(data, rec, right, "path", wrong) == 0.0
    assert reward_of(data, rec, right, "path") == 0.0  # without the chain's tokens there is no path
    padded = torch.cat([steps, torch.tensor([-1])])  # in a batch with a deeper question: one slot more, unfilled
    assert reward_of(data, rec, right, "path", padded) == 1.0

    rl = tmp_path / "rl.toml"
    rl.write_text(f'[rl]\ninit_from = "{run}"\npolicy = "noisy_soft"\ngroup_size = 2\neval_samples = 2\n'
                  'reward = "path_partial"\nchain = "thoughts"\n[train]\nmax_iters = 2\nbatch_size = 2\n'
                  'eval_interval = 2\nwarmup_iters = 0\nthreads = 1\n[task]\ndepths = [3]\neval_examples = 2\n')
    proc = softar("rl", rl, "--out", tmp_path / "rl", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "rl" / "config.json").read_text())["rl"]["chain"] == "thoughts"
    proc = softar("eval", run, "--task", "twins", "--data", twins_data / "test.json", "--samples", "2", "--policy",
                  "soft", "--chain", "thoughts", "--reward", "path", "--depths", "3,4")
    assert proc.returncode == 0, proc.stderr
    sampled = json.loads(proc.stdout.strip().splitlines()[-1])["sampled"]
    assert len(sampled["right"]) == 10 and sampled["chain"] == "thoughts" and sampled["reward_name"] == "path"
    coconut = tmp_path / "coconut"
    train(config.load(None, task_overrides(twins_data, **{"task.name": '"twins"', "train.max_iters": 1})), coconut,
          quiet=True)
    for args, message in (([f'rl.init_from="{coconut}"', 'rl.reward="answer"'], 'rl.chain: "thoughts" puts a slot'),
                          (["rl.chain=\"sideways\""], "rl.chain: expected one of")):
        assert_one_line_error(softar("rl", rl, *args, "--out", tmp_path / "bad"), message)
    assert_one_line_error(softar("eval", run, "--task", "twins", "--data", twins_data / "test.json", "--depths", "3"),
                          "give --samples N too")
    assert_one_line_error(softar("eval", run, "--task", "twins", "--data", twins_data / "test.json", "--samples", "2",
                                 "--depths", "9"), "--depths: ")
    assert not (tmp_path / "bad").exists()


def test_the_rewards_of_written_paths_by_hand():
    from softar.tasks.rewards import REWARDS

    r = make_record(random.Random(3), 8, 3)
    chain, wrong = list(r["steps"]), f"n{r['neg_target']}"
    other = next(f"n{v}" for v in range(16) if f"n{v}" not in chain)

    def score(name, steps, answer):
        return REWARDS[name](TWINS, r, steps, answer, "symbolic")

    assert score("path", chain, [r["answer"]]) == 1.0 and score("answer", chain, [r["answer"]]) == 1.0
    assert score("path", chain, [wrong]) == 0.0 and score("answer", [], [r["answer"]]) == 1.0  # a guess is right
    assert score("path", [], [r["answer"]]) == 0.0 and score("path", chain[:2] + [other], [r["answer"]]) == 0.0
    assert score("path_partial", chain, [r["answer"]]) == 1.0
    assert score("path_partial", chain[:2] + [other], [wrong]) == pytest.approx(0.9 * 2 / 3)
    assert score("path_partial", [other, *chain], [r["answer"]]) == 0.0  # the first step must leave the person
    assert score("path_partial", chain, [wrong]) == pytest.approx(0.9)  # every step right, the answer not
    assert score("format", [other], [wrong]) == 1.0 and score("format", chain, []) == 0.0
    assert score("format", ["?"], [r["answer"]]) == 0.0 and score("format", [], [r["answer"], wrong]) == 0.0


def test_twins_prepare_cli_counts_per_depth_and_refuses_what_it_cannot_use(tmp_path):
    out = softar("task", "prepare", "twins", "--out", tmp_path / "d", "--valid", 2, "--test", 3, "--max-depth", 2,
                 "--nodes", 5)
    assert out.returncode == 0, out.stderr
    meta = json.loads(out.stdout.strip().splitlines()[-1])
    assert meta["counts"] == {"valid": 2, "test": 3} and meta["generator"] == {"nodes": 5, "depths": [1, 2]}
    assert len(json.loads((tmp_path / "d" / "test.json").read_text())) == 6
    assert_one_line_error(softar("task", "prepare", "twins", "--out", tmp_path / "e", "--train", 5), "no train split")
    assert_one_line_error(softar("task", "prepare", "twins", "--out", tmp_path / "e", "--max-depth", 8),
                          "depths must be")
    assert_one_line_error(softar("task", "prepare", "prosqa", "--out", tmp_path / "e", "--nodes", 5), "twins")
    assert not (tmp_path / "e").exists()
    meta_file = tmp_path / "d" / "task.json"
    good = meta_file.read_text()
    meta_file.write_text(good.replace('"nodes": 5', '"nodes": 99'))  # a hostile generator: one line, nothing loads
    assert_one_line_error(softar("task", "audit", tmp_path / "d"), "nodes per twin must be 2 to 32")
    meta_file.write_text(good)
    prosqa = tmp_path / "p"  # a generator in the task.json of a task with fixed splits: refused, not ignored
    prepare_task("prosqa", prosqa, {"train": 4, "valid": 2, "test": 2}, seed=0)
    meta = json.loads((prosqa / "task.json").read_text())
    (prosqa / "task.json").write_text(json.dumps({**meta, "generator": {"depths": [1, 2]}}))
    assert_one_line_error(softar("task", "audit", prosqa), "prosqa reads fixed splits; a generator is for")
    (tmp_path / "d" / "train.json").write_text("[]")  # a train split beside a generating task's data is not its own
    assert_one_line_error(softar("task", "audit", tmp_path / "d"), "train.json")


def test_a_run_with_a_warm_up_resumes_exactly_across_its_two_phases(twins_data, tmp_path):
    """Recall for 2 steps, then the task with fresh optimizer moments and its own schedule: stopped after step 3
    and resumed, it ends bit for bit where the uninterrupted run does."""
    from .test_train import final_weights, train_losses

    def cfg(**kw):
        return config.load(None, task_overrides(twins_data, **{"task.name": '"twins"', "task.mode": '"no_cot"',
                                                               "task.recall_iters": 2, "task.recall_pairs": 6,
                                                               "train.lr_decay_iters": 4, **kw}))

    full, split = tmp_path / "full", tmp_path / "split"
    train(cfg(), full, quiet=True)
    train(cfg(**{"train.max_iters": 3}), split, quiet=True)
    train(cfg(), split, resume=True, quiet=True)
    assert train_losses(full) == train_losses(split)
    a, b = final_weights(full), final_weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage_reset, adam_steps", [(False, 7), (True, 3)])
def test_stage_reset_clears_the_optimizer_as_each_later_stage_begins(twins_data, tmp_path, stage_reset, adam_steps):
    """Recall for steps 0-1, then stages of 2 steps from step 2 (stage 2, the last, from step 6 to 8): AdamW's step
    count in the final checkpoint counts from the task's start, or with task.stage_reset from the last stage's."""
    from softar.checkpoint import latest_checkpoint, load_checkpoint

    from .test_train import final_weights

    def cfg(**kw):
        return config.load(None, task_overrides(twins_data, **{
            "task.name": '"twins"', "task.mode": '"thoughts"', "task.recall_iters": 2, "task.recall_pairs": 6,
            "task.max_stage": 2, "task.stage_iters": 2, "task.stage_reset": str(stage_reset).lower(),
            "train.max_iters": 9, "train.lr_decay_iters": 9, **kw}))

    train(cfg(), tmp_path / "run", quiet=True)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    steps = {float(v) for k, v in ckpt.tensors["optimizer"].items() if k.endswith("/step")}
    assert steps == {adam_steps}
    train(cfg(**{"train.max_iters": 6}), tmp_path / "split", quiet=True)  # stopped as the last stage begins
    train(cfg(), tmp_path / "split", resume=True, quiet=True)
    a, b = final_weights(tmp_path / "run"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SoftarError, match="task.stage_reset"):  # cot has no stages
        config.load(None, task_overrides(twins_data, **{"task.name": '"twins"', "task.mode": '"cot"',
                                                        "task.stage_reset": "true"}))


def test_the_warm_up_runs_at_its_own_peak_learning_rate_and_the_task_as_before(twins_data, tmp_path):
    """task.recall_lr = 3 x train.lr: the warm-up's logged learning rates (inside its linear warmup) are 3 times
    those of the same run without it; from the task's start on they are the same."""
    def logged(name: str, recall_lr: float) -> dict[int, float]:
        cfg = config.load(None, task_overrides(twins_data, **{
            "task.name": '"twins"', "task.mode": '"cot"', "task.recall_iters": 3, "task.recall_pairs": 6,
            "task.recall_lr": recall_lr, "train.lr": 1e-3, "train.min_lr": 1e-4, "train.warmup_iters": 2,
            "train.max_iters": 7, "train.lr_decay_iters": 7}))
        train(cfg, tmp_path / name, quiet=True)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["lr"] for r in rows if r.get("kind") == "train"}

    plain, hot = logged("plain", 0.0), logged("hot", 3e-3)
    assert set(plain) == set(hot) == set(range(1, 8))
    assert all(hot[s] == pytest.approx(3 * plain[s]) for s in (1, 2))
    assert all(hot[s] == plain[s] for s in (4, 5, 6, 7)) and plain[1] == pytest.approx(1e-3 / 3)


def test_a_warm_up_that_did_not_take_is_flagged_as_the_task_starts(twins_data, tmp_path, capsys, monkeypatch):
    """The warm-up's last step is evaluated whatever train.eval_interval, and a recall accuracy there below
    WARM_UP_TOOK gives one warning line with it (3 steps cannot teach the lookup); at or above it, none."""
    from softar.tasks import recall

    cfg = config.load(None, task_overrides(twins_data, **{
        "task.name": '"twins"', "task.mode": '"cot"', "task.recall_iters": 3, "task.recall_pairs": 6,
        "train.max_iters": 5, "train.eval_interval": 4}))
    train(cfg, tmp_path / "a", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if r.get("kind") == "eval"}
    assert sorted(evals) == [3, 4, 5]
    acc, err = evals[3]["recall_accuracy"], capsys.readouterr().err
    assert acc < recall.WARM_UP_TOOK and err.count("softar: warning:") == 1
    assert f"step 3: the recall warm-up ended at recall accuracy {acc:.2f}" in err
    monkeypatch.setattr(recall, "WARM_UP_TOOK", acc)
    train(cfg, tmp_path / "b", quiet=True)
    assert "warning" not in capsys.readouterr().err


def test_the_pause_curriculum_replaces_steps_by_pauses_as_coconut_replaces_them_by_thoughts():
    r = make_record(random.Random(4), 8, 3)
    modes = ("thoughts", "pause_curriculum")
    encoders = {m: Encoder(TWINS, TOK, "symbolic", config.TaskConfig(name="twins", render="symbolic", mode=m,
                                                                     max_stage=4)) for m in modes}
    for k in range(5):
        (a, ea), (b, eb) = (encoders[m].sequence(encoders[m].example(r), k) for m in modes)
        assert ea == eb and len(a) == len(b)  # the same layout, stage by stage
        slots = b[len(encoders["pause_curriculum"].example(r).question): eb]
        assert slots == [TOK.stoi["<pause>"]] * k
        assert [t for t, u in zip(a, b, strict=True) if t != u] == [TOK.stoi["<thought>"]] * k  # only the slot token
        assert b[eb + 1 :] == [TOK.stoi[s] for s in r["steps"][k:]] + encoders["pause_curriculum"].example(r).answer


def test_the_reasoning_configs_differ_only_where_their_headers_say():
    """Amendments 4 and 5 change one thing each against amendment 3's Coconut, amendment 7 the warm-up alone; the GPU
    twins configs and the ProsQA configs differ only in the mode (and its thoughts)."""
    import dataclasses
    from pathlib import Path

    folder = Path(config.__file__).parent / "configs" / "reasoning"

    def load(name):
        return config.load(folder / f"{name}.toml")

    mixed = load("twins_coconut_mixed")
    reset, rescale = load("twins_coconut_reset"), load("twins_coconut_rescale")
    assert reset.task == dataclasses.replace(mixed.task, stage_reset=True) and reset.soft == mixed.soft
    assert rescale.task == mixed.task and rescale.soft == dataclasses.replace(mixed.soft, args={"rescale": 1.0})
    assert reset.model == rescale.model == mixed.model and reset.train == rescale.train == mixed.train
    for group in (["gpu_twins_gate", "gpu_twins_cot", "gpu_twins_coconut"],
                  ["prosqa_no_cot", "prosqa_cot", "prosqa_coconut", "prosqa_pause", "prosqa_soft"]):
        cfgs = [load(n) for n in group]
        assert all(c.model == cfgs[0].model and c.train == cfgs[0].train for c in cfgs), group
        assert all(dataclasses.replace(c.task, mode="cot", max_stage=6, thoughts_per_step=1, depth_iters=0, pauses=6)
                   == dataclasses.replace(cfgs[0].task, mode="cot", max_stage=6, thoughts_per_step=1,
                                          depth_iters=0, pauses=6) for c in cfgs), group
    assert load("gpu_twins_coconut").soft == rescale.soft and load("prosqa_coconut").task.recall_every == 2
    # Amendment 7: the warm-up alone differs, 600 steps at a peak of 2e-3, and the task phase keeps its steps
    from softar.tasks.data import stage_iters

    for name in ("twins_gate", "twins_cot", "twins_coconut_rescale"):
        base, long = load(name), load(f"{name}_long_warmup")
        assert long.task == dataclasses.replace(base.task, recall_iters=600, recall_lr=2e-3), name
        assert long.train == dataclasses.replace(base.train, max_iters=base.train.max_iters + 300), name
        assert (long.model, long.soft, long.data) == (base.model, base.soft, base.data), name
    assert stage_iters(load("twins_coconut_rescale_long_warmup").task, 2100) == stage_iters(rescale.task, 1800) == 300
