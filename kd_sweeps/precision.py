"""Which precision a run computes in: ``train.precision`` and the embedded models' ``prep_precision``.

``auto`` (the default) is bf16 where the device computes it natively and fp32 elsewhere: bf16
autocast on a CPU without bf16 instructions is emulated, about 3x SLOWER than fp32 (a 3-layer
Qwen3 step, batch 32 x 160: 587 ms vs 190 ms, measured 2026-12-01 on a Xeon with AVX-512F but no
AVX512-BF16), while on CPUs with AVX512-BF16 or AMX and on bf16 GPUs it is the faster choice.

Whatever the choice, a trained student's master weights and optimizer state stay fp32: bf16 is a
compute dtype only (autocast, or FSDP2's mixed-precision policy). A bf16 master copy would lose
fine-tuning updates: at lr 4e-6 an update is below half of bf16's rounding step for any weight
above ~2e-3 (8 significant bits), so most weights would never move.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd_sweeps.choices import Precision, values

PRECISIONS = values(Precision)
# /proc/cpuinfo flags of x86 CPUs that compute bf16 natively (AVX512-BF16 dot products, AMX tiles).
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where that file does not exist.
    (torch tells the vector width it dispatches to, ``torch.backends.cpu.get_cpu_capability()``,
    but not whether bf16 instructions are there.)"""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_bf16(device) -> bool:
    """Whether ``device`` computes bf16 natively (not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        # including_emulation=False: a pre-Ampere GPU "supports" bf16 only by emulating it, slowly.
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)
    return False


def resolve(precision: str, device) -> str:
    """``bf16`` or ``fp32``: the precision ``auto`` means on ``device``; explicit choices are kept."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {', '.join(PRECISIONS)}")
    return precision


def default_device(requested: str = "auto") -> torch.device:
    """The device ``train.device`` picks (auto | cpu | cuda), without starting a process group."""
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")
