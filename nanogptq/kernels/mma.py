"""A 4-bit GEMV on tensor cores for decoding (up to 8 rows), in CUDA C compiled at first use (NVRTC).

For activation rows x[m] and a grid w[n, k] = (q[n, k] - z[n, g]) * s[n, g], g = k // group:

    y[m, n] = sum_g s[n, g] sum_{k in g} (q[n, k] - z[n, g]) x[m, k]

Each warp multiplies a 16-row tile of codes by the activations with `mma.sync.m16n8k16` (fp16 inputs, fp32
sums): the codes are the A operand (16 rows x 16 k per instruction, 8 codes per lane: one int32 word), the
activations the B operand, whose 8 columns are 8 activation rows (columns past the last row repeat it and
are not stored). Tensor cores do the multiply-adds, so what is left per weight is turning 4-bit codes into
exact fp16 (q - z): per word a shift, four LOP3s (the 0x6400 trick: 1024 + q, or 1024 + 16 q for the high
nibble) and four fp16x2 add/fma with -(1024 + z) or (1/16, -(64 + z)), then one mma: 10 instructions per
8 weights before loads and addressing, fewer than the Triton GEMV's loop (triton_gemv.py) spends, and the
sums are fp32 (the Triton kernel's innermost ones are fp16).

The kernel is launched as a programmatic dependent of the kernel before it (sm_90 and later, `launch_kernel`):
its blocks may start while that kernel ends, load their first codes (constant) and then wait for it
(`wait_previous_kernel`) before reading x, which it wrote; they then let the next kernel start. With the
compiled step's fused kernels doing the same (runtime.generate.compile_blocks), a decoded model's kernels overlap
their ends and starts instead of draining the GPU between them.

The tuner (`time_configs`) picks per shape how many chunks a warp loads per batch, how many warps split K,
how many consecutive row tiles a block takes (1, 2 or 4: they share each activation load, at the cost of
registers), whether x is read through the non-coherent path, and whether each warp first copies its part of
x to shared memory (one activation row only), so that no registers hold x while the codes load.

The epilogue adds a bias (fp32), applies GELU and adds a residual (each compiled in or out: the FLAGS
template parameter, so a plain GEMV carries none of it); for one row staged in shared memory it
also folds a LayerNorm of x into the product (store_sums has the algebra): x is staged as gamma * x, the
staging sums x and x^2, and the epilogue applies the mean and rstd. A decoded block then runs no LayerNorm
or add kernels (runtime/fusion.py). Warp 0, which runs the epilogue, loads its vectors before the warps'
reduction, so they arrive while it waits at the barrier instead of after it (the output and the residual
may alias, so loads in the epilogue would each wait for the store before them).

The words are laid out (`to_mma_layout`, once at load) so each lane's word is its A fragment, and so a
warp's 32 lanes read 512 contiguous bytes per load. The mma's k index is a sum index, so any permutation of
k within a chunk works if codes and activations agree: lane (g, t) (g = lane / 4, t = lane % 4) covers the
4 CW contiguous activations 4 CW t ... of its chunk (16 CW columns), which it loads as CW / 2 16-byte
vectors, and word i of that lane multiplies activations 4 i ... 4 i + 3 of them.

PTX fragments of mma.m16n8k16 (f16 A row-major, B column-major, f32 C), g = lane >> 2, t = lane & 3:
    A reg j (j = 0..3) holds rows g + 8 (j & 1), columns 2 t + 8 (j >> 1) + (0, 1)
    B reg j (j = 0, 1) holds rows 2 t + 8 j + (0, 1), column g
    C reg j (j = 0..3) holds row g + 8 (j >> 1), column 2 t + (j & 1)
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math

import torch

from nanogptq.kernels.launch import build, launch_kernel, pdl_available

log = logging.getLogger(__name__)

GROUP_CW = (8, 4)  # words per lane per chunk: chunks of 128 or 64 columns; a group holds whole chunks
MAX_ROWS = 8  # activation rows: the B operand's 8 columns
# (chunks per batch of loads, warps per block splitting K, row tiles per block, activations through the
# non-coherent path, activations staged in shared memory): the tuner's candidates, each the fastest for some
# shape of the decode benchmark's models on an H100 or H200. Staging x (one activation row only,
# `x_shared_bytes`) frees the registers that held it while the codes load, which makes room for deeper batches.
CONFIGS = ((2, 2, 1, False, False), (2, 4, 1, False, False), (2, 8, 1, False, False), (4, 2, 1, False, False),
           (4, 4, 1, False, False), (1, 8, 1, False, False), (2, 4, 2, False, False), (2, 8, 2, False, False),
           (2, 4, 1, True, False), (1, 8, 4, True, False),
           (2, 4, 1, False, True), (2, 8, 1, False, True), (4, 8, 1, False, True), (8, 4, 1, False, True),
           (8, 8, 1, False, True), (4, 4, 2, False, True), (4, 8, 2, False, True),
           (1, 8, 4, False, True), (2, 4, 2, False, True), (1, 8, 2, False, True))  # x staged, 2-4 tiles: for
# a folded LayerNorm (which needs x staged) on shapes where 2-4 tiles won with x in registers
Config = tuple[int, int, int, bool, bool]

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
struct __align__(16) u32x4 { u32 x, y, z, w; };

__device__ __forceinline__ u32 lop3_or(u32 a, u32 mask) {  // (a & mask) | 0x64006400
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(mask), "r"(0x64006400u));
  return r;
}
__device__ __forceinline__ u32 hadd2(u32 a, u32 b) {
  u32 r;
  asm("add.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}
__device__ __forceinline__ void mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ld_stream(u32* r, const u32* p) {  // read once: keep it out of L1
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
}
__device__ __forceinline__ void wait_previous_kernel() {
  // Programmatic dependent launch (sm_90): this grid may start while the previous kernel still runs; wait
  // for it (and its writes) here, then let the next kernel start. A no-op for a grid launched without it.
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ float h2f(u32 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)h));
  return f;
}
__device__ __forceinline__ u16 f2h(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

template <int CW, int TILES>
struct Chunk {  // one lane's share of one chunk of TILES row tiles: codes and grids, 2 CW activation pairs
  u32 w[TILES][CW];
  u32 x[2 * CW];
  u32 s[TILES], z[TILES];
};

template <int CW, int TILES>
__device__ __forceinline__ void load_codes(Chunk<CW, TILES>& ch, const u32* w, size_t tile_words, const u32* s,
                                           const u16* z, int tile_grids, bool has_z) {
#pragma unroll
  for (int tt = 0; tt < TILES; ++tt) {
#pragma unroll
    for (int v = 0; v < CW / 4; ++v) ld_stream(ch.w[tt] + 4 * v, w + tt * tile_words + 128 * v);
    ch.s[tt] = s[tt * tile_grids];
    ch.z[tt] = has_z ? (u32)z[tt * tile_grids] : 0x0808u;  // symmetric grids: z = 8
  }
}

template <int CW, bool XNC>
__device__ __forceinline__ void load_x(u32 (&xr)[2 * CW], const u16* x) {
  // x is written by the previous kernel, and read only after waiting for it (`wait_previous_kernel`, whose
  // memory clobber keeps these loads below it). XNC: through the non-coherent path (volatile asm, so it
  // stays below the wait too), which assumes data no one writes while the kernel reads it: true after the
  // wait, and no line of x is read before it. Else a plain load, which the compiler schedules freely (also
  // what reads a chunk's x back from shared memory: XS below).
#pragma unroll
  for (int v = 0; v < CW / 2; ++v) {
    if (XNC) {
      asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                   : "=r"(xr[4 * v]), "=r"(xr[4 * v + 1]), "=r"(xr[4 * v + 2]), "=r"(xr[4 * v + 3])
                   : "l"(x + 8 * v));
    } else {
      const u32x4 r = *reinterpret_cast<const u32x4*>(x + 8 * v);
      xr[4 * v] = r.x, xr[4 * v + 1] = r.y, xr[4 * v + 2] = r.z, xr[4 * v + 3] = r.w;
    }
  }
}

struct Epilogue {  // the vectors of what the kernel applies besides the product (its FLAGS say which)
  const u16* gamma;  // FOLD: a LayerNorm's weight, fp16 (K)
  const float* u;    // FOLD: W gamma, fp32 (N)
  const float* c;    // BIAS: added to every row, fp32 (N)
  const u16* res;    // RESIDUAL: added last, fp16 (M, N) with y's stride
  float eps;         // FOLD: the LayerNorm's
};
enum { FOLD = 1, BIAS = 2, GELU = 4, RESIDUAL = 8 };  // FLAGS, a template parameter: without them, no code

template <int CW, bool XNC, bool FOLDS>
__device__ __forceinline__ float2 stage_x(u16* xw, const u16* xg, const u16* gamma, int chunks) {
  // A warp's chunks of x to shared memory; with FOLDS, as gamma * x (fp32 products), returning the warp's sums
  // of x and of x^2 (for the LayerNorm's mean and variance, which the epilogue applies: see store_sums)
  float s1 = 0.f, s2 = 0.f;
  for (int p = (threadIdx.x & 31); p < chunks * 2 * CW; p += 32) {  // 16-byte pieces, 2 CW per chunk
    u32 r[4];
    load_x<2, XNC>(r, xg + 8 * p);
    if (FOLDS) {
      const u32x4 gv = *reinterpret_cast<const u32x4*>(gamma + 8 * p);
      const u32 gr[4] = {gv.x, gv.y, gv.z, gv.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float lo = h2f(r[e] & 0xFFFFu), hi = h2f(r[e] >> 16);
        s1 += lo + hi;
        s2 = fmaf(lo, lo, fmaf(hi, hi, s2));
        r[e] = (u32)f2h(lo * h2f(gr[e] & 0xFFFFu)) | ((u32)f2h(hi * h2f(gr[e] >> 16)) << 16);
      }
    }
    *reinterpret_cast<u32x4*>(xw + 8 * p) = u32x4{r[0], r[1], r[2], r[3]};
  }
  if (FOLDS) {
#pragma unroll
    for (int o = 16; o; o >>= 1) s1 += __shfl_xor_sync(0xFFFFFFFFu, s1, o), s2 += __shfl_xor_sync(0xFFFFFFFFu, s2, o);
  }
  __syncwarp();
  return make_float2(s1, s2);
}

template <int CW, int TILES>
__device__ __forceinline__ void compute(float (&acc)[TILES][4], const Chunk<CW, TILES>& ch) {
#pragma unroll
  for (int tt = 0; tt < TILES; ++tt) {  // the tiles share the chunk's activations (the B operand)
    const u32 olo = (0xE400u + (ch.z[tt] & 0xFFu)) * 0x10001u;   // -(1024 + z) for row g, in both halves
    const u32 ohi = (0xD400u + 16u * (ch.z[tt] >> 8)) * 0x10001u;  // -(64 + z) for row g + 8
    const u32 k16 = 0x2C002C00u;                                    // 1/16
    float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < CW; ++i) {
      const u32 q = ch.w[tt][i], q2 = q >> 8;
      const u32 a0 = hadd2(lop3_or(q, 0x000F000Fu), olo);        // nibbles 0, 4: row g
      const u32 a1 = hfma2(lop3_or(q, 0x00F000F0u), k16, ohi);   // nibbles 1, 5: row g + 8
      const u32 a2 = hadd2(lop3_or(q2, 0x000F000Fu), olo);       // nibbles 2, 6: row g
      const u32 a3 = hfma2(lop3_or(q2, 0x00F000F0u), k16, ohi);  // nibbles 3, 7: row g + 8
      mma(d, a0, a1, a2, a3, ch.x[2 * i], ch.x[2 * i + 1]);
    }
    const float s_lo = h2f(ch.s[tt] & 0xFFFFu), s_hi = h2f(ch.s[tt] >> 16);
    acc[tt][0] += d[0] * s_lo;
    acc[tt][1] += d[1] * s_lo;
    acc[tt][2] += d[2] * s_hi;
    acc[tt][3] += d[3] * s_hi;
  }
}

template <int TILES, int FLAGS>
struct Vectors {  // the epilogue's values for warp 0's outputs, loaded early: u, bias, residual
  float u[FLAGS & FOLD ? TILES : 1][4], c[FLAGS & BIAS ? TILES : 1][4], r[FLAGS & RESIDUAL ? TILES : 1][4];
};

template <int TILES, int FLAGS>
__device__ __forceinline__ void load_vectors(Vectors<TILES, FLAGS>& vec, int T0, int M, int N, int y_stride,
                                             const Epilogue& ep) {
  // Before the warps' reduction, so that these loads complete while warp 0 waits for the others at the
  // barrier, and the epilogue after it does not wait on memory again
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = 16 * (T0 + tt) + g + 8 * (j >> 1), m = 2 * t + (j & 1);
      const bool in = n < N && m < M;
      if (FLAGS & FOLD) vec.u[tt][j] = in ? ep.u[n] : 0.f;
      if (FLAGS & BIAS) vec.c[tt][j] = in ? ep.c[n] : 0.f;
      if (FLAGS & RESIDUAL) vec.r[tt][j] = in ? h2f(ep.res[(size_t)m * y_stride + n]) : 0.f;
    }
}

template <int WARPS, int TILES, int FLAGS>
__device__ __forceinline__ void store_sums(float (&acc)[TILES][4], float2 stats, u16* __restrict__ y, int T0, int M,
                                           int N, int K, int y_stride, const Epilogue& ep,
                                           const Vectors<TILES, FLAGS>& vec) {
  // With FOLD, x was staged as gamma * x, so for LayerNorm(x) = (x - mean) rstd gamma + beta,
  //     W LayerNorm(x) + bias = rstd (W (gamma * x) - mean W gamma) + (W beta + bias)
  // (W beta + bias is the BIAS vector): the mean and rstd of x come from the warps' sums.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  if (WARPS > 1) {  // the warps' partial sums over their parts of K
    __shared__ float red[WARPS][TILES][32][4];
    __shared__ float2 red_stats[FLAGS & FOLD ? WARPS : 1];
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
      for (int j = 0; j < 4; ++j) red[warp][tt][lane][j] = acc[tt][j];
    if ((FLAGS & FOLD) && lane == 0) red_stats[warp] = stats;
    __syncthreads();
    if (warp) return;
#pragma unroll
    for (int wk = 1; wk < WARPS; ++wk) {
#pragma unroll
      for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[tt][j] += red[wk][tt][lane][j];
      if (FLAGS & FOLD) stats.x += red_stats[wk].x, stats.y += red_stats[wk].y;
    }
  }
  float mean = 0.f, rstd = 1.f;
  if (FLAGS & FOLD) mean = stats.x / K, rstd = rsqrtf(fmaxf(stats.y / K - mean * mean, 0.f) + ep.eps);  // biased
#pragma unroll
  for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // C reg j: row g + 8 (j >> 1), activation row 2 t + (j & 1)
      const int n = 16 * (T0 + tt) + g + 8 * (j >> 1), m = 2 * t + (j & 1);
      if (n >= N || m >= M) continue;
      float v = acc[tt][j];
      if (FLAGS & FOLD) v = rstd * (v - mean * vec.u[tt][j]);
      if (FLAGS & BIAS) v += vec.c[tt][j];
      if (FLAGS & GELU) v = 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
      if (FLAGS & RESIDUAL) v += vec.r[tt][j];
      y[(size_t)m * y_stride + n] = f2h(v);
    }
}

template <int CW, int UNROLL, int WARPS, int TILES, bool XNC, bool XS, int FLAGS>
__global__ void __launch_bounds__(WARPS * 32) mma_gemv(
    const u32* __restrict__ w, const u16* x, const u32* __restrict__ s, const u16* __restrict__ z,
    u16* __restrict__ y, int M, int N, int NC, int cpg_log2, int NGR, int x_stride, int y_stride, int has_z,
    Epilogue ep) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  // TILES consecutive row tiles per block (they share each activation load); the last block's may overlap
  // the block before it, which then computes and writes those rows' same values twice (NT >= TILES)
  const int NT = (N + 15) / 16, T0 = min((int)blockIdx.x * TILES, NT - TILES);
  const int cbeg = (NC * warp) / WARPS, cend = (NC * (warp + 1)) / WARPS;
  const size_t tile_words = (size_t)NC * CW * 32;
  const int tile_grids = NGR * 8;
  const u32* wl = w + (size_t)T0 * tile_words + lane * 4;
  // lane g's B column is activation row g; columns g >= M repeat the last row, and are not stored
  const u16* xl = x + (size_t)min(g, M - 1) * x_stride + 4 * CW * t;
  // XS (one activation row): each warp copies its columns of x to shared memory once, then reads each chunk's
  // fragments from there just before its mma, so no registers hold x while the codes load
  extern __shared__ __align__(16) u16 x_shared[];
  u16* xw = x_shared + (size_t)cbeg * 16 * CW;
  const u16* xsl = xw + 4 * CW * t;
  const u32* sl = s + (size_t)T0 * tile_grids + g;
  const u16* zl = z + (size_t)T0 * tile_grids + g;  // unread when !has_z
  float acc[TILES][4];
#pragma unroll
  for (int tt = 0; tt < TILES; ++tt) acc[tt][0] = acc[tt][1] = acc[tt][2] = acc[tt][3] = 0.f;
  // The first batch's codes and grid are constant, so they are loaded before waiting on the kernel that
  // writes x: under programmatic dependent launch they stream while that kernel ends.
  // (A warp with fewer chunks loads some of the tile's again, branch-free, and skips their compute.)
  const int first = max(0, min(UNROLL, cend - cbeg));
  Chunk<CW, TILES> ch[UNROLL];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int cu = min(cbeg + u, NC - 1), gr = cu >> cpg_log2;
    load_codes<CW, TILES>(ch[u], wl + (size_t)cu * CW * 32, tile_words, sl + gr * 8, zl + gr * 8, tile_grids, has_z);
  }
  wait_previous_kernel();
  float2 stats = make_float2(0.f, 0.f);  // FOLD: x staged (XS), one row
  if (XS) {
    stats = stage_x<CW, XNC, (FLAGS & FOLD) != 0>(xw, x + (size_t)cbeg * 16 * CW, ep.gamma + (size_t)cbeg * 16 * CW,
                                                 cend - cbeg);
  } else {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) load_x<CW, XNC>(ch[u].x, xl + min(cbeg + u, NC - 1) * 16 * CW);
  }
#pragma unroll
  for (int u = 0; u < UNROLL; ++u)
    if (u < first) {
      if (XS) load_x<CW, false>(ch[u].x, xsl + u * 16 * CW);
      compute<CW, TILES>(acc, ch[u]);
    }
  int c = cbeg + first;
  for (; c + UNROLL <= cend; c += UNROLL) {  // all of a batch's loads in flight before its first mma
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int cu = c + u, gr = cu >> cpg_log2;
      load_codes<CW, TILES>(ch[u], wl + (size_t)cu * CW * 32, tile_words, sl + gr * 8, zl + gr * 8, tile_grids,
                            has_z);
      if (!XS) load_x<CW, XNC>(ch[u].x, xl + cu * 16 * CW);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (XS) load_x<CW, false>(ch[u].x, xsl + (c + u - cbeg) * 16 * CW);
      compute<CW, TILES>(acc, ch[u]);
    }
  }
  for (; c < cend; ++c) {
    const int gr = c >> cpg_log2;
    load_codes<CW, TILES>(ch[0], wl + (size_t)c * CW * 32, tile_words, sl + gr * 8, zl + gr * 8, tile_grids, has_z);
    if (XS) load_x<CW, false>(ch[0].x, xsl + (c - cbeg) * 16 * CW);
    else load_x<CW, XNC>(ch[0].x, xl + c * 16 * CW);
    compute<CW, TILES>(acc, ch[0]);
  }
  Vectors<TILES, FLAGS> vec;
  if (warp == 0) load_vectors<TILES, FLAGS>(vec, T0, M, N, y_stride, ep);  // only warp 0 runs the epilogue
  store_sums<WARPS, TILES, FLAGS>(acc, stats, y, T0, M, N, NC * 16 * CW, y_stride, ep, vec);
}
"""


def _as_int32(v: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values (in int64) as the int32 with the same bits."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32).contiguous()


def supports(bits: int, group_size: int, in_features: int) -> bool:
    """4-bit grids whose groups hold whole chunks (64 columns at least), per-row and per-tensor grids with
    in_features a multiple of 64."""
    if bits != 4:
        return False
    if group_size > 0:  # a power of two: whole chunks per group, as a shift
        return group_size >= 64 and group_size & (group_size - 1) == 0 and in_features % group_size == 0
    return in_features % 64 == 0


def chunk_words(group_size: int, in_features: int) -> int:
    """Words per lane per chunk: 8 (128 columns) where the groups hold whole 128-column chunks, else 4."""
    span = group_size if group_size > 0 else in_features
    return next(cw for cw in GROUP_CW if span % (16 * cw) == 0)


def to_mma_layout(codes: torch.Tensor, cw: int) -> torch.Tensor:
    """Codes (N, K) of 4 bits -> int32 words (cdiv(N, 16), K / (16 cw), cw / 4, 32 lanes, 4): tile T,
    chunk c, vector v, lane 4 g + t, word 4 v + e of the lane. Word i's nibble h + 2 jh + 4 e2 holds row
    16 T + g + 8 h and column 16 cw c + 4 cw t + 4 i + 2 jh + e2 (padding rows are zero)."""
    N, K = codes.shape
    NT, NC = -(-N // 16), K // (16 * cw)
    q = torch.zeros(NT * 16, K, dtype=torch.int64, device=codes.device)
    q[:N] = codes.to(torch.int64)
    q = q.view(NT, 2, 8, NC, 4, cw, 2, 2)  # T, h, g, c, t, i, jh, e2
    q = q.permute(0, 3, 2, 4, 5, 7, 6, 1)  # T, c, g, t, i, e2, jh, h: nibble order last
    shifts = 4 * torch.arange(8, device=codes.device)
    words = (q.reshape(NT, NC, 8, 4, cw, 8) << shifts).sum(-1)  # T, c, g, t, i
    words = words.view(NT, NC, 8, 4, cw // 4, 4).permute(0, 1, 4, 2, 3, 5)  # T, c, v, g, t, e
    return _as_int32(words.reshape(NT, NC, cw // 4, 32, 4))  # sums of disjoint nibbles: < 2^32


def from_mma_layout(words: torch.Tensor, N: int) -> torch.Tensor:
    """The codes (N, K) back from `to_mma_layout`'s words: the layout's inverse, for the tests (prefill reads
    the words directly: triton_dequant.py)."""
    NT, NC, V = words.shape[:3]
    cw = 4 * V
    # in bytes (little-endian: byte b holds nibbles 2 b and 2 b + 1), so prefill unpacks 1 byte per code
    b = words.contiguous().view(torch.uint8).view(NT, NC, V, 8, 4, 4, 4)  # T, c, v, g, t, e, byte
    nibbles = torch.stack([b & 0xF, b >> 4], dim=-1)  # ..., byte, low/high: nibble 2 byte + low/high
    nibbles = nibbles.permute(0, 1, 3, 4, 2, 5, 6, 7).reshape(NT, NC, 8, 4, cw, 8)  # T, c, g, t, i, nibble
    q = nibbles.view(NT, NC, 8, 4, cw, 2, 2, 2).permute(0, 7, 2, 1, 3, 4, 6, 5)  # T, h, g, c, t, i, jh, e2
    return q.reshape(NT * 16, NC * 16 * cw)[:N].to(torch.uint8)


def grid_layout(scales: torch.Tensor, zeros: torch.Tensor | None, N: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (rows, NGR) fp16 and zero codes (rows, NGR) uint8 (rows = 1 per tensor, else N) -> per tile,
    group and g, the pair for rows g and g + 8: int32 fp16 bits (s_g | s_g+8 << 16), int16 (z_g | z_g+8 << 8)."""
    NT = -(-N // 16)

    def tiles(t: torch.Tensor) -> torch.Tensor:
        t = t.expand(N, -1).to(torch.int32)
        t = torch.cat([t, t.new_zeros(NT * 16 - N, t.shape[1])])
        return t.view(NT, 2, 8, -1).permute(0, 3, 2, 1)  # T, group, g, h

    s = tiles(scales.view(torch.int16).to(torch.int32) & 0xFFFF)
    s_pairs = _as_int32(s[..., 0].long() | (s[..., 1].long() << 16))
    if zeros is None:
        return s_pairs, None
    z = tiles(zeros)
    return s_pairs, (z[..., 0] | (z[..., 1] << 8)).to(torch.int16).contiguous()


class _Epilogue(ctypes.Structure):  # the kernel's Epilogue, passed by value
    _fields_ = [("gamma", ctypes.c_void_p), ("u", ctypes.c_void_p), ("c", ctypes.c_void_p), ("res", ctypes.c_void_p),
                ("eps", ctypes.c_float)]


FOLD, BIAS, GELU, RESIDUAL = 1, 2, 4, 8  # the kernel's FLAGS: compiled in, one instance per set used
@functools.cache
def _kernel(cw: int, config: Config, flags: int, device_index: int):
    unroll, warps, tiles, xnc, xs = config
    return build(SOURCE, f"mma_gemv<{cw}, {unroll}, {warps}, {tiles}, {str(xnc).lower()}, {str(xs).lower()}, {flags}>",
                 device_index)


SHARED_LIMIT = 48 * 1024  # a block's shared memory without the opt-in attribute


def x_shared_bytes(M: int, K: int, config: Config) -> int | None:
    """The dynamic shared memory a config stages x in: 0 without staging, None where staging cannot run (more
    than one activation row, or x too wide to fit beside the reduction's buffer)."""
    _, warps, tiles, _, xs = config
    reduction = 4 * warps * tiles * 32 * 4 + 8 * warps if warps > 1 else 0  # store_sums' red and red_stats
    if not xs:
        return 0
    return 2 * K if M == 1 and 2 * K + reduction <= SHARED_LIMIT else None


def config_error(config: Config, M: int, K: int, n_tiles: int, fold: bool) -> str | None:
    """Why `config` cannot run M rows of K on a layer of `n_tiles` row tiles (folding a LayerNorm if `fold`),
    or None if it can."""
    if config[2] > n_tiles:
        return f"{config[2]} row tiles per block, but the layer has {n_tiles}"
    if x_shared_bytes(M, K, config) is None:
        return (f"config {config} stages x in shared memory, which takes one row whose {2 * K} bytes fit in "
                f"{SHARED_LIMIT} beside the reduction's; got {M} rows")
    if fold and not config[4]:
        return f"config {config} does not stage x, which folding a LayerNorm takes"
    return None


@functools.cache
def compiles(device_index: int) -> bool:
    """Whether the kernel builds here (NVRTC found, the GPU's architecture known to it): "auto" falls back
    to the Triton GEMV where it does not, with a warning saying why."""
    try:
        _kernel(8, heuristic_config(1), 0, device_index)
    except Exception as e:  # a missing or too old libnvrtc, an unknown architecture: probing, not an error
        log.warning("the tensor-core GEMV does not build on this GPU (%s: %s); 4-bit layers fall back to the "
                    "Triton GEMV", type(e).__name__, e)
        return False
    return True


def heuristic_config(n_tiles: int, fold: bool = False) -> Config:
    """Without timing (during a CUDA-graph capture): few row tiles need more warps per tile to keep enough
    loads in flight; a LayerNorm to fold needs x staged."""
    return (2, 8, 1, False, fold) if n_tiles < 512 else (2, 2, 1, False, fold)


def can_fold(K: int) -> bool:
    """Whether a LayerNorm of K-wide rows can be folded into the GEMV: x must be staged in shared memory."""
    return x_shared_bytes(1, K, heuristic_config(1, True)) is not None


_TUNED: dict[tuple, Config] = {}  # per shape, the tuner's pick (as Triton's autotuner caches)


def l2_bytes(device: torch.device | str | int = 0) -> int:
    """The GPU's L2 cache size (50 MB on the H100 SXM, 60 MB on the H200; 50 MB where torch does not say)."""
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)


def random_layer_copies(N: int, K: int, cw: int, group_size: int, device: torch.device | str,
                        l2: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Copies of an N x K layer's words (random codes) that together exceed the L2 cache (`l2` bytes, default
    the GPU's) three times, at most 256, and one grid for all (scales 0.01, zero points 8): what the tuner
    times a shape on, as a decoded model reads each weight once per token from HBM."""
    shape = (-(-N // 16), K // (16 * cw), cw // 4, 32, 4)
    if l2 is None:
        l2 = l2_bytes(device)
    n_copies = min(max(2, -(-3 * l2 // (4 * math.prod(shape)))), 256)
    copies = [torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device=device) for _ in range(n_copies)]
    ng = 1 if group_size <= 0 else K // group_size
    s_pairs, z_pairs = grid_layout(torch.full((N, ng), 0.01, dtype=torch.float16, device=device),
                                   torch.full((N, ng), 8, dtype=torch.uint8, device=device), N)
    return copies, s_pairs, z_pairs


def time_configs(N: int, K: int, M: int, cw: int, group_size: int, device: torch.device, fold: bool = False) -> Config:
    """The fastest of CONFIGS for this shape (of those that can run it: no more tiles per block than the layer
    has, x staged only where it fits), timed on random codes in copies that together exceed the L2 cache
    three times, called in turn, as a decoded model reads each weight once per token from HBM; with `fold`,
    the configs that stage x, folding a LayerNorm. At most 256 copies: a layer of less than 1/256 of the L2
    cache is timed from L2, where a model of such layers lives anyway. (triton.testing.do_bench, which flushes
    L2 with a large write before each call, picked configs that ran the decode step slower than these.)"""
    copies, s_pairs, z_pairs = random_layer_copies(N, K, cw, group_size, device)
    x = torch.randn(M, K, dtype=torch.float16, device=device)
    norm = (torch.ones(K, dtype=torch.float16, device=device), torch.zeros(N, device=device), 1e-5) if fold else None

    def seconds(cfg: Config) -> float:
        # in a CUDA graph: launched from Python one by one, the calls would be timed at the host's pace
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for words in copies[:2]:  # compile, warm up
                launch(x, words, s_pairs, z_pairs, N, group_size, config=cfg, norm=norm)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for words in copies * 2:
                launch(x, words, s_pairs, z_pairs, N, group_size, config=cfg, norm=norm)
        runs = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end))
        return sorted(runs)[1]

    return min((cfg for cfg in CONFIGS if config_error(cfg, M, K, copies[0].shape[0], fold) is None), key=seconds)


def pick_config(x: torch.Tensor, words: torch.Tensor, N: int, group_size: int, fold: bool = False) -> Config:
    cw, (M, K) = 4 * words.shape[2], x.shape
    key = (N, K, M, cw, group_size, x.device, fold)
    if key not in _TUNED:
        if torch.cuda.is_current_stream_capturing():  # no timing inside a graph capture
            return heuristic_config(words.shape[0], fold)
        _TUNED[key] = time_configs(N, K, M, cw, group_size, x.device, fold)
    return _TUNED[key]


def tuned_configs() -> dict[str, str]:
    """The tuner's picks so far (N, K, rows, words per chunk, group), for benchmark reports."""
    form = "unroll={} warps={} tiles={} xnc={:d} xs={:d}"
    return {f"mma {key[:5]}" + (" LayerNorm" if key[6] else ""): form.format(*cfg) for key, cfg in _TUNED.items()}


Norm = tuple[torch.Tensor, torch.Tensor, float]  # a LayerNorm folded in: its weight (fp16), W times it (fp32), eps


def launch(x: torch.Tensor, words: torch.Tensor, s_pairs: torch.Tensor, z_pairs: torch.Tensor | None, N: int,
           group_size: int, gelu: bool = False, config: Config | None = None, pdl: bool | None = None,
           norm: Norm | None = None, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) fp16 times the grid, M <= 8, plus `bias` (fp32, N), through GELU if `gelu`, plus
    `residual` (M, N). With `norm`, of LayerNorm(x) instead of x, folded in (store_sums says how; one row, a
    config that stages x; bias is then W beta + the layer's bias). `config` (one of CONFIGS) skips the tuner;
    `pdl` (default: on sm_90 and later) launches it as a programmatic dependent of the previous kernel."""
    M, K = x.shape
    NT, NC, V = words.shape[:3]
    cw = 4 * V
    if x.dtype != torch.float16 or not 0 < M <= MAX_ROWS or K != NC * 16 * cw:
        raise ValueError(f"mma GEMV: x must be fp16 with 1-{MAX_ROWS} rows of {NC * 16 * cw}, got "
                         f"{x.dtype} {tuple(x.shape)}")
    if norm is not None and M != 1:
        raise ValueError(f"mma GEMV: a LayerNorm is folded in for one row, got {M}")
    vectors = [(bias, torch.float32, N)] + ([] if norm is None else [(norm[0], torch.float16, K),
                                                                     (norm[1], torch.float32, N)])
    for t, dtype, size in vectors:
        if t is not None and (t.dtype != dtype or t.shape != (size,) or not t.is_contiguous()):
            raise ValueError(f"mma GEMV: bias and LayerNorm vectors are contiguous ({size},) {dtype}, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if x.data_ptr() % 16 or x.stride(0) % 8 or x.stride(1) != 1:  # the activations' 16-byte vector loads
        x = x.contiguous().clone()  # a fresh allocation is aligned
    config = config or pick_config(x, words, N, group_size, norm is not None)
    error = config_error(config, M, K, NT, norm is not None)
    if error:
        raise ValueError(f"mma GEMV: {error}")
    tiles, shared = config[2], x_shared_bytes(M, K, config)
    # chunks per group, a power of two (as a shift); one grid per row: every chunk in group 0
    cpg_log2 = 31 if group_size <= 0 else (group_size // (16 * cw)).bit_length() - 1
    y = torch.empty(M, N, device=x.device, dtype=torch.float16)
    if residual is not None:
        residual = residual.to(torch.float16).contiguous()  # y's stride
    gamma, u, eps = norm if norm is not None else (None, None, 0.0)
    flags = (FOLD * (norm is not None) | BIAS * (bias is not None) | GELU * gelu | RESIDUAL * (residual is not None))
    epilogue = _Epilogue(*(t.data_ptr() if t is not None else None for t in (gamma, u, bias, residual)), eps)
    index = x.device.index or 0
    pdl = pdl_available(index) if pdl is None else pdl
    launch_kernel(_kernel(cw, config, flags, index), -(-NT // tiles), 32 * config[1],
                  [words, x, s_pairs, s_pairs if z_pairs is None else z_pairs, y, M, N, NC, cpg_log2, s_pairs.shape[1],
                   x.stride(0), y.stride(0), int(z_pairs is not None), epilogue],
                  torch.cuda.current_stream(x.device), pdl, shared)  # z unread if symmetric
    return y


@torch.library.custom_op("nanogptq::mma_gemv", mutates_args=())
def mma_gemv(x: torch.Tensor, words: torch.Tensor, s_pairs: torch.Tensor, z_pairs: torch.Tensor | None,
             out_features: int, group_size: int, gelu: bool = False, ln_weight: torch.Tensor | None = None,
             ln_u: torch.Tensor | None = None, ln_eps: float = 1e-5, bias: torch.Tensor | None = None,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """`launch` as an op torch.compile calls as it is (a raw kernel launch is not traceable)."""
    norm = None if ln_weight is None else (ln_weight, ln_u, ln_eps)
    return launch(x, words, s_pairs, z_pairs, out_features, group_size, gelu, norm=norm, bias=bias, residual=residual)


@mma_gemv.register_fake
def _(x, words, s_pairs, z_pairs, out_features, group_size, gelu=False, ln_weight=None, ln_u=None, ln_eps=1e-5,
      bias=None, residual=None):
    return x.new_empty(x.shape[0], out_features, dtype=torch.float16)
