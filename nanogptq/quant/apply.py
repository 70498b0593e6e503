"""Quantize a whole GPT, block by block, and rebuild quantized models from checkpoint metadata.

GPTQ runs sequentially, like the reference code's --true-sequential: block b's linears see the inputs
produced by blocks 0..b-1 *already quantized*, and inside a block each linear (in forward order
c_attn, c_proj, c_fc, c_proj) is quantized from a fresh pass in which the block's earlier linears are
already quantized. That is one block pass per linear plus one for the next block's inputs: cheap at
nanoGPT sizes and the most faithful choice.

Per-layer reconstruction error ||WX - QX||^2 / ||WX||^2 is computed from the Hessian:
||(W - Q) X||^2 = tr((W - Q) X X^T (W - Q)^T), so no activations need to be kept.
"""

from __future__ import annotations

import logging
import time
import zlib

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from nanogptq.model import MLP, Block
from nanogptq.quant.config import QuantConfig
from nanogptq.quant.gptq import HessianAccumulator, gptq_quantize_weight
from nanogptq.quant.linear import KERNELS, QuantEmbedding, QuantLinear, check_kernel, random_orthogonal
from nanogptq.quant.qat import TernaryLinear, prepare_ternary_model
from nanogptq.quant.rtn import QuantizedWeight, rtn_quantize_weight

log = logging.getLogger(__name__)
META_EXTRAS = ("format", "quantized_layers")  # keys of the checkpoint's "quantization" besides QuantConfig's
EMBED_CONFIG = QuantConfig(method="rtn", bits=8, group_size=-1, symmetric=True)


def layer_seed(rotate_seed: int, name: str) -> int:
    """A per-layer rotation seed that does not depend on Python's randomized str hash."""
    return (rotate_seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62


def quantize_layer(
    layer: nn.Linear, H: torch.Tensor | None, cfg: QuantConfig, name: str
) -> tuple[QuantLinear, dict]:
    """One nn.Linear -> QuantLinear; H (in, in) is its input Hessian (None: RTN without data)."""
    t0 = time.perf_counter()
    W = layer.weight.detach().float()
    seed = layer_seed(cfg.rotate_seed, name) if cfg.rotate else None
    Wq, Hq = W, H
    if seed is not None:  # incoherence: W' = W U, and inputs x' = U^T x, so H' = U^T H U
        U = random_orthogonal(W.shape[1], seed).to(W.device)
        Wq = (W.double() @ U).float()
        Hq = None if H is None else (U.T @ H.double() @ U).float()
    if cfg.method == "gptq":
        qw = gptq_quantize_weight(Wq, Hq, cfg)
    else:
        qw = rtn_quantize_weight(Wq, cfg)
    qlayer = QuantLinear.from_quantized(qw, layer.bias, seed)
    dW = qlayer.dequantize().to(W.device) - W
    if H is None:  # no data: weight-space error
        err = (dW.square().sum() / W.square().sum()).item()
    else:
        err = ((dW @ H) * dW).sum().item() / max(((W @ H) * W).sum().item(), 1e-30)
    row = {
        "layer": name,
        "rel_error": err,
        "error_kind": "output" if H is not None else "weight",
        "time_s": time.perf_counter() - t0,
        **{k: v for k, v in qw.stats.items() if k != "time_s"},
    }
    return qlayer, row


def calibration_windows(tokens, n: int, length: int, seed: int) -> torch.Tensor:
    """n random (seeded) windows of `length` tokens, as an (n, length) int64 tensor."""
    tokens = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if len(tokens) <= length:
        raise ValueError(f"need more than {length} calibration tokens, got {len(tokens)}")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - length, size=n)
    return torch.from_numpy(np.stack([tokens[s : s + length] for s in starts]).astype(np.int64))


@torch.no_grad()
def _run(block: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [block(x) for x in xs]


@torch.no_grad()
def quantize(
    model: nn.Module, config: QuantConfig, calib_tokens=None, progress: bool = True, batch_size: int = 16,
    kernel: str = "auto",
) -> nn.Module:
    """Replace the model's block linears (and optionally the tied embedding) by QuantLinear, in place.

    Calibration runs the already-quantized layers on the exact "dequant" path; `kernel` is set at the end.

    `model.quant_log` gets one dict per layer: name, relative error, time (and GPTQ's loss and damping).
    """
    model.eval()
    device = next(model.parameters()).device
    if config.method == "gptq" and calib_tokens is None:
        raise ValueError("GPTQ needs calibration tokens")
    xs = None
    if calib_tokens is not None:
        windows = calibration_windows(
            calib_tokens, config.calib_samples, model.config.block_size, config.calib_seed
        )
        xs = [model.embed(w.to(device)) for w in windows.split(batch_size)]
    quant_log = []
    for b, block in enumerate(model.transformer.h):
        names = [n for n, m in block.named_modules() if n in config.layers]  # forward (definition) order
        missing = set(config.layers) - set(names)
        if missing:
            raise ValueError(f"block {b} has no linear named {sorted(missing)[0]!r}")
        for name in tqdm(names, desc=f"block {b}", disable=not progress, leave=False):
            layer = block.get_submodule(name)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"{name} in block {b} is a {type(layer).__name__}, not nn.Linear")
            H = None
            if xs is not None:
                acc = HessianAccumulator(layer.in_features, device)
                handle = layer.register_forward_hook(acc.hook)
                _run(block, xs)
                handle.remove()
                H = acc.H
            qlayer, row = quantize_layer(layer, H, config, f"transformer.h.{b}.{name}")
            qlayer.kernel = "dequant"
            qlayer.prepare_kernel()
            block.set_submodule(name, qlayer)
            log.info(
                "%s: rel_error %.3g (%s) in %.2fs",
                row["layer"],
                row["rel_error"],
                row["error_kind"],
                row["time_s"],
            )
            quant_log.append(row)
        if xs is not None:
            xs = _run(block, xs)  # inputs of the next block, through this block's quantized layers
    if config.quantize_embeddings:
        head, row = quantize_layer(model.lm_head, None, EMBED_CONFIG, "lm_head")
        model.lm_head = head
        model.transformer.wte = QuantEmbedding(head)
        quant_log.append(row)
    model.quant_log = quant_log
    check_kernel(kernel)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = kernel
    return finalize_quantized_model(model)


def quant_meta(model: nn.Module, config: QuantConfig) -> dict:
    """The checkpoint's "quantization" entry."""
    return {"format": 1, **config.to_dict(), "quantized_layers": list(block_quant_layers(model))}


def block_quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The quantized linears inside the blocks (not the tied head: quantize_embeddings covers that)."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and n.startswith("transformer.h.")
    }


def prepare_quantized_model(model: nn.Module, quant_meta: dict, kernel: str = "auto") -> nn.Module:
    """Swap in empty QuantLinear/QuantEmbedding modules shaped like the checkpoint's, for load_model."""
    check_kernel(kernel)
    if quant_meta.get("method") == "ternary":  # exported QAT checkpoints
        return prepare_ternary_model(model, quant_meta, kernel)
    cfg = QuantConfig.from_dict({k: v for k, v in quant_meta.items() if k not in META_EXTRAS})
    for name in quant_meta.get("quantized_layers", []):
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"quantized layer {name!r} is a {type(layer).__name__} in this model, not nn.Linear"
            )
        q = QuantLinear(
            layer.in_features,
            layer.out_features,
            cfg.bits,
            cfg.group_size,
            cfg.symmetric,
            layer.bias is not None,
            cfg.rotate,
            cfg.uses_g_idx,
            kernel,
        )
        model.set_submodule(name, q)
    if cfg.quantize_embeddings:
        e = EMBED_CONFIG
        wte = model.transformer.wte
        head = QuantLinear(
            wte.embedding_dim, wte.num_embeddings, e.bits, e.group_size, e.symmetric, kernel=kernel
        )
        model.lm_head = head
        model.transformer.wte = QuantEmbedding(head)
    return model


def finalize_quantized_model(model: nn.Module, keep_packed: bool = True) -> nn.Module:
    """After loading and .to(device): resolve kernels and build their layouts (and rotations), move each
    MLP's GELU into its quantized c_fc; with keep_packed=False, then free the stored codes that a layout
    replaced (inference only). Layers that a requested kernel cannot run take "auto"'s pick instead (an
    8-bit head under an int4 kernel, say), with a warning; a kernel that runs none of them is an error."""
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    refused = [m for m in quant if m.kernel != "auto" and not KERNELS[m.kernel].supports(m, m.qweight.device)]
    if refused and len(refused) == len(quant):
        m = refused[0]
        raise ValueError(f"kernel {m.kernel!r} runs none of this model's quantized layers on {m.qweight.device.type}"
                         " (--kernel auto picks one that does)")
    asked = {m.kernel for m in refused}
    for m in refused:
        m.kernel = "auto"
    for m in model.modules():
        if isinstance(m, (QuantLinear, TernaryLinear)):
            m.prepare_kernel()
    if refused:
        picked = sorted({m.kernel for m in refused})
        log.warning("kernel %s cannot run %d of the %d quantized layers here: they run %s",
                    ", ".join(sorted(asked)), len(refused), len(quant), ", ".join(picked))
    fuse_mlp_gelu(model)
    fuse_blocks(model)
    if not keep_packed:
        free_packed_buffers(model)
    return model


def fuse_mlp_gelu(model: nn.Module) -> int:
    """Each MLP whose c_fc is a QuantLinear hands its GELU to that layer (the same function on the same
    values): a kernel with a GELU epilogue then saves the separate elementwise pass. Returns how many.
    Code that swaps such a c_fc for a float nn.Linear must give the MLP its nn.GELU back."""
    n = 0
    for mlp in model.modules():
        if isinstance(mlp, MLP) and isinstance(mlp.c_fc, QuantLinear) and isinstance(mlp.act, nn.GELU):
            assert mlp.act.approximate == "none", "QuantLinear applies the exact (erf) GELU"
            mlp.c_fc.gelu, mlp.act = True, nn.Identity()
            n += 1
    return n


def fuse_blocks(model: nn.Module) -> int:
    """Each block whose four linears run a kernel that applies their epilogue itself (mma) takes its
    LayerNorms and residual adds into them for one-token steps (Block.fused, QuantLinear.fuse_epilogue;
    choosing another kernel, prepare_kernel, undoes it):
    ln_1 folded into c_attn, ln_2 into c_fc (after fuse_mlp_gelu), the residual stream added by the
    c_projs. The decode step then launches no LayerNorm or add kernels. Returns how many blocks."""
    from nanogptq.quant import cuda_gemv

    n = 0
    for block in model.modules():
        if not isinstance(block, Block) or block.fused:
            continue
        c_attn, c_proj, c_fc, c_proj2 = block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj
        layers = (c_attn, c_proj, c_fc, c_proj2)
        if not (all(isinstance(q, QuantLinear) and KERNELS[q.kernel].forward_fused is not None and q.rot_seed is None
                    for q in layers)
                and all(isinstance(ln, nn.LayerNorm) and ln.elementwise_affine for ln in (block.ln_1, block.ln_2))
                and isinstance(block.mlp.act, nn.Identity) and not c_proj.gelu and not c_proj2.gelu
                and all(cuda_gemv.can_fold(q.in_features) for q in (c_attn, c_fc))):
            continue
        c_attn.fuse_epilogue(block.ln_1)
        c_fc.fuse_epilogue(block.ln_2)
        c_proj.fuse_epilogue()
        c_proj2.fuse_epilogue()
        n += 1
    return n


def free_packed_buffers(model: nn.Module) -> int:
    """QuantLinear.free_packed on every layer but the one a QuantEmbedding reads its rows from (the
    embedding lookup needs the stored codes); returns how many layers were freed."""
    embedding_heads = {id(m.head) for m in model.modules() if isinstance(m, QuantEmbedding)}
    return sum(m.free_packed() for m in model.modules()
               if isinstance(m, QuantLinear) and id(m) not in embedding_heads)


def quantized_weight_of(layer: QuantLinear) -> QuantizedWeight:
    """Unpacked view of a QuantLinear (for tests and tools)."""
    from nanogptq.quant.pack import unpack

    zeros = None if layer.qzeros is None else unpack(layer.qzeros, layer.bits, layer.scales.shape[1])
    return QuantizedWeight(
        unpack(layer.qweight, layer.bits, layer.in_features),
        layer.scales,
        zeros,
        layer.bits,
        layer.group_size,
        layer.g_idx,
    )


def theoretical_size_bytes(model: nn.Module) -> int:
    """bits * weights / 8 for quantized weights + every other stored tensor's bytes, shared tensors once."""
    seen, total = set(), 0.0
    for mod in model.modules():
        stored = list(mod._parameters.items())
        stored += [(n, b) for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set]
        for n, t in stored:
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            if isinstance(mod, QuantLinear) and n in (
                "qweight",
                "qzeros",
            ):  # without the packing's row padding
                count = mod.in_features * mod.out_features if n == "qweight" else mod.scales.numel()
                total += count * mod.bits / 8
            else:
                total += t.numel() * t.element_size()
    return round(total)


def bits_per_weight(model: nn.Module) -> float:
    """Average storage bits per weight of the quantized linears (the block linears), grids included."""
    bits = weights = 0
    for name, m in model.named_modules():
        if isinstance(m, TernaryLinear) and name.startswith("transformer.h."):
            weights += m.in_features * m.out_features
            bits += m.qweight.numel() * 8 + m.scale.numel() * 32
    for m in block_quant_layers(model).values():
        n = m.in_features * m.out_features
        weights += n
        bits += n * m.bits + m.scales.numel() * 16
        bits += 0 if m.symmetric else m.scales.numel() * m.bits  # (qzeros may be freed, see free_packed)
        bits += 0 if m.g_idx is None else m.g_idx.numel() * 32
    return bits / weights if weights else 32.0
