"""A Hugging Face causal LM as a VectorLM: tiny random GPT-2 and Llama models built here and saved with
save_pretrained (nothing is downloaded). Greedy hard decoding equals transformers' own `generate`; cached soft
generation equals uncached; `softar sample --hf` runs every mode and a context layout."""

import json
import os

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
