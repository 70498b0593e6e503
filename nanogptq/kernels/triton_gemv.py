"""A Triton GEMV for batch-1 decoding on the packed checkpoint codes.

For one activation row x and a grid w[n, k] = (q[n, k] - z[n, g]) * s[n, g], g = k // group:

    y[n] = sum_k x[k] (q[n, k] - z[n, g]) s[n, g]

with the codes dequantized in registers and never written back; the bytes read per token are the
checkpoint's bytes. One kernel, `_gemv_rows_kernel`, for 4 and 8 bits, on INTERLEAVED words
(`to_interleaved`, built once at load): two codes per instruction into packed fp16 arithmetic (inline
PTX), weights and activations in one register layout.

Batch-1 decoding is memory bound, so the job is keeping enough bytes in flight at few instructions per
weight; the autotuner picks the tile per shape, and whole tiles (EVEN) load without masks. Accumulation is
fp32 (the innermost sums fp16); x and y are in the activation dtype. fp16 activations are the fast case:
bf16 ones are converted to fp16 in the loop (about 0.4 instructions per 4-bit weight). An optional GELU
epilogue serves the MLP's first linear (runtime/fusion.py moves the MLP's GELU into it).

The kernel is registered as the custom op `nanogptq::gemv` (opaque to torch.compile, which calls it as it
is; a CUDA graph captures it like any other kernel).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from nanogptq.kernels.launch import pdl_available

MAX_TILE_GROUP = 256  # columns per tile group: larger scale groups are split into several tile groups
INTERPRETER_CONFIG = {"BLOCK_W": 2, "GPI": 2, "R": 2, "STAGES": 1}


# ---- INTERLEAVED (to_interleaved): two codes per instruction, at 4 and 8 bits ----
#
# Unpacking one code at a time costs about five instructions per weight (shift, mask, the mantissa trick's
# OR and subtraction, the multiply-add), which at 4 bits is more time than reading the byte takes at HBM
# speed. An INTERLEAVED word holds columns 2p, 2p + 1 of RPW rows (4 at 4 bits, 2 at 8); one instruction
# puts one row's two codes into the low 10 bits of a pair of fp16 values whose exponent makes them
# 1024 + q (0x6400 is 1024 in fp16, whose unit in the last place is 1; at 4 bits a LOP3 mask-and-OR, rows 1
# and 3 coming out as 1024 + 16 q; at 8 bits a PRMT byte permute). One packed fp16 multiply-add per row
# then gives the exact (q - z) / 2^bits (the pair scaled so that it lies in [4, 8) or [64, 128), where
# every such multiple is representable), and one more multiplies it into the activation pair (x_2p,
# x_2p+1), which is one int32 of the activation row: about 1.5 instructions per weight, two lanes each.
# Weights and activations are read with one index tensor, so Triton gives both one register layout (no
# shuffle through shared memory), in 16-byte loads. Each lane sums R products in fp16 and each thread then
# adds its 4 neighbouring words' sums, still in fp16 (4 R products per row; exact codes over 2^bits keep
# the sums near the activations' size; activations rounded from bf16 to fp16's 11 bits), before one
# conversion to fp32 and the group's scale (times 2^bits).


_ROWS4_ASM = tl.constexpr("""
{
.reg .b32 a, b, c, d, t, k16, k256;
lop3.b32 a, $4, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 b, $4, 0x00F000F0, 0x64006400, 0xEA;
shr.u32 t, $4, 8;
lop3.b32 c, t, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 d, t, 0x00F000F0, 0x64006400, 0xEA;
mov.b32 k16, 0x2C002C00;
mov.b32 k256, 0x1C001C00;
fma.rn.f16x2 a, a, k16, $6;
fma.rn.f16x2 b, b, k256, $7;
fma.rn.f16x2 c, c, k16, $8;
fma.rn.f16x2 d, d, k256, $9;
fma.rn.f16x2 $0, a, $5, $10;
fma.rn.f16x2 $1, b, $5, $11;
fma.rn.f16x2 $2, c, $5, $12;
fma.rn.f16x2 $3, d, $5, $13;
}
""")
# 4 bits: $0..$3 the four rows' fp16-pair accumulators out, $10..$13 in; $4 the word; $5 the activation
# pair in fp16; $6..$9 the rows' -(1024 + z) / 16 (rows 0, 2: (1024 + q) / 16 = 64 + q / 16) or
# -(1024 + 16 z) / 256 (rows 1, 3) in both halves. lop3's table 0xEA is (a & b) | c; 0x2C00 = 1/16,
# 0x1C00 = 1/256.


_ROWS8_ASM = tl.constexpr("""
{
.reg .b32 a, b, magic, k256;
mov.b32 magic, 0x64646464;
mov.b32 k256, 0x1C001C00;
prmt.b32 a, $2, magic, 0x4240;
prmt.b32 b, $2, magic, 0x4341;
fma.rn.f16x2 a, a, k256, $4;
fma.rn.f16x2 b, b, k256, $5;
fma.rn.f16x2 $0, a, $3, $6;
fma.rn.f16x2 $1, b, $3, $7;
}
""")
# 8 bits: $0, $1 the two rows' accumulators out, $6, $7 in; $2 the word (bytes: row 0 col 0, row 1 col 0,
# row 0 col 1, row 1 col 1); $3 the activation pair; $4, $5 the rows' -(1024 + z) / 256. prmt's selector
# 0x4240 takes bytes 0 and 2 of the word with 0x64 above each: (1024 + q_a, 1024 + q_b).

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
def _hadd2(a, b):
    return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _row_total(acc, h, s, FAST: tl.constexpr):
    """One row's lane sums (fp16 pairs when FAST, else already fp32) times its scale, into acc. The lane
    sums of each thread's 4 neighbouring words (one 16-byte load) are added first, in fp16 when FAST, so
    the conversion to fp32 and the scaling happen once per 4 words."""
    h4 = tl.reshape(h, (h.shape[0], h.shape[1], h.shape[2] // 4, 4))
    if FAST:
        h = tl.reduce(h4, 3, _hadd2)
        h = tl.inline_asm_elementwise(_F16X2_SUM_ASM, "=r,r", [h], dtype=tl.float32, is_pure=True, pack=1)
    else:
        h = tl.sum(h4, axis=3)
    return acc + h * s


@triton.jit
def _offset(z, r: tl.constexpr, BITS: tl.constexpr):
    """fp16 bits, in both halves, of -(the unpacked 1024 + z) times the row's multiplier (see the asm)."""
    if BITS == 8:
        v = 0xC400 + z  # -(4 + z / 256): 4's unit in the last place is 1/256
    elif r % 2 == 0:
        v = 0xD400 + z  # -(64 + z / 16): 64's unit in the last place is 1/16
    else:
        v = 0xC400 + z * 16  # -(4 + z / 16)
    return v * 0x10001


@triton.jit
def _pair_dot(w, r: tl.constexpr, z, xa, xb, BITS: tl.constexpr):
    """The fp32 twin of one row's asm: sum over the pair of (q - z) x / 2^bits (the interpreter's path)."""
    mask: tl.constexpr = (1 << BITS) - 1
    qa = ((w >> (BITS * r)) & mask) - z
    qb = ((w >> (16 + BITS * r)) & mask) - z
    return (qa.to(tl.float32) * xa + qb.to(tl.float32) * xb) * (1.0 / (1 << BITS))


@triton.jit
def _load(ptr, mask, EVEN: tl.constexpr):
    """tl.load, masked (zeros outside) unless the tile divides the matrix (EVEN): a masked load first zeroes
    its registers, an instruction per two."""
    if EVEN:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=0)


@triton.jit
def _gemv_rows_kernel(
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
    stride_ww,  # in words, per word row (RPW rows)
    stride_sn,
    stride_zn,
    stride_ym,
    BITS: tl.constexpr,
    PG: tl.constexpr,  # column pairs (words) per tile group
    HAS_Z: tl.constexpr,
    X_BF16: tl.constexpr,  # activations are bf16 (else fp16)
    FAST: tl.constexpr,  # the packed-fp16 inline assembly (GPU); off: the same sums in fp32 (interpreter)
    BLOCK_W: tl.constexpr,  # word rows per program
    GPI: tl.constexpr,  # tile groups per step
    R: tl.constexpr,  # words per lane per tile group (a thread sums 4 R products per row in fp16 before the scale)
    GELU: tl.constexpr = False,  # the output through GELU (the MLP's first linear: one kernel fewer per block)
    EVEN: tl.constexpr = False,  # whole tiles only (set by _whole_tiles): no masks
    STAGES: tl.constexpr = 1,
    PDL: tl.constexpr = False,  # launched as a programmatic dependent (sm_90): wait for the previous kernel
):
    RPW: tl.constexpr = 16 // BITS  # rows per word: 4 or 2 (rows 2 and 3 exist at 4 bits only)
    C: tl.constexpr = PG // R
    m = tl.program_id(1)
    rw = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    row = rw * RPW
    rmask = row < N
    rg = tl.arange(0, GPI)
    rc = tl.arange(0, C)
    acc0 = tl.zeros((BLOCK_W, GPI, C // 4), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_W, GPI, C // 4), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_W, GPI, C // 4), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_W, GPI, C // 4), dtype=tl.float32)
    x_row = x_ptr + m * stride_xm
    x32 = x32_ptr + m * (stride_xm // 2)
    same = (rw * 0)[:, None, None]  # adds nothing, but gives the activation loads the weights' (3-d) shape
    if PDL:  # x is the previous kernel's output: wait for it, then let the next kernel start (mma.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    for g0 in tl.range(0, NG, GPI, num_stages=STAGES):
        g = g0 + rg
        sg = g // SG_DIV
        gmask = rmask[:, None] & (g < NG)[None, :]  # the word row; its rows 1-3 may be padding (N odd, ...)
        gm1 = gmask & (row + 1 < N)[:, None]
        gm2 = gmask & (row + 2 < N)[:, None]
        gm3 = gmask & (row + 3 < N)[:, None]
        s_at = s_ptr + row[:, None] * stride_sn + sg[None, :]
        z_at = z_ptr + row[:, None] * stride_zn + sg[None, :]
        s0 = _load(s_at, gmask, EVEN).to(tl.float32)[:, :, None]
        s1 = _load(s_at + stride_sn, gm1, EVEN).to(tl.float32)[:, :, None]
        s2, s3 = s0, s1  # rows 2 and 3: 4 bits only
        if BITS == 4:
            s2 = _load(s_at + 2 * stride_sn, gm2, EVEN).to(tl.float32)[:, :, None]
            s3 = _load(s_at + 3 * stride_sn, gm3, EVEN).to(tl.float32)[:, :, None]
        if HAS_Z:
            z0 = _load(z_at, gmask, EVEN).to(tl.int32)[:, :, None]
            z1 = _load(z_at + stride_zn, gm1, EVEN).to(tl.int32)[:, :, None]
            z2, z3 = z0, z1
            if BITS == 4:
                z2 = _load(z_at + 2 * stride_zn, gm2, EVEN).to(tl.int32)[:, :, None]
                z3 = _load(z_at + 3 * stride_zn, gm3, EVEN).to(tl.int32)[:, :, None]
        else:
            z0 = tl.full((BLOCK_W, GPI, 1), 1 << (BITS - 1), tl.int32)
            z1, z2, z3 = z0, z0, z0
        if FAST:
            h0 = tl.zeros((BLOCK_W, GPI, C), dtype=tl.int32)  # fp16 pairs (+0, +0)
            h1, h2, h3 = h0, h0, h0
            o0, o1 = _offset(z0, 0, BITS), _offset(z1, 1, BITS)
            o2, o3 = _offset(z2, 2, BITS), _offset(z3, 3, BITS)
        else:
            h0 = tl.zeros((BLOCK_W, GPI, C), dtype=tl.float32)
            h1, h2, h3 = h0, h0, h0
        wmask = gmask[:, :, None]
        for i in tl.static_range(R):
            pair = g[None, :, None] * PG + i * C + rc[None, None, :]  # (1, GPI, C)
            w = _load(w_ptr + rw[:, None, None] * stride_ww + pair, wmask, EVEN)
            xmask = (pair < K // 2) & wmask  # K is even: a pair is all in or all padding
            if FAST:
                xp = _load(x32 + pair + same, xmask, EVEN)
                if X_BF16:
                    xp = tl.inline_asm_elementwise(_BF16X2_TO_F16X2_ASM, "=r,r", [xp], dtype=tl.int32,
                                                   is_pure=True, pack=1)
                if BITS == 4:
                    h0, h1, h2, h3 = tl.inline_asm_elementwise(
                        _ROWS4_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [w, xp, o0, o1, o2, o3, h0, h1, h2, h3],
                        dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1,
                    )
                else:
                    h0, h1 = tl.inline_asm_elementwise(
                        _ROWS8_ASM, "=r,=r,r,r,r,r,r,r", [w, xp, o0, o1, h0, h1],
                        dtype=(tl.int32, tl.int32), is_pure=True, pack=1,
                    )
            else:
                xa = _load(x_row + pair * 2 + same, xmask, EVEN).to(tl.float32)
                xb = _load(x_row + pair * 2 + 1 + same, xmask, EVEN).to(tl.float32)
                h0 += _pair_dot(w, 0, z0, xa, xb, BITS)
                h1 += _pair_dot(w, 1, z1, xa, xb, BITS)
                if BITS == 4:
                    h2 += _pair_dot(w, 2, z2, xa, xb, BITS)
                    h3 += _pair_dot(w, 3, z3, xa, xb, BITS)
        acc0 = _row_total(acc0, h0, s0, FAST)
        acc1 = _row_total(acc1, h1, s1, FAST)
        if BITS == 4:
            acc2 = _row_total(acc2, h2, s2, FAST)
            acc3 = _row_total(acc3, h3, s3, FAST)
    y_at = y_ptr + m * stride_ym + row
    tl.store(y_at, _output(acc0, BITS, GELU, y_ptr), mask=rmask)
    tl.store(y_at + 1, _output(acc1, BITS, GELU, y_ptr), mask=row + 1 < N)
    if BITS == 4:
        tl.store(y_at + 2, _output(acc2, BITS, GELU, y_ptr), mask=row + 2 < N)
        tl.store(y_at + 3, _output(acc3, BITS, GELU, y_ptr), mask=row + 3 < N)


@triton.jit
def _output(acc, BITS: tl.constexpr, GELU: tl.constexpr, y_ptr):
    """One row's output: the sum of its partial sums, times the 2^bits that the codes' scaling by 2^-bits
    left out (once per output: exact, a power of 2), then GELU (erf form, as F.gelu) when asked."""
    y = tl.sum(tl.sum(acc, axis=2), axis=1) * (1 << BITS)
    if GELU:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    return y.to(y_ptr.dtype.element_ty)


def _rows_configs() -> list[triton.Config]:
    """(BLOCK_W, GPI, R, warps): 8 to 16 words per thread and pass, in 16-byte loads, so each multiprocessor
    keeps enough bytes in flight to cover HBM latency (Little's law: about 30 KB on an H200) and the fixed
    cost of a pass (scales, zero points, addresses) spreads over many weights; R words per lane before the
    fp16 sums are scaled."""
    tiles = [(1, 8, 1, 2), (1, 8, 2, 2), (1, 16, 2, 2), (1, 16, 4, 2), (2, 8, 4, 2), (1, 16, 1, 4), (1, 16, 2, 4),
             (1, 32, 2, 4), (1, 32, 4, 4), (2, 16, 4, 4), (4, 8, 4, 4), (2, 8, 2, 4), (1, 32, 4, 8), (2, 32, 4, 8)]
    configs = [triton.Config({"BLOCK_W": bw, "GPI": gpi, "R": r, "STAGES": 1}, num_warps=w) for bw, gpi, r, w in tiles]
    # software pipelining of the loads, for two of them
    configs += [triton.Config({"BLOCK_W": 1, "GPI": gpi, "R": r, "STAGES": 2}, num_warps=w)
                for gpi, r, w in ((8, 2, 2), (16, 4, 4))]
    return configs


def _prune_rows(configs, named_args, **kwargs):
    """Each of the R lane tiles must hold whole 4-word loads: R divides PG / 4 (small groups have few pairs)."""
    pg = named_args.get("PG", kwargs.get("PG"))  # at least 8 (groups of 16): the R = 1 tiles always stay
    return [c for c in configs if (pg // 4) % c.kwargs["R"] == 0]


def _whole_tiles(args) -> bool:
    """Whether the program tiles cover the matrix exactly: rows, tile groups, and K itself."""
    rows = rows_per_word(args["BITS"]) * args["BLOCK_W"]
    return args["N"] % rows == 0 and args["NG"] % args["GPI"] == 0 and args["K"] == args["NG"] * 2 * args["PG"]


_gemv_rows = triton.heuristics({"EVEN": _whole_tiles})(_gemv_rows_kernel)
_gemv_rows_tuned = triton.autotune(
    configs=_rows_configs(),
    key=["N", "K", "PG", "BITS", "X_BF16"],
    prune_configs_by={"early_config_prune": _prune_rows},
)(_gemv_rows)


def tuned_configs() -> dict[str, str]:
    """The tile the autotuner picked per key (N, K, tile-group pairs, bits, bf16 activations) so far, for
    benchmark reports."""
    return {f"interleaved {key[:5]}": str(cfg) for key, cfg in _gemv_rows_tuned.cache.items()}


def compile_signature() -> dict[str, str]:
    """The kernel's argument types, read off its own parameter list, for triton.compile without a GPU (the
    sm_90 compile test): fp16 activations, SG_DIV a constant as Triton specializes
    it to 1 (grouped grids up to 256 columns)."""
    pointers = {"x_ptr": "*fp16", "x32_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8",
                "y_ptr": "*fp16"}
    return {p.name: "constexpr" if p.is_constexpr or p.name == "SG_DIV" else pointers.get(p.name, "i32")
            for p in _gemv_rows_kernel.params}


def tile_group(group_size: int, in_features: int, bits: int) -> tuple[int, int]:
    """(G, SG_DIV): the kernel's tile group and how many of them make one scale group.

    Per-row (-1) and per-tensor (0) grids have one scale group spanning all of K: any tile works, and
    SG_DIV = cdiv(K, G) maps every tile group to scale column 0.
    """
    if group_size > 0:
        G = min(group_size, MAX_TILE_GROUP)
        return G, group_size // G
    G = 128  # at 8 bits too: larger tiles of the interleaved kernel outgrow its registers
    return G, triton.cdiv(in_features, G)


def supports(bits: int, group_size: int, in_features: int) -> bool:
    """Grouped grids need a power-of-two group (a Triton tile); per-row and per-tensor grids always work.
    INTERLEAVED words hold 2 columns (of 4 or 2 rows, the last word row padded): in_features even."""
    if bits not in (4, 8) or in_features % 2:
        return False
    return group_size in (-1, 0) or (group_size >= 16 and group_size & (group_size - 1) == 0)


def rows_per_word(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"the interleaved layout holds 4 or 8 bit codes, got {bits}")
    return 16 // bits


def _interleave_shifts(bits: int, device) -> torch.Tensor:
    return 16 * torch.arange(2, device=device) + bits * torch.arange(rows_per_word(bits), device=device)[:, None]


def to_interleaved(codes: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """Codes (N, K) re-laid as INTERLEAVED words: one int32 holds columns 2p, 2p + 1 of rows_per_word(bits)
    rows, code (row r of the word's rows, column 2p + c) at bits 16 c + bits r. The last word row is padded
    with zero rows where rows_per_word does not divide N (a vocabulary of 65 or 50,257 tokens), each row's
    last tile group with zero codes. -> int32 (cdiv(N, rows_per_word), NG * G / 2)."""
    rpw = rows_per_word(bits)
    N, K = codes.shape
    tile = tile_group(group_size, K, bits)[0]
    tiles = -(-K // tile)
    codes = torch.nn.functional.pad(codes, (0, tiles * tile - K, 0, -N % rpw)).to(torch.int64)
    codes = codes.view(-1, rpw, tiles * tile // 2, 2).permute(0, 2, 1, 3)  # (word row, pair, r, c)
    words = (codes << _interleave_shifts(bits, codes.device)).sum((-2, -1))  # < 2^32, wraps into int32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def from_interleaved(words: torch.Tensor, n: int, bits: int, rows: int) -> torch.Tensor:
    """Inverse of to_interleaved: uint8 codes (rows, n), the padding rows and columns dropped."""
    shifts = _interleave_shifts(bits, words.device).to(torch.int32)
    codes = (words[..., None, None] >> shifts) & ((1 << bits) - 1)  # the sign bits are masked off
    return codes.permute(0, 2, 1, 3).reshape(rows_per_word(bits) * words.shape[0], -1)[:rows, :n].to(torch.uint8)


def launch(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    N: int,
    gelu: bool = False,
    config: dict | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """The kernel on explicit tensors (words from `to_interleaved` of N rows); `config` (the autotuner's
    keys) skips the autotuner, as Triton's CPU interpreter (TRITON_INTERPRET=1, which tests the kernel
    without a GPU) needs; `pdl` (default: on sm_90 and later) launches it as a programmatic dependent of
    the previous kernel."""
    M, K = x.shape
    rpw = rows_per_word(bits)
    G, sg_div = tile_group(group_size, K, bits)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    stride_sn = 0 if scales.shape[0] == 1 else scales.stride(0)
    stride_zn = 0 if zeros is None or zeros.shape[0] == 1 else zeros.stride(0)
    fast = os.environ.get("TRITON_INTERPRET") != "1" and x.dtype in (torch.bfloat16, torch.float16)
    if pdl is None:
        pdl = fast and x.is_cuda and pdl_available(x.device.index or 0)

    def grid(meta):
        return (triton.cdiv(N, rpw * meta["BLOCK_W"]), M)

    (_gemv_rows if config else _gemv_rows_tuned)[grid](
        x, x.view(torch.int32) if fast else x, words, scales, scales if zeros is None else zeros, y,
        N, K, triton.cdiv(K, G), sg_div, x.stride(0), words.stride(0), stride_sn, stride_zn, y.stride(0),
        BITS=bits, PG=G // 2, HAS_Z=zeros is not None, X_BF16=x.dtype == torch.bfloat16, FAST=fast, GELU=gelu,
        PDL=pdl, **({"launch_pdl": True} if pdl else {}), **(config or {}),
    )  # fmt: skip  (the int32 view is unread when not fast; zeros unread when HAS_Z is off)
    return y


@torch.library.custom_op("nanogptq::gemv", mutates_args=())
def gemv(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    out_features: int,
    gelu: bool = False,
) -> torch.Tensor:
    """x (M, K) in the activation dtype, words (cdiv(N, rows_per_word), ...) int32 from `to_interleaved`,
    scales (rows, n_groups) fp16, zeros (rows, n_groups) uint8 codes or None for a symmetric grid; rows = 1
    for a per-tensor grid, else N = out_features. -> (M, N), through GELU if `gelu`."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter cannot autotune
    config = INTERPRETER_CONFIG if interpreted else None
    return launch(x, words, scales, zeros, bits, group_size, out_features, gelu, config)


@gemv.register_fake
def _(x, words, scales, zeros, bits, group_size, out_features, gelu=False):
    return x.new_empty(x.shape[0], out_features)
