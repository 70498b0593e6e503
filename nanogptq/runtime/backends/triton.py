"""triton: 8- and 4-bit grids on the Triton GEMV (kernels/triton_gemv.py), CUDA only.

The codes are re-laid at load as INTERLEAVED words, which unpack two codes per instruction, for decode-sized
inputs (up to MAX_ROWS rows); larger inputs (prefill) dequantize the words to the activation dtype (one
Triton kernel, kernels/triton_dequant.py) and use cuBLAS. "auto" picks it on CUDA at 8 bits and for the
4-bit grids mma does not take. Triton is imported here only where a layer runs on CUDA: it is an optional
dependency, and the CPU never needs it.
"""

from __future__ import annotations

import torch

from nanogptq.runtime.backends.base import Backend, prefill, register_zero_codes

MAX_ROWS = 8  # the GEMV reads the weights once per row: beyond a few rows cuBLAS wins


def _triton_gemv():
    """The Triton GEMV module, or None where Triton is missing."""
    try:
        from nanogptq.kernels import triton_gemv
    except ImportError:
        return None
    return triton_gemv


def layout_weight(m, words: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype` from a GEMV's layout, for prefill (one Triton kernel)."""
    from nanogptq.kernels import triton_dequant

    return triton_dequant.dequantize(words, layout, m.scales, m.z_codes, m.bits, m.group_size, m.out_features,
                                     m.in_features, dtype)


def supports(m, device: torch.device) -> bool:
    if device.type != "cuda" or m.g_idx is not None:  # act-order groups are not runs of columns
        return False
    tg = _triton_gemv()
    return tg is not None and tg.supports(m.bits, m.group_size, m.in_features)


def prepare(m) -> None:
    tg = _triton_gemv()  # importing it registers torch.ops.nanogptq.gemv
    register_zero_codes(m)
    m.register_buffer("t_qweight", tg.to_interleaved(m.codes(), m.group_size, m.bits), persistent=False)


def forward(m, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """`gelu`: F.gelu of the output, which the GEMV applies before it stores it."""
    x2 = x.reshape(-1, m.in_features)
    if x2.shape[0] <= MAX_ROWS:
        y = torch.ops.nanogptq.gemv(x2.contiguous(), m.t_qweight, m.scales, m.z_codes, m.bits, m.group_size,
                                    m.out_features, gelu)
    else:
        y = prefill(x2, layout_weight(m, m.t_qweight, "interleaved", x2.dtype), gelu)
    return y.reshape(*x.shape[:-1], m.out_features)


BACKEND = Backend(forward, prepare, supports, ("t_qweight", "scales", "z_codes"),
                  forward_gelu=lambda m, x: forward(m, x, gelu=True))
