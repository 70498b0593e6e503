"""Quantize a whole GPT, block by block, into stored layers; rebuild such models from checkpoint metadata.

    model = quantize(model, QuantConfig(method="gptq", bits=4, group_size=128), train_tokens)

`quantize` replaces the chosen linears by QuantLinear (codes, scales, zeros) and returns the model, which
runs on the exact reference path; kernels, fusion and dtype casts are the runtime's, built at load. The
checkpoint's config.json "quantization" entry is QuantConfig.to_dict() plus "format" (1) and
"quantized_layers" (full module names); `prepare_quantized_model` rebuilds the module shapes from it.

GPTQ runs sequentially, like the reference code's --true-sequential: block b's linears see the inputs
produced by blocks 0..b-1 *already quantized*, and inside a block each linear (in forward order
c_attn, c_proj, c_fc, c_proj) is quantized from a fresh pass in which the block's earlier linears are
already quantized. That is one block pass per linear, each stopped at that linear, plus one for the next
block's inputs: cheap at nanoGPT sizes and the most faithful choice. The passes run `batch_size` windows at a
time; with `device`, the model stays where it is and one block at a time moves to the device (a GPT-2-XL shape
quantizes on a GPU in a few GB: benchmarks/gptq_scale.py).

Per-layer reconstruction error ||WX - QX||^2 / ||WX||^2 is computed from the Hessian:
||(W - Q) X||^2 = tr((W - Q) X X^T (W - Q)^T), so no activations need to be kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from nanogptq.quant.config import QuantConfig
from nanogptq.quant.gptq import HessianAccumulator, gptq_quantize_weight, prepare_hessian
from nanogptq.quant.linear import QuantEmbedding, QuantLinear, dequantized_once
from nanogptq.quant.qat import TernaryLinear, prepare_ternary_model
from nanogptq.quant.rotation import layer_seed, random_orthogonal
from nanogptq.quant.rtn import rtn_quantize_weight
from nanogptq.quant.walk import check_block_linears, find_layers, named_linears, replace_layers

log = logging.getLogger(__name__)
# keys of the checkpoint's "quantization" besides QuantConfig's; "rotated_layers" lists the layers whose
# rotation was kept (with rotate on; where the key is absent, every quantized layer is rotated)
META_EXTRAS = ("format", "quantized_layers", "rotated_layers")
EMBED_CONFIG = QuantConfig(method="rtn", bits=8, group_size=-1, symmetric=True)


def quantize_layer(
    layer: nn.Linear, H: torch.Tensor | None, cfg: QuantConfig, name: str
) -> tuple[QuantLinear, dict]:
    """One nn.Linear -> QuantLinear; H (in, in) is its input Hessian (None: RTN without data).

    The options that are meant to help, rotation and the clipping search, are kept per layer only where they
    do: with cfg.rotate the layer is quantized with and without its rotation, with cfg.clip_search with and
    without the search, and the candidate with the smallest error (output error with H, weight error without)
    is kept. A rotation that does not help costs the runtime an input rotation for nothing, and the search
    picks each grid from that grid's own error, which GPTQ's later columns can still undo. The log row's
    "rotated" and "clipped" say what was kept.
    """
    t0 = time.perf_counter()
    W = layer.weight.detach().float()
    seeds = [None, layer_seed(cfg.rotate_seed, name)] if cfg.rotate else [None]
    configs = [cfg, dataclasses.replace(cfg, clip_search=False)] if cfg.clip_search else [cfg]
    best = None
    for seed in seeds:
        # the rotation, the rotated weight and Hessian, and GPTQ's Cholesky inverse serve every option
        U = None if seed is None else random_orthogonal(W.shape[1], seed).to(W.device)
        Wq, Hq = _rotated(W, H, U)
        prepared = prepare_hessian(Hq, cfg.act_order, cfg.damp, W.device) \
            if cfg.method == "gptq" and Hq is not None else None
        for option in configs:
            if cfg.method == "gptq":
                qw = gptq_quantize_weight(Wq, Hq, option, prepared=prepared)
            else:
                qw = rtn_quantize_weight(Wq, option, Hq)
            stored = qw.dequantize().to(W.device)  # what the QuantLinear dequantizes: its codes, unpacked
            effective = stored if U is None else (stored.double() @ U.T).float()  # as QuantLinear.dequantize
            err = layer_error(W, effective, H)
            if best is None or err < best[2]:
                best = (qw, seed, err, option.clip_search, U)
    qw, seed, err, clipped, U = best
    qlayer = QuantLinear.from_quantized(qw, layer.bias, seed)
    if U is not None:
        qlayer.rot = U.float()  # as rotate_input would make it
    row = {
        "layer": name,
        "rel_error": err,
        "error_kind": "output" if H is not None else "weight",
        "time_s": time.perf_counter() - t0,
        **({"rotated": qlayer.rot_seed is not None} if cfg.rotate else {}),
        **({"clipped": clipped} if cfg.clip_search else {}),
        **{k: v for k, v in qw.stats.items() if k != "time_s"},
    }
    return qlayer, row


def _rotated(W: torch.Tensor, H: torch.Tensor | None, U: torch.Tensor | None):
    """W and H in the basis rotated by U (float64): W' = W U, and inputs x' = U^T x, so H' = U^T H U."""
    if U is None:
        return W, H
    return (W.double() @ U).float(), None if H is None else (U.T @ H.double() @ U).float()


def layer_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None) -> float:
    """Relative error of Wq for W: the output error tr(dW H dW^T) / tr(W H W^T) with the input Hessian H,
    the weight error ||dW||^2 / ||W||^2 without."""
    dW = Wq - W
    if H is None:
        return (dW.square().sum() / W.square().sum()).item()
    return ((dW @ H) * dW).sum().item() / max(((W @ H) * W).sum().item(), 1e-30)


def calibration_windows(tokens, n: int, length: int, seed: int) -> torch.Tensor:
    """n random (seeded) windows of `length` tokens, as an (n, length) int64 tensor."""
    tokens = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if len(tokens) <= length:
        raise ValueError(f"need more than {length} calibration tokens, got {len(tokens)}")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - length, size=n)
    return torch.from_numpy(np.stack([tokens[s : s + length] for s in starts]).astype(np.int64))


class _InputSeen(Exception):
    """Raised by a calibration hook once its linear has seen its input: the rest of the block is not needed."""


def _calibration_context(x: torch.Tensor, dtype: torch.dtype | None):
    """Autocast to `dtype` for a calibration forward, or nothing (the model's own dtype) without one."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(x.device.type, dtype=dtype)


@torch.no_grad()
def _run(block: nn.Module, xs: list[torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Each batch of calibration inputs through the block, replaced by its output in place (so the block's
    inputs and outputs for all windows are never held at once)."""
    for i, x in enumerate(xs):
        with _calibration_context(x, dtype):
            xs[i] = block(x)


@torch.no_grad()
def layer_hessian(block: nn.Module, layer: nn.Linear, xs: list[torch.Tensor],
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """The Hessian (fp32) of `layer`'s inputs when the block runs on each batch of `xs`, batch by batch. Each
    forward stops at the layer: what comes after it cannot change its input."""
    acc = HessianAccumulator(layer.in_features, layer.weight.device)

    def hook(module: nn.Module, inputs: tuple) -> None:
        acc.add(inputs[0].detach())
        raise _InputSeen

    handle = layer.register_forward_pre_hook(hook)
    try:
        for x in xs:
            try:
                with _calibration_context(x, dtype):
                    block(x)
            except _InputSeen:
                pass
    finally:
        handle.remove()
    return acc.H


@torch.no_grad()
def quantize(model: nn.Module, config: QuantConfig, calib_tokens=None, progress: bool = True,
             batch_size: int = 16, device: torch.device | str | None = None,
             calib_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the model's block linears named in config.layers (and optionally the tied embedding) by
    QuantLinear, in place, and return the model. Calibration runs the already-quantized layers on their
    exact reference forward. `model.quant_log` gets one dict per layer: name, relative error, time (and
    GPTQ's loss and damping).

    `device` (default: where the model is) is where the work runs: each block is moved there for its turn and
    back after it, so a model kept on the CPU is quantized on a GPU that holds one block, the calibration
    activations (batch_size windows at a time through a block) and one Hessian, never the whole model.
    `calib_dtype` (float16 or bfloat16) runs the calibration forwards under autocast, as the reference GPTQ
    runs its models in fp16; the Hessians stay fp32 and GPTQ rounds the model's own weights. None (the
    default) runs them in the model's dtype."""
    model.eval()
    home = next(model.parameters()).device
    device = home if device is None else torch.device(device)
    if config.method == "gptq" and calib_tokens is None:
        raise ValueError("GPTQ needs calibration tokens")
    layers = check_block_linears(model, config.layers, "quantization")  # name -> nn.Linear, forward order
    xs = None
    if calib_tokens is not None:
        windows = calibration_windows(calib_tokens, config.calib_samples, model.config.block_size, config.calib_seed)
        xs = [model.embed(w.to(home)).to(device) for w in windows.split(batch_size)]
    quant_log = []
    with dequantized_once(model):  # each stored layer is run on many batches: unpack its codes once
        for b, block in enumerate(model.transformer.h):
            block.to(device)
            names = [name for name in layers if name.startswith(f"transformer.h.{b}.")]
            for name in tqdm(names, desc=f"block {b}", disable=not progress, leave=False):
                layer = layers.pop(name)  # once replaced, nothing may keep it (on the device) but this loop
                H = None if xs is None else layer_hessian(block, layer, xs, calib_dtype)
                qlayer, row = quantize_layer(layer, H, config.layer_config(name), name)
                del H
                qlayer.hold_dequantized()
                model.set_submodule(name, qlayer)
                log.info("%s: rel_error %.3g (%s) in %.2fs", row["layer"], row["rel_error"], row["error_kind"],
                         row["time_s"])
                quant_log.append(row)
            if xs is not None:
                _run(block, xs, calib_dtype)  # inputs of the next block, through this block's quantized layers
            block.to(home)
    if config.quantize_embeddings:
        head, row = quantize_layer(model.lm_head, None, EMBED_CONFIG, "lm_head")
        model.lm_head = head
        model.transformer.wte = QuantEmbedding(head)
        quant_log.append(row)
    model.quant_log = quant_log
    return model


def quant_meta(model: nn.Module, config: QuantConfig) -> dict:
    """The checkpoint's "quantization" entry."""
    layers = block_quant_layers(model)
    meta = {"format": 1, **config.to_dict(), "quantized_layers": list(layers)}
    if config.rotate:
        meta["rotated_layers"] = [name for name, m in layers.items() if getattr(m, "rot_seed", None) is not None]
    return meta


def block_quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized linears inside the blocks (not the tied head: quantize_embeddings covers that)."""
    return find_layers(model, lambda name, m: isinstance(m, (QuantLinear, TernaryLinear))
                       and name.startswith("transformer.h."))


def prepare_quantized_model(model: nn.Module, quant_meta: dict) -> nn.Module:
    """Swap in empty stored modules (QuantLinear, QuantEmbedding, or an exported QAT model's TernaryLinear)
    shaped like the checkpoint's, for its weights to load into."""
    if quant_meta.get("method") == "ternary":  # exported QAT checkpoints
        return prepare_ternary_model(model, quant_meta)
    cfg = QuantConfig.from_dict({k: v for k, v in quant_meta.items() if k not in META_EXTRAS},
                                source="checkpoint quantization entry")
    names = quant_meta.get("quantized_layers", [])
    layers = named_linears(model, names, "quantized")
    rotated = set(quant_meta.get("rotated_layers", names if cfg.rotate else []))
    def stored(name: str, layer: nn.Linear) -> QuantLinear:
        c = cfg.layer_config(name)  # a --target-bpw plan gives each layer its own bits and group size
        return QuantLinear(layer.in_features, layer.out_features, c.bits, c.group_size, c.symmetric,
                           layer.bias is not None, name in rotated, c.uses_g_idx)

    replace_layers(model, layers, stored)
    if cfg.quantize_embeddings:
        e, wte = EMBED_CONFIG, model.transformer.wte
        head = QuantLinear(wte.embedding_dim, wte.num_embeddings, e.bits, e.group_size, e.symmetric)
        model.lm_head = head
        model.transformer.wte = QuantEmbedding(head)
    return model


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
    for m in block_quant_layers(model).values():
        n = m.in_features * m.out_features
        if isinstance(m, TernaryLinear):
            weights += n
            bits += m.qweight.numel() * 8 + m.scale.numel() * 32
            continue
        weights += n
        bits += n * m.bits + m.scales.numel() * 16
        bits += 0 if m.symmetric else m.scales.numel() * m.bits  # (counted from the grid: a runtime may free qzeros)
        bits += 0 if m.g_idx is None else m.g_idx.numel() * 32
    return bits / weights if weights else 32.0
