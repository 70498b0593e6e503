"""QuantLinear / QuantEmbedding: modules that hold packed integer weights.

Persistent buffers (what the checkpoint stores):
    qweight  (out, packed_len(in, bits)) uint8   codes in the original column order (act-order is undone)
    scales   (rows, n_groups) fp16               rows = 1 per tensor, else out (see rtn.py)
    qzeros   (rows, packed_len(n_groups, bits)) uint8   asymmetric grids only, packed like qweight
    bias     (out,) fp32                         if the layer has one
    g_idx    (in,) int32                         only for GPTQ act-order groups formed on the fly
    rot_seed (1,) int64                          only with rotate: W' = W U is stored, U is regenerated

Inference goes through a kernel picked at load time (`kernel`, "auto" resolves in `prepare_kernel`). A kernel
is a forward function plus an optional `prepare` that builds its own weight layout from the packed buffers
as non-persistent buffers (so .to(device) moves them and checkpoints never see them). "dequant" (dequantize,
then F.linear, caching nothing) is the exact reference every fast kernel in kernels.py is tested against;
"auto" takes the first of AUTO_ORDER that supports the layer on its device and falls back to "dequant".

A kernel's layout is a second copy of the weights. For inference only, `free_packed()` drops the stored
codes where the layout replaced them (a 4-bit model then holds 4-bit weights once, not twice); such a layer
still runs its kernel but can no longer be saved, dequantized or switched to another kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogptq.quant import kernels as K
from nanogptq.quant.pack import pack, packed_len, unpack
from nanogptq.quant.rtn import QuantizedWeight, dequantize_weight, n_groups


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal (n, n) matrix, float64 on CPU, identical on every machine for a seed."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R))  # the sign fix makes the distribution uniform (Haar)


PACKED_BUFFERS = ("qweight", "scales", "qzeros", "g_idx")


@dataclass(frozen=True)
class Kernel:
    forward: Callable[[QuantLinear, torch.Tensor], torch.Tensor]  # x already rotated; bias added after
    prepare: Callable[[QuantLinear], None] = lambda m: None
    supports: Callable[[QuantLinear, torch.device], bool] = lambda m, device: True
    reads: tuple[str, ...] = PACKED_BUFFERS  # the buffers one forward reads: weight bytes per token
    # the forward with F.gelu applied to its output, for layers without a bias (None: F.gelu runs after)
    forward_gelu: Callable[[QuantLinear, torch.Tensor], torch.Tensor] | None = None
    # one token with the epilogue QuantLinear.fuse_epilogue moved into the kernel, plus a residual (or None)
    forward_fused: Callable[[QuantLinear, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None


KERNELS: dict[str, Kernel] = {
    "dequant": Kernel(forward=K.dequant_forward),
    "int8pack": Kernel(K.int8pack_forward, K.prepare_int8, K.int8pack_supports, K.INT8_LAYOUT_BUFFERS),
    "int4pack": Kernel(K.int4pack_forward, K.prepare_int4, K.int4pack_supports, ("w_int4", "w_sz", "in_perm")),
    # CUDA only
    "triton": Kernel(K.triton_forward, K.prepare_triton, K.triton_supports, ("t_qweight", "scales", "z_codes"),
                     forward_gelu=lambda m, x: K.triton_forward(m, x, gelu=True)),
    "mma": Kernel(K.mma_forward, K.prepare_mma, K.mma_supports, ("m_words", "m_scales", "m_zeros"),
                  forward_gelu=lambda m, x: K.mma_forward(m, x, gelu=True), forward_fused=K.mma_fused_forward),
    # quantizes activations: opt-in only
    "w8a8": Kernel(K.w8a8_forward, K.prepare_int8, K.w8a8_supports, K.INT8_WEIGHTS),
}
LAYOUT_BUFFERS = {name for k in KERNELS.values() for name in k.reads} - set(PACKED_BUFFERS)
FUSED_BUFFERS = ("e_bias", "ln_weight", "ln_u")  # what QuantLinear.fuse_epilogue registers, in its order
# "auto" takes the first kernel that supports the layer; put fast ones first. Measured on the H200 (README):
# the tensor-core GEMV edges out the Triton one at 4 bits, which beats tinygemm there and everything stock
# at 8 bits; on the CPU, where neither runs, int4pack and int8pack.
AUTO_ORDER = ("mma", "triton", "int4pack", "int8pack", "dequant")


def auto_kernel(m: QuantLinear, device: torch.device, order: tuple[str, ...] = AUTO_ORDER) -> str:
    """The first kernel of `order` that supports the layer on `device`."""
    return next(k for k in order if KERNELS[k].supports(m, device))


def check_kernel(name: str) -> str:
    if name != "auto" and name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose from auto, {', '.join(KERNELS)}")
    return name


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool = False,
        rotate: bool = False,
        g_idx: bool = False,
        kernel: str = "auto",
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.kernel = check_kernel(kernel)
        rows, ng = (1 if group_size == 0 else out_features), n_groups(group_size, in_features)
        self.register_buffer(
            "qweight", torch.zeros(out_features, packed_len(in_features, bits), dtype=torch.uint8)
        )
        self.register_buffer("scales", torch.ones(rows, ng, dtype=torch.float16))
        # absent parts are None buffers: not in the state dict, but assignable later
        self.register_buffer(
            "qzeros", None if symmetric else torch.zeros(rows, packed_len(ng, bits), dtype=torch.uint8)
        )
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32) if g_idx else None)
        self.register_buffer("rot_seed", torch.zeros(1, dtype=torch.int64) if rotate else None)
        self.register_buffer("rot", None, persistent=False)  # U, built by prepare_kernel
        self.packed_freed = False
        self.gelu = False  # F.gelu on the output: the MLP's activation, moved here by fuse_mlp_gelu
        self.fused = False  # fuse_epilogue: forward(..., fused=True) applies the bias (and more) in the kernel

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        rot_seed: int | None = None,
        kernel: str = "auto",
    ) -> QuantLinear:
        out_f, in_f = qw.codes.shape
        m = cls(
            in_f,
            out_f,
            qw.bits,
            qw.group_size,
            qw.zeros is None,
            bias is not None,
            rot_seed is not None,
            qw.g_idx is not None,
            kernel,
        )
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

    def _need_packed(self, what: str) -> None:
        if self.packed_freed:
            raise RuntimeError(f"cannot {what}: this QuantLinear was loaded for inference only (its stored "
                               "codes were freed); load the checkpoint again with keep_packed=True")

    def dequantize_stored(self) -> torch.Tensor:
        """Float32 weight as stored (in the rotated basis when rotate is on)."""
        self._need_packed("dequantize the stored weights")
        codes = unpack(self.qweight, self.bits, self.in_features)
        zeros = None if self.qzeros is None else unpack(self.qzeros, self.bits, self.scales.shape[1])
        return dequantize_weight(codes, self.scales, zeros, self.bits, self.group_size, self.g_idx)

    def rotation(self) -> torch.Tensor | None:
        if self.rot_seed is None:
            return None
        return random_orthogonal(self.in_features, int(self.rot_seed.item()))

    def dequantize(self) -> torch.Tensor:
        """The effective float32 weight: y = x W^T for the original, unrotated input x (reference path)."""
        W = self.dequantize_stored()
        U = self.rotation()
        return W if U is None else (W.double() @ U.to(W.device).T).float()  # W' U^T = W U U^T

    def prepare_kernel(self) -> None:
        """Resolve "auto" for the current device and build the kernel's layout (call after .to(device))."""
        self._need_packed("build a kernel layout")
        device = self.qweight.device
        if self.kernel == "auto":
            self.kernel = auto_kernel(self, device)
        elif not KERNELS[self.kernel].supports(self, device):
            raise ValueError(f"kernel {self.kernel!r} cannot run this {self.bits}-bit layer (group {self.group_size}, "
                             f"{self.in_features} in, {self.out_features} out) on {device.type}")
        U = self.rotation()
        self.rot = None if U is None else U.float().to(self.qweight.device)
        for name in (LAYOUT_BUFFERS | set(FUSED_BUFFERS)) & self._buffers.keys():  # a previous kernel's layout
            del self._buffers[name]
        self.fused = False
        KERNELS[self.kernel].prepare(self)

    def fuse_epilogue(self, norm: nn.LayerNorm | None = None) -> None:
        """Let the mma GEMV apply the bias, and with `norm` that LayerNorm of the input, on one-token steps
        (quant.fuse_blocks; the forward's `residual` is then added in the kernel too). The LayerNorm is folded
        into the weight: W LayerNorm(x) + b = rstd (W (gamma * x) - mean W gamma) + (W beta + b), so the kernel
        multiplies x by gamma as it stages it, and needs W gamma and W beta + b, computed here once from the
        dequantized weight in fp32. (Inference: the norm's parameters are read now, not at each call.)"""
        if KERNELS[self.kernel].forward_fused is None:
            raise ValueError(f"kernel {self.kernel!r} cannot apply a layer's epilogue itself (mma can)")
        W = self.dequantize()
        bias = None if self.bias is None else self.bias.float()
        gamma = u = None
        if norm is not None:
            gamma = norm.weight.detach().float().to(W.device)
            beta = torch.zeros_like(gamma) if norm.bias is None else norm.bias.detach().float().to(W.device)
            u, bias = W @ gamma, W @ beta + (0.0 if bias is None else bias)
            gamma = gamma.half()
        for name, t in zip(FUSED_BUFFERS, (None if bias is None else bias.contiguous(), gamma, u), strict=True):
            self.register_buffer(name, t, persistent=False)
        self.ln_eps = 1e-5 if norm is None else norm.eps
        self.fused = True

    def free_packed(self) -> bool:
        """Drop the stored codes (qweight, qzeros) if the kernel reads its own copy instead; returns whether
        it did. Inference only: see the module docstring."""
        if "qweight" in KERNELS[self.kernel].reads:
            return False  # the kernel reads the stored codes themselves (dequant)
        self.qweight = self.qzeros = None
        self.packed_freed = True
        return True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._need_packed("save it")  # a checkpoint without its codes would load as garbage
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
        """x W^T + b (through GELU if `gelu`), plus `residual` if given. `fused` (one token, after
        fuse_epilogue): all of it in the kernel, and x through the folded LayerNorm first if there is one."""
        if fused:
            return KERNELS[self.kernel].forward_fused(self, x, residual)
        if residual is not None:
            return self(x) + residual
        if self.rot_seed is not None:
            if self.rot is None:
                raise RuntimeError("QuantLinear with rotation used before prepare_kernel()")
            x = x @ self.rot.to(x.dtype)  # x' = U^T x for column vectors
        kernel = KERNELS[self.kernel]
        if self.gelu and self.bias is None and kernel.forward_gelu is not None:
            return kernel.forward_gelu(self, x)
        y = kernel.forward(self, x)
        y = y if self.bias is None else y + self.bias.to(y.dtype)
        return F.gelu(y) if self.gelu else y

    def read_tensors(self) -> list[torch.Tensor]:
        """What one forward reads from memory with the current kernel (the packed buffers stay resident
        beside a kernel's own layout, unread)."""
        names = (*KERNELS[self.kernel].reads, "bias", "rot")
        return [t for n in names if (t := getattr(self, n, None)) is not None]

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
            f"symmetric={self.symmetric}, rotate={self.rot_seed is not None}, kernel={self.kernel}"
            + (", gelu" if self.gelu else "")
        )


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
