"""mma: 4-bit grids on the tensor-core GEMV (kernels/mma.py, CUDA C compiled by NVRTC), CUDA only, sm_80+.

The codes are re-laid at load as mma.m16n8k16 A fragments, for up to 8 activation rows, fp32 sums; groups of
64 << j columns or one grid per row. "auto" picks it first at 4 bits. Where a block's four linears all run
on it, runtime/fusion.py moves the block's LayerNorms, biases and residual adds into them for one-token steps
(`forward_fused`). Prefill dequantizes the layout (kernels/triton_dequant.py), then cuBLAS.
"""

from __future__ import annotations

import torch

from nanogptq.kernels import mma
from nanogptq.runtime.backends.base import Backend, prefill, register_zero_codes
from nanogptq.runtime.backends.triton import layout_weight


def supports(m, device: torch.device) -> bool:
    if device.type != "cuda" or m.g_idx is not None:
        return False
    if not mma.supports(m.bits, m.group_size, m.in_features):
        return False
    if torch.cuda.is_available():  # (without a GPU the choice is still computed, for tests)
        index = torch.device(device).index or 0
        # mma.sync.m16n8k16 needs sm_80; the kernel is compiled at first use
        return torch.cuda.get_device_capability(index) >= (8, 0) and mma.compiles(index)
    return True


def prepare(m) -> None:
    zeros = register_zero_codes(m)  # for prefill, beside the kernel's own pairs
    cw = mma.chunk_words(m.group_size, m.in_features)
    m.register_buffer("m_words", mma.to_mma_layout(m.codes(), cw), persistent=False)
    s_pairs, z_pairs = mma.grid_layout(m.scales, zeros, m.out_features)
    m.register_buffer("m_scales", s_pairs, persistent=False)
    m.register_buffer("m_zeros", z_pairs, persistent=False)


def forward(m, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """Decode-sized inputs on the tensor-core GEMV (in fp16: bf16 activations are converted, as the
    Triton GEMV does in its loop); prefill dequantizes the layout, then cuBLAS."""
    x2 = x.reshape(-1, m.in_features)
    if x2.shape[0] <= mma.MAX_ROWS:
        xh = x2.to(torch.float16).contiguous()
        y = torch.ops.nanogptq.mma_gemv(xh, m.m_words, m.m_scales, m.m_zeros, m.out_features, m.group_size,
                                        gelu).to(x.dtype)
    else:
        y = prefill(x2, layout_weight(m, m.m_words, "mma", x2.dtype), gelu)
    return y.reshape(*x.shape[:-1], m.out_features)


def forward_fused(m, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """One token on the tensor-core GEMV with what RuntimeLinear.fuse_epilogue moved into it: the bias, a
    LayerNorm of x folded in, the GELU, and `residual` added last. (In fp16, as `forward`; a bf16 residual
    stream goes through fp16 here.)"""
    if not m.fused:
        raise RuntimeError("RuntimeLinear called fused before fuse_epilogue")
    x2 = x.reshape(1, m.in_features)
    r = None if residual is None else residual.reshape(1, m.out_features)
    y = torch.ops.nanogptq.mma_gemv(x2.to(torch.float16).contiguous(), m.m_words, m.m_scales, m.m_zeros,
                                    m.out_features, m.group_size, m.gelu, m.ln_weight, m.ln_u, m.ln_eps, m.e_bias, r)
    return y.to(x.dtype).reshape(*x.shape[:-1], m.out_features)


def can_fold(in_features: int) -> bool:
    """Whether a LayerNorm of rows this wide can be folded into the GEMV."""
    return mma.can_fold(in_features)


BACKEND = Backend(forward, prepare, supports, ("m_words", "m_scales", "m_zeros"),
                  forward_gelu=lambda m, x: forward(m, x, gelu=True), forward_fused=forward_fused)
