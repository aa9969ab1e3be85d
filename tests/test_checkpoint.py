import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from softar import SoftarError
from softar.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
)


def tensors(value: float) -> dict:
    return {"model": {"w": torch.full((4, 4), value), "b": torch.arange(3.0) + value}}


def test_round_trip_latest_and_pruning(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, tensors(step), {"step": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000003", "step_000004"]
    ckpt = load_checkpoint(latest_checkpoint(tmp_path))
    assert ckpt.meta == {"step": 4}
    assert torch.equal(ckpt.tensors["model"]["w"], torch.full((4, 4), 4.0))


def test_optimizer_state_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    t, plain = optimizer_to_tensors(opt.state_dict())
    save_checkpoint(tmp_path, 1, {"optimizer": t}, {"optimizer": plain}, keep_last=1)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path))
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    plain = json.loads(json.dumps(ckpt.meta["optimizer"]))
    opt2.load_state_dict(optimizer_from_tensors(ckpt.tensors["optimizer"], plain))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for k in a["state"][i])


def test_sha256_mismatch_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, tensors(1.0), {"step": 1}, keep_last=1)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(SoftarError, match="sha256 mismatch for model.safetensors"):
        load_checkpoint(path)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_planted_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = save_checkpoint(tmp_path / "ck", 1, tensors(1.0), {"step": 1}, keep_last=1)
    torch.save({"w": Payload()}, path / "model.safetensors")
    manifest = json.loads((path / "manifest.json").read_text())  # the attacker fixes the manifest too
    from softar.disk import sha256_file

    manifest["sha256"]["model.safetensors"] = sha256_file(path / "model.safetensors")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SoftarError, match="not a valid safetensors file"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


WRITER = textwrap.dedent("""
    import sys, time, pathlib, torch
    import softar.checkpoint as ck
    import softar.disk as dk
    root, block_at = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    ck.save_checkpoint(root, 1, {"model": {"w": torch.ones(64, 64)}}, {"step": 1}, keep_last=3)
    real, calls = ck.fsync_path, [0]
    def fsync_then_maybe_hang(path):
        real(path)
        calls[0] += 1
        if calls[0] == block_at:
            (root.parent / "ready").touch()
            time.sleep(600)
    ck.fsync_path = dk.fsync_path = fsync_then_maybe_hang
    ck.save_checkpoint(root, 2, {"model": {"w": torch.zeros(64, 64)}}, {"step": 2}, keep_last=3)
    (root.parent / "ready").touch()
""")


@pytest.mark.parametrize("block_at", [1, 3, 5, 6, 99])
def test_kill_during_checkpoint_write_leaves_a_loadable_latest(tmp_path, block_at):
    """SIGKILL a real writer at several points of the second save: latest is always loadable, and is the second
    checkpoint only once that one is complete."""
    root = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(block_at)])
    deadline = time.monotonic() + 120
    while not (tmp_path / "ready").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL) if proc.poll() is None else None
    proc.wait(timeout=30)
    ckpt = load_checkpoint(latest_checkpoint(root))
    assert ckpt.meta["step"] in (1, 2)
    assert torch.equal(ckpt.tensors["model"]["w"], torch.full((64, 64), 1.0 if ckpt.meta["step"] == 1 else 0.0))
    if block_at == 99:  # never blocked: the write completed
        assert ckpt.meta["step"] == 2
    save_checkpoint(root, 3, {"model": {"w": torch.zeros(1)}}, {"step": 3}, keep_last=3)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # leftovers of the killed write are gone
