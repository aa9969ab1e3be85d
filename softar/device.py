"""Device, precision and thread settings shared by train, eval, sample and bench."""

from __future__ import annotations

import contextlib

import torch

from softar import SoftarError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SoftarError("device 'cuda' requested (train.device or --device), but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for; float32 runs without any autocast context."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
