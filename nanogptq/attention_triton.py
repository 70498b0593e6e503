"""Attention of one decoded token over the static KV cache, split along the cache (flash-decoding).

With one query per head, PyTorch's fused attention kernels run one thread block per head (32 for a 7 B
model: a quarter of an H100) and a separate kernel turns the boolean mask into -inf. Here the cache of
every head is cut into S chunks, so B * H * S programs read it at once, each computing on its chunk

    m = max_j s_j,  den = sum_j exp(s_j - m),  a = sum_j exp(s_j - m) v_j,   s_j = q . k_j / sqrt(D)

for the positions j <= pos only (the mask is the position itself, no tensor), then merges the chunks:
M = max m_c, y = sum_c exp(m_c - M) a_c / sum_c exp(m_c - M) den_c. The merge runs in the same kernel, in
the last of a head's S programs to finish: each program stores its partial, then takes a ticket from the
head's counter (an atomic add; a barrier first, so the whole program's stores precede it); the one that
draws S - 1 reads the S partials (past L1) and writes y, then sets the counter back to zero (a second
kernel did the merge before). Accumulation is fp32. The cache is written by the caller (index_copy_)
before the call; the op reads it and never mutates it, and leaves the counters as it found them (zero), so
torch.compile and CUDA graphs take it as an ordinary kernel (`torch.ops.nanogptq.decode_attention`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# On the H200, 32 heads x 128, a 584-position cache read from HBM, merge in the kernel
# (benchmarks/decode_attention.py --cache 584 --programs 528 1056 --block 16 64 --warps 1 4,
# results/decode_attention_fused_h200.json): 1056 programs of one warp and 16-position steps 7.7 us per
# layer, the previous defaults (528 programs, 4 warps, 64-position steps, chosen on the H100 with a separate
# merge kernel, where 528 x 64 ran 10.2 us and 264 x 32 13.3 us) 9.4 us
TARGET_PROGRAMS = 1056  # about eight per SM of an H100 or H200: enough loads in flight to stream the cache
MAX_CHUNK = 256  # positions per program: its loop over the chunk is serial
MAX_SPLITS = 32  # chunks per head: the merging program loads all their partials at once
BLOCK_L = 16  # positions per loop step; chunks are whole steps (a ragged last step is a wasted load)
NUM_WARPS = 1


@triton.jit
def _partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    m_ptr,
    l_ptr,
    a_ptr,
    y_ptr,
    count_ptr,
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
    BLOCK_S: tl.constexpr,
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
    tl.debug_barrier()  # all of this program's stores, before its one thread's release below
    ticket = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel", scope="gpu")
    if ticket == S - 1:  # the head's last program: the others' partials are visible (acquire)
        rs = tl.arange(0, BLOCK_S)
        smask = rs < S
        ms = tl.load(m_ptr + bh * S + rs, mask=smask, other=float("-inf"), cache_modifier=".cg")
        dens = tl.load(l_ptr + bh * S + rs, mask=smask, other=0.0, cache_modifier=".cg")
        big = tl.max(ms, axis=0)  # chunk 0 always holds position 0, so this is finite
        w = tl.where(smask & (ms > float("-inf")), tl.exp(ms - big), 0.0)
        parts = tl.load(a_ptr + (bh * S + rs)[:, None] * D + rd[None, :], mask=smask[:, None], other=0.0,
                        cache_modifier=".cg")
        y = tl.sum(w[:, None] * parts, axis=0) / tl.sum(w * dens, axis=0)
        tl.store(y_ptr + bh * D + rd, y.to(y_ptr.dtype.element_ty))
        tl.store(count_ptr + bh, 0)  # ready for the next call


def supports(q: torch.Tensor) -> bool:
    """One query per head, a power-of-two head size (a Triton tile)."""
    D = q.size(-1)
    return q.size(2) == 1 and D >= 16 and D & (D - 1) == 0


@torch.library.custom_op("nanogptq::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """q (B, H, 1, D), the caches k, v (B, H, L, D) (same strides), pos (1,) the query's position:
    softmax(q k^T / sqrt(D)) v over the cache positions <= pos. -> (B, H, 1, D) in q's dtype. `counts`: B * H
    int32 zeros the kernel uses and leaves zero (the KV cache keeps them, so a step allocates nothing);
    fresh ones if None."""
    B, H, _, D = q.shape
    L = k.size(2)
    assert k.stride() == v.stride() and k.stride(3) == 1 and q.stride(3) == 1
    # enough chunks to fill the GPU, at most MAX_SPLITS (the merge holds them all), and chunks of at most
    # MAX_CHUNK positions for long caches
    S = max(1, min(triton.cdiv(L, BLOCK_L), triton.cdiv(TARGET_PROGRAMS, B * H), MAX_SPLITS), triton.cdiv(L, MAX_CHUNK))
    chunk = triton.cdiv(triton.cdiv(L, S), BLOCK_L) * BLOCK_L
    S = triton.cdiv(L, chunk)
    m = torch.empty(B * H * S, device=q.device, dtype=torch.float32)
    den = torch.empty_like(m)
    a = torch.empty(B * H * S, D, device=q.device, dtype=torch.float32)
    y = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    if counts is None:
        counts = torch.zeros(B * H, device=q.device, dtype=torch.int32)
    assert counts.dtype == torch.int32 and counts.numel() >= B * H
    _partial_kernel[(B * H, S)](
        q, k, v, pos, m, den, a, y, counts, H, L, chunk, S, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        D=D, BLOCK_L=BLOCK_L, BLOCK_S=triton.next_power_of_2(S), num_warps=NUM_WARPS,
    )  # fmt: skip
    return y


@decode_attention.register_fake
def _(q, k, v, pos, counts=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
