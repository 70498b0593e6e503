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


def to_halves(packed: torch.Tensor, n: int, tile: int) -> torch.Tensor:
    """4-bit rows (..., packed_len(n, 4)) re-laid as HALVES (the Triton GEMV's layout): in each tile of
    `tile` codes, byte j holds code j (low nibble) and code j + tile / 2 (high nibble); the last tile is
    padded with zero codes. -> uint8 (..., cdiv(n, tile) * tile / 2)."""
    tiles = -(-n // tile)
    codes = torch.nn.functional.pad(unpack(packed, 4, n), (0, tiles * tile - n))
    codes = codes.view(*packed.shape[:-1], tiles, 2, tile // 2)
    return (codes[..., 0, :] | (codes[..., 1, :] << 4)).flatten(-2).contiguous()


def from_halves(halves: torch.Tensor, n: int, tile: int) -> torch.Tensor:
    """Inverse of to_halves: uint8 codes (..., n)."""
    b = halves.view(*halves.shape[:-1], -1, tile // 2)
    return torch.stack((b & 0xF, b >> 4), dim=-2).flatten(-3)[..., :n]


# WORDS: nibble j of a word of 8 codes sits at bits WORD_SHIFTS[j], so that masking a word with 0x000F000F
# (or 0x00F000F0), after a shift by 0 or 8, yields two neighbouring codes in the two 16-bit halves: one
# instruction turns them into a pair of fp16 values (the Triton GEMV's fast path, triton_gemv.py)
WORD_SHIFTS = (0, 16, 4, 20, 8, 24, 12, 28)


def to_words(packed: torch.Tensor, n: int, tile: int) -> torch.Tensor:
    """4-bit rows (..., packed_len(n, 4)) re-laid as int32 WORDS of 8 codes, the last tile of `tile` codes
    padded with zero codes. -> int32 (..., cdiv(n, tile) * tile / 8)."""
    tiles = -(-n // tile)
    codes = torch.nn.functional.pad(unpack(packed, 4, n), (0, tiles * tile - n)).to(torch.int64)
    codes = codes.view(*packed.shape[:-1], -1, 8)
    shifts = torch.tensor(WORD_SHIFTS, device=codes.device, dtype=torch.int64)
    words = (codes << shifts).sum(-1)  # < 2^32: fits, then wraps into int32's range
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def from_words(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of to_words: uint8 codes (..., n)."""
    shifts = torch.tensor(WORD_SHIFTS, device=words.device, dtype=torch.int32)
    codes = (words.unsqueeze(-1) >> shifts) & 0xF  # the arithmetic shift's sign bits are masked off
    return codes.flatten(-2)[..., :n].to(torch.uint8)
