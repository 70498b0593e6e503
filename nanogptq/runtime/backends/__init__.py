"""The backends quantized layers run on, one file each, and how one is chosen.

    dequant   the exact reference (dequantize, then a float matmul): every other backend is tested against it
    int8pack  8-bit, PyTorch's int8 weight-only ops (CPU, CUDA); exported ternary layers too
    int4pack  4-bit, tinygemm (CPU, CUDA)
    triton    4/8-bit, the Triton GEMV (CUDA)
    mma       4-bit, the tensor-core GEMV (CUDA, sm_80+)
    w8a8      int8 weights x int8 activations (changes the numerics: opt-in only)

"auto" takes the first of AUTO_ORDER that supports the layer on its device: on the GPU the tensor-core GEMV
at 4 bits, then the Triton GEMV (4 and 8 bits); on the CPU, where neither runs, int4pack and int8pack
(docs/results.md has the measurements behind this order).
"""

from __future__ import annotations

import torch

from nanogptq.runtime.backends import dequant, int4pack, int8pack, mma, triton, w8a8
from nanogptq.runtime.backends.base import PACKED_BUFFERS, Backend

BACKENDS: dict[str, Backend] = {
    "dequant": dequant.BACKEND,
    "int8pack": int8pack.BACKEND,
    "int4pack": int4pack.BACKEND,
    "triton": triton.BACKEND,
    "mma": mma.BACKEND,
    "w8a8": w8a8.BACKEND,
}
AUTO_ORDER = ("mma", "triton", "int4pack", "int8pack", "dequant")
LAYOUT_BUFFERS = {name for b in BACKENDS.values() for name in b.reads} - set(PACKED_BUFFERS)
TERNARY_BACKENDS = ("dequant", "int8pack")  # what an exported ternary layer runs on


def auto_backend(m, device: torch.device, order: tuple[str, ...] = AUTO_ORDER) -> str:
    """The first backend of `order` that supports the layer on `device`."""
    return next(k for k in order if BACKENDS[k].supports(m, device))


def check_kernel(name: str) -> str:
    """A --kernel value: "auto" or a backend's name; anything else is an error naming the choices."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown kernel {name!r}; choose from auto, {', '.join(BACKENDS)}")
    return name
