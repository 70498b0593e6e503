"""int8pack: 8-bit grids, one per row (or per tensor), on PyTorch's int8 weight-only ops.

w = (q - 128) s + (128 - z) s: an int8 matrix times a per-row scale, plus a rank-1 term sum(x) (128 - z) s
that is zero for symmetric grids. CPU: aten._weight_int8pack_mm with bf16 activations for decode-sized
inputs and in_features a multiple of 16 (its fp32 path is not vectorized), int8 -> bf16 + F.linear for the
others. CUDA: F.linear(x, w_int8.to(x.dtype)) * s, which torch.compile fuses into one kernel (the scale
goes on the output, so the weight is read once, as int8). The CPU path computes in bf16, so it matches the
fp32 reference to bf16 precision (~1e-2 relative). The ternary layers of an exported QAT model run here too
(trits are int8 codes: `set_int8_layout`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogptq.runtime.backends.base import Backend, per_row

CPU_GEMV_MAX_ROWS = 16  # above this many rows the CPU int8 kernel (a GEMV loop) is slower than a bf16 GEMM
INT8_WEIGHTS = ("w_int8", "w_scales", "w_corr")  # what int8pack and w8a8 read per token
INT8_LAYOUT_BUFFERS = (*INT8_WEIGHTS, "w_ones")  # what set_int8_layout registers (int8pack reads w_ones too)


def supports(m, device: torch.device) -> bool:
    # no g_idx check: with one grid per row (or tensor) every column is in group 0 anyway
    return m.bits == 8 and m.group_size in (0, -1) and device.type in ("cpu", "cuda")


def prepare(m) -> None:
    codes = m.codes()
    corr = None if m.qzeros is None else per_row(m, (128 - m.zero_points()) * m.scales.float())
    set_int8_layout(m, (codes.to(torch.int16) - 128).to(torch.int8), per_row(m, m.scales.float()), corr)


def set_int8_layout(m: nn.Module, w_int8: torch.Tensor, scales: torch.Tensor, corr: torch.Tensor | None) -> None:
    """The buffers `forward` reads: w = w_int8 * scales (per row, fp32) + the zero term corr."""
    m.register_buffer("w_int8", w_int8, persistent=False)
    m.register_buffer("w_scales", scales, persistent=False)  # fp32: fp16 -> bf16 would round the scales
    m.register_buffer("w_corr", corr, persistent=False)
    # the CPU op applies its scales in the activation dtype (bf16); we apply ours in fp32 afterwards
    ones = torch.ones(m.out_features, dtype=torch.bfloat16, device=w_int8.device)
    m.register_buffer("w_ones", ones, persistent=False)


def add_zero_term(m, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """+ sum(x) * (128 - z) * s: the part of an asymmetric grid that the int8 matrix leaves out."""
    return y if m.w_corr is None else y + x2.float().sum(-1, keepdim=True) * m.w_corr


def forward(m, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, m.in_features)
    # torch 2.13's CPU op needs K % 16 == 0: other widths give wrong sums, and crash at 2 or more rows
    if x.device.type == "cpu" and x2.shape[0] <= CPU_GEMV_MAX_ROWS and m.in_features % 16 == 0:
        xb = x2.to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(xb, m.w_int8, m.w_ones).float() * m.w_scales
    elif x.device.type == "cpu":  # prefill: int8 -> bf16 is exact, and the bf16 GEMM is fast
        y = F.linear(x2.to(torch.bfloat16), m.w_int8.to(torch.bfloat16)).float() * m.w_scales
    else:
        y = F.linear(x2, m.w_int8.to(x.dtype)) * m.w_scales.to(x.dtype)
    y = add_zero_term(m, x2, y)
    return y.to(x.dtype).reshape(*x.shape[:-1], m.out_features)


BACKEND = Backend(forward, prepare, supports, INT8_LAYOUT_BUFFERS)
