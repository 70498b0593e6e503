"""Quantization grids (scale + zero point): finding them, and mapping weights to codes and back.

A grid maps a weight w to the code q = clamp(round(w / scale) + zero, 0, 2**bits - 1) and back to
(q - zero) * scale, as in the GPTQ reference code. Asymmetric grids span [min(w, 0), max(w, 0)] and store
an integer zero point; symmetric grids span [-max|w|, max|w|] with the fixed zero 2**(bits-1).

Group layout: scales have shape (rows, n_groups); rows is 1 for per-tensor grids (group_size 0) and
out_features otherwise; per-channel (-1) has n_groups = 1. With group_size G > 0, group g covers input
columns [g*G, (g+1)*G); when G does not divide in_features the last group is shorter (as if padded).
Scales are stored in fp16, so grids are computed with the fp16-rounded scale (rounded *up*, so that
max|w| stays inside the grid) and every code is exactly reproducible from the stored tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MIN_SCALE = 2.0**-20  # keeps all-zero groups away from a zero fp16 scale
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 down to 0.5
CLIP_CHUNK = 2**24  # weights x ratios the clipping search holds at once


@dataclass
class QuantizedWeight:
    """A quantized (out, in) matrix: unpacked codes in the original column order plus their grids."""

    codes: torch.Tensor  # (out, in) uint8 in [0, 2**bits)
    scales: torch.Tensor  # (rows, n_groups) fp16
    zeros: torch.Tensor | None  # (rows, n_groups) uint8 zero points; None when symmetric
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None  # (in,) int32 group of each column when groups are not contiguous
    stats: dict = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scales, self.zeros, self.bits, self.group_size, self.g_idx)


def max_code(bits: int) -> int:
    return 2**bits - 1


def group_cols(group_size: int, n: int) -> int:
    """Input columns per grid: all of them for per-tensor (0) and per-channel (-1)."""
    return group_size if group_size > 0 else n


def n_groups(group_size: int, n: int) -> int:
    return -(-n // group_cols(group_size, n))


def expand_groups(t: torch.Tensor, group_size: int, n: int) -> torch.Tensor:
    """(rows, n_groups) -> (rows, n): each group's value repeated over its columns."""
    return t.repeat_interleave(group_cols(group_size, n), dim=1)[:, :n]


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= scale, as float32."""
    s16 = scale.clamp_min(MIN_SCALE).half()
    s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    return s16.float()


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Float codes (integer-valued) of w on the grid; scale and zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def _grid_at(xmin, xmax, ratio: float | torch.Tensor, bits: int, symmetric: bool):
    maxq = max_code(bits)
    lo, hi = xmin * ratio, xmax * ratio
    flat = hi == lo  # all-zero rows: any grid works, take the reference's [-1, 1]
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = _fp16_scale((hi - lo) / maxq)
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def find_grid(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    per_tensor: bool = False,
    clip_search: bool = False,
    hessian: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero, each (rows, 1) -- (1, 1) if per_tensor -- for the rows of w (rows, cols).

    clip_search tries ranges shrunk by CLIP_RATIOS and keeps, per row (per tensor: overall), the one with the
    smallest error. Without `hessian` that is the squared weight error (RTN without data). With it, the error
    is the layer's output error tr(dW H dW^T) restricted to these columns: `hessian` is either the (cols, cols)
    diagonal block of the layer's input Hessian H for w's columns, or only its diagonal (cols,). The block is
    what the output error is made of inside the group; the cross terms with other columns couple this grid's
    rounding to errors that are settled elsewhere (GPTQ has already folded earlier columns' errors into w, and
    spreads this group's errors over later columns), so the diagonal block is the part this choice owns.
    """
    x = w.float()
    rows = x.shape[0]
    if per_tensor:
        x = x.reshape(1, -1)
    xmin = x.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = x.max(dim=1, keepdim=True).values.clamp(min=0)
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    scale, zero = _grid_at(xmin, xmax, 1.0, bits, symmetric)
    if not clip_search:
        return scale, zero
    h = None if hessian is None else hessian.to(x.device, torch.float32)

    def error(s, z):  # (ratios, rows, 1) grids -> (ratios, rows or 1, 1) errors
        d = (dequantize_codes(quantize_codes(x, s, z, max_code(bits)), s, z) - x).reshape(len(s), rows, -1)
        if h is None:
            e = d.square().sum(dim=-1, keepdim=True)
        elif h.dim() == 1:
            e = (d.square() * h).sum(dim=-1, keepdim=True)
        else:
            e = ((d @ h) * d).sum(dim=-1, keepdim=True)  # each row's d H d^T
        return e.sum(dim=1, keepdim=True) if per_tensor else e

    # every ratio at once (in chunks of at most CLIP_CHUNK elements): the same arithmetic per ratio as one at
    # a time, in a handful of tensor ops instead of a Python loop of small ones, which launch-bound devices
    # (and a CPU shared by OpenMP threads) spend their time on
    ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    scales, zeros, errors = [], [], []
    for chunk in ratios.split(max(1, CLIP_CHUNK // x.numel())):
        s, z = _grid_at(xmin, xmax, chunk, bits, symmetric)
        scales.append(s)
        zeros.append(z)
        errors.append(error(s, z))
    # the first ratio with the least error, 1.0 (no clipping) on a tie
    pick = torch.cat(errors).argmin(dim=0, keepdim=True)
    return torch.cat(scales).take_along_dim(pick, 0)[0], torch.cat(zeros).take_along_dim(pick, 0)[0]


def dequantize_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 (out, in) weight from codes and per-group grids."""
    n = codes.shape[1]
    s = scales.float()
    z = torch.full_like(s, 2 ** (bits - 1)) if zeros is None else zeros.float()
    if g_idx is not None:
        s, z = s[:, g_idx.long()], z[:, g_idx.long()]
    else:
        s, z = expand_groups(s, group_size, n), expand_groups(z, group_size, n)
    return dequantize_codes(codes.float(), s, z)
