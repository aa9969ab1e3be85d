"""bfloat16 and torch.compile against float32 eager: bfloat16 detection against the CPU's own flags, an autocast
training step and bfloat16-weight decoding within bfloat16's precision, and compiled graphs that a second process
loads from the on-disk cache instead of compiling, with the same results as eager."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from softar import config
from softar.decode import Decoding
from softar.device import autocast, bf16_hardware
from softar.soft.collapse import Sampling
from softar.soft.feeds import HardFeed
from softar.soft.model import build_model

# bfloat16 keeps 8 significant bits (a relative rounding of 2^-8 = 0.0039 per value); on this tiny model the
# per-token errors below measure 0.003-0.004 nats, and 0.02 leaves room for other CPUs' kernels
TOLERANCE = 0.02


def tiny_model(vocab: int = 96):
    torch.manual_seed(0)
    cfg = config.resolve(config.load(None, ["model.n_layer=2", "model.n_head=2", "model.d_model=64",
                                            "model.block_size=32"]), vocab)
    return build_model(cfg), torch.randint(vocab, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's /proc/cpuinfo")
def test_bf16_hardware_is_what_the_cpu_reports():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    expected = "amx" if {"amx_tile", "amx_bf16"} <= flags else "avx512_bf16" if "avx512_bf16" in flags else None
    assert bf16_hardware(torch.device("cpu")) == expected


def test_autocast_training_step_within_bfloat16_precision():
    """The same weights and batch under softAR's bfloat16 autocast: every token's loss within TOLERANCE of
    float32's, the gradients pointing the same way, and the weights still float32 (autocast rounds activations)."""
    model, x = tiny_model()
    runs = {}
    for dtype in ("float32", "bfloat16"):
        model.zero_grad()
        with autocast(torch.device("cpu"), dtype):
            logits = model(x)  # [B, T, V]
        per_token = F.cross_entropy(logits.float().flatten(0, 1), x.flatten(), reduction="none")
        per_token.mean().backward()
        runs[dtype] = per_token.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])
        assert logits.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    (l32, g32), (l16, g16) = runs["float32"], runs["bfloat16"]
    assert (l16 - l32).abs().max() < TOLERANCE
    assert F.cosine_similarity(g16, g32, dim=0) > 0.99


def test_bfloat16_weights_decode_what_float32_would():
    """`sample --dtype bfloat16`'s path: the model cast to bfloat16, greedy decoding through the ring cache. Every
    token it picks is float32's best choice within TOLERANCE, and the log-probabilities it reports are float32's
    within TOLERANCE; its logits for a whole batch of windows too."""
    model, x = tiny_model()
    model.eval()
    fast = copy.deepcopy(model).to(torch.bfloat16)
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        ref, got = (torch.log_softmax(m(x).float(), -1) for m in (model, fast))  # [B, T, V]
        assert (got - ref).abs().max() < TOLERANCE
        prompts = torch.randint(96, (4, 1), generator=torch.Generator().manual_seed(2))
        gen = Decoding(HardFeed(Sampling(temperature=0.0)), max_new_tokens=31).run(fast, prompts)
        seq = torch.tensor(gen.sequences())  # [4, 32]: the whole window, so float32 can score it in one pass
        logp = torch.log_softmax(model(seq[:, :-1]), -1)  # [4, 31, V]
    chosen = logp.gather(-1, seq[:, 1:, None])[..., 0]
    assert (logp.max(-1).values - chosen).max() < TOLERANCE
    assert (gen.logprobs - chosen).abs().max() < TOLERANCE


COMPILE_SCRIPT = """
import softar
softar.use_compile_cache()  # first, as the `softar` command does: the first use of Inductor fixes its folder
import torch
from softar import config
from torch._dynamo.utils import counters
from softar.soft.model import build_model
torch.manual_seed(0)
cfg = config.resolve(config.load(None, ["model.n_layer=1", "model.n_head=2", "model.d_model=32",
                                        "model.block_size=16"]), 50)
model = build_model(cfg)
x = torch.randint(50, (2, 16), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    eager, fast = model(x, targets=x)[0], torch.compile(model)(x, targets=x)[0]
torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-6)
print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


def test_compiled_graphs_are_reused_by_the_next_process(tmp_path):
    """Two processes compile the same model: the first builds its graph into softAR's cache folder (under
    XDG_CACHE_HOME, not torch's /tmp default), the second loads it from there (Inductor's hit counter), and both
    equal eager."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"} | {"XDG_CACHE_HOME": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    assert [r.stdout.split() for r in runs] == [["0", "1"], ["1", "0"]]
    assert any((tmp_path / "softar" / "inductor").iterdir())
