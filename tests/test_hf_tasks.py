"""Reasoning tasks on a Hugging Face model (model.hf): task records tokenized with the model's own tokenizer, the
task's markers added as special tokens (the embeddings grow), every mode trained, solved with and without the cache,
evaluated, exported and fine-tuned by RL; free-text records (`qa`). Tiny random GPT-2 (tied head, its own EOS) and
Llama (untied head, no EOS) with a word-level tokenizer of the task's words, built here: nothing is downloaded."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
import transformers  # noqa: E402
from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402

from softar import cli, config  # noqa: E402
from softar.evaluate.reasoning import TaskData, solve, task_loss_on  # noqa: E402
from softar.rundir import load_run  # noqa: E402
from softar.soft.model import build_model  # noqa: E402
from softar.tasks.base import SPECIALS, VOCABULARY  # noqa: E402
from softar.tasks.data import prepare_task  # noqa: E402

WORDS = [w for w in VOCABULARY if w not in SPECIALS] + ["<unk>", "<|endoftext|>"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def task_hf(request, tmp_path_factory):
    """(the model folder, a small ProsQA dataset, free-text records of the same questions)."""
    root = tmp_path_factory.mktemp(f"hf_task_{request.param}")
    torch.manual_seed(0)
    if request.param == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=len(WORDS), n_positions=768, n_embd=32, n_layer=2, n_head=2,
            bos_token_id=len(WORDS) - 1, eos_token_id=len(WORDS) - 1))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=768, tie_word_embeddings=False, bos_token_id=None,
            eos_token_id=None))
    model.save_pretrained(root / "model")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]"), behavior="isolated")
    eos = {"eos_token": "<|endoftext|>"} if request.param == "gpt2" else {}
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **eos).save_pretrained(root / "model")
    prepare_task("prosqa", root / "prosqa", {"train": 64, "valid": 8, "test": 8}, seed=1)
    for split in ("train", "valid"):
        records = json.loads((root / "prosqa" / f"{split}.json").read_text())
        (root / f"qa_{split}.json").write_text(json.dumps([{k: r[k] for k in ("question", "steps", "answer")}
                                                           for r in records]))
    return root


def task_config(root, mode: str = "thoughts", task: str = "prosqa", *extra: str) -> list[str]:
    return [f'model.hf="{root / "model"}"', f'data.dir="{root / task}"', f"task.name={task}", f'task.mode="{mode}"',
            "task.max_stage=2", "task.eval_examples=4", "task.max_answer_tokens=24", "model.block_size=700",
            "train.max_iters=24", "train.batch_size=8", "train.lr=3e-3", "train.warmup_iters=2",
            "train.eval_interval=24", "train.eval_iters=1", "train.threads=1", 'soft.kind="hidden"', *extra]


def train(root, out, *overrides) -> dict:
    (root / "empty.toml").touch()  # every key is an override
    assert cli.main(["train", str(root / "empty.toml"), *overrides, "--quiet", "--out", str(out)]) == 0
    return json.loads((out / "result.json").read_text())


def test_task_markers_join_the_model_vocabulary(task_hf):
    """The five markers (and <eos> where the tokenizer has none) come after the folder's own tokens, in a fixed
    order; the embedding (and an untied head) grows by them, each new row the mean of its name's pieces' rows."""
    cfg = config.load(None, task_config(task_hf))
    data = TaskData.open(cfg)
    cfg = config.resolve(cfg, data.encoder.tok.vocab_size)
    model = build_model(cfg)
    source = transformers.AutoModelForCausalLM.from_pretrained(task_hf / "model")
    V = len(WORDS)
    ids = data.encoder.id
    own_eos = source.config.eos_token_id is not None
    assert ids["<eos>"] == (V - 1 if own_eos else V)
    assert [ids[w] for w in ("<bot>", "<eot>", "<thought>", "<pause>", "<ans>")] == \
        list(range(V + (not own_eos), V + (not own_eos) + 5))
    assert model.E.shape[0] == cfg.model.vocab_size == V + 5 + (not own_eos)
    assert model.thought_id == ids["<thought>"]
    E0 = source.get_input_embeddings().weight
    assert torch.equal(model.E[:V], E0)
    assert torch.allclose(model.E[ids["<ans>"]], E0[WORDS.index("<unk>")])  # "ans" is no word: <unk>'s row
    head = model.lm.model.get_output_embeddings().weight
    assert (head is model.E) == (source.get_output_embeddings().weight is E0)


def test_a_task_fine_tune_lowers_the_loss_and_decodes_the_same_with_and_without_the_cache(task_hf, tmp_path):
    """Coconut's curriculum on the pretrained model: the valid loss at the last stage falls below the pretrained
    model's; greedy solving through the cache equals solving that recomputes every step."""
    overrides = task_config(task_hf)
    cfg = config.load(None, overrides)
    data = TaskData.open(cfg)
    cfg = config.resolve(cfg, data.encoder.tok.vocab_size)
    before = task_loss_on(build_model(cfg), data, "valid", 2, 8, None, torch.device("cpu"))
    run_dir = tmp_path / "run"
    result = train(task_hf, run_dir, *overrides)
    assert result["stage"] == 2 and result["val_loss"] < before - 0.5
    run = load_run(run_dir, torch.device("cpu"))
    data = TaskData.open(run.cfg)
    cached = solve(run.model, data.encoder, data.examples["valid"], 2, 24)
    fresh = solve(run.model, data.encoder, data.examples["valid"], 2, 24, use_cache=False)
    assert [c["ids"] for c in cached] == [f["ids"] for f in fresh]
    for c, f in zip(cached, fresh, strict=True):
        assert c["thoughts"].shape == (2, 32) and torch.allclose(c["thoughts"], f["thoughts"], atol=1e-5)


def test_a_cot_task_run_evaluates_exports_and_trains_by_rl(task_hf, tmp_path, capsys):
    """A CoT run: `softar eval --task` scores it; its export (model and tokenizer, markers included) loads with
    transformers, whose greedy `generate` writes what softAR's solver writes; `softar rl` starts from it."""
    run_dir = tmp_path / "cot"
    train(task_hf, run_dir, *task_config(task_hf, "cot"))
    test = task_hf / "prosqa" / "test.json"
    assert cli.main(["eval", str(run_dir), "--task", "prosqa", "--data", str(test), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["examples"] == 8 and 0 <= report["accuracy"] <= 1

    export = tmp_path / "export"
    assert cli.main(["export", str(run_dir), "--hf", str(export)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    run = load_run(run_dir, torch.device("cpu"))
    data = TaskData.open(run.cfg, splits=("valid",))
    enc = data.encoder
    assert tokenizer.convert_tokens_to_ids(["<bot>", "<ans>"]) == [enc.id["<bot>"], enc.id["<ans>"]]
    assert model.get_input_embeddings().weight.shape[0] == run.model.E.shape[0]
    ours = solve(run.model, enc, data.examples["valid"][:3], 0, 24)
    for ex, solved in zip(data.examples["valid"][:3], ours, strict=True):
        prompt = torch.tensor([enc.prompt(ex, 0)])
        theirs = model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=enc.id["<eos>"],
                                pad_token_id=enc.id["<eos>"], attention_mask=torch.ones_like(prompt))
        written = theirs[0, prompt.shape[1]:].tolist()
        assert written[: len(solved["ids"])] == solved["ids"]
        assert len(written) == len(solved["ids"]) + (len(written) > len(solved["ids"]))  # then at most its <eos>

    (tmp_path / "rl.toml").write_text(f'[rl]\ninit_from = "{run_dir}"\npolicy = "hard"\ngroup_size = 2\n'
                                      "eval_samples = 1\n[train]\nmax_iters = 2\nbatch_size = 2\nlr = 1e-4\n"
                                      "warmup_iters = 1\neval_interval = 2\nthreads = 1\n[task]\neval_examples = 2\n"
                                      "max_answer_tokens = 8\n")
    assert cli.main(["rl", str(tmp_path / "rl.toml"), "--quiet", "--out", str(tmp_path / "rl")]) == 0
    assert json.loads((tmp_path / "rl" / "result.json").read_text())["step"] == 2


def test_free_text_records_train_a_pretrained_model(task_hf, tmp_path, capsys):
    """`softar task prepare qa --files`: the user's {question, steps, answer} records, checked and stored; a pause
    run on the model's tokenizer trains on them. Broken files, and qa without model.hf, are one line, exit 2."""
    qa = task_hf / "qa"
    if not qa.exists():
        assert cli.main(["task", "prepare", "qa", "--out", str(qa), "--files", f"train={task_hf / 'qa_train.json'}",
                         f"valid={task_hf / 'qa_valid.json'}"]) == 0
        meta = json.loads(capsys.readouterr().out)
        assert meta["counts"] == {"train": 64, "valid": 8} and meta["vocab_size"] == 0
    result = train(task_hf, tmp_path / "qa_run", *task_config(task_hf, "pause", "qa", "task.pauses=2"))
    assert result["stage"] == 0 and result["val_loss"] < 5

    def refused(args, message):
        assert cli.main([str(a) for a in args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "Is Tom a wumpus ?", "steps": "no list", "answer": "yes"}]))
    refused(["task", "prepare", "qa", "--out", tmp_path / "q", "--files", f"train={bad}", f"valid={bad}"],
            "'steps' must be list")
    bad.write_text(json.dumps([{"question": "", "steps": [], "answer": "yes"}]))
    refused(["task", "prepare", "qa", "--out", tmp_path / "q", "--files", f"train={bad}", f"valid={bad}"],
            "must not be empty")
    refused(["task", "prepare", "qa", "--out", tmp_path / "q", "--files", f"train={bad}"], "expected train=FILE")
    refused(["task", "prepare", "qa", "--out", tmp_path / "q"], "--files train=T.json")
    refused(["task", "prepare", "prosqa", "--out", tmp_path / "q", "--files", f"train={bad}"], "free-text task")
    assert not (tmp_path / "q").exists()
    no_hf = [o for o in task_config(task_hf, "cot", "qa") if not o.startswith("model.hf")]
    refused(["train", task_hf / "empty.toml", *no_hf, "--out", tmp_path / "x"], "set model.hf")
    refused(["task", "audit", qa], "no options")


def test_bfloat16_weights_and_what_a_pretrained_task_run_refuses(task_hf, tmp_path, capsys):
    """model.dtype = bfloat16 keeps the weights (and checkpoints) in bfloat16; the recall warm-up (softAR's own
    vocabulary), model.dtype without model.hf, and gradient checkpointing of thoughts (transformers drops the cache
    they train through) are refused."""
    run_dir = tmp_path / "bf16"
    train(task_hf, run_dir, *task_config(task_hf, "cot", "prosqa", "model.dtype=bfloat16", "train.max_iters=2"))
    run = load_run(run_dir, torch.device("cpu"))
    assert {p.dtype for p in run.model.lm.parameters()} == {torch.bfloat16}
    for extra, message in ((["task.recall_iters=5"], "task.recall_iters"),
                           (["model.hf=''", "model.dtype=bfloat16"], "model.dtype"),
                           (['task.mode="thoughts"', "train.checkpointing=true"], "drops the KV cache")):
        assert cli.main(["train", str(task_hf / "empty.toml"), *task_config(task_hf, "cot"), *extra, "--out",
                         str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_the_coconut_recipe_loads(task_hf):
    """configs/hf/coconut_prosqa.toml states Coconut's schedule: 6 stages of 664 steps, 6,640 in all."""
    cfg = config.load(Path(__file__).parents[1] / "configs" / "hf" / "coconut_prosqa.toml",
                      [f'model.hf="{task_hf / "model"}"', f'data.dir="{task_hf / "prosqa"}"'])
    assert (cfg.task.mode, cfg.task.max_stage, cfg.task.stage_iters, cfg.train.max_iters) == ("thoughts", 6, 664, 6640)
    assert cfg.train.batch_size * cfg.train.grad_accum == 128 and cfg.soft.kind == "hidden"
