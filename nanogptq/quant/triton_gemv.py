"""A Triton GEMV for batch-1 decoding on the packed checkpoint codes.

For one activation row x and a grid w[n, k] = (q[n, k] - z[n, g]) * s[n, g], g = k // group:

    y[n] = sum_k x[k] (q[n, k] - z[n, g]) s[n, g]

with the codes dequantized in registers and never written back; the bytes read per token are the
checkpoint's bytes. Two kernels:

  8 bits   `_gemv_kernel` on `QuantLinear.qweight` itself (one code per byte). Codes become fp32 by the
           mantissa trick (no int-to-float instruction); each program owns BLOCK_N output rows and walks K
           in GPI groups of G columns per step. It also reads two 4-bit byte layouts (PAIRS as stored,
           HALVES), kept as the benchmark's baselines for the kernel below (1.5x slower on the H200).
  4 bits   `_gemv4_quads_kernel` on QUADS (pack.to_quads, built once at load): two codes per instruction
           into packed fp16 arithmetic (inline PTX), with weights and activations in one register layout.

Batch-1 decoding is memory bound, so the job is keeping enough bytes in flight; the autotuner picks the tile
per shape. Accumulation is fp32 (the 4-bit kernel's innermost sums fp16); x and y are in the activation
dtype (bf16 on the GPU).

The kernel is registered as the custom op `nanogptq::gemv` (opaque to torch.compile, which calls it as it
is; a CUDA graph captures it like any other kernel).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from nanogptq.quant import pack

MAX_TILE_GROUP = 256  # columns per tile group: larger scale groups are split into several tile groups
INTERPRETER_CONFIG = {"BLOCK_N": 4, "GPI": 2, "ACC3": True}
INTERPRETER_QUADS_CONFIG = {"BLOCK_Q": 2, "GPI": 2, "R": 2, "STAGES": 1}


def _configs(bits: int) -> list[triton.Config]:
    """Tiles (BLOCK_N rows x GPI tile groups) per step. A 4-bit tile group holds half the bytes of an
    8-bit one, so 4 bits get larger tiles (more bytes in flight); per-element accumulators (ACC3) only
    where they fit in registers; PREFETCH (the next step's loads issued before this step's arithmetic)
    for mid-sized tiles."""
    if bits == 8:
        tiles = [(1, 8), (1, 16), (2, 4), (2, 8), (4, 2), (4, 4), (4, 8), (8, 2), (8, 4), (16, 2), (16, 4)]
    else:
        tiles = [(1, 16), (2, 16), (4, 8), (4, 16), (8, 4), (8, 8), (16, 4), (4, 32), (8, 16), (16, 8), (32, 4)]
    configs = [
        triton.Config({"BLOCK_N": bn, "GPI": gpi, "ACC3": acc3}, num_warps=w)
        for bn, gpi in tiles
        for w in (4, 8)
        for acc3 in (True, False)
        if not (acc3 and bn * gpi > 64)
    ]
    # register double-buffering (PREFETCH) for the mid-sized tiles, whose two steps fit in registers
    configs += [
        triton.Config({"BLOCK_N": bn, "GPI": gpi, "ACC3": False, "PREFETCH": True}, num_warps=4)
        for bn, gpi in tiles
        if bn * gpi in (16, 32)
    ]
    return configs


# 4-bit byte layouts: PAIRS is pack.py's (the even column in the low nibble, the odd one in the high
# nibble), read as stored; HALVES, built at load time by `to_halves`, puts column j of each tile group in
# the low nibble of byte j and column j + G/2 in its high nibble, so both nibbles' activations are
# contiguous loads in the layout the weights already have
PAIRS, HALVES, QUADS = 1, 2, 3
_PAIRS, _HALVES = tl.constexpr(PAIRS), tl.constexpr(HALVES)  # the kernel may read only constexpr globals


@triton.jit
def _load_tile(x_row, w_ptr, s_ptr, z_ptr, rn, nmask, g, rb, K, NG, SG_DIV, stride_wn, stride_sn, stride_zn,
               BITS: tl.constexpr, G: tl.constexpr, HAS_Z: tl.constexpr, LAYOUT: tl.constexpr,
               BLOCK_N: tl.constexpr, GPI: tl.constexpr):
    """One step's loads: codes (BLOCK_N, GPI, GB) as int32, scales and zero points (BLOCK_N, GPI), and
    the activations the codes multiply (xa for 8 bits and low nibbles, xb for high nibbles / PAIRS)."""
    PER: tl.constexpr = 8 // BITS  # codes per byte
    GB: tl.constexpr = G // PER  # bytes per row of a tile group
    byte = g[:, None] * GB + rb[None, :]  # (GPI, GB)
    if LAYOUT == _HALVES:
        bmask = (g < NG)[:, None] & (rb < GB)[None, :]  # the rows are padded to whole tile groups
    else:
        bmask = byte * PER < K
    w_ptrs = w_ptr + rn[:, None, None] * stride_wn + byte[None, :, :]
    w = tl.load(w_ptrs, mask=nmask[:, None, None] & bmask[None], other=0).to(tl.int32)
    sg = g // SG_DIV
    gmask = nmask[:, None] & (g < NG)[None, :]
    s = tl.load(s_ptr + rn[:, None] * stride_sn + sg[None, :], mask=gmask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + rn[:, None] * stride_zn + sg[None, :], mask=gmask, other=0).to(tl.float32)
    else:
        z = tl.full((BLOCK_N, GPI), 2 ** (BITS - 1), tl.float32)
    if BITS == 8:
        xa = tl.load(x_row + byte, mask=byte < K, other=0.0).to(tl.float32)
        xb = xa
    elif LAYOUT == _HALVES:
        c_lo = g[:, None] * G + rb[None, :]  # (GPI, GB): both loads contiguous, no reshuffle
        c_hi = c_lo + GB
        xa = tl.load(x_row + c_lo, mask=c_lo < K, other=0.0).to(tl.float32)
        xb = tl.load(x_row + c_hi, mask=c_hi < K, other=0.0).to(tl.float32)
    else:
        c = g[:, None] * G + tl.arange(0, G)[None, :]
        xb = tl.load(x_row + c, mask=c < K, other=0.0).to(tl.float32)
        xa = xb
    return w, s, z, xa, xb


@triton.jit
def _accumulate(acc, w, s, z, xa, xb, BITS: tl.constexpr, G: tl.constexpr, LAYOUT: tl.constexpr,
                BLOCK_N: tl.constexpr, GPI: tl.constexpr, ACC3: tl.constexpr):
    # codes to floats without int->float conversions (a quarter-rate instruction): OR-ing a code
    # c < 2^23 into the mantissa of 2^23 (0x4B000000) gives the float 2^23 + c exactly, so one
    # subtraction of 2^23 + z yields c - z
    off = (z + 8388608.0)[:, :, None]
    if BITS == 8:
        part = ((w | 0x4B000000).to(tl.float32, bitcast=True) - off) * xa[None, :, :]
    else:
        q_lo = ((w & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - off
        q_hi = ((w >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - off
        if LAYOUT == _HALVES:
            part = q_lo * xa[None, :, :] + q_hi * xb[None, :, :]
        else:
            # interleave the nibbles back into column order: (BLOCK_N, GPI, GB, 2) -> (BLOCK_N, GPI, G)
            q = tl.reshape(tl.join(q_lo, q_hi), (BLOCK_N, GPI, G))
            part = q * xb[None, :, :]
    # the scale once per group after the reduction (ACC3 off), or per element (ACC3 on)
    if ACC3:
        acc += part * s[:, :, None]
    else:
        acc += tl.sum(part, axis=2) * s
    return acc


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    N,
    K,
    NG,  # tile groups: cdiv(K, G)
    SG_DIV,  # tile groups per scale group (scale column = g // SG_DIV)
    stride_xm,
    stride_wn,
    stride_sn,
    stride_zn,
    stride_ym,
    BITS: tl.constexpr,
    G: tl.constexpr,
    HAS_Z: tl.constexpr,
    LAYOUT: tl.constexpr,  # 4 bits: PAIRS or HALVES; 8 bits: 0
    AW: tl.constexpr,  # width of a tile group's products: G for PAIRS at 4 bits (unpacked in order), else G // PER
    BLOCK_N: tl.constexpr,
    GPI: tl.constexpr,
    ACC3: tl.constexpr,
    PREFETCH: tl.constexpr = False,
):
    PER: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // PER
    m = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rg = tl.arange(0, GPI)
    rb = tl.arange(0, GB)
    x_row = x_ptr + m * stride_xm
    # ACC3: accumulate per element and reduce once at the end (no cross-thread reduction per step), else
    # reduce each step into (BLOCK_N, GPI); the autotuner tries both
    if ACC3:
        acc = tl.zeros((BLOCK_N, GPI, AW), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, GPI), dtype=tl.float32)
    if PREFETCH:
        # register double-buffering: the next step's loads are in flight while this step's codes are
        # unpacked, twice the bytes in flight per program (a GEMV is bound by them, not by arithmetic)
        w, s, z, xa, xb = _load_tile(x_row, w_ptr, s_ptr, z_ptr, rn, nmask, rg, rb, K, NG, SG_DIV, stride_wn,
                                     stride_sn, stride_zn, BITS, G, HAS_Z, LAYOUT, BLOCK_N, GPI)
        for g0 in range(GPI, NG + GPI, GPI):  # the last step's loads are all masked off
            w2, s2, z2, xa2, xb2 = _load_tile(x_row, w_ptr, s_ptr, z_ptr, rn, nmask, g0 + rg, rb, K, NG, SG_DIV,
                                              stride_wn, stride_sn, stride_zn, BITS, G, HAS_Z, LAYOUT, BLOCK_N, GPI)
            acc = _accumulate(acc, w, s, z, xa, xb, BITS, G, LAYOUT, BLOCK_N, GPI, ACC3)
            w, s, z, xa, xb = w2, s2, z2, xa2, xb2
    else:
        for g0 in range(0, NG, GPI):
            w, s, z, xa, xb = _load_tile(x_row, w_ptr, s_ptr, z_ptr, rn, nmask, g0 + rg, rb, K, NG, SG_DIV,
                                         stride_wn, stride_sn, stride_zn, BITS, G, HAS_Z, LAYOUT, BLOCK_N, GPI)
            acc = _accumulate(acc, w, s, z, xa, xb, BITS, G, LAYOUT, BLOCK_N, GPI, ACC3)
    if ACC3:
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
    else:
        y = tl.sum(acc, axis=1)
    tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)


# ---- 4 bits in QUADS (pack.to_quads): two codes per instruction ----
#
# Unpacking one code at a time costs about five instructions per weight (shift, mask, the mantissa trick's
# OR and subtraction, the multiply-add), which at 4 bits is more time than reading the byte takes at HBM
# speed. A QUADS word holds columns 2p, 2p + 1 of four rows; masked, one row's two codes sit in the two
# 16-bit halves, so one LOP3 makes the fp16 pair (1024 + q_a, 1024 + q_b) (0x6400 is 1024 in fp16, whose
# unit in the last place is 1), and packed fp16 instructions (two lanes each) subtract the zero point and
# multiply-add the activation pair (x_2p, x_2p+1), which is one int32 of the activation row: under two
# instructions per weight. The weights and the activations are read with the same index tensor, so Triton
# gives both one register layout (no shuffle through shared memory). Each lane sums R products in fp16
# (exact codes; activations rounded from bf16 to fp16's 11 bits), then the group's scale applies in fp32.

_QUAD_ASM = tl.constexpr("""
{
.reg .b32 a, b, c, d, t, k16;
lop3.b32 a, $4, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 b, $4, 0x00F000F0, 0x64006400, 0xEA;
shr.u32 t, $4, 8;
lop3.b32 c, t, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 d, t, 0x00F000F0, 0x64006400, 0xEA;
mov.b32 k16, 0x2C002C00;
sub.f16x2 a, a, $6;
fma.rn.f16x2 b, b, k16, $7;
sub.f16x2 c, c, $8;
fma.rn.f16x2 d, d, k16, $9;
fma.rn.f16x2 $0, a, $5, $10;
fma.rn.f16x2 $1, b, $5, $11;
fma.rn.f16x2 $2, c, $5, $12;
fma.rn.f16x2 $3, d, $5, $13;
}
""")
# $0..$3 the four rows' fp16-pair accumulators out, $10..$13 in; $4 the word; $5 the activation pair in
# fp16; $6, $8 = 1024 + z of rows 0 and 2, $7, $9 = -(64 + z) of rows 1 and 3 (their masks leave 16 q, so
# times 1/16 = 0x2C00 it is 64 + q), each in both halves. lop3's table 0xEA is (a & b) | c.

# two bf16 activations (one int32) -> the same two in fp16: bf16 is the top half of an fp32
_BF16X2_TO_F16X2_ASM = tl.constexpr("""
{
.reg .b32 lo, hi;
shl.b32 lo, $1, 16;
and.b32 hi, $1, 0xFFFF0000;
cvt.rn.f16x2.f32 $0, hi, lo;
}
""")

_F16X2_SUM_ASM = tl.constexpr("""
{
.reg .f16 l, h;
.reg .f32 fl, fh;
mov.b32 {l, h}, $1;
cvt.f32.f16 fl, l;
cvt.f32.f16 fh, h;
add.f32 $0, fl, fh;
}
""")


@triton.jit
def _lane_sum(h):
    """fp16 pairs (int32 bits) -> the fp32 sum of each pair."""
    return tl.inline_asm_elementwise(_F16X2_SUM_ASM, "=r,r", [h], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _quad_row(acc, h, s, FAST: tl.constexpr):
    """One row's group total (fp16 pairs when FAST, else already fp32) times its scale, into acc."""
    if FAST:
        h = _lane_sum(h)
    return acc + h * s


@triton.jit
def _gemv4_quads_kernel(
    x_ptr,
    x32_ptr,  # FAST: the activations viewed as int32 pairs (a pointer cast would lose its alignment)
    w_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    N,
    K,
    NG,  # tile groups: cdiv(K, 2 * PG)
    SG_DIV,  # tile groups per scale group
    stride_xm,
    stride_wq,  # in words, per quad of rows
    stride_sn,
    stride_zn,
    stride_ym,
    PG: tl.constexpr,  # column pairs (words) per tile group
    HAS_Z: tl.constexpr,
    X_BF16: tl.constexpr,  # activations are bf16 (else fp16)
    FAST: tl.constexpr,  # the packed-fp16 inline assembly (GPU); off: the same sums in fp32 (interpreter)
    BLOCK_Q: tl.constexpr,  # quads of rows per program
    GPI: tl.constexpr,  # tile groups per step
    R: tl.constexpr,  # words per lane per tile group (a lane sums R products in fp16 before the scale)
    STAGES: tl.constexpr = 1,
):
    C: tl.constexpr = PG // R
    m = tl.program_id(1)
    rq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = rq * 4 < N
    rg = tl.arange(0, GPI)
    rc = tl.arange(0, C)
    acc0 = tl.zeros((BLOCK_Q, GPI, C), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_Q, GPI, C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_Q, GPI, C), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_Q, GPI, C), dtype=tl.float32)
    x_row = x_ptr + m * stride_xm
    x32 = x32_ptr + m * (stride_xm // 2)
    same = (rq * 0)[:, None, None]  # adds nothing, but gives the activation loads the weights' (3-d) shape
    for g0 in tl.range(0, NG, GPI, num_stages=STAGES):
        g = g0 + rg
        sg = g // SG_DIV
        gmask = qmask[:, None] & (g < NG)[None, :]
        row = rq[:, None] * 4
        s_at = s_ptr + row * stride_sn + sg[None, :]
        z_at = z_ptr + row * stride_zn + sg[None, :]
        s0 = tl.load(s_at, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
        s1 = tl.load(s_at + stride_sn, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
        s2 = tl.load(s_at + 2 * stride_sn, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
        s3 = tl.load(s_at + 3 * stride_sn, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
        if HAS_Z:
            z0 = tl.load(z_at, mask=gmask, other=0).to(tl.int32)[:, :, None]
            z1 = tl.load(z_at + stride_zn, mask=gmask, other=0).to(tl.int32)[:, :, None]
            z2 = tl.load(z_at + 2 * stride_zn, mask=gmask, other=0).to(tl.int32)[:, :, None]
            z3 = tl.load(z_at + 3 * stride_zn, mask=gmask, other=0).to(tl.int32)[:, :, None]
        else:
            z0 = tl.full((BLOCK_Q, GPI, 1), 8, tl.int32)
            z1, z2, z3 = z0, z0, z0
        if FAST:
            h0 = tl.zeros((BLOCK_Q, GPI, C), dtype=tl.int32)  # fp16 pairs (+0, +0)
            h1, h2, h3 = h0, h0, h0
            zz0 = (z0 + 0x6400) * 0x10001  # fp16 bits of 1024 + z, in both halves
            nz1 = (z1 * 16 + 0xD400) * 0x10001  # fp16 bits of -(64 + z): 64's ulp is 1/16
            zz2 = (z2 + 0x6400) * 0x10001
            nz3 = (z3 * 16 + 0xD400) * 0x10001
        else:
            h0 = tl.zeros((BLOCK_Q, GPI, C), dtype=tl.float32)
            h1, h2, h3 = h0, h0, h0
        for i in tl.static_range(R):
            pair = g[None, :, None] * PG + i * C + rc[None, None, :]  # (1, GPI, C)
            wmask = qmask[:, None, None] & (g < NG)[None, :, None]
            w = tl.load(w_ptr + rq[:, None, None] * stride_wq + pair, mask=wmask, other=0)
            xmask = (pair < K // 2) & wmask  # K is even: a pair is all in or all padding
            if FAST:
                xp = tl.load(x32 + pair + same, mask=xmask, other=0)
                if X_BF16:
                    xp = tl.inline_asm_elementwise(_BF16X2_TO_F16X2_ASM, "=r,r", [xp], dtype=tl.int32,
                                                   is_pure=True, pack=1)
                h0, h1, h2, h3 = tl.inline_asm_elementwise(
                    _QUAD_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r",
                    [w, xp, zz0, nz1, zz2, nz3, h0, h1, h2, h3],
                    dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1,
                )
            else:
                xa = tl.load(x_row + pair * 2 + same, mask=xmask, other=0.0).to(tl.float32)
                xb = tl.load(x_row + pair * 2 + 1 + same, mask=xmask, other=0.0).to(tl.float32)
                h0 += (((w >> 0) & 0xF) - z0).to(tl.float32) * xa + (((w >> 16) & 0xF) - z0).to(tl.float32) * xb
                h1 += (((w >> 4) & 0xF) - z1).to(tl.float32) * xa + (((w >> 20) & 0xF) - z1).to(tl.float32) * xb
                h2 += (((w >> 8) & 0xF) - z2).to(tl.float32) * xa + (((w >> 24) & 0xF) - z2).to(tl.float32) * xb
                h3 += (((w >> 12) & 0xF) - z3).to(tl.float32) * xa + (((w >> 28) & 0xF) - z3).to(tl.float32) * xb
        acc0 = _quad_row(acc0, h0, s0, FAST)
        acc1 = _quad_row(acc1, h1, s1, FAST)
        acc2 = _quad_row(acc2, h2, s2, FAST)
        acc3 = _quad_row(acc3, h3, s3, FAST)
    y_at = y_ptr + m * stride_ym + rq * 4
    ty = y_ptr.dtype.element_ty
    tl.store(y_at, tl.sum(tl.sum(acc0, axis=2), axis=1).to(ty), mask=qmask)
    tl.store(y_at + 1, tl.sum(tl.sum(acc1, axis=2), axis=1).to(ty), mask=qmask)
    tl.store(y_at + 2, tl.sum(tl.sum(acc2, axis=2), axis=1).to(ty), mask=qmask)
    tl.store(y_at + 3, tl.sum(tl.sum(acc3, axis=2), axis=1).to(ty), mask=qmask)


def _quads_configs() -> list[triton.Config]:
    """(BLOCK_Q, GPI, R, warps): tiles of 4 (2 warps) or 8 (4 warps) 16-byte loads per thread and step, so
    each multiprocessor keeps enough bytes in flight to cover HBM latency (Little's law: about 30 KB on an
    H200); R words per lane before the fp16 sums are scaled. Every C = PG / R lane tile holds whole loads
    for PG = 64 (g128)."""
    tiles = [(1, 8, 1, 4), (2, 4, 1, 4), (1, 16, 2, 4), (4, 4, 2, 4), (4, 8, 4, 4), (8, 4, 4, 4), (2, 16, 4, 4),
             (1, 4, 1, 2), (1, 8, 2, 2), (2, 8, 4, 2), (4, 4, 4, 2), (2, 4, 2, 2)]
    return [
        triton.Config({"BLOCK_Q": bq, "GPI": gpi, "R": r, "STAGES": st}, num_warps=w)
        for bq, gpi, r, w in tiles
        for st in (1, 2)
    ]


def _prune_quads(configs, named_args, **kwargs):
    """R must divide the tile group's column pairs (small groups have few)."""
    pg = named_args.get("PG", kwargs.get("PG"))
    kept = [c for c in configs if pg % c.kwargs["R"] == 0]
    return kept or [triton.Config({"BLOCK_Q": 1, "GPI": 4, "R": 1, "STAGES": 1}, num_warps=2)]


_gemv4_quads_tuned = triton.autotune(
    configs=_quads_configs(), key=["N", "K", "PG"], prune_configs_by={"early_config_prune": _prune_quads}
)(_gemv4_quads_kernel)


_gemv_tuned = {bits: triton.autotune(configs=_configs(bits), key=["N", "K", "G"])(_gemv_kernel) for bits in (4, 8)}


def tuned_configs() -> dict[str, str]:
    """The tile the autotuner picked per kernel and (N, K, group) key so far, for benchmark reports."""
    tuners = {"int4-quads": _gemv4_quads_tuned, **{f"int{b}": t for b, t in _gemv_tuned.items()}}
    return {f"{name} {key[:3]}": str(cfg) for name, t in tuners.items() for key, cfg in t.cache.items()}


def tile_group(group_size: int, in_features: int, bits: int) -> tuple[int, int]:
    """(G, SG_DIV): the kernel's tile group and how many of them make one scale group.

    Per-row (-1) and per-tensor (0) grids have one scale group spanning all of K: any tile works, and
    SG_DIV = cdiv(K, G) maps every tile group to scale column 0.
    """
    if group_size > 0:
        G = min(group_size, MAX_TILE_GROUP)
        return G, group_size // G
    G = 128 if bits == 4 else 256
    return G, triton.cdiv(in_features, G)


def supports(bits: int, group_size: int, out_features: int, in_features: int) -> bool:
    """Grouped grids need a power-of-two group (a Triton tile); per-row and per-tensor grids always work.
    4-bit QUADS hold 4 rows x 2 columns per word: out_features a multiple of 4, in_features even."""
    if bits not in (4, 8) or (bits == 4 and (out_features % 4 or in_features % 2)):
        return False
    return group_size in (-1, 0) or (group_size >= 16 and group_size & (group_size - 1) == 0)


def to_quads(qweight: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """pack.py's 4-bit rows re-laid as int32 QUADS padded to whole tile groups: (N / 4, NG * G / 2)."""
    return pack.to_quads(qweight, in_features, tile_group(group_size, in_features, 4)[0])


def to_halves(qweight: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """pack.py's 4-bit rows (N, cdiv(K, 2)) re-laid as HALVES with this kernel's tile group: (N, NG * G / 2),
    zero codes padding the last tile group (the kernel masks their activations)."""
    return pack.to_halves(qweight, in_features, tile_group(group_size, in_features, 4)[0])


def out_features(qweight: torch.Tensor, bits: int, layout: int) -> int:
    return qweight.shape[0] * (4 if bits == 4 and layout == QUADS else 1)  # a QUADS row holds 4 rows


def launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    layout: int = PAIRS,
    config: dict | None = None,
) -> torch.Tensor:
    """The kernel on explicit tensors; `config` (the autotuner's keys) skips the autotuner, as Triton's CPU
    interpreter (TRITON_INTERPRET=1, which tests the kernel without a GPU) needs. 4-bit weights are in
    `layout` (PAIRS: as stored, HALVES: from `to_halves`, QUADS: int32 from `to_quads`)."""
    M, K = x.shape
    N = out_features(qweight, bits, layout)
    G, sg_div = tile_group(group_size, K, bits)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    stride_sn = 0 if scales.shape[0] == 1 else scales.stride(0)
    stride_zn = 0 if zeros is None or zeros.shape[0] == 1 else zeros.stride(0)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), M)

    common = (x, qweight, scales, scales if zeros is None else zeros, y, N, K, triton.cdiv(K, G), sg_div,
              x.stride(0), qweight.stride(0), stride_sn, stride_zn, y.stride(0))  # zeros: unused when HAS_Z is off
    if bits == 4 and layout == QUADS:
        fast = os.environ.get("TRITON_INTERPRET") != "1" and x.dtype in (torch.bfloat16, torch.float16)
        def quads_grid(meta):
            return (triton.cdiv(N, 4 * meta["BLOCK_Q"]), M)

        x32 = x.view(torch.int32) if fast else x  # unread when not fast
        (_gemv4_quads_kernel if config else _gemv4_quads_tuned)[quads_grid](
            x, x32, *common[1:], PG=G // 2, HAS_Z=zeros is not None, X_BF16=x.dtype == torch.bfloat16, FAST=fast,
            **(config or {}),
        )
        return y
    (_gemv_kernel if config else _gemv_tuned[bits])[grid](
        *common,
        BITS=bits,
        G=G,
        HAS_Z=zeros is not None,
        LAYOUT=layout if bits == 4 else 0,
        AW=G if (bits == 4 and layout == PAIRS) else G * bits // 8,
        **(config or {}),
    )
    return y


@torch.library.custom_op("nanogptq::gemv", mutates_args=())
def gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    layout: int = PAIRS,
) -> torch.Tensor:
    """x (M, K) in the activation dtype, qweight (N, packed K) uint8, scales (rows, n_groups) fp16, zeros
    (rows, n_groups) uint8 codes or None for a symmetric grid; rows = 1 for a per-tensor grid. -> (M, N)."""
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter cannot autotune
        config = INTERPRETER_QUADS_CONFIG if (bits == 4 and layout == QUADS) else INTERPRETER_CONFIG
        return launch(x, qweight, scales, zeros, bits, group_size, layout, config)
    return launch(x, qweight, scales, zeros, bits, group_size, layout)


@gemv.register_fake
def _(x, qweight, scales, zeros, bits, group_size, layout=PAIRS):
    return x.new_empty(x.shape[0], out_features(qweight, bits, layout))
