"""int4pack: 4-bit grids on tinygemm (aten._weight_int4pack_mm, and its _for_cpu twin), in bf16.

Groups of 32/64/128/256 columns; per-channel and per-tensor grids are repeated into such groups. tinygemm's
grid is w = (q - 8) scale + zero, so scale = s and zero = (8 - z) s, exact in fp32 (then stored in bf16, so
the results match the fp32 reference to bf16 precision). GPTQ act-order groups (g_idx) are runs of columns
in the order GPTQ visited them: the layout stores the columns in that order and the activations are
gathered into it per call.
"""

from __future__ import annotations

import torch

from nanogptq.runtime.backends.base import Backend

INT4_GROUPS = (256, 128, 64, 32)  # the group sizes tinygemm supports, largest (fewest scales) first


def int4_group(m) -> int | None:
    """The tinygemm group size that holds the layer's grid exactly, or None."""
    if m.group_size > 0:
        fits = m.group_size in INT4_GROUPS and m.in_features % m.group_size == 0
        return m.group_size if fits else None
    # one grid per row (or tensor) = any group size with the same grid repeated in every group
    return next((g for g in INT4_GROUPS if m.in_features % g == 0), None)


def _act_order_perm(m) -> torch.Tensor | None:
    """The column order in which each act-order group is one run of `group_size` columns, or None where
    the layer has no g_idx (its groups already are runs)."""
    return None if m.g_idx is None else torch.argsort(m.g_idx.long(), stable=True)


def _act_order_groups_are_full(m) -> bool:
    if m.g_idx is None:
        return True
    counts = torch.bincount(m.g_idx.long(), minlength=m.scales.shape[1])
    return bool((counts == m.group_size).all())


def supports(m, device: torch.device) -> bool:
    return (
        m.bits == 4
        and _act_order_groups_are_full(m)
        and m.out_features % 16 == 0  # the CPU packing needs N % 16, CUDA's N % 8
        and int4_group(m) is not None
        and device.type in ("cpu", "cuda")
    )


def int4_scales_and_zeros(m) -> torch.Tensor:
    """(in / G, out, 2) fp32 [scale, zero] with w = (q - 8) * scale + zero; exact in fp32."""
    G = int4_group(m)
    s = m.scales.float().expand(m.out_features, -1)
    z = m.zero_points().expand(m.out_features, -1)
    if m.group_size <= 0:  # repeat the single grid into in_features / G groups
        s, z = s.expand(-1, m.in_features // G), z.expand(-1, m.in_features // G)
    return torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous()


def int4_inner_k_tiles(in_features: int) -> int:
    """CUDA tinygemm: in_features must be a multiple of 16 * inner_k_tiles; larger tiles are faster."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


def prepare(m) -> None:
    codes = m.codes().to(torch.int32)
    perm = _act_order_perm(m)
    if perm is not None:
        codes = codes[:, perm]
    m.register_buffer("in_perm", perm, persistent=False)
    if m.qweight.device.type == "cuda":
        # the CUDA op takes two codes per byte, the even column in the high nibble
        u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        w = torch.ops.aten._convert_weight_to_int4pack(u8, int4_inner_k_tiles(m.in_features))
    else:
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)  # CPU ignores inner_k_tiles
    m.register_buffer("w_int4", w, persistent=False)
    m.register_buffer("w_sz", int4_scales_and_zeros(m).to(torch.bfloat16), persistent=False)
    m.w_group = int4_group(m)


def forward(m, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, m.in_features)
    if m.in_perm is not None:
        x2 = x2.index_select(-1, m.in_perm)
    x2 = x2.to(torch.bfloat16).contiguous()
    if x.is_cuda:
        y = torch.ops.aten._weight_int4pack_mm(x2, m.w_int4, m.w_group, m.w_sz)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, m.w_int4, m.w_group, m.w_sz)
    return y.to(x.dtype).reshape(*x.shape[:-1], m.out_features)


BACKEND = Backend(forward, prepare, supports, ("w_int4", "w_sz", "in_perm"))
