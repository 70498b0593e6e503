"""The stored quantized layers: QuantLinear (packed codes and their grids) and QuantEmbedding.

Persistent buffers (what the checkpoint stores):
    qweight  (out, packed_len(in, bits)) uint8   codes in the original column order (act-order is undone)
    scales   (rows, n_groups) fp16               rows = 1 per tensor, else out (see grid.py)
    qzeros   (rows, packed_len(n_groups, bits)) uint8   asymmetric grids only, packed like qweight
    bias     (out,) fp32                         if the layer has one
    g_idx    (in,) int32                         only for GPTQ act-order groups formed on the fly
    rot_seed (1,) int64                          only with rotate: W' = W U is stored, U is regenerated

A QuantLinear's own forward is the exact reference: dequantize the stored grid, then a float matmul. It is
what calibration runs while GPTQ quantizes a model block by block, and what every fast kernel is tested
against. Running on kernels is the runtime's business (runtime/linear.py swaps in a RuntimeLinear at load).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogptq.quant.grid import QuantizedWeight, dequantize_weight, n_groups
from nanogptq.quant.pack import pack, packed_len, unpack
from nanogptq.quant.rotation import random_orthogonal

STORED_BUFFERS = ("qweight", "scales", "qzeros", "bias", "g_idx", "rot_seed")


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool = False, rotate: bool = False, g_idx: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        rows, ng = (1 if group_size == 0 else out_features), n_groups(group_size, in_features)
        self.register_buffer("qweight", torch.zeros(out_features, packed_len(in_features, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(rows, ng, dtype=torch.float16))
        # absent parts are None buffers: not in the state dict, but assignable later
        zeros = None if symmetric else torch.zeros(rows, packed_len(ng, bits), dtype=torch.uint8)
        self.register_buffer("qzeros", zeros)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32) if g_idx else None)
        self.register_buffer("rot_seed", torch.zeros(1, dtype=torch.int64) if rotate else None)
        self.register_buffer("rot", None, persistent=False)  # U, made from rot_seed at the first use

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       rot_seed: int | None = None) -> QuantLinear:
        out_f, in_f = qw.codes.shape
        m = cls(in_f, out_f, qw.bits, qw.group_size, qw.zeros is None, bias is not None, rot_seed is not None,
                qw.g_idx is not None)
        m.qweight = pack(qw.codes, qw.bits)
        m.scales = qw.scales.clone()
        if qw.zeros is not None:
            m.qzeros = pack(qw.zeros, qw.bits)
        if bias is not None:
            m.bias = bias.detach().float().clone()
        if qw.g_idx is not None:
            m.g_idx = qw.g_idx.clone()
        if rot_seed is not None:
            m.rot_seed = torch.tensor([rot_seed], dtype=torch.int64, device=m.qweight.device)
        return m

    def codes(self) -> torch.Tensor:
        """The unpacked codes (out, in), uint8."""
        return unpack(self.qweight, self.bits, self.in_features)

    def zero_codes(self) -> torch.Tensor | None:
        """The unpacked zero points (rows, n_groups), uint8; None for a symmetric grid."""
        return None if self.qzeros is None else unpack(self.qzeros, self.bits, self.scales.shape[1])

    def zero_points(self) -> torch.Tensor:
        """Float zero points (rows, n_groups): the stored ones, or 2^(bits-1) for a symmetric grid."""
        zeros = self.zero_codes()
        return torch.full(self.scales.shape, 2.0 ** (self.bits - 1), device=self.scales.device) if zeros is None \
            else zeros.float()

    def quantized_weight(self) -> QuantizedWeight:
        """The stored grid, unpacked."""
        return QuantizedWeight(self.codes(), self.scales, self.zero_codes(), self.bits, self.group_size, self.g_idx)

    def dequantize_stored(self) -> torch.Tensor:
        """Float32 weight as stored (in the rotated basis when rotate is on)."""
        return dequantize_weight(self.codes(), self.scales, self.zero_codes(), self.bits, self.group_size, self.g_idx)

    def rotation(self) -> torch.Tensor | None:
        """U (in, in) float64 on the CPU, or None without rotation."""
        return None if self.rot_seed is None else random_orthogonal(self.in_features, int(self.rot_seed.item()))

    def dequantize(self) -> torch.Tensor:
        """The effective float32 weight: y = x W^T for the original, unrotated input x (reference path)."""
        W = self.dequantize_stored()
        U = self.rotation()
        return W if U is None else (W.double() @ U.to(W.device).T).float()  # W' U^T = W U U^T

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """x' = U^T x (for column vectors; x @ U for rows), U kept once made."""
        if self.rot_seed is None:
            return x
        if self.rot is None or self.rot.device != x.device:
            self.rot = self.rotation().float().to(x.device)
        return x @ self.rot.to(x.dtype)

    def hold_dequantized(self, weight: torch.Tensor | None = None) -> None:
        """Keep the stored weight dequantized (`weight`: that, already made) for the forward until
        `release_dequantized`, so passes over many batches with fixed codes (calibration, held-out loss) unpack
        them once. A non-persistent buffer while held: it moves with the module and is never saved."""
        self.register_buffer("held_weight", self.dequantize_stored() if weight is None else weight, persistent=False)

    def release_dequantized(self) -> None:
        if "held_weight" in self._buffers:
            delattr(self, "held_weight")  # nn.Module's: drops the buffer and its non-persistent mark

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self._buffers.get("held_weight")
        W = self.dequantize_stored() if W is None else W
        y = F.linear(self.rotate_input(x), W.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
                f"symmetric={self.symmetric}, rotate={self.rot_seed is not None}")


@contextlib.contextmanager
def dequantized_once(model: nn.Module) -> Iterator[None]:
    """Inside, every QuantLinear of `model` runs on its weight dequantized once (`hold_dequantized`); on the way
    out every QuantLinear then in the model, one swapped in meanwhile and held included, is released."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.hold_dequantized()
    try:
        yield
    finally:
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.release_dequantized()


class QuantEmbedding(nn.Module):
    """The tied embedding table, read from the output head's 8-bit per-row QuantLinear (rows = tokens)."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        if head.bits != 8 or head.group_size != -1 or head.rot_seed is not None or head.g_idx is not None:
            raise ValueError("QuantEmbedding needs an 8-bit per-row head without rotation")
        self.head = head  # registered here too, so the state dict shares (and safetensors dedups) its tensors
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.head
        zero = 2 ** (h.bits - 1) if h.qzeros is None else h.qzeros[idx].float()  # 8 bits: one code per byte
        return (h.qweight[idx].float() - zero) * h.scales[idx].float()
