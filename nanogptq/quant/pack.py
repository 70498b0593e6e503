"""Bit packing of unsigned integer codes along the last dimension.

A *unit* is the smallest whole number of bytes holding whole codes: 1 code in 1 byte at 8 bits, 2 in 1 byte
at 4 bits, 4 in 1 byte at 2 bits, 8 codes in 3 bytes at 3 bits. Inside a unit, code j sits at bits
[j*bits, (j+1)*bits) of a little-endian integer (the first code in the lowest bits of the first byte).

Rows whose length is not a multiple of the codes per unit are padded with zero codes at the end;
`unpack` takes the true length `n` and drops the padding.
"""

from __future__ import annotations

import math

import torch


def unit(bits: int) -> tuple[int, int]:
    """(codes per unit, bytes per unit) for a bit width."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"can only pack 2, 3, 4 or 8 bit codes, got {bits}")
    unit_bits = math.lcm(bits, 8)
    return unit_bits // bits, unit_bits // 8


def packed_len(n: int, bits: int) -> int:
    """Bytes per row for `n` codes."""
    per, nbytes = unit(bits)
    return -(-n // per) * nbytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (..., n) with values in [0, 2**bits) -> uint8 (..., packed_len(n, bits))."""
    per, nbytes = unit(bits)
    n = codes.shape[-1]
    pad = -n % per
    c = codes.to(torch.int32)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(per, device=c.device, dtype=torch.int32) * bits
    words = (c << shifts).sum(-1, dtype=torch.int32)  # at most 24 bits: fits int32
    byte_shifts = torch.arange(nbytes, device=c.device, dtype=torch.int32) * 8
    out = (words.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 (..., packed_len(n, bits)) -> uint8 codes (..., n)."""
    per, nbytes = unit(bits)
    if packed.shape[-1] != packed_len(n, bits):
        raise ValueError(f"{packed.shape[-1]} packed bytes cannot hold {n} codes of {bits} bits")
    if bits == 8:
        return packed.to(torch.uint8)
    p = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, nbytes)
    byte_shifts = torch.arange(nbytes, device=p.device, dtype=torch.int32) * 8
    words = (p << byte_shifts).sum(-1, dtype=torch.int32)
    shifts = torch.arange(per, device=p.device, dtype=torch.int32) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)
