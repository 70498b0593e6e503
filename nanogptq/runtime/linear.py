"""The stored layers made to run on a backend: RuntimeLinear (a QuantLinear) and RuntimeTernaryLinear.

`RuntimeLinear.from_stored(layer, backend)` shares the stored layer's tensors and adds the backend's layout
as non-persistent buffers (`prepare`, after the module is on its device; again after a move). For inference
only, `free_packed()` drops the stored codes where the layout replaced them (a 4-bit model then holds 4-bit
weights once, not twice); such a layer still runs its backend but can no longer be saved, dequantized or
switched to another backend.

Two epilogues can move into a layer, set by runtime/fusion.py: `gelu` (the MLP's activation, applied by
the backend where it can) and `fuse_epilogue` (bias, a folded LayerNorm and the residual add, in the mma
GEMV; `forward(..., fused=True)`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogptq.quant.linear import STORED_BUFFERS, QuantLinear
from nanogptq.quant.qat import TernaryLinear, prepare_input
from nanogptq.runtime.backends import BACKENDS, LAYOUT_BUFFERS, TERNARY_BACKENDS, auto_backend, check_kernel, int8pack

FUSED_BUFFERS = ("e_bias", "ln_weight", "ln_u")  # what fuse_epilogue registers, in its order


class RuntimeLinear(QuantLinear):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool = False, rotate: bool = False, g_idx: bool = False, backend: str = "auto"):
        super().__init__(in_features, out_features, bits, group_size, symmetric, bias, rotate, g_idx)
        self.backend = check_kernel(backend)
        self.packed_freed = False
        self.gelu = False  # F.gelu on the output: the MLP's activation, moved here by fusion.fuse_mlp_gelu
        self.fused = False  # fuse_epilogue: forward(..., fused=True) applies the bias (and more) in the kernel

    @classmethod
    def from_stored(cls, q: QuantLinear, backend: str = "auto") -> RuntimeLinear:
        """The same stored tensors (shared, not copied), to run on `backend` once `prepare`d."""
        m = cls(q.in_features, q.out_features, q.bits, q.group_size, q.symmetric, backend=backend)
        for name in STORED_BUFFERS:
            setattr(m, name, getattr(q, name))
        return m

    def _need_packed(self, what: str) -> None:
        if self.packed_freed:
            raise RuntimeError(f"cannot {what}: this layer was loaded for inference only (its stored codes were "
                               "freed); load the checkpoint again with keep_packed=True")

    def codes(self) -> torch.Tensor:
        self._need_packed("read the stored codes")
        return super().codes()

    def prepare(self) -> None:
        """Resolve "auto" for the current device and build the backend's layout (call after .to(device))."""
        self._need_packed("build a backend layout")
        device = self.qweight.device
        if self.backend == "auto":
            self.backend = auto_backend(self, device)
        elif not BACKENDS[self.backend].supports(self, device):
            raise ValueError(f"kernel {self.backend!r} cannot run this {self.bits}-bit layer (group "
                             f"{self.group_size}, {self.in_features} in, {self.out_features} out) on {device.type}")
        U = self.rotation()
        self.rot = None if U is None else U.float().to(device)
        for name in (LAYOUT_BUFFERS | set(FUSED_BUFFERS)) & self._buffers.keys():  # a previous backend's layout
            del self._buffers[name]
        self.fused = False
        BACKENDS[self.backend].prepare(self)

    def fuse_epilogue(self, norm: nn.LayerNorm | None = None) -> None:
        """Let the backend apply the bias, and with `norm` that LayerNorm of the input, on one-token steps (the
        forward's `residual` is then added in the kernel too). The LayerNorm is folded into the weight:
        W LayerNorm(x) + b = rstd (W (gamma * x) - mean W gamma) + (W beta + b), so the kernel multiplies x by
        gamma as it stages it, and needs W gamma and W beta + b, computed here once from the dequantized
        weight in fp32. (Inference: the norm's parameters are read now, not at each call.)"""
        if BACKENDS[self.backend].forward_fused is None:
            raise ValueError(f"kernel {self.backend!r} cannot apply a layer's epilogue itself (mma can)")
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
        """Drop the stored codes (qweight, qzeros) if the backend reads its own copy instead; returns whether
        it did. Inference only: see the module docstring."""
        if "qweight" in BACKENDS[self.backend].reads:
            return False  # the backend reads the stored codes themselves (dequant)
        self.qweight = self.qzeros = None
        self.packed_freed = True
        return True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._need_packed("save it")  # a checkpoint without its codes would load as garbage
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
        """x W^T + b (through GELU if `gelu`), plus `residual` if given. `fused` (one token, after
        fuse_epilogue): all of it in the kernel, and x through the folded LayerNorm first if there is one."""
        backend = BACKENDS[self.backend]
        if fused:
            return backend.forward_fused(self, x, residual)
        if residual is not None:
            return self(x) + residual
        if self.rot_seed is not None:
            if self.rot is None:
                raise RuntimeError("RuntimeLinear with rotation used before prepare()")
            x = x @ self.rot.to(x.dtype)  # x' = U^T x for column vectors
        if self.gelu and self.bias is None and backend.forward_gelu is not None:
            return backend.forward_gelu(self, x)
        y = backend.forward(self, x)
        y = y if self.bias is None else y + self.bias.to(y.dtype)
        return F.gelu(y) if self.gelu else y

    def read_tensors(self) -> list[torch.Tensor]:
        """What one forward reads from memory with the current backend (the packed buffers stay resident
        beside a backend's own layout, unread)."""
        names = (*BACKENDS[self.backend].reads, "bias", "rot")
        return [t for n in names if (t := getattr(self, n, None)) is not None]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.backend}" + (", gelu" if self.gelu else "")


class RuntimeTernaryLinear(TernaryLinear):
    """An exported ternary layer on "dequant" (TernaryLinear's own exact forward) or "int8pack": the trits laid
    out once as an int8 matrix with the scale per row, on int8pack's weight-only op ("auto" picks it)."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        check_kernel(backend)  # a typo is an error
        # a QuantLinear backend that ternary layers lack (int4pack, ...) gives them the exact reference
        self.backend = "int8pack" if backend == "auto" else backend if backend in TERNARY_BACKENDS else "dequant"

    @classmethod
    def from_stored(cls, t: TernaryLinear, backend: str = "auto") -> RuntimeTernaryLinear:
        m = cls(t.in_features, t.out_features, False, t.act_bits, t.norm, t.eps, t.act_scale, t.weight_scale,
                backend=backend)
        m.qweight, m.scale, m.bias = t.qweight, t.scale, t.bias
        return m

    def prepare(self) -> None:
        """Build the int8 layout from the packed trits (nothing re-quantized): w = trits * scale, an int8 grid
        with no zero-point term."""
        for name in int8pack.INT8_LAYOUT_BUFFERS:
            self._buffers.pop(name, None)
        if self.backend == "int8pack":
            scales = self.scale.float().expand(self.out_features).contiguous()
            int8pack.set_int8_layout(self, self.trits(), scales, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "dequant":
            return super().forward(x)
        if "w_int8" not in self._buffers:
            raise RuntimeError(f"RuntimeTernaryLinear on {self.backend!r} used before prepare()")
        y = int8pack.forward(self, prepare_input(x, self.norm, self.act_bits, self.eps, self.act_scale))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.backend}"
