"""What a backend is, and the pieces several backends share.

A backend runs a stored layer's grid w = (q - z) * s (quant/grid.py; z = 2^(bits-1) for symmetric grids)
exactly, rewritten once at load into the layout its op wants, never re-quantizing float weights. It declares
what it `supports` (bits, groups, device), `prepare`s its layout as non-persistent buffers on the layer
(so .to(device) moves them and checkpoints never see them), and runs `forward`. The layer is a
runtime.linear.RuntimeLinear: a QuantLinear (stored buffers, dequantize()) plus these layouts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # annotations only: a backend receives the layer, it never builds one
    from nanogptq.runtime.linear import RuntimeLinear

PACKED_BUFFERS = ("qweight", "scales", "qzeros", "g_idx")


@dataclass(frozen=True)
class Backend:
    forward: Callable[[RuntimeLinear, torch.Tensor], torch.Tensor]  # x already rotated; bias added after
    prepare: Callable[[RuntimeLinear], None] = lambda m: None
    supports: Callable[[RuntimeLinear, torch.device], bool] = lambda m, device: True
    reads: tuple[str, ...] = PACKED_BUFFERS  # the buffers one forward reads: weight bytes per token
    # the forward with F.gelu applied to its output, for layers without a bias (None: F.gelu runs after)
    forward_gelu: Callable[[RuntimeLinear, torch.Tensor], torch.Tensor] | None = None
    # one token with the epilogue RuntimeLinear.fuse_epilogue moved into the kernel, plus a residual (or None)
    forward_fused: Callable[[RuntimeLinear, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None


def per_row(m: RuntimeLinear, t: torch.Tensor) -> torch.Tensor:
    """(rows, 1) -> (out,): per-tensor grids (rows = 1) become one identical grid per row."""
    return t.expand(m.out_features, 1).reshape(m.out_features)


def register_zero_codes(m: RuntimeLinear) -> torch.Tensor | None:
    """The zero points unpacked (uint8, rows x groups) as the z_codes buffer, which the GEMVs' prefill (and
    the Triton kernel itself) read once the packed qzeros are freed; None for symmetric grids."""
    zeros = m.zero_codes()
    zeros = None if zeros is None else zeros.contiguous()
    m.register_buffer("z_codes", zeros, persistent=False)
    return zeros


def prefill(x2: torch.Tensor, weight: torch.Tensor, gelu: bool) -> torch.Tensor:
    """Inputs of more rows than a GEMV takes: a float weight made from the layout, cuBLAS."""
    y = F.linear(x2, weight)
    return F.gelu(y) if gelu else y
