"""Random orthogonal rotation of a layer's input side (QuIP's incoherence processing).

For an orthogonal U, W x = (W U)(U^T x): the stored weight is W' = W U and the layer's input is rotated by
U^T on the way in. A Haar-random U spreads each row's outliers over all columns, so a grid fits the rotated
rows more tightly. U is never stored: it is regenerated from a per-layer seed.
"""

from __future__ import annotations

import zlib

import torch


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal (n, n) matrix, float64 on CPU, identical on every machine for a seed."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R))  # the sign fix makes the distribution uniform (Haar)


def layer_seed(rotate_seed: int, name: str) -> int:
    """A per-layer rotation seed that does not depend on Python's randomized str hash."""
    return (rotate_seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62
