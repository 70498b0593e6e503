"""Attention of one decoded token over the static KV cache, split along the cache (flash-decoding).

With one query per head, PyTorch's fused attention kernels run one thread block per head (32 for a 7 B
model: a quarter of an H100) and a separate kernel turns the boolean mask into -inf. Here the cache of
every head is cut into S chunks, so B * H * S programs read it at once, each computing on its chunk

    m = max_j s_j,  den = sum_j exp(s_j - m),  a = sum_j exp(s_j - m) v_j,   s_j = q . k_j / sqrt(D)

for the positions j <= pos only (the mask is the position itself, no tensor), then merges the chunks:
M = max m_c, y = sum_c exp(m_c - M) a_c / sum_c exp(m_c - M) den_c. The merge runs in the same kernel, in
the last of a head's S programs to finish: each program stores its partial, then takes a ticket from the
head's counter (an atomic add; a barrier first, so the whole program's stores precede it); the one that
draws S - 1 reads the S partials (past L1) and writes y, then sets the counter back to zero, so no second
kernel merges. Accumulation is fp32.

The op takes c_attn's output as it is (q, k, v side by side) and writes the new key and value into the
cache itself: the chunk that holds position `pos` stores them, and every program takes them from qkv, not
from the cache, so no program waits for another's store and the cache write needs no kernel of its own.
On sm_90 and later it is launched as a programmatic dependent of the kernel before it (c_attn's GEMV): its
programs may start while that kernel ends and load their first cached keys and values, which that kernel
does not write, before they wait for it (`gdc_wait`) and read qkv. The op mutates only the cache's slot
`pos` (declared, so torch.compile keeps it in place) and leaves the counters as it found them (zero), so
torch.compile and CUDA graphs take it as an ordinary kernel (`torch.ops.nanogptq.decode_attention`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nanogptq.kernels.launch import pdl_available

# The launch shape: many one-warp programs with short steps stream the cache fastest in the decode step
# (benchmarks/decode_attention.py sweeps programs, steps and warps; docs/gpu_kernels.md).
TARGET_PROGRAMS = 1056  # about eight per SM of an H100 or H200: enough loads in flight to stream the cache
MAX_CHUNK = 256  # positions per program: its loop over the chunk is serial
MAX_SPLITS = 32  # chunks per head: the merging program loads all their partials at once
BLOCK_L = 16  # positions per loop step; chunks are whole steps (a ragged last step is a wasted load)
NUM_WARPS = 1
PDL = True  # on sm_90 and later: launched as a programmatic dependent of c_attn's kernel (mma.py)


@triton.jit
def _decode_kernel(
    qkv_ptr,
    kv_ptr,
    pos_ptr,
    m_ptr,
    l_ptr,
    a_ptr,
    y_ptr,
    count_ptr,
    H,
    CHUNK,
    S,
    sm_scale,
    stride_qkv,
    stride_kv,
    stride_kb,
    stride_kh,
    stride_kl,
    D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // H
    h = bh % H
    last = tl.load(pos_ptr).to(tl.int32)  # the new token's position: its k, v are in qkv, the cache holds 0..last-1
    rd = tl.arange(0, D)
    k_at = kv_ptr + b * stride_kb + h * stride_kh + rd[None, :]
    v_at = k_at + stride_kv
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, last + 1)
    cached_end = tl.minimum(end, last)
    # The first step's cached keys and values are loaded before waiting for the kernel that wrote qkv:
    # under PDL this program may start while that kernel still runs, and nothing it writes is read here.
    first = start + tl.arange(0, BLOCK_L)
    k = tl.load(k_at + first[:, None] * stride_kl, mask=(first < cached_end)[:, None], other=0.0)
    v = tl.load(v_at + first[:, None] * stride_kl, mask=(first < cached_end)[:, None], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = qkv_ptr + b * stride_qkv + h * D + rd
    q = tl.load(row).to(tl.float32) * sm_scale
    k_new = tl.load(row + H * D)
    v_new = tl.load(row + 2 * H * D)
    if c == last // CHUNK:  # the chunk of the new position writes it into the cache, for the next steps
        tl.store(k_at + last * stride_kl, k_new[None, :])
        tl.store(v_at + last * stride_kl, v_new[None, :])
    m = tl.full((), float("-inf"), tl.float32)
    den = tl.zeros((), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for j0 in range(start, end, BLOCK_L):
        rl = j0 + tl.arange(0, BLOCK_L)
        new = (rl == last)[:, None]
        kf = tl.where(new, k_new[None, :], k).to(tl.float32)
        vf = tl.where(new, v_new[None, :], v).to(tl.float32)
        s = tl.where(rl < end, tl.sum(kf * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * vf, axis=0)
        den = den * alpha + tl.sum(p, axis=0)
        m = m_new
        nxt = rl + BLOCK_L  # the next step's (loaded here, once this step's are dead: registers for one step)
        k = tl.load(k_at + nxt[:, None] * stride_kl, mask=(nxt < cached_end)[:, None], other=0.0)
        v = tl.load(v_at + nxt[:, None] * stride_kl, mask=(nxt < cached_end)[:, None], other=0.0)
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


@torch.library.custom_op("nanogptq::decode_attention", mutates_args=("kv",))
def decode_attention(
    qkv: torch.Tensor, kv: torch.Tensor, pos: torch.Tensor, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """One decoded token's attention: qkv (B, 1, 3C), c_attn's output (q, k, v of H heads of D each); kv
    (2, B, H, L, D), the KV cache, filled below `pos` (1,), the token's position. Writes the token's k, v into
    kv at `pos` and returns softmax(q K^T / sqrt(D)) V over the positions <= pos, (B, 1, C) in qkv's dtype.
    `counts`: B * H int32 zeros the kernel uses and leaves zero (the caller keeps them, so a step allocates
    nothing); fresh ones if None."""
    _, B, H, L, D = kv.shape
    assert qkv.shape == (B, 1, 3 * H * D) and qkv.stride(2) == 1 and kv.stride(4) == 1
    # enough chunks to fill the GPU, at most MAX_SPLITS (the merge holds them all), and chunks of at most
    # MAX_CHUNK positions for long caches
    S = max(1, min(triton.cdiv(L, BLOCK_L), triton.cdiv(TARGET_PROGRAMS, B * H), MAX_SPLITS), triton.cdiv(L, MAX_CHUNK))
    chunk = triton.cdiv(triton.cdiv(L, S), BLOCK_L) * BLOCK_L
    S = triton.cdiv(L, chunk)
    m = torch.empty(B * H * S, device=kv.device, dtype=torch.float32)
    den = torch.empty_like(m)
    a = torch.empty(B * H * S, D, device=kv.device, dtype=torch.float32)
    y = torch.empty(B, 1, H * D, device=kv.device, dtype=qkv.dtype)
    if counts is None:
        counts = torch.zeros(B * H, device=kv.device, dtype=torch.int32)
    assert counts.dtype == torch.int32 and counts.numel() >= B * H
    pdl = PDL and kv.is_cuda and pdl_available(kv.device.index or 0)
    _decode_kernel[(B * H, S)](
        qkv, kv, pos, m, den, a, y, counts, H, chunk, S, 1.0 / math.sqrt(D),
        qkv.stride(0), kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        D=D, BLOCK_L=BLOCK_L, BLOCK_S=triton.next_power_of_2(S), PDL=pdl, num_warps=NUM_WARPS,
        **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return y


@decode_attention.register_fake
def _(qkv, kv, pos, counts=None):
    return qkv.new_empty(qkv.shape[0], 1, qkv.shape[2] // 3)
