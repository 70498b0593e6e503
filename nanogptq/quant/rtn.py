"""Round-to-nearest (RTN): each weight to the nearest point of its group's grid (grid.py), no data needed."""

from __future__ import annotations

import torch

from nanogptq.quant.config import QuantConfig
from nanogptq.quant.grid import QuantizedWeight, expand_groups, find_grid, group_cols, max_code, quantize_codes


def rtn_quantize_weight(W: torch.Tensor, cfg: QuantConfig, H: torch.Tensor | None = None) -> QuantizedWeight:
    """Round each weight to the nearest point of its group's grid. With the input Hessian H (in, in), the
    clipping search weighs each group's error by H's diagonal block for its columns (grid.find_grid)."""
    W = W.detach().float()
    n = W.shape[1]
    G = group_cols(cfg.group_size, n)
    grids = [
        find_grid(
            W[:, g : g + G],
            cfg.bits,
            cfg.symmetric,
            cfg.group_size == 0,
            cfg.clip_search,
            None if H is None else H[g : g + G, g : g + G],
        )
        for g in range(0, n, G)
    ]
    scale = torch.cat([s for s, _ in grids], dim=1)
    zero = torch.cat([z for _, z in grids], dim=1)
    codes = quantize_codes(
        W, expand_groups(scale, cfg.group_size, n), expand_groups(zero, cfg.group_size, n), max_code(cfg.bits)
    )
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scale.half(),
        zeros=None if cfg.symmetric else zero.to(torch.uint8),
        bits=cfg.bits,
        group_size=cfg.group_size,
    )
