"""`softar inspect`: the generation trace it draws from, its payload, and the page itself in headless Chromium."""

import json

import pytest
import torch

from softar import config
from softar.config import ContextConfig, ModelConfig
from softar.inspect import render_html
from softar.inspect.browser import chromium
from softar.inspect.payload import region_of, window_regions
from softar.soft.collapse import CollapsePolicy
from softar.train import train

from .conftest import decoding, soft_model, task_overrides, tiny_overrides
from .test_cli import assert_one_line_error, softar

LAYOUT = {"context.aggregate": 1, "context.segments": 2, "context.segment_len": 4, "context.soft": 4}


@pytest.mark.parametrize("extra", [{}, {"aggregate_all": True, "op": "decay"}])
def test_a_trace_changes_nothing_and_its_windows_agree_with_the_tiers(extra):
    """return_trace=True gives the same tokens; the last window's regions put every generated token in the tier
    generate reports; every window has the slots the model read; greedy picks the top of the traced distribution."""
    torch.manual_seed(0)
    model = soft_model(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=24, vocab_size=12),
                       ContextConfig(aggregate=1, segments=2, soft=5, segment_len=3, **extra)).eval()
    lay = model.layout
    for dec in (decoding(mode="soft", max_new_tokens=40, policy=CollapsePolicy(threshold=2.45, budget=3),
                         stop_tokens=(5,)),
                decoding(mode="hard", temperature=0, max_new_tokens=40)):
        prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2]]
        g = dec.run(model, prompts, seed=3, return_trace=True, return_vectors=True)
        plain = dec.run(model, prompts, seed=3, return_vectors=True)
        for name in ("tokens", "lengths", "logprobs", "stopped", "collapsed", "scores", "vectors", "collapsed_by_age"):
            assert torch.equal(getattr(g, name), getattr(plain, name)), name
        assert g.tiers == plain.tiers
        for b, prompt in enumerate(prompts):
            n, P = int(g.lengths[b]), len(prompt)
            views = g.windows[b]
            assert len(views) == n + 1 and [v.seen for v in views] == list(range(P, P + n + 1))
            assert [region_of(views[-1], P + j) for j in range(n)] == g.tiers[b]
            for v in views:  # against the ladder worked out by hand (one token moves per step)
                regions = {r["name"]: (r["from"], r["to"], r["slots"]) for r in window_regions(v, lay.aggregate_all)}
                soft = min(v.seen - P, lay.soft)  # generated tokens enter the soft region, the prompt the hard one
                hard = min(v.seen - soft, lay.hard)
                seg0 = min(v.seen - soft - hard, 3)
                seg1 = min(v.seen - soft - hard - seg0, 3)
                first = [v.seen - soft, v.seen - soft - hard, v.seen - soft - hard - seg0]
                assert regions["soft"] == (first[0], v.seen, soft) and regions["hard"] == (first[1], first[0], hard)
                assert regions["segment0"] == (first[2], first[1], 1)
                assert regions["segment1"] == (first[2] - seg1, first[2], 1)
                assert regions["aggregate"] == (0, first[1] if lay.aggregate_all else first[2] - seg1, 1)
                assert list(regions) == ["aggregate", "segment1", "segment0", "hard", "soft"]  # window order
                assert len(v.soft_collapsed) == soft
        if dec.feed.sampling.temperature == 0:  # greedy: the token is the top of the traced distribution
            n = int(g.lengths[0])
            assert torch.equal(g.top_ids[0, :n, 0], g.tokens[0, :n])
        probs = g.top_probs[0, : int(g.lengths[0])]
        assert (probs[:, :-1] >= probs[:, 1:]).all() and (probs.sum(-1) <= 1 + 1e-5).all()
        assert (g.entropy[0, : int(g.lengths[0])] > 0).all()


def test_a_plain_window_is_traced_as_it_slides():
    torch.manual_seed(0)
    model = soft_model(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=8, vocab_size=12)).eval()
    g = decoding(mode="soft", max_new_tokens=20).run(model, [[1, 2, 3]], return_trace=True)
    size, length = 8, 3
    for step, v in enumerate(g.windows[0]):
        assert v.regions == [("tokens", 0, length)] and v.seen == 3 + step and v.soft_collapsed == []
        length = length + 1 if length < size else size // 2  # a full window keeps its newest half, then the new one


@pytest.fixture(scope="module")
def layout_run(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "run"
    train(config.load(None, tiny_overrides(char_data, **LAYOUT)), out, quiet=True)
    return out


def inspect(*args):
    proc = softar("inspect", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_inspect_writes_a_page_and_its_payload(layout_run, tmp_path):
    page = tmp_path / "page.html"
    result = inspect(layout_run, "--prompt", "ROMEO:", "--mode", "soft", "--collapse-threshold", "3.5",
                     "--max-new-tokens", "40", "--out", page)
    payload = json.loads((tmp_path / "page.json").read_text())
    assert result["tokens"] == len(payload["tokens"]) == 6 + 40 and payload["prompt_tokens"] == 6
    tiers = [t["tier"] for t in payload["tokens"]]
    assert set(tiers) <= {"soft", "hard", "segment", "aggregate", "gone"} and tiers[-1] == "soft"
    assert {"segment", "aggregate"} <= set(tiers)  # 46 tokens overflow 9 hard + 4 soft + 2x4 segment slots
    gen = payload["tokens"][6:]
    assert all(len(t["topk"]) == 10 and len(t["nearest"]) == 5 for t in gen)
    assert any(t["collapsed"] for t in gen) and len(payload["steps"]) == 41
    for t in gen:  # threshold 3.5, no budget: every collapse is at entry, above the threshold
        assert t["collapsed"] == (t["score"] > 3.5) and ("why" in t) == t["collapsed"]
    assert payload["metrics"]["curves"]["train_loss_step"][0][0] == 1
    text = page.read_text()
    assert "<link" not in text and "src=" not in text and "default-src 'none'" in text  # self-contained, offline
    again = inspect(layout_run, "--prompt", "ROMEO:", "--mode", "soft", "--collapse-threshold", "3.5",
                    "--max-new-tokens", "40", "--out", page)  # its own page it replaces
    assert again == result and json.loads((tmp_path / "page.json").read_text()) == payload  # deterministic


def test_a_task_run_shows_each_thought_with_its_nodes_and_frontier(task_data, tmp_path):
    run = tmp_path / "run"
    train(config.load(None, task_overrides(task_data)), run, quiet=True)
    inspect(run, "--task-example", f"{task_data / 'test.json'}:3", "--out", tmp_path / "page.html")
    payload = json.loads((tmp_path / "page.json").read_text())
    record = json.loads((task_data / "test.json").read_text())[3]
    thoughts = [t for t in payload["tokens"] if t["source"] == "thought"]
    assert len(thoughts) == 2 and payload["task"]["question"] == record["question"]  # 2 stages x 1 thought
    adjacent = {}
    for a, b in record["edges"]:
        adjacent.setdefault(a, set()).add(b)
    frontier = visited = {record["root"]}
    for k, t in enumerate(thoughts):  # breadth-first by hand: the nodes first reached at depth k + 1
        frontier = {b for a in frontier for b in adjacent.get(a, ())} - visited
        visited = visited | frontier
        assert t["depth"] == k + 1 and len(t["nodes"]) == 5 and t["tier"] == "soft" and t["norm"] > 0
        assert t["frontier"] == [f"n{i}" for i in sorted(frontier)], (k, t["frontier"])
        assert [s for _, s in t["nodes"]] == sorted((s for _, s in t["nodes"]), reverse=True)
    assert all(t["topk"] for t in payload["tokens"] if t["source"] == "generated")
    for args, message in (([f"{task_data / 'test.json'}:999"], "holds 8 records"),
                          ([f"{task_data / 'test.json'}:x"], "expected FILE:INDEX"),
                          ([f"{task_data / 'nothing.json'}:0"], "nothing.json"),
                          (["x:0", "--prompt", "A"], "not allowed with argument"),
                          ([f"{task_data / 'test.json'}:0", "--out", tmp_path / "no" / "p.html"], "does not exist")):
        out = [] if "--out" in args else ["--out", tmp_path / "p.html"]
        assert_one_line_error(softar("inspect", run, "--task-example", *args, *out), message)
    assert_one_line_error(softar("inspect", run, "--prompt", "A", "--out", tmp_path / "p.html"), "--task-example")
    assert_one_line_error(softar("inspect", run, "--task-example", f"{task_data / 'test.json'}:3", "--temperature",
                                 "0", "--out", tmp_path / "p.html"), "--temperature: a reasoning-task run is solved")
    if chromium() is None:
        return
    pytest.importorskip("playwright")
    from softar.inspect.browser import render

    def look(tab):  # a thought's panel shows the nodes it reads as
        tab.locator("#text .tok.source-thought").nth(1).click()
        return tab.locator("#detail .nodes .barrow").count(), tab.locator("#text .tok.source-thought").count()

    seen = render(tmp_path / "page.html", look)
    assert seen.result == (5, 2) and seen.console_errors == [] and seen.requests == []


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_page_in_headless_chromium(layout_run, char_data, tmp_path):
    """The page renders with one element per token carrying its tier, a click shows the token's top-k, the window
    strip shows each step's slots, the console stays clean and no request leaves the page, even with a token that
    tries to close the script (the CSP would block its image anyway: the text check is what shows it stays text)."""
    pytest.importorskip("playwright")
    from softar.inspect.browser import render

    page = tmp_path / "page.html"
    inspect(layout_run, "--prompt", "ROMEO:", "--mode", "soft", "--collapse-threshold", "3.5", "--max-new-tokens",
            "40", "--out", page)
    payload = json.loads((tmp_path / "page.json").read_text())
    payload["tokens"][0]["text"] = "</script><img src='https://example.com/x.png'><script>"
    page.write_text(render_html(payload))

    def look(tab):
        spans = tab.locator("#text .tok")
        classes = [spans.nth(i).get_attribute("class").split() for i in range(spans.count())]
        before = tab.locator("#detail .topk .barrow").count()
        spans.nth(20).click()
        tab.locator("#step").fill("10")
        return {"classes": classes, "before": before, "bars": tab.locator("#detail .topk .barrow").count(),
                "selected": tab.locator("#detail").get_attribute("data-token"),
                "first": spans.nth(0).text_content(), "slots": tab.locator("#strip .slot").count()}

    seen = render(page, look)
    shot = tmp_path / "page.png"
    shot.write_bytes(seen.png)  # kept in the test's folder, to look at
    got = seen.result
    assert len(got["classes"]) == len(payload["tokens"])
    for cls, token in zip(got["classes"], payload["tokens"], strict=True):
        assert f"tier-{token['tier']}" in cls and ("collapsed" in cls) == token["collapsed"]
    assert got["before"] == 0 and got["bars"] == len(payload["tokens"][20]["topk"]) and got["selected"] == "20"
    assert got["first"] == payload["tokens"][0]["text"]  # shown as text, not run as markup
    assert got["slots"] == sum(r["slots"] for r in payload["steps"][10]["regions"])
    assert seen.console_errors == [] and seen.requests == []
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    plain = tmp_path / "plain"  # a plain window in hard mode, sliding: every slot is a hard token
    train(config.load(None, tiny_overrides(char_data, **{"train.max_iters": 1})), plain, quiet=True)
    inspect(plain, "--prompt", "ROMEO:", "--mode", "hard", "--max-new-tokens", "30", "--out", tmp_path / "plain.html")
    plain_payload = json.loads((tmp_path / "plain.json").read_text())

    def strip_at(step):
        def look(tab):
            tab.locator("#step").fill(str(step))
            return [tab.locator("#strip .slot").nth(i).get_attribute("class")
                    for i in range(tab.locator("#strip .slot").count())]
        return look

    at = render(tmp_path / "plain.html", strip_at(25))
    region = plain_payload["steps"][25]["regions"][0]
    assert at.result == ["slot kind-hard"] * (region["to"] - region["from"]) and at.console_errors == []
    assert region["to"] == 6 + 25 and region["to"] - region["from"] < 16  # it slid

    control = tmp_path / "control.html"  # the check itself: a page that does fetch is caught
    control.write_text("<!doctype html><body data-ready='1'><img src='https://example.com/x.png'>"
                       "<script>console.error('boom')</script></body>")
    caught = render(control)
    assert caught.requests == ["https://example.com/x.png"] and "boom" in caught.console_errors


def test_screenshots_and_pages_replace_only_their_own_files(layout_run, tmp_path):
    """--screenshot and PAGE.html/PAGE.json replace only files the folder's manifest proves softar wrote and nobody
    changed since; someone else's file, one edited since, or a link is refused; all before the model runs."""
    import hashlib

    from softar.disk import MANIFEST
    from softar.inspect import write_png

    png = b"\x89PNG\r\n\x1a\n" + bytes(25) + b"IDAT"
    shot = tmp_path / "shot.png"
    write_png(png, shot)
    listed = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert listed == {"shot.png": [hashlib.sha256(png).hexdigest()]}  # what it wrote, by content
    write_png(png + b"x", shot)  # its own screenshot it replaces
    (tmp_path / "photo.png").write_bytes(png)  # someone else's PNG, byte for byte like softar's, it does not
    (tmp_path / "link.html").symlink_to(tmp_path / "nowhere.html")
    for args, message in ((["--screenshot", tmp_path / "photo.png"], "holds photo.png, which softar did not write"),
                          (["--screenshot", tmp_path / "shot.jpg"], "must be a .png file"),
                          (["--out", tmp_path / "link.html"], "holds link.html, which softar did not write")):
        out = [] if "--out" in args else ["--out", tmp_path / "page.html"]
        before = sorted(tmp_path.iterdir())
        assert_one_line_error(softar("inspect", layout_run, "--max-new-tokens", "2", *out, *args), message)
        assert sorted(tmp_path.iterdir()) == before and (tmp_path / "photo.png").read_bytes() == png
    assert (tmp_path / "link.html").is_symlink() and not (tmp_path / "nowhere.html").exists()
    shot.write_bytes(png + b"my edit")  # softar's file, changed by its user since: no longer softar's to replace
    assert_one_line_error(softar("inspect", layout_run, "--max-new-tokens", "2", "--out", tmp_path / "page.html",
                                 "--screenshot", shot), "holds shot.png, which softar did not write (or which changed")
    assert shot.read_bytes() == png + b"my edit"


def test_the_reason_for_a_collapse():
    from softar.inspect.payload import collapse_reason

    policy = CollapsePolicy(threshold=2.0, budget=1)
    assert collapse_reason(policy, 3.0) == "at entry: entropy 3.000 > threshold 2"
    assert collapse_reason(policy, 1.0).startswith("later, by the budget: at most 1")
    uncertain = CollapsePolicy(threshold=2.0, keep_uncertain=True)
    assert collapse_reason(uncertain, 1.0).startswith("at entry: entropy 1.000 <")
