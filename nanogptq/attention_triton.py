"""Attention of one decoded token over the static KV cache, split along the cache (flash-decoding).

With one query per head, PyTorch's fused attention kernels run one thread block per head (32 for a 7 B
model: a quarter of an H100) and a separate kernel turns the boolean mask into -inf. Here the cache of
every head is cut into S chunks, so B * H * S programs read it at once, each computing on its chunk

    m = max_j s_j,  den = sum_j exp(s_j - m),  a = sum_j exp(s_j - m) v_j,   s_j = q . k_j / sqrt(D)

for the positions j <= pos only (the mask is the position itself, no tensor); a second kernel merges the
chunks: M = max m_c, y = sum_c exp(m_c - M) a_c / sum_c exp(m_c - M) den_c. Accumulation is fp32. The cache
is written by the caller (index_copy_) before the call; the op reads it and never mutates it, so
torch.compile and CUDA graphs take it as an ordinary kernel (`torch.ops.nanogptq.decode_attention`).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# measured on the H100, 32 heads x 128, a 584-position cache read from HBM (benchmarks/decode_attention.py
# --programs 264 528 1056 --block 32 64): 528 programs of 64-position steps 10.2 us, 264 x 32 13.3 us
TARGET_PROGRAMS = 528  # about four per H100 SM: enough loads in flight to stream the cache
MAX_CHUNK = 256  # positions per program: its loop over the chunk is serial
BLOCK_L = 64  # positions per loop step; chunks are whole steps (a ragged last step is a wasted load)
NUM_WARPS = 4


@triton.jit
def _partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    m_ptr,
    l_ptr,
    a_ptr,
    H,
    L,
    CHUNK,
    S,
    sm_scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kl,
    D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // H
    h = bh % H
    last = tl.load(pos_ptr)  # positions 0..last are valid
    rd = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rd).to(tl.float32) * sm_scale
    base = b * stride_kb + h * stride_kh
    m = tl.full((), float("-inf"), tl.float32)
    den = tl.zeros((), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, last + 1)
    for j0 in range(start, end, BLOCK_L):
        rl = j0 + tl.arange(0, BLOCK_L)
        valid = rl < end
        offs = base + rl[:, None] * stride_kl + rd[None, :]
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)  # both loads in flight at once
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        den = den * alpha + tl.sum(p, axis=0)
        m = m_new
    out = bh * S + c
    tl.store(m_ptr + out, m)  # an empty chunk (past `last`) leaves m = -inf, den = 0: weight 0 below
    tl.store(l_ptr + out, den)
    tl.store(a_ptr + out * D + rd, acc)


@triton.jit
def _merge_kernel(m_ptr, l_ptr, a_ptr, y_ptr, S, D: tl.constexpr, BLOCK_S: tl.constexpr):
    bh = tl.program_id(0)
    rs = tl.arange(0, BLOCK_S)
    smask = rs < S
    m = tl.load(m_ptr + bh * S + rs, mask=smask, other=float("-inf"))
    den = tl.load(l_ptr + bh * S + rs, mask=smask, other=0.0)
    big = tl.max(m, axis=0)  # chunk 0 always holds position 0, so this is finite
    w = tl.where(smask & (m > float("-inf")), tl.exp(m - big), 0.0)
    rd = tl.arange(0, D)
    a = tl.load(a_ptr + (bh * S + rs)[:, None] * D + rd[None, :], mask=smask[:, None], other=0.0)
    y = tl.sum(w[:, None] * a, axis=0) / tl.sum(w * den, axis=0)
    tl.store(y_ptr + bh * D + rd, y.to(y_ptr.dtype.element_ty))


def supports(q: torch.Tensor) -> bool:
    """One query per head, a power-of-two head size (a Triton tile)."""
    D = q.size(-1)
    return q.size(2) == 1 and D >= 16 and D & (D - 1) == 0


@torch.library.custom_op("nanogptq::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """q (B, H, 1, D), the caches k, v (B, H, L, D) (same strides), pos (1,) the query's position:
    softmax(q k^T / sqrt(D)) v over the cache positions <= pos. -> (B, H, 1, D) in q's dtype."""
    B, H, _, D = q.shape
    L = k.size(2)
    assert k.stride() == v.stride() and k.stride(3) == 1 and q.stride(3) == 1
    # enough chunks to fill the GPU, and chunks of at most MAX_CHUNK positions for long caches
    block_l = 16 if os.environ.get("TRITON_INTERPRET") == "1" else BLOCK_L
    S = max(1, min(triton.cdiv(L, block_l), triton.cdiv(TARGET_PROGRAMS, B * H)), triton.cdiv(L, MAX_CHUNK))
    chunk = triton.cdiv(triton.cdiv(L, S), block_l) * block_l
    S = triton.cdiv(L, chunk)
    m = torch.empty(B * H * S, device=q.device, dtype=torch.float32)
    den = torch.empty_like(m)
    a = torch.empty(B * H * S, D, device=q.device, dtype=torch.float32)
    y = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    _partial_kernel[(B * H, S)](
        q, k, v, pos, m, den, a, H, L, chunk, S, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        D=D, BLOCK_L=block_l, num_warps=NUM_WARPS,
    )  # fmt: skip
    _merge_kernel[(B * H,)](m, den, a, y, S, D=D, BLOCK_S=triton.next_power_of_2(S), num_warps=4)
    return y


@decode_attention.register_fake
def _(q, k, v, pos):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
