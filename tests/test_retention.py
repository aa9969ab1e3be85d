"""softar.evaluate.retention and the retention study's controls: scoring identical targets, the ablations, the
copy probe, the frequency-prior null, the analogy scorer, the summary-slot controls and fine-tuning from a run."""

import numpy as np
import pytest
import torch

from softar.config import ModelConfig

from .conftest import decoding, soft_model
from .test_soft_window import tiny_layout_model


def random_ids(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, vocab, (n, length)))


def test_target_logprobs_read_each_target_from_exactly_its_context():
    """A plain model at context c and a layout model (hard region + history) score each target as one forward of
    the window the training-time builder makes for it."""
    from softar.evaluate.retention import target_logprobs

    torch.manual_seed(0)
    plain = soft_model(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=8, vocab_size=11)).eval()
    ids = random_ids(3, 40, 11)
    got = target_logprobs(plain, ids, prefix=30, context=5)
    for t in (30, 35, 39):
        want = plain(ids[:, t - 5 : t])[:, -1].log_softmax(-1).gather(1, ids[:, t : t + 1])[:, 0]
        assert torch.allclose(got[:, t - 30], want.double(), atol=1e-5)
    layout = tiny_layout_model(op="sum")  # 3 summary slots, 9 hard, 30 tokens of history
    got = target_logprobs(layout, ids, prefix=39)
    hist, hard = ids[:, 0:30], ids[:, 30:39]
    logits = layout.read(layout.window(layout.E[hard], (hist, torch.full((3,), 30))), last=True).logits[:, -1]
    assert torch.allclose(got[:, 0], logits.log_softmax(-1).gather(1, ids[:, 39:40])[:, 0].double(), atol=1e-5)
    with pytest.raises(ValueError, match="prefix"):
        target_logprobs(layout, ids, prefix=20)


def test_layout_greedy_generation_matches_the_scored_window():
    """With no soft slots, each greedy step's token is the argmax of the window `target_logprobs` scores (hard
    region = the newest tokens, history = everything before)."""

    model = tiny_layout_model(op="sqrt")
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4]])
    out = decoding(temperature=0, max_new_tokens=12).run(model, prompt).full()
    lay = model.layout
    for t in range(prompt.shape[1], out.shape[1]):
        hist = out[:, : t - lay.hard][:, -lay.history :]
        window = model.window(model.E[out[:, t - lay.hard : t]], (hist, torch.tensor([hist.shape[1]])))
        assert model.read(window, last=True).logits[0, -1].argmax().item() == out[0, t].item()


@pytest.mark.parametrize("op", ["sum", "mean", "decay"])
def test_swapping_summaries_changes_the_loss_and_shuffling_inside_a_segment_does_not(op):
    """Swapped (another stretch's history) and zeroed summaries change the scores; shuffling the history inside
    each slot's span leaves a sum (and a mean) exactly unchanged, but not a decayed sum, which weighs by age."""
    from softar.evaluate.retention import target_logprobs

    model = tiny_layout_model(op=op)
    ids = random_ids(4, 39 + 6, 11)
    real, swapped, zeroed, shuffled = (target_logprobs(model, ids, 39, ablation=a)
                                       for a in ("real", "swapped", "zeroed", "shuffled"))
    assert not torch.allclose(real, swapped) and not torch.allclose(real, zeroed)
    if op == "decay":
        assert not torch.equal(real, shuffled)
    else:
        assert torch.equal(real, shuffled)


def test_shuffle_keeps_every_token_inside_its_slot_span():
    from softar.evaluate.retention import shuffle_within_slots

    model = tiny_layout_model(op="sum")  # segments of 3 tokens (ages 0-2, 3-5), the aggregate older
    hist = torch.arange(30)[None]
    out = shuffle_within_slots(hist, model)
    assert not torch.equal(out, hist)
    for a, b in ((0, 24), (24, 27), (27, 30)):  # columns of the aggregate, the older and the newer segment
        assert sorted(out[0, a:b].tolist()) == list(range(a, b))


def test_frequency_prior_recall_on_a_hand_built_history():
    """The prior ranks by train frequency without looking at the history: of the k = 2 tokens {0, 4} a slot holds,
    only token 0 is among the 2 most frequent; a constant score ranks by token id."""
    from softar.evaluate.context import recall_at_k, token_frequencies

    prior = token_frequencies(np.array([0] * 10 + [1] * 9 + [2] * 8 + [3, 4, 5]), 6)
    assert prior.tolist() == [10, 9, 8, 1, 1, 1]
    held = torch.tensor([[True, False, False, False, True, False], [True, True, False, False, False, False],
                         [False] * 6])
    got = recall_at_k(prior.expand(3, 6), held)
    assert got[0].item() == 0.5 and got[1].item() == 1.0 and torch.isnan(got[2])
    assert recall_at_k(torch.zeros(1, 6), held[:1]).item() == 0.5  # ties by id: the top 2 are {0, 1}


def test_recovery_probe_reads_back_an_orthonormal_sum_and_reports_the_prior():
    from softar.evaluate.context import recovery_probe, token_frequencies

    model = tiny_layout_model(op="sum", segment_len=4)
    with torch.no_grad():
        model.E.copy_(torch.eye(11, 16))  # orthonormal rows: a sum is read back exactly
    data = np.random.default_rng(0).integers(0, 11, 400).astype(np.uint16)
    result = recovery_probe(model, data, token_frequencies(data, 11), history_lengths=(8, 20), windows=6)
    seg = result["8"]["segment"]
    assert seg["recall_at_k"] == 1.0 and "aggregate" not in result["8"]
    assert seg["recall_minus_prior"] == pytest.approx(1.0 - seg["prior_recall_at_k"])
    assert 0 < seg["prior_recall_at_k"] < 1
    assert result["20"]["aggregate"]["recall_at_k"] == 1.0


def copying_scorer(context: int, vocab: int):
    """A model that copies by construction: it finds the last earlier occurrence of the previous token within its
    `context` tokens and puts 0.9 on what followed it (uniform otherwise)."""
    def score(ids: torch.Tensor, prefix: int) -> torch.Tensor:
        out = torch.empty(ids.shape[0], ids.shape[1] - prefix, dtype=torch.float64)
        for n in range(ids.shape[0]):
            for k, t in enumerate(range(prefix, ids.shape[1])):
                seen, guess = ids[n, t - context : t].tolist(), None
                for j in range(len(seen) - 2, -1, -1):
                    if seen[j] == seen[-1]:
                        guess = seen[j + 1]
                        break
                p = 0.1 / vocab + (0.9 if guess == ids[n, t].item() else 0.0)
                out[n, k] = float(np.log(p))
        return out
    return score


def test_copy_probe_on_a_model_that_copies_by_construction():
    """The planted span is copied when it lies inside the model's context and gains exactly nothing outside it
    (against another stretch's span planted at the same place)."""
    from softar.evaluate.retention import copy_scores

    ids = random_ids(6, 200 + 16, 5000)
    gains = copy_scores(copying_scorer(context=64, vocab=5000), ids, prefix=200, distances=(16, 40, 100, 200))
    assert gains["16"].mean() > 5 and gains["40"].mean() > 5  # log(0.9 / (0.1 / V)) per copied target
    assert torch.equal(gains["100"], torch.zeros_like(gains["100"])) and gains["200"].abs().max() == 0
    with pytest.raises(ValueError, match="overlap"):
        copy_scores(copying_scorer(64, 5000), ids, 200, distances=(8,))


def test_gap_closed_and_its_interval():
    from softar.evaluate.retention import bootstrap_gap_closed, gap_closed

    rng = np.random.default_rng(0)
    short = rng.normal(-4.0, 0.1, (2, 50, 8))
    long = short + 0.2  # log p: the long context gains 0.2 nats on every target
    half = short + 0.1
    assert gap_closed(short, half, long) == pytest.approx(0.5)
    lo, hi = bootstrap_gap_closed(short, half, long)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)  # a constant shift: no spread at all
    noisy = short + rng.normal(0.1, 0.3, short.shape)
    lo, hi = bootstrap_gap_closed(short, noisy, long)
    assert lo < gap_closed(short, noisy, long) < hi


def test_analogy_scorer_on_a_hand_built_2d_space(tmp_path):
    """queen = king - man + woman exactly; boy sits nearer woman than queen does, so 3CosAdd answers queen while the
    only-c null answers boy; a question with a word outside the vocabulary is counted and skipped."""
    from softar.data.tokenizer import WordTokenizer
    from softar.evaluate.analogies import analogy_accuracy, read_analogies

    tok = WordTokenizer(["<unk>", "<nl>", "man", "king", "woman", "queen", "boy"])
    angle = {"<unk>": 270, "<nl>": 300, "man": 0, "king": 45, "woman": 180, "queen": 135, "boy": 170}
    E = torch.tensor([[np.cos(np.radians(angle[w])), np.sin(np.radians(angle[w]))] for w in tok.words],
                     dtype=torch.float32)
    path = tmp_path / "q.txt"
    path.write_text(": royal\nman king woman queen\nMan King Woman dragon\n\n: other\nking man queen woman\n")
    result = analogy_accuracy(E, tok, read_analogies(path))
    royal = result["sections"]["royal"]
    assert royal == {"questions": 2, "answered": 1, "skipped": 1, "accuracy": 1.0, "only_c": 0.0}
    assert result["answered"] == 2 and result["skipped"] == 1
    path.write_text(": s\nman king woman\n")
    from softar import SoftarError

    with pytest.raises(SoftarError, match="q.txt:2: an analogy line holds 4 words"):
        read_analogies(path)


def test_pause_slots_ignore_the_history_and_write_vectors_start_as_arithmetic():
    from softar.evaluate.retention import target_logprobs

    ids = random_ids(3, 39 + 4, 11)
    pause = tiny_layout_model(memory="pause")
    assert torch.equal(target_logprobs(pause, ids, 39), target_logprobs(pause, ids, 39, ablation="swapped"))
    write = tiny_layout_model(memory="write")  # W = 0 at init: exactly the arithmetic
    arithmetic = tiny_layout_model()
    with torch.no_grad():
        for name, p in arithmetic.state_dict().items():
            write.state_dict()[name].copy_(p)
    assert torch.equal(target_logprobs(write, ids, 39), target_logprobs(arithmetic, ids, 39))
    with torch.no_grad():
        write.memory.proj.weight.normal_()
    assert not torch.equal(target_logprobs(write, ids, 39), target_logprobs(arithmetic, ids, 39))


def test_recurrent_memory_reads_the_history_and_trains_through_its_last_chunk():
    model = tiny_layout_model(memory="rmt").train()
    hist = random_ids(2, 30, 11)
    tokens = model.E[random_ids(2, 9, 11, seed=1)]
    lens = torch.tensor([30, 2])  # the second row has no whole chunk of history: the initial memory
    memory = model.summary((hist, lens), tokens)
    assert torch.equal(memory[1], model.memory.initial) and not torch.allclose(memory[0], memory[1])
    memory[0].sum().backward()
    assert model.memory.write.grad.abs().sum() > 0 and model.memory.proj.weight.grad.abs().sum() > 0


def test_generation_refuses_a_learned_memory():
    from softar import SoftarError

    for memory in ("pause", "write", "rmt"):
        with pytest.raises(SoftarError, match="context.memory"):
            decoding(max_new_tokens=2).run(tiny_layout_model(memory=memory), torch.tensor([[1, 2, 3]]))


def test_a_memory_needs_summary_slots(tiny_cfg):
    from softar.config import ConfigError
    from softar.soft.model import check_names

    with pytest.raises(ConfigError, match="context.memory"):
        check_names(tiny_cfg(**{"context.memory": '"pause"'}))


def test_fine_tuning_loads_the_network_and_keeps_the_new_slots_fresh(tiny_cfg, tmp_path, char_data):
    """train.init_from: a layout model starts from a plain run's network; the window builder's new parameters keep
    their initialisation; a run holding parameters the model lacks is refused in one line."""
    from softar import SoftarError
    from softar.config import resolve
    from softar.rundir import data_fingerprint, load_init_weights, load_latest
    from softar.soft.model import build_model
    from softar.train import train

    vocab = data_fingerprint(char_data)["vocab_size"]
    plain = tmp_path / "plain"
    train(tiny_cfg(**{"model.pos_emb": '"rope"'}), plain, quiet=True)
    cfg = tiny_cfg(**{"model.pos_emb": '"rope"', "model.block_size": 19, "context.aggregate": 1,
                      "context.segments": 2, "context.segment_len": 4, "context.max_history": 40,
                      "train.init_from": f'"{plain}"'})
    cfg = resolve(cfg, vocab)
    torch.manual_seed(0)
    model = build_model(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    source = load_latest(plain).tensors["model"]
    info = load_init_weights(model, cfg)
    assert info["step"] == 8
    for name, value in model.state_dict().items():
        assert torch.equal(value, source[name] if name in source else fresh[name]), name
    assert any(name.startswith("slots.") for name in fresh) and not any(n.startswith("slots.") for n in source)
    layout = tmp_path / "layout"
    train(cfg, layout, quiet=True)
    back = resolve(tiny_cfg(**{"model.pos_emb": '"rope"', "train.init_from": f'"{layout}"'}), vocab)
    with pytest.raises(SoftarError, match="which this model does not have"):
        load_init_weights(build_model(back), back)
    with pytest.raises(SoftarError, match="is not a softar run"):
        missing = resolve(tiny_cfg(**{"train.init_from": f'"{tmp_path / "nothing"}"'}), vocab)
        load_init_weights(build_model(missing), missing)



def test_a_damaged_retention_file_is_a_one_line_error(tmp_path):
    from softar import SoftarError
    from softar.experiments.retention_study import ARRAYS_FILE, load_arrays

    run = tmp_path / "run"
    run.mkdir()
    (run / ARRAYS_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SoftarError, match="not a readable retention file"):
        load_arrays([run])
    np.savez(run / ARRAYS_FILE, real=np.zeros((2, 3)))
    with pytest.raises(SoftarError, match="not a retention file"):
        load_arrays([run])
    np.savez(run / ARRAYS_FILE, **{k: np.zeros((2, 3)) for k in ("short", "long", "real", "cached")})
    assert load_arrays([run, run])["real"].shape == (2, 2, 3)


def test_gap_specs_name_a_run_and_optionally_its_context(tmp_path):
    from softar.evaluate.run import parse_gap_run

    assert parse_gap_run("runs/w128:32") == ("runs/w128", 32)
    assert parse_gap_run("runs/w128") == ("runs/w128", None)
    assert parse_gap_run("runs/w128:\u00b2") == ("runs/w128:\u00b2", None)  # a superscript is no context
    odd = tmp_path / "run:32"
    odd.mkdir()
    assert parse_gap_run(str(odd)) == (str(odd), None)  # a directory named so is that directory


def test_the_study_configs_compare_like_with_like():
    """Every CPU config of the retention study predicts 1,536 tokens per step from the same network; the summary
    configs and their controls have the same three extra slots; the fine-tuning pair differs only in the slots."""
    from pathlib import Path

    from softar import config
    from softar.soft.window import Layout

    folder = Path(config.__file__).parent / "configs" / "retention"
    cfgs = {p.stem: config.load(p) for p in sorted(folder.glob("*.toml"))}
    cpu = {n: c for n, c in cfgs.items() if not n.startswith(("gpu_", "words_"))}
    for name, c in cpu.items():
        lay = Layout.from_config(c.context, c.model.block_size)
        assert c.train.batch_size * lay.token_slots == 1536, name
        assert (c.model.n_layer, c.model.d_model, c.model.pos_emb) == (4, 128, "rope"), name
        assert lay.n_summary in (0, 3) and lay.hard in (32, 128), name
    assert {cpu[n].context.memory for n in ("w32_sum", "w32_pause", "w32_write", "w32_rmt")} == \
        {"arithmetic", "pause", "write", "rmt"}
    ft, sum_ft = cpu["w32_ft"], cpu["w32_sum_ft"]
    assert ft.train == sum_ft.train and ft.train.init_from.endswith("w32_s{seed}")
    gpu = [c for n, c in cfgs.items() if n.startswith("gpu_")]
    assert len({c.train.batch_size * Layout.from_config(c.context, c.model.block_size).token_slots for c in gpu}) == 1


@pytest.mark.parametrize("kind", ["bag", "binding"])
def test_the_known_answer_verdict_reads_the_share_of_the_optimums_gap(kind):
    """Arrays built so that the sum layout gains exactly 0.3 of the optimum's gap on every scored target (bag: over
    w32, the optimum's gap 0.2 as the same-weights one; binding: below the loss log 10 of a reader of the short
    context, whose reference is the optimum itself): the prediction (bag: at least 0.5; binding: at most 0.1) must
    fail in both, with a degenerate interval."""
    from softar.config import Config, ContextConfig
    from softar.experiments.retention_study import known_answer_section

    S, W, K = 2, 6, 4
    rng = np.random.default_rng(0)
    short = -3.0 - rng.random((S, W, K))
    long = short + 0.2
    w32 = short + 0.05
    summed = w32 + 0.3 * 0.2
    common = {"short": short, "long": long, "hit_short": np.zeros((S, W, K)), "hit_long": np.ones((S, W, K)),
              "bayes_short": short - 0.1, "bayes_long": long - 0.1, "bayes_history": short + 0.1}
    if kind == "binding":
        common = {k: v for k, v in common.items() if not k.startswith("bayes")}
        common.update(query_mask=np.ones((S, W, K), bool), query_window_loss=np.full((S, W, K), np.log(10)),
                      query_bag_loss=np.full((S, W, K), 0.8 * np.log(10)), query_in_sight=np.ones((S, W, K), bool),
                      query_bag_accuracy=np.full((S, W, K), 0.25))
        summed = np.full((S, W, K), -0.7 * np.log(10))
    arrays = {"w128": {**common, "real": long, "hit_real": np.ones((S, W, K))},
              "w32": {**common, "real": w32, "hit_real": np.zeros((S, W, K))},
              "sum": {**common, "real": summed, "hit_real": np.ones((S, W, K))}}  # it looks up what it reads
    loaded = {"w128": Config(model=ModelConfig(block_size=128)), "w32": Config(model=ModelConfig(block_size=32)),
              "sum": Config(model=ModelConfig(block_size=35),
                            context=ContextConfig(aggregate=1, segments=2, segment_len=32, op="sum"))}
    text = "\n".join(known_answer_section(arrays, loaded, [("w128", 32), ("w128", 128)], 544, "w32"))
    assert "the apparatus sees the gap" in text.lower()
    assert "- sum (sum): +0.300 [+0.300, +0.300]: fails" + \
        ("; above the bag-of-values optimum (0.200)." if kind == "binding" else ".") in text
    if kind == "binding":  # a layout that cannot look up what it reads is below its own floor
        arrays["sum"]["hit_real"] = np.zeros((S, W, K))
        text = "\n".join(known_answer_section(arrays, loaded, [("w128", 32), ("w128", 128)], 544, "w32"))
        assert "- sum (sum): +0.300 [+0.300, +0.300]: **below the floor**: it answers 0.000 of the queries in " \
            "sight" in text
