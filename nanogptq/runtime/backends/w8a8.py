"""w8a8: int8pack's weights times int8 activations, quantized per token on the fly (symmetric, absmax / 127),
through torch._int_mm (int32 accumulation) on CPU and CUDA. It changes the numerics (activation rounding),
so "auto" never picks it: opt-in with --kernel w8a8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanogptq.runtime.backends import int8pack
from nanogptq.runtime.backends.base import Backend


def supports(m, device: torch.device) -> bool:
    # cuBLAS int8 GEMMs need K and N multiples of 8
    cuda_ok = device.type != "cuda" or (m.in_features % 8 == 0 and m.out_features % 8 == 0)
    return int8pack.supports(m, device) and cuda_ok


def forward(m, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, m.in_features).float()
    rows = x2.shape[0]
    sx = x2.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127  # dynamic, per token
    xq = torch.round(x2 / sx).clamp(-127, 127).to(torch.int8)
    if x.is_cuda and rows <= 16:  # the CUDA _int_mm needs more than 16 rows: pad with zero rows
        xq = F.pad(xq, (0, 0, 0, 17 - rows))
    acc = torch._int_mm(xq, m.w_int8.t())[:rows]  # int32, exact
    y = int8pack.add_zero_term(m, x2, acc.float() * sx * m.w_scales)
    return y.to(x.dtype).reshape(*x.shape[:-1], m.out_features)


BACKEND = Backend(forward, int8pack.prepare, supports, int8pack.INT8_WEIGHTS)
