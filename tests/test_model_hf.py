"""A Hugging Face causal LM as a VectorLM: tiny random GPT-2 and Llama models built here and saved with
save_pretrained (nothing is downloaded). Greedy hard decoding equals transformers' own `generate`; cached soft
generation equals uncached; `softar sample --hf` runs every mode and a context layout."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
import transformers  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

from softar import cli  # noqa: E402
from softar.config import SoftConfig  # noqa: E402
from softar.model import VectorLM  # noqa: E402
from softar.rundir import load_hf  # noqa: E402

from .conftest import decoding

CHARS = list("abcdefghijklmnopqrstuvwxyz .,:\n") + ["<unk>"]


def tiny(kind: str):
    torch.manual_seed(0)
    V = len(CHARS)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      initializer_range=0.3)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.3)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    tiny(request.param).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return path


def test_greedy_hard_decoding_equals_transformers_generate(hf_dir):
    run = load_hf(hf_dir, torch.device("cpu"))
    assert isinstance(run.model.lm, VectorLM) and run.model.window_slots == 64
    prompt = torch.tensor([run.tokenizer.encode("to be or not")])
    ours = decoding(temperature=0, max_new_tokens=20).run(run.model, prompt).full()
    theirs = run.model.lm.model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0,
                                         attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", ["expected", "gated", "moi"])
def test_batched_soft_generation_equals_one_at_a_time(hf_dir, kind):
    """A Hugging Face network runs the engine's recomputing path: prompts of different lengths in one batch give
    what each gives alone."""
    run = load_hf(hf_dir, torch.device("cpu"))
    prompts = [run.tokenizer.encode("the king"), run.tokenizer.encode("a queen and ")]
    dec = decoding(mode="soft", temperature=1.0, collapse="lm_sample", soft=SoftConfig(kind=kind), max_new_tokens=16)
    batch = dec.run(run.model, prompts, seed=1, return_vectors=True)
    for i, p in enumerate(prompts):
        alone = dec.run(run.model, [p], seed=1 + i, return_vectors=True)
        assert torch.equal(batch.tokens[i], alone.tokens[0])
        torch.testing.assert_close(batch.vectors[i], alone.vectors[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args", [["--mode", "hard"], ["--mode", "soft", "--soft", "expected"],
                                  ["--mode", "soft", "--soft", "gated"],
                                  ["--mode", "soft", "--soft", "moi", "--soft-arg", "beta=2", "--collapse",
                                   "lm_sample", "--show-soft"],
                                  ["context.aggregate=1", "context.segments=1", "context.segment_len=8",
                                   "context.soft=3", "model.block_size=24", "--mode", "soft",
                                   "--collapse-threshold", "2.5", "--show-soft"]])
def test_sample_cli_on_a_hugging_face_model(hf_dir, args, capsys):
    assert cli.main(["sample", "--hf", str(hf_dir), *args, "--prompt", "to be", "--max-new-tokens", "30",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("to be") and len(out.out.splitlines()[0]) > len("to be")
    if "context.soft=3" in args:
        assert "collapse rate" in out.err and "segment0" in out.out


def test_hf_layout_overrides_are_checked(hf_dir, capsys):
    assert cli.main(["sample", "--hf", str(hf_dir), "train.lr=1", "--device", "cpu"]) == 2
    assert "only context.*, soft.* and model.block_size" in capsys.readouterr().err
    assert cli.main(["sample", "--hf", str(hf_dir), "model.block_size=999", "--device", "cpu"]) == 2
    assert "more than the 64 positions" in capsys.readouterr().err


def test_hf_folders_that_would_run_on_random_weights_are_refused(hf_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    empty = tmp_path / "empty_weights"
    shutil.copytree(hf_dir, empty)
    for f in empty.glob("*.safetensors"):
        f.unlink()
    save_file({}, str(empty / "model.safetensors"))
    assert cli.main(["sample", "--hf", str(empty), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks weights the model needs" in err[0], err
    pickled = tmp_path / "pickled"
    shutil.copytree(hf_dir, pickled)
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    assert cli.main(["sample", "--hf", str(pickled), "--device", "cpu"]) == 2
    assert "only safetensors are loaded" in capsys.readouterr().err
    notok = tmp_path / "no_tokenizer"  # would have decoded with a 1-token stand-in and printed nothing
    shutil.copytree(hf_dir, notok)
    for f in notok.iterdir():
        if f.name not in ("config.json", "generation_config.json") and f.suffix != ".safetensors":
            f.unlink()
    assert cli.main(["sample", "--hf", str(notok), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no tokenizer" in err[0], err
    fifo = tmp_path / "fifo"  # a FIFO where a file is read would hang the reader
    shutil.copytree(hf_dir, fifo)
    (fifo / "config.json").unlink()
    os.mkfifo(fifo / "config.json")
    assert cli.main(["sample", "--hf", str(fifo), "--device", "cpu"]) == 2
    assert "is neither a regular file nor a folder" in capsys.readouterr().err
    assert cli.main(["sample", "--hf", "gpt2", "--device", "cpu"]) == 2  # a hub id: nothing is downloaded
    assert "not a local folder" in capsys.readouterr().err


def test_inspect_on_a_hugging_face_model(hf_dir, tmp_path, capsys):
    page = tmp_path / "page.html"
    assert cli.main(["inspect", "--hf", str(hf_dir), "context.aggregate=1", "context.segments=1",
                     "context.segment_len=8", "context.soft=3", "model.block_size=24", "--mode", "soft",
                     "--collapse-threshold", "2.5", "--prompt", "to be", "--max-new-tokens", "30", "--device", "cpu",
                     "--out", str(page)]) == 0
    payload = json.loads(page.with_suffix(".json").read_text())
    assert len(payload["tokens"]) == 5 + 30 and payload["run"]["model"]["n_layer"] == 2
    assert payload["metrics"]["curves"] == {} and {"segment", "soft"} <= {t["tier"] for t in payload["tokens"]}



# -- model.hf: a pretrained model trained, evaluated, resumed and exported like softAR's own -------------------------
@pytest.fixture(scope="module")
def hf_data(hf_dir, tmp_path_factory):
    """Shakespeare's first 20,000 characters, lower-cased, tokenized with the folder's own tokenizer."""
    from softar.data.corpus import shakespeare_text
    from softar.data.prepare import prepare

    root = tmp_path_factory.mktemp("hf_data")
    (root / "corpus.txt").write_text(shakespeare_text()[:20_000].lower())
    prepare(str(root / "corpus.txt"), root / "data", "hf", hf=hf_dir)
    return root / "data"


def hf_train(hf_dir, data, out, *extra) -> list[str]:
    """`softar train` of the folder's model on `data`: 8 steps of 8 windows of 32 tokens."""
    config = Path(__file__).parents[1] / "configs" / "shakespeare_char.toml"
    return ["train", str(config), f'model.hf="{hf_dir}"', f'data.dir="{data}"',
            "model.block_size=32", "train.batch_size=8", "train.max_iters=8", "train.lr_decay_iters=8",
            "train.eval_interval=4", "train.eval_iters=2", "train.warmup_iters=2", "train.lr=3e-3", "train.threads=1",
            *extra, "--quiet",
            "--out", str(out)]


def pretrained_val_loss(hf_dir, data) -> float:
    """The pretrained model's own loss on the val split (windows of 33 tokens), by transformers."""
    import numpy as np

    val = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64))
    windows = val[: len(val) // 33 * 33].view(-1, 33)
    with torch.no_grad():
        return float(transformers.AutoModelForCausalLM.from_pretrained(hf_dir)(windows, labels=windows).loss)


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_hugging_face_model_trains_resumes_and_exports(hf_dir, hf_data, tmp_path, capsys):
    """model.hf: fine-tuning lowers the val loss; a run stopped at step 4 and resumed ends where the straight run
    ends; the export loads with transformers, whose greedy `generate` equals softAR's greedy decoding of the run."""
    straight = tmp_path / "straight"
    assert cli.main(hf_train(hf_dir, hf_data, straight)) == 0
    result = last_json(capsys)
    assert result["val_loss"] < pretrained_val_loss(hf_dir, hf_data) - 0.1
    record = json.loads((straight / "run.json").read_text())["hf"]
    assert record["path"] == str(hf_dir) and len(record["sha256"]) == 64
    config = json.loads((straight / "config.json").read_text())["model"]
    assert (config["n_layer"], config["d_model"], config["vocab_size"]) == (2, 32, len(CHARS))

    halves = tmp_path / "halves"
    assert cli.main(hf_train(hf_dir, hf_data, halves, "train.max_iters=4")) == 0
    capsys.readouterr()
    assert cli.main(hf_train(hf_dir, hf_data, halves) + ["--resume"]) == 0
    assert last_json(capsys)["val_loss"] == result["val_loss"]

    export = tmp_path / "export"
    assert cli.main(["export", str(straight), "--hf", str(export)]) == 0
    assert last_json(capsys)["step"] == 8
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    prompt = torch.tensor([tokenizer.encode("to be or not", add_special_tokens=False)])
    theirs = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0,
                            attention_mask=torch.ones_like(prompt))
    from softar.rundir import load_run

    run = load_run(straight, torch.device("cpu"))
    assert torch.equal(decoding(temperature=0, max_new_tokens=20).run(run.model, prompt).full(), theirs)
    assert cli.main(["export", str(straight), "--hf", str(export)]) == 2  # never over a folder
    assert "not an empty folder" in capsys.readouterr().err


def test_a_hugging_face_run_fine_tunes_with_a_layout_and_evaluates(hf_dir, hf_data, tmp_path, capsys):
    """train.init_from an HF run with summary slots and soft tokens added; `softar eval` and `sample` read it."""
    base = tmp_path / "base"
    assert cli.main(hf_train(hf_dir, hf_data, base, "train.max_iters=4")) == 0
    tuned = tmp_path / "tuned"
    assert cli.main(hf_train(hf_dir, hf_data, tuned, "train.max_iters=4", f'train.init_from="{base}"',
                             "context.aggregate=1", "context.segments=1", "context.segment_len=8",
                             "model.block_size=24")) == 0
    capsys.readouterr()
    assert json.loads((tuned / "run.json").read_text())["init_from"]["step"] == 4
    assert cli.main(["eval", str(tuned), "--windows", "2", "--horizons", "2", "--device", "cpu"]) == 0
    assert math.isfinite(last_json(capsys)["loss"])
    assert cli.main(["sample", str(tuned), "--prompt", "to be", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("to be")


def test_a_hugging_face_model_needs_its_own_tokens_and_folder(hf_dir, hf_data, char_data, tmp_path, capsys):
    """Data tokenized otherwise, a hub id, and a folder changed after training: one line each, exit 2."""
    import shutil

    def refused(args, message):
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("softar: error: ") and message in err[0], err

    refused(hf_train(hf_dir, char_data, tmp_path / "a"), "was not tokenized with the tokenizer of model.hf")
    refused(hf_train("gpt2", hf_data, tmp_path / "b"), "not a local folder")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    copy = tmp_path / "copy"
    shutil.copytree(hf_dir, copy)
    assert cli.main(hf_train(copy, hf_data, tmp_path / "run", "train.max_iters=2")) == 0
    (copy / "generation_config.json").write_text("{}")
    refused(["eval", str(tmp_path / "run"), "--windows", "2", "--device", "cpu"], "is not the folder")
    refused(["export", str(tmp_path / "run"), "--hf", str(tmp_path / "out")], "is not the folder")
    refused(["prepare", "--tokenizer", "hf", "--out", str(tmp_path / "d")], "--tokenizer hf needs --hf DIR")


def test_sampling_stops_at_the_tokenizers_eos_and_starts_with_its_bos(tmp_path, capsys):
    """A tokenizer with BOS ('x', added before every prompt) and EOS (a token greedy decoding reaches after a few
    steps): `softar sample --hf` reads the prompt as the tokenizer encodes it and stops where
    `transformers.generate` stops, at EOS, before its token limit."""
    from tokenizers import processors

    model = tiny("llama")
    bos = CHARS.index("x")
    prompt = torch.tensor([[bos, *(CHARS.index(c) for c in "to be")]])
    free = model.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=None,
                          attention_mask=torch.ones_like(prompt))[0, prompt.shape[1]:].tolist()
    eos = next(t for i, t in enumerate(free) if i >= 4 and t not in free[:i] and CHARS[t] != "<unk>")
    path = tmp_path / "eos"
    model.generation_config.eos_token_id = model.config.eos_token_id = eos
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="x $A", special_tokens=[("x", bos)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="x",
                                                eos_token=CHARS[eos])
    fast.save_pretrained(path)
    assert fast("to be")["input_ids"] == prompt[0].tolist()
    theirs = model.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0,
                            attention_mask=torch.ones_like(prompt))[0].tolist()
    assert theirs[-1] == eos and len(theirs) < prompt.shape[1] + 40
    assert cli.main(["sample", "--hf", str(path), "--prompt", "to be", "--temperature", "0", "--max-new-tokens",
                     "40", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == fast.decode(theirs)


def block_calls(model, first_block, vectors) -> int:
    """How many module calls inside the first block one training forward and backward make (transformers checkpoints
    a block's `forward`, so what runs again in backward is inside it)."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in first_block.modules()
             if m is not first_block]
    model.train()
    model.lm.hidden(vectors).last.sum().backward()
    for hook in hooks:
        hook.remove()
    return len(calls)


def test_activation_checkpointing_of_a_hugging_face_model(hf_dir, hf_data, tmp_path, capsys):
    """train.checkpointing turns on the model's own checkpointing (its blocks run again in backward); a run ends
    with the same weights as without."""
    from safetensors.torch import load_file

    run = load_hf(hf_dir, torch.device("cpu"))
    first = next(m for m in run.model.lm.model.modules() if isinstance(m, torch.nn.ModuleList))[0]
    vectors = run.model.E[torch.tensor([[1, 2, 3, 4]])].detach()
    once = block_calls(run.model, first, vectors)
    run.model.lm.checkpoint_activations()
    assert block_calls(run.model, first, vectors) > once  # ran again in backward
    weights = []
    for on in ("false", "true"):
        out = tmp_path / on
        assert cli.main(hf_train(hf_dir, hf_data, out, "train.max_iters=3", f"train.checkpointing={on}")) == 0
        name = (out / "checkpoints" / "latest").read_text().strip()
        weights.append(load_file(str(out / "checkpoints" / name / "model.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("layout", [[], ["context.aggregate=1", "context.segments=1", "context.segment_len=8",
                                         "context.soft=3", "model.block_size=24"]])
def test_cached_decoding_equals_recomputing_every_window(hf_dir, layout):
    """The decode loop's cache for a Hugging Face model (appended each step, a recomputed window written back when
    the window slides or the hierarchy moves, rows of different prompt lengths masked apart) gives what recomputing
    every window gives: greedy tokens for 150 steps, past the model's 64 positions, and soft feedback's vectors.
    (Soft feedback is followed for 10 steps only: these random models have weights 15x GPT-2's, so a difference in
    the last float bit doubles every step or two once it feeds back, cached or not.)"""
    run = load_hf(hf_dir, torch.device("cpu"), layout)
    prompts = [run.tokenizer.encode(t) for t in ("the king", "a queen and ", "to be or")]
    for dec in (decoding(temperature=0, max_new_tokens=150),
                decoding(mode="soft", temperature=1.0, collapse="lm_sample", max_new_tokens=10)):
        cached = dec.run(run.model, prompts, seed=1, return_vectors=True, return_logits=True)
        recomputed = dec.run(run.model, prompts, seed=1, return_vectors=True, return_logits=True, use_cache=False)
        assert torch.equal(cached.tokens, recomputed.tokens)
        torch.testing.assert_close(cached.vectors, recomputed.vectors, rtol=1e-3, atol=1e-4)  # sums reordered
        torch.testing.assert_close(cached.logits, recomputed.logits, rtol=1e-3, atol=1e-3)


def test_bench_sample_times_a_hugging_face_model_beside_its_generate(hf_dir, tmp_path, capsys):
    assert cli.main(["bench", "sample", "--hf", str(hf_dir), "--new-tokens", "20", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_sample.json").read_text())
    assert result["new_tokens"] == 20 and result["hf"] == str(hf_dir)
    assert all(result[k] > 0 for k in ("tokens_per_s_batch1", "tokens_per_s_no_cache", "hf_tokens_per_s_batch1"))
    assert cli.main(["bench", "train", "--hf", str(hf_dir), "--out", str(tmp_path)]) == 2
    assert "goes with `softar bench sample` alone" in capsys.readouterr().err


def test_lora_trains_adapters_alone_and_exports_them_merged(hf_dir, hf_data, tmp_path, capsys):
    """model.lora_rank: the pretrained weights stay as they were, the adapters move, the val loss falls; the export
    folds the adapters in, and its greedy `generate` equals softAR's greedy decoding of the run."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    assert cli.main(hf_train(hf_dir, hf_data, out, "model.lora_rank=4", "train.lr=1e-2")) == 0
    tuned = last_json(capsys)["val_loss"]
    name = (out / "checkpoints" / "latest").read_text().strip()
    trained = load_file(str(out / "checkpoints" / name / "model.safetensors"))
    pretrained = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
    base = {k: v for k, v in trained.items() if ".base_layer." in k}
    adapters = {k: v for k, v in trained.items() if "lora_B" in k}
    assert base and adapters
    for key, value in base.items():  # lm.model.transformer.h.0.attn.c_attn.base_layer.weight -> its original name
        assert torch.equal(value, pretrained[key.removeprefix("lm.model.").replace(".base_layer", "")])
    assert all(v.abs().sum() > 0 for v in adapters.values())  # lora_B starts at zero
    assert tuned < pretrained_val_loss(hf_dir, hf_data) - 0.05
    export = tmp_path / "export"
    assert cli.main(["export", str(out), "--hf", str(export)]) == 0
    capsys.readouterr()
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert not any("lora" in k for k in model.state_dict())
    prompt = torch.tensor([[1, 2, 3, 4]])
    theirs = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0,
                            attention_mask=torch.ones_like(prompt))
    from softar.rundir import load_run

    run = load_run(out, torch.device("cpu"))
    ours = decoding(temperature=0, max_new_tokens=20).run(run.model, prompt).full()
    assert torch.equal(ours, theirs)


def test_the_folder_is_one_however_it_is_spelled_and_its_shape_is_its_own(hf_dir, hf_data, tmp_path, capsys,
                                                                           monkeypatch):
    """model.hf is recorded as an absolute path (a run evaluates from any folder) and a resume names it any way;
    a shape key that contradicts the folder, a bench --out inside it, more new tokens than its window, and an export
    onto a link are refused in one line."""
    import shutil

    monkeypatch.chdir(hf_dir.parent)
    out = tmp_path / "run"
    assert cli.main(hf_train(hf_dir.name, hf_data, out, "train.max_iters=2")) == 0
    capsys.readouterr()
    assert json.loads((out / "config.json").read_text())["model"]["hf"] == str(hf_dir)
    assert cli.main(hf_train(f"./{hf_dir.name}/../{hf_dir.name}", hf_data, out, "train.max_iters=3") +
                    ["--resume"]) == 0
    moved = tmp_path / "moved"  # the same files elsewhere: the checksum says it is the same model
    shutil.copytree(hf_dir, moved)
    assert cli.main(hf_train(moved, hf_data, out, "train.max_iters=4") + ["--resume"]) == 0
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", str(out), "--windows", "2", "--horizons", "2", "--device", "cpu"]) == 0
    capsys.readouterr()

    def refused(args, message):
        assert cli.main([str(a) for a in args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    refused(hf_train(hf_dir, hf_data, tmp_path / "r2", "model.n_layer=7"), "model.n_layer: 7 differs from the 2")
    refused(["bench", "sample", "--hf", hf_dir, "--out", hf_dir / "bench"], "inside the model folder")
    refused(["bench", "sample", "--hf", hf_dir, "--new-tokens", "64", "--out", tmp_path / "b"], "at most 63")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    refused(["export", out, "--hf", tmp_path / "link"], "a symbolic link")
    refused(["sample", "--hf", tmp_path / "gone" / "model", "--device", "cpu"], "it does not exist")
    assert not (hf_dir / "bench").exists() and not (tmp_path / "nowhere").exists()
