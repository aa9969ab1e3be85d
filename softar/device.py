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


def bf16_hardware(device: torch.device) -> str | None:
    """Which bfloat16 matmul units this device has: 'amx' (Intel since Sapphire Rapids), 'avx512_bf16' (AMD Zen 4,
    Intel Cooper Lake), 'cuda', or None where bfloat16 would be emulated (and slower than float32)."""
    if device.type == "cuda":
        return "cuda" if torch.cuda.is_bf16_supported(including_emulation=False) else None
    if device.type == "cpu":  # torch's private checks (CPUID and the OS's permission for AMX tiles)
        if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
            return "amx"
        if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
            return "avx512_bf16"
    return None


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
