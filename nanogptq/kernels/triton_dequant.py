"""Prefill's weight: the GEMV layouts' words dequantized into a float (out, in) weight in one Triton kernel.

A GEMV reads the weights once per activation row, so inputs of more rows than it takes (a prompt) go
through cuBLAS on a float weight made from the kernel's own layout (the stored codes are freed at load).
Made with torch ops (unpack, permute, expand the groups, (q - z) s in fp32, cast), that weight would take
several full-size fp32 intermediates; this kernel reads the word and the group's scale and zero, and
writes the weight once, in the activation dtype.

Each output element finds its code from the layout's definition, so the values are exactly
quant.grid.dequantize_weight's, (q - z) s computed in fp32, then rounded once to the output dtype:
- "mma" (mma.to_mma_layout): row 16 T + 8 h + g, column 16 cw c + 4 cw t + 4 i + 2 jh + e2 is
  nibble h + 2 jh + 4 e2 of word (T, c, i // 4, lane 4 g + t, i % 4);
- "interleaved" (triton_gemv.to_interleaved): row RPW wr + r, column 2 p + cc is bits 16 cc + BITS r of word (wr, p).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N, BLOCK_K = 16, 256


@triton.jit
def _dequant_kernel(words, scales, zeros, out, N, K, NC, WCOLS, S_ROW, GROUP,
                    MMA: tl.constexpr, CW: tl.constexpr, BITS: tl.constexpr, HAS_Z: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
    k = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K))[None, :]
    mask = (r < N) & (k < K)
    # each index and shift is a row part plus a column part
    if MMA:
        tile, h, g = r // 16, (r % 16) // 8, r % 8
        c, kk = k // (16 * CW), k % (16 * CW)
        t, i, jh, e2 = kk // (4 * CW), (kk % (4 * CW)) // 4, (kk % 4) // 2, kk % 2
        # word (tile, c, i // 4, 4 g + t, i % 4) of words shaped (tiles, NC, CW / 4, 32, 4)
        index = (tile * NC * CW * 32 + 16 * g) + (c * CW * 32 + (i // 4) * 128 + 4 * t + i % 4)
        shift = 4 * h + (8 * jh + 16 * e2)
    else:
        rpw: tl.constexpr = 16 // BITS
        index = (r // rpw) * WCOLS + k // 2
        shift = BITS * (r % rpw) + 16 * (k % 2)
    word = tl.load(words + index, mask=mask, other=0)
    q = ((word >> shift) & ((1 << BITS) - 1)).to(tl.float32)  # the mask drops the arithmetic shift's sign bits
    grid = r * S_ROW + k // GROUP  # S_ROW 0: one grid for the whole tensor
    s = tl.load(scales + grid, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(zeros + grid, mask=mask, other=0).to(tl.float32)
    else:  # symmetric: the grid's middle code
        z = 1 << (BITS - 1)
    tl.store(out + r * K + k, ((q - z) * s).to(out.dtype.element_ty), mask=mask)


def dequantize(words: torch.Tensor, layout: str, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               group_size: int, out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The (out_features, in_features) weight in `dtype` from a GEMV layout's words ("mma": the tensor-core
    GEMV's, "interleaved": the Triton GEMV's) and the (1 or out_features, groups) scales and zero codes."""
    if layout not in ("mma", "interleaved"):
        raise ValueError(f"unknown layout {layout!r}")
    N, K = out_features, in_features
    out = torch.empty(N, K, dtype=dtype, device=words.device)
    per_row = scales.shape[0] != 1
    if zeros is not None and zeros.shape != scales.shape:
        raise ValueError(f"zero codes {tuple(zeros.shape)} do not match scales {tuple(scales.shape)}")
    has_z = zeros is not None
    scales = scales.contiguous()
    zeros = zeros.contiguous() if has_z else scales  # a placeholder, unread without HAS_Z
    mma = layout == "mma"
    cw = 4 * words.shape[2] if mma else 4
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K))
    _dequant_kernel[grid](
        words, scales, zeros, out, N, K, words.shape[1] if mma else 0, 0 if mma else words.shape[1],
        scales.shape[1] if per_row else 0, group_size if group_size > 0 else K,
        MMA=mma, CW=cw, BITS=bits, HAS_Z=has_z, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return out
