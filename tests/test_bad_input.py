"""Every config key and CLI flag, fed a wrong type, an out-of-range value or a missing file: one line on stderr
naming the problem, exit code 2, and nothing written."""

import pytest

from softar import cli
from softar.config import Config
from softar.data.prepare import prepare
from softar.train import train

from .conftest import tiny_overrides

CONFIG = "configs/shakespeare_char.toml"

# one out-of-range value per key (TOML syntax); None: any value of the right type is valid
OUT_OF_RANGE = {
    "model.n_layer": "0", "model.n_head": "3", "model.d_model": "0", "model.d_embed": "-1", "model.block_size": "0",
    "model.vocab_size": "5", "model.dropout": "1.0", "model.bias": None, "model.pos_emb": '"alibi"',
    "model.rope_base": "0.0", "model.embedding": '"glove"', "model.embedding_from": None, "model.vector_head": None,
    "model.collapse_head": None, "model.collapse_layer": "5", "model.collapse_mix": "true",
    "loss.ce": "-1.0", "loss.mse": "0.5", "loss.cosine": "-0.5", "loss.infonce": "1.0",
    "loss.infonce_temperature": "0.0",
    "loss.vmf": "1.0", "loss.collapse": "1.0", "loss.soft_inputs": "1.5",
    "soft.kind": '"regress"', "soft.top_k": "-1", "soft.args": "{gamma = 1.0}", "soft.noise": '"uniform"',
    "soft.noise_scale": "-1.0",
    "model.hf": '"gpt2"', "model.lora_rank": "-1", "model.lora_alpha": "0.0", "model.dtype": '"float16"',
    "train.checkpointing": None,
    "data.dir": '""', "data.targets": '"answers"',
    "train.max_iters": "0", "train.batch_size": "0", "train.grad_accum": "0", "train.lr": "-1e-3",
    "train.min_lr": "1.0", "train.warmup_iters": "-1", "train.lr_decay_iters": "-1", "train.weight_decay": "-0.1",
    "train.beta1": "1.0", "train.beta2": "1.5", "train.grad_clip": "-1.0", "train.seed": "-1",
    "train.device": '"tpu"', "train.dtype": '"float8"', "train.compile": None, "train.threads": "-1",
    "train.eval_interval": "0", "train.eval_iters": "0", "train.log_interval": "0", "train.ckpt_interval": "-1",
    "train.keep_last": "0", "train.max_bad_steps": "0", "train.parallel": '"zero3"',
    "train.check_memory": None, "train.init_from": '"runs/nowhere"',
    "context.aggregate": "2", "context.segments": "-1", "context.soft": "-1", "context.segment_len": "0",
    "context.segment_growth": "0", "context.aggregate_all": None, "context.op": '"max"', "context.decay": "1.0",
    "context.project": None, "context.kind_embeddings": None, "context.max_history": "-1",
    "context.soft_fill": '"twice"', "context.fill_draw": "1.5", "context.shift_every": "0",
    "context.memory": '"pause"',
    "task.name": '"chess"', "task.render": '"latex"', "task.mode": '"tree"', "task.thoughts_per_step": "0",
    "task.max_stage": "-1", "task.stage_iters": "-1", "task.pauses": "-1", "task.eval_examples": "0",
    "task.max_answer_tokens": "0", "task.recall_iters": "-1", "task.recall_pairs": "63", "task.depth_iters": "-1",
    "task.depths": "[2, 2]", "task.recall_every": "1", "task.recall_lr": "2.0", "task.stage_reset": "true",
    "rl.init_from": None, "rl.policy": '"greedy"', "rl.group_size": "1", "rl.inner_steps": "0", "rl.clip": "1.0",
    "rl.kl_coef": "-1.0", "rl.sigma": "0.0", "rl.temperature": "0.0", "rl.eval_samples": "0",
    "rl.reward": '"beauty"', "rl.scale_advantages": None, "rl.loss_average": '"mean"', "rl.chain": '"sideways"',
}
FIELDS = {f"{s}.{k}": type(v) for s, sec in Config().to_dict().items() for k, v in sec.items()}


def wrong_type(key: str) -> str:
    return {int: '"abc"', float: '"abc"', bool: '"yes"', str: "7", dict: "7", list: "7"}[FIELDS[key]]


def snapshot(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run_cli(args, capsys) -> str:
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("softar: error: "), err
    return err[0]


def test_every_config_key_is_covered():
    assert set(OUT_OF_RANGE) == set(FIELDS)


@pytest.mark.parametrize("key", sorted(FIELDS))
def test_config_key_wrong_type_and_out_of_range(key, char_data, tmp_path, capsys):
    base = ["train", CONFIG, *tiny_overrides(char_data), "--quiet", "--out", tmp_path / "run"]
    assert key in run_cli([*base, f"{key}={wrong_type(key)}"], capsys)
    if OUT_OF_RANGE[key] is not None:
        line = run_cli([*base, f"{key}={OUT_OF_RANGE[key]}"], capsys)
        assert line.startswith(f"softar: error: {key}")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def run_dir(char_data, tmp_path_factory):
    from softar import config

    out = tmp_path_factory.mktemp("bad") / "run"
    train(config.load(None, tiny_overrides(char_data)), out, quiet=True)
    return out


CASES = [
    (["prepare", "--corpus", "{tmp}/missing.txt", "--out", "{tmp}/d"], "corpus not found"),
    (["prepare", "--tokenizer", "wordpiece", "--out", "{tmp}/d"], "--tokenizer"),
    (["prepare", "--vocab-size", "-5", "--out", "{tmp}/d"], "--vocab-size"),
    (["prepare", "--vocab-size", "many", "--out", "{tmp}/d"], "--vocab-size"),
    (["prepare", "--tokenizer", "bpe", "--vocab-size", "100", "--out", "{tmp}/d"], "256"),
    (["prepare"], "--out"),
    (["prepare", "--corpus", "{data}", "--out", "{tmp}/d"], "no .txt or .md files"),
    (["train", "{tmp}/missing.toml"], "config file not found"),
    (["train", CONFIG, "nonsense", "--out", "{tmp}/r"], "expected section.key=value"),
    (["train", CONFIG, "data.dir={chardata}", "--resume", "--out", "{tmp}/r"], "nothing to resume"),
    (["train", CONFIG, "data.dir={tmp}/none", "--out", "{tmp}/r"], "no prepared data"),
    (["train", CONFIG, "--bogus-flag"], "unrecognized arguments"),
    (["eval", "{tmp}/missing"], "is not a softar run"),
    (["eval", "{run}", "--split", "test"], "--split"),
    (["eval", "{run}", "--data", "{tmp}/missing"], "no prepared data"),
    (["eval", "{run}", "--data", "{bpe}"], "vocabulary mismatch"),
    (["eval", "{run}", "--device", "tpu"], "--device"),
    (["sample", "{run}", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["sample", "{run}", "--max-new-tokens", "x"], "--max-new-tokens"),
    (["sample", "{run}", "--temperature", "-1"], "--temperature"),
    (["sample", "{run}", "--temperature", "nan"], "--temperature"),
    (["sample", "{run}", "--top-k", "-1"], "--top-k"),
    (["sample", "{run}", "--seed", "-1"], "--seed"),
    (["sample", "{run}", "--seed", "4294967296"], "--seed"),
    (["eval", "{run}", "--seed", "4294967296"], "--seed"),
    (["sample", "{run}", "--keep-uncertain"], "no layout"),
    (["sample", "{run}", "--collapse-threshold", "2"], "no layout"),
    (["sample", "{run}", "--num-samples", "0"], "--num-samples"),
    (["sample", "{run}", "--device", "tpu"], "--device"),
    (["sample", "{run}", "--prompt", ""], "encodes to no tokens"),
    (["sample", "{run}", "--prompt", "\u00e9"], "not in the tokenizer's vocabulary"),
    (["sample", "{tmp}/missing"], "is not a softar run"),
    (["sample", "{run}", "--mode", "fuzzy"], "--mode"),
    (["sample", "{run}", "--mode", "soft", "--soft", "regress"], "--soft: 'regress' needs model.vector_head = true"),
    (["sample", "{run}", "--mode", "soft", "--soft", "moi", "--soft-arg", "gamma=1"], "--soft-arg: 'moi' takes beta"),
    (["sample", "{run}", "--soft-arg", "beta"], "--soft-arg: expected NAME=NUMBER"),
    (["sample", "{run}", "--hf", "{tmp}"], "give either a run directory or --hf DIR"),
    (["sample", "--hf", "{tmp}"], "holds no Hugging Face model"),
    (["sample"], "give a run directory, or --hf DIR"),
    (["sample", "{run}", "context.soft=2"], "unrecognized arguments"),
    (["sample", "{run}", "--mode", "soft", "--collapse", "head"], "needs a run trained with model.collapse_head"),
    (["sample", "{run}", "--collapse", "nearest"], "--collapse"),
    (["sample", "{run}", "--top-p", "-0.5"], "--top-p"),
    (["sample", "{run}", "--noise", "pink"], "--noise"),
    (["sample", "{run}", "--noise-scale", "-1"], "--noise-scale"),
    (["sweep", "configs/soft/char_ce.toml", "--seeds", "0"], "--seeds"),
    (["sweep", "configs/soft/char_ce.toml", "--first-seed", "4294967296"], "--first-seed"),
    (["sweep", "configs/soft/char_ce.toml", "--first-seed", "4294967295", "--seeds", "2"], "runs past train.seed"),
    (["sweep", "{tmp}/missing.toml"], "config file not found"),
    (["eval", "{run}", "--horizons", "8,x"], "--horizons"),
    (["eval", "{run}", "--horizons", "100"], "--horizons: 100 must be in"),
    (["bench", "gpu", CONFIG], "kind"),
    (["bench", "train", "{tmp}/missing.toml"], "config file not found"),
    (["bench", "train", CONFIG, "--steps", "0"], "--steps"),
    (["bench", "sample", CONFIG, "--new-tokens", "-1"], "--new-tokens"),
    (["bench", "train", CONFIG, "model.n_head=3"], "model.n_head"),
    (["bench", "faults", CONFIG, "--kills", "0"], "--kills"),
    (["quickstart", "train.lr=-1", "--data", "{tmp}/d", "--out", "{tmp}/r"], "train.lr"),
    (["quickstart", "model.n_layers=2", "--data", "{tmp}/d", "--out", "{tmp}/r"], "model.n_layers"),
    (["train", CONFIG, "data.dir={chardata}", "context.soft=40", "context.segments=24", "--out", "{tmp}/r"],
     "model.block_size: 64 slots leave no hard slot"),
    (["train", CONFIG, "data.dir={chardata}", "context.segments=1", "context.max_history=0", "--out", "{tmp}/r"],
     "context.max_history"),
    (["train", CONFIG, "data.dir={chardata}", "context.segments=1", "context.max_history=100000", "--out",
      "{tmp}/r"], "context.max_history: 100000 tokens of history"),
    (["sample", "{run}", "--collapse-threshold", "-1"], "--collapse-threshold"),
    (["sample", "{run}", "--collapse-score", "vibes"], "--collapse-score"),
    (["sample", "{run}", "--soft-budget", "-2"], "--soft-budget"),
    (["eval", "{run}", "--gap", "{tmp}/a", "{tmp}/b"], "--gap: "),
    (["eval", "{run}", "--reference", "{tmp}/missing"], "--reference: the generation report is for a run with a"),
    (["eval", "{run}", "--thresholds", "1,x"], "--thresholds"),
    (["sweep", "configs/soft/char_ce.toml", "--gap", "char_ce", "char_w128"], "'char_w128' is not one of"),
    (["inspect", "{run}", "--out", "{tmp}/missing/page.html"], "missing does not exist"),
    (["inspect", "{run}", "--out", "{tmp}/page.txt"], "must be a .html file"),
    (["inspect", "{run}", "--prompt", "\u00e9", "--out", "{tmp}/p.html"], "not in the tokenizer's vocabulary"),
    (["inspect", "{run}", "--prompt", "", "--out", "{tmp}/p.html"], "encodes to no tokens"),
    (["inspect", "{run}", "--task-example", "{tmp}/x.json:0", "--out", "{tmp}/p.html"], "needs a reasoning-task run"),
    (["inspect", "{run}", "--collapse-threshold", "2", "--out", "{tmp}/p.html"], "no layout"),
    (["inspect", "{run}", "--screenshot", "{tmp}/missing/p.png", "--out", "{tmp}/p.html"], "--screenshot"),
    (["inspect", "{run}", "--max-new-tokens", "5000", "--out", "{tmp}/p.html"], "at most 4096"),
    (["inspect", "{run}"], "--out"),
    (["inspect", "{tmp}/missing", "--out", "{tmp}/p.html"], "is not a softar run"),
    (["inspect", "{run}", "--out", "{data}"], "must be a .html file"),
    (["rl", "{tmp}/missing.toml"], "config file not found"),
    (["rl", CONFIG, "--out", "{tmp}/r"], "model: an RL run keeps the model"),
    ([], "command"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:3]) + f" [{i}]" for i, (a, _) in enumerate(CASES)])
def test_cli_flag(args, message, run_dir, char_data, small_corpus, tmp_path, capsys, tmp_path_factory):
    bpe = tmp_path_factory.getbasetemp() / "bpe_for_bad_input"
    if not bpe.exists():
        prepare(str(small_corpus), bpe, "bpe", 300)
    empty_dir = tmp_path / "empty_corpus"
    empty_dir.mkdir()
    fill = {"tmp": tmp_path, "run": run_dir, "data": empty_dir, "bpe": bpe, "chardata": char_data}
    args = [a.format(**fill) for a in args]
    before, run_before = snapshot(tmp_path), snapshot(run_dir)
    assert message in run_cli(args, capsys)
    assert snapshot(tmp_path) == before and snapshot(run_dir) == run_before


def test_eval_without_checkpoint(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints")
    assert "has no checkpoint yet" in run_cli(["eval", copy], capsys)
    assert "has no checkpoint yet" in run_cli(["inspect", copy, "--out", tmp_path / "page.html"], capsys)
    assert not (tmp_path / "page.html").exists()


def test_inspect_keeps_files_it_did_not_write(run_dir, tmp_path, capsys):
    """--out naming someone else's file (or its PAGE.json) is refused, and the file is untouched."""
    for name in ("page.html", "page.json"):
        mine = tmp_path / name
        mine.write_text("my notes")
        assert "which softar did not write" in run_cli(["inspect", run_dir, "--out", tmp_path / "page.html"],
                                                         capsys)
        assert mine.read_text() == "my notes" and len(list(tmp_path.iterdir())) == 1
        mine.unlink()
