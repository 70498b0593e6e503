"""A stored model made ready to run, once, after it is loaded and moved to its device:

    model = prepare_for_inference(ckpt.model, kernel="auto", dtype=torch.float16, keep_packed=False)

1. each stored QuantLinear / TernaryLinear becomes a RuntimeLinear / RuntimeTernaryLinear on a backend
   ("auto": the fastest that runs the stored grid exactly here), which builds its layout;
2. fusion (runtime/fusion.py): GELUs into the c_fc kernels, LayerNorms and residual adds into mma GEMVs,
   the split-cache decode attention on CUDA;
3. with keep_packed=False, the stored codes a layout replaced are freed (inference only);
4. the activation dtype: every float parameter (LayerNorms, embeddings, float linears) is cast, and with it
   the residual stream and the KV cache, while quantized layers keep their codes and scales as stored.

`resolve_dtype` says what `--dtype auto` means on a device.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from nanogptq.quant.linear import QuantEmbedding, QuantLinear
from nanogptq.quant.qat import TernaryLinear
from nanogptq.quant.walk import find_layers, replace_layers
from nanogptq.runtime.backends import BACKENDS, check_kernel
from nanogptq.runtime.fusion import fuse_blocks, fuse_mlp_gelu, use_decode_attention
from nanogptq.runtime.linear import RuntimeLinear, RuntimeTernaryLinear

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # activation dtypes by name
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_dtype(name: str, device: str | torch.device, quantized: bool) -> torch.dtype:
    """The activation dtype `name` (auto, fp32, bf16 or fp16) stands for on `device`. auto: fp32 on the CPU
    (its kernels take fp32 inputs and convert to bf16 themselves where that is their fast path); on CUDA
    fp16 for quantized checkpoints (the GEMVs' fast path), bf16 for float ones."""
    if name == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.float16 if quantized else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def cast_activations(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Run `model` on `dtype` activations, in place: every float parameter (LayerNorms, position and float
    token embeddings, float linears, a ternary layer's bias) is cast, and with it the residual stream and
    the KV cache (setup_kv_cache takes wpe's dtype). Quantized layers hold their weights in buffers, which
    stay as stored. Tied weights stay tied (the shared Parameter is cast once)."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


def use_backends(model: nn.Module, kernel: str = "auto") -> list[RuntimeLinear]:
    """Swap every stored layer for its runtime twin on `kernel` and build the layouts. Layers that a named
    kernel cannot run take "auto"'s pick instead (an 8-bit head under an int4 kernel, say), with a warning;
    a kernel that runs none of them is an error. Returns the RuntimeLinears."""
    check_kernel(kernel)
    embeddings = [m for m in model.modules() if isinstance(m, QuantEmbedding)]
    replace_layers(model, find_layers(model, lambda n, m: type(m) is QuantLinear),
                   lambda name, q: RuntimeLinear.from_stored(q, kernel))
    replace_layers(model, find_layers(model, lambda n, m: type(m) is TernaryLinear),
                   lambda name, t: RuntimeTernaryLinear.from_stored(t, kernel))
    for emb in embeddings:  # the tied head is one module under two names, found (and swapped) under one of them
        head = emb.head if isinstance(emb.head, RuntimeLinear) else model.lm_head
        emb.head = model.lm_head = head  # the table reads the rows of the head as it runs now
    layers = [m for m in model.modules() if isinstance(m, RuntimeLinear)]
    refused = [m for m in layers if m.backend != "auto" and not BACKENDS[m.backend].supports(m, m.qweight.device)]
    if refused and len(refused) == len(layers):
        raise ValueError(f"kernel {kernel!r} runs none of this model's quantized layers on "
                         f"{refused[0].qweight.device.type} (--kernel auto picks one that does)")
    for m in refused:
        m.backend = "auto"
    for m in model.modules():
        if isinstance(m, (RuntimeLinear, RuntimeTernaryLinear)):
            m.prepare()
    if refused:
        picked = ", ".join(sorted({m.backend for m in refused}))
        log.warning("kernel %s cannot run %d of the %d quantized layers here: they run %s", kernel, len(refused),
                    len(layers), picked)
    return layers


def free_packed_buffers(model: nn.Module) -> int:
    """RuntimeLinear.free_packed on every layer but the one a QuantEmbedding reads its rows from (the
    embedding lookup needs the stored codes); returns how many layers were freed."""
    embedding_heads = {id(m.head) for m in model.modules() if isinstance(m, QuantEmbedding)}
    return sum(m.free_packed() for m in model.modules()
               if isinstance(m, RuntimeLinear) and id(m) not in embedding_heads)


def prepare_for_inference(model: nn.Module, kernel: str = "auto", dtype: torch.dtype | None = None,
                          keep_packed: bool = True, fuse: bool = True, split_attention: bool = True) -> nn.Module:
    """The model, in place, ready to run on its device (see the module docstring). `fuse` and
    `split_attention` exist so benchmarks can measure what fusion and the decode attention buy."""
    model.eval()
    use_backends(model, kernel)
    fuse_mlp_gelu(model)
    if fuse:
        fuse_blocks(model)
    if split_attention:
        use_decode_attention(model)
    if not keep_packed:
        free_packed_buffers(model)
    if dtype is not None:
        cast_activations(model, dtype)
    return model
