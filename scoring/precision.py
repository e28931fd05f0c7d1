"""The device and the image tower's inference precision: names, the device's default, the autocast dtype.

``fp32`` runs everything in float32. ``bf16`` and ``fp16`` run the ViT blocks under
``torch.autocast`` (matmuls and convolutions in the low-precision type, reductions and
norms in float32); the backbone hands float32 features back, so the methods'
similarity heads (temperature-100 softmax, memory-bank cosine distances, whose small
differences decide a score) stay exact. ``auto`` picks per device: bf16 on a GPU that has
it (fp16 on older ones); on a CPU, bf16 where it has bf16 dot-product instructions
(AVX512-BF16 or AMX on x86, BF16 on Arm), where ``linewatch bench`` measured it at about
3x fp32's frames/s (2-core Xeon with AMX; README, Throughput); fp32 on other CPUs, where
oneDNN emulates bf16 and it does not pay.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | None) -> str:
    """``None`` -> cuda when a GPU is there, else cpu; a named device is checked."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but this torch build sees no CUDA GPU")
    return name


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` -> the device's default; other names are checked against the device."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and kind != "cuda":
        # CPU fp16 autocast has few fast kernels (slower than fp32 where we measured); a
        # user asking for it almost certainly meant bf16.
        raise ValueError(f"precision fp16 needs a CUDA device (this one is {kind}); use bf16 or fp32")
    return precision


def cpu_has_native_bf16() -> bool:
    """bf16 dot-product instructions on this CPU (Linux /proc/cpuinfo; elsewhere: assume not)."""
    try:
        with open("/proc/cpuinfo") as fh:
            words = set(" ".join(line.split(":", 1)[1] for line in fh
                                 if line.startswith(("flags", "Features")) and ":" in line).split())
    except OSError:
        return False
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision; None for fp32 (no autocast)."""
    if precision not in _DTYPES:
        raise ValueError(f"precision {precision!r} is not resolved; call resolve_precision first")
    return _DTYPES[precision]
