"""Inference precision of the image tower: names, the device's default, the autocast dtype.

``fp32`` runs everything in float32. ``bf16`` and ``fp16`` run the ViT blocks under
``torch.autocast`` (matmuls and convolutions in the low-precision type, reductions and
norms in float32); the backbone hands float32 features back, so the methods'
similarity heads (temperature-100 softmax, memory-bank cosine distances, whose small
differences decide a score) stay exact. ``auto`` picks per device: bf16 on a GPU that has
it (fp16 on older ones), fp32 on CPU, where ``linewatch bench`` measured it (see README,
Throughput).
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` -> the device's default; other names are checked against the device."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"  # measured on CPU: see auto_cpu_reason below and the README
    if precision == "fp16" and kind != "cuda":
        # CPU fp16 autocast has few fast kernels (slower than fp32 where we measured); a
        # user asking for it almost certainly meant bf16.
        raise ValueError(f"precision fp16 needs a CUDA device (this one is {kind}); use bf16 or fp32")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision; None for fp32 (no autocast)."""
    if precision not in _DTYPES:
        raise ValueError(f"precision {precision!r} is not resolved; call resolve_precision first")
    return _DTYPES[precision]
