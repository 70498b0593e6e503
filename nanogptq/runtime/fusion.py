"""Modules swapped in at load so that a decode step launches fewer kernels; the model's math is unchanged.

- `fuse_mlp_gelu`: each MLP whose c_fc runs on a backend hands its GELU to that layer (the same function on
  the same values), so a GEMV with a GELU epilogue saves the separate elementwise pass.
- `fuse_blocks`: a block whose four linears all run on a backend that applies their epilogue itself (mma)
  becomes a FusedBlock: on one-token steps ln_1 is folded into c_attn, ln_2 into c_fc, and the residual
  stream is added by the c_projs, so the step launches only the linears and the attention.
- `use_decode_attention`: on CUDA, attention layers become DecodeAttention, whose one-token steps run the
  split-cache Triton kernel (kernels/decode_attention.py), which also writes the token's key and value into
  the cache.

A swap changes a module's class to a subclass that adds only a forward (`_become`): its parameters,
buffers and children stay as they are, so the model's state dict is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from nanogptq.model import MLP, Block, CausalSelfAttention
from nanogptq.runtime.backends import BACKENDS
from nanogptq.runtime.backends.mma import can_fold
from nanogptq.runtime.linear import RuntimeLinear


def _become(module: nn.Module, cls: type) -> None:
    """Give `module` the forward of `cls`, a subclass of its class that adds no state of its own."""
    if not isinstance(module, cls.__bases__):
        raise TypeError(f"{cls.__name__} swaps in for {cls.__bases__[0].__name__}, not {type(module).__name__}")
    module.__class__ = cls


def fuse_mlp_gelu(model: nn.Module) -> int:
    """Move each MLP's exact GELU into its RuntimeLinear c_fc; returns how many."""
    n = 0
    for mlp in model.modules():
        # the epilogues apply the exact (erf) GELU: a tanh-approximated one stays a module of its own
        if isinstance(mlp, MLP) and isinstance(mlp.c_fc, RuntimeLinear) and isinstance(mlp.act, nn.GELU) \
                and mlp.act.approximate == "none":
            mlp.c_fc.gelu, mlp.act = True, nn.Identity()
            n += 1
    return n


class FusedBlock(Block):
    """A Block whose one-token steps run LayerNorms, biases and residual adds inside its linears' kernels
    (RuntimeLinear.fuse_epilogue); longer inputs take Block's forward. Dropout is off: inference only."""

    @property
    def fused(self) -> bool:
        """Whether all four linears still apply their epilogues (preparing a layer for another backend undoes
        its fuse_epilogue, and the block then runs unfused)."""
        return all(m.fused for m in (self.attn.c_attn, self.attn.c_proj, self.mlp.c_fc, self.mlp.c_proj))

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        if x.shape[0] * x.shape[1] != 1 or not self.fused:
            return super().forward(x, input_pos, mask)
        attn, mlp = self.attn, self.mlp
        y = attn.attend(attn.c_attn(x, fused=True), input_pos, mask)  # c_attn(ln_1(x))
        x = attn.c_proj(y, x, fused=True)  # x + c_proj(y)
        return mlp.c_proj(mlp.c_fc(x, fused=True), x, fused=True)  # x + c_proj(gelu(c_fc(ln_2(x))))


def _fusable(block: Block) -> bool:
    layers = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
    return (all(isinstance(q, RuntimeLinear) and BACKENDS[q.backend].forward_fused is not None
                and q.rot_seed is None for q in layers)
            and all(isinstance(ln, nn.LayerNorm) and ln.elementwise_affine for ln in (block.ln_1, block.ln_2))
            and isinstance(block.mlp.act, nn.Identity) and block.mlp.c_fc.gelu
            and not block.attn.c_proj.gelu and not block.mlp.c_proj.gelu
            and all(can_fold(q.in_features) for q in (block.attn.c_attn, block.mlp.c_fc)))


def fuse_blocks(model: nn.Module) -> int:
    """Each block that can (see the module docstring) becomes a FusedBlock; returns how many. Run after
    fuse_mlp_gelu, once the layers' backends are prepared."""
    n = 0
    for block in model.modules():
        if type(block) is not Block or not _fusable(block):
            continue
        block.attn.c_attn.fuse_epilogue(block.ln_1)
        block.mlp.c_fc.fuse_epilogue(block.ln_2)
        block.attn.c_proj.fuse_epilogue()
        block.mlp.c_proj.fuse_epilogue()
        _become(block, FusedBlock)
        n += 1
    return n


class DecodeAttention(CausalSelfAttention):
    """CausalSelfAttention whose one-token steps on a CUDA KV cache run the split-cache Triton kernel, which
    writes the token's key and value into the cache as it attends. `counts` are the kernel's per-head
    counters (zero between calls), kept here so that a step allocates nothing (runtime.generate sets them
    up with the cache)."""

    counts: torch.Tensor | None = None

    def attend(self, qkv: torch.Tensor, input_pos: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        cache = self.kv_cache
        if (qkv.shape[1] == 1 and input_pos is not None and cache is not None and qkv.is_cuda
                and qkv.dtype == cache.kv.dtype
                and isinstance(self.q_quant, nn.Identity) and isinstance(self.k_quant, nn.Identity)):
            counts = self.counts if self.counts is not None and self.counts.device == qkv.device else None
            return torch.ops.nanogptq.decode_attention(qkv, cache.kv, input_pos, counts)
        return super().attend(qkv, input_pos, mask)


def decode_attention_available(model: nn.Module) -> bool:
    """Whether the split-cache kernel can run this model's heads here: CUDA, Triton, and a power-of-two head
    size of at least 16."""
    config = model.config
    head_dim = config.n_embd // config.n_head
    if model.transformer.wpe.weight.device.type != "cuda" or head_dim < 16 or head_dim & (head_dim - 1):
        return False
    try:
        import nanogptq.kernels.decode_attention  # noqa: F401  (registers the op; needs Triton)
    except ImportError:
        return False
    return True


def use_decode_attention(model: nn.Module) -> int:
    """Every attention layer becomes a DecodeAttention where the kernel can run; returns how many."""
    if not decode_attention_available(model):
        return 0
    layers = [m for m in model.modules() if type(m) is CausalSelfAttention]
    for attn in layers:
        _become(attn, DecodeAttention)
    return len(layers)
