"""dequant: the exact reference. Dequantize the stored grid, then a float matmul; caches nothing.

Every other backend is tested against it, and `eval` and `compare` run it by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanogptq.runtime.backends.base import Backend


def forward(m, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, m.dequantize_stored().to(x.dtype))


BACKEND = Backend(forward=forward)
