"""bfloat16 and torch.compile against float32 eager: bfloat16 detection against the CPU's own flags, an autocast
training step and bfloat16-weight decoding within bfloat16's precision, and compiled graphs that a second process
loads from the on-disk cache instead of compiling, with the same results as eager."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softar import config
from softar.device import bf16_hardware
from softar.soft.model import build_model

# bfloat16 keeps 8 significant bits: a relative rounding error of 2^-8 = 0.0039 per value
BF16_EPS = 2.0**-8


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
    """The same weights and batch: the bfloat16-autocast loss within a few bf16 roundings of float32's, and the
    gradients pointing the same way (float32 weights and optimizer either way: autocast rounds activations only)."""
    model, x = tiny_model()
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss, _ = model(x, targets=x)
        loss.backward()
        grads[dtype] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert all(p.dtype == torch.float32 for p in model.parameters())
    (l32, g32), (l16, g16) = grads[torch.float32], grads[torch.bfloat16]
    assert abs(l16 - l32) <= 4 * BF16_EPS * l32
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


def test_bfloat16_weights_decode_like_float32():
    """A model cast to bfloat16 for decoding: its log-probabilities within bf16's precision of float32's."""
    model, x = tiny_model()
    model.eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(x)[0].float(), -1)
        got = torch.log_softmax(model.to(torch.bfloat16)(x)[0].float(), -1)
    assert got.dtype == ref.dtype and (got - ref).abs().max() < 16 * BF16_EPS * ref.abs().max()


COMPILE_SCRIPT = """
from softar import config  # first, as `softar` itself is: the first use of Inductor fixes its cache folder
import torch
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
