"""The first Triton GEMV (session 4), kept as a baseline for benchmarks/gemv.py: not used by the package.

It reads the codes as stored (8 bits; 4-bit PAIRS, the even column in the low nibble) or re-laid as HALVES
(column j of each tile group in the low nibble of byte j, column j + G/2 in its high nibble), and turns one
code at a time into fp32 by OR-ing it into the mantissa of 2^23. Each program owns BLOCK_N output rows and
walks K in GPI tile groups of G columns per step; the autotuner also tries register double-buffering
(PREFETCH). nanogptq.quant.triton_gemv's interleaved kernel replaced it: on the H200 this one reached 28%
(4 bits) and 55-59% (8 bits) of the HBM peak on 7 B-shaped layers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanogptq.quant.pack import unpack
from nanogptq.quant.triton_gemv import tile_group


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


PAIRS, HALVES = 1, 2
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


_tuned = {bits: triton.autotune(configs=_configs(bits), key=["N", "K", "G"])(_gemv_kernel) for bits in (4, 8)}


def to_halves(qweight: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """pack.py's 4-bit rows (N, cdiv(K, 2)) re-laid as HALVES: (N, NG * G / 2), zero codes padding the last
    tile group (the kernel masks their activations)."""
    tile = tile_group(group_size, in_features, 4)[0]
    tiles = -(-in_features // tile)
    codes = torch.nn.functional.pad(unpack(qweight, 4, in_features), (0, tiles * tile - in_features))
    codes = codes.view(*qweight.shape[:-1], tiles, 2, tile // 2)
    return (codes[..., 0, :] | (codes[..., 1, :] << 4)).flatten(-2).contiguous()


def launch(x, codes, scales, zeros, bits: int, group_size: int, layout: int = PAIRS, config: dict | None = None):
    """y = x W^T for the grid (codes, scales, zero codes or None) of QuantLinear; `config` skips the
    autotuner. 4-bit codes in `layout` (PAIRS: as stored, HALVES: from to_halves)."""
    M, K = x.shape
    N = codes.shape[0]
    G, sg_div = tile_group(group_size, K, bits)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    stride_sn = 0 if scales.shape[0] == 1 else scales.stride(0)
    stride_zn = 0 if zeros is None or zeros.shape[0] == 1 else zeros.stride(0)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), M)

    (_gemv_kernel if config else _tuned[bits])[grid](
        x, codes, scales, scales if zeros is None else zeros, y, N, K, triton.cdiv(K, G), sg_div,
        x.stride(0), codes.stride(0), stride_sn, stride_zn, y.stride(0),
        BITS=bits, G=G, HAS_Z=zeros is not None, LAYOUT=layout if bits == 4 else 0,
        AW=G if (bits == 4 and layout == PAIRS) else G * bits // 8, **(config or {}),
    )  # fmt: skip
    return y
