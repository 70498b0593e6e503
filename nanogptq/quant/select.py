"""Whole-model choices on top of `quantize`: the bits budget's plan, the fallback to plain act-order, and the
block tuning.

    model = quantize_model(model, QuantConfig.preset("quality", bits=3), train_tokens)

`quantize_model` is what `nanogptq quantize` runs. With `config.target_bpw` it first measures a per-layer
plan of bits and group sizes (quant/budget.py). With `config.fallback` it quantizes the model twice, with the
config and with GPTQ + act-order alone, and keeps the model whose cross-entropy on held-out calibration
windows (the training split, windows drawn with another seed than GPTQ's) is lower. Per-layer errors do
not add up to the model's loss: on the tiny model at 3 bits the clipping search and rotation lowered every
layer's output error they were kept for, and still raised the validation perplexity. Comparing whole models
on text GPTQ did not see costs one more quantization and two evaluations. The choice is judged by loss, not
by KL divergence to the float model: the variant with the lower KL was the one with the higher perplexity in
two of three seeds there. `model.quant_selection` records both candidates' losses and which one was kept.

With `config.tune_steps`, the model kept is then tuned block by block against a float copy of the model
(quant/tune.py): after the fallback's choice, so one model is tuned, not both candidates.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn

from nanogptq.quant.budget import plan_budget
from nanogptq.quant.config import QuantConfig
from nanogptq.quant.linear import dequantized_once
from nanogptq.quant.quantize import calibration_windows, quantize
from nanogptq.quant.tune import tune_model

HELD_OUT_SEED = 1_000_003  # added to calib_seed: the held-out windows are never GPTQ's own


@torch.no_grad()
def heldout_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over (n, length + 1) token windows."""
    device = next(model.parameters()).device
    total = count = 0.0
    with dequantized_once(model):
        for chunk in windows.split(batch_size):
            chunk = chunk.to(device)
            _, loss = model(chunk[:, :-1], chunk[:, 1:].contiguous())
            total += loss.item() * chunk[:, 1:].numel()
            count += chunk[:, 1:].numel()
    return total / count


def plain_config(config: QuantConfig) -> QuantConfig:
    """The fallback candidate: the same grids (static groups too: they change the bytes) and calibration, GPTQ
    with act-order and nothing else."""
    return dataclasses.replace(config, act_order=True, clip_search=False, rotate=False, fallback=False)


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig, calib_tokens=None, progress: bool = True,
                   device: torch.device | str | None = None) -> nn.Module:
    """`quantize` with the whole-model options: the --target-bpw plan, then the fallback (module docstring).
    Returns the quantized model (possibly another object than `model`, which is then left quantized by the
    candidate that lost, or as it was). `device`: where each block is quantized (quantize's)."""
    if config.target_bpw and not config.plan:
        config = plan_budget(model, config, calib_tokens, progress=progress)
    reference = copy.deepcopy(model) if config.tune_steps else None  # the tuning's float targets
    model = _quantize_with_fallback(model, config, calib_tokens, progress, device)
    if reference is not None:
        model.quant_log += tune_model(model, reference, calib_tokens, config, device=device, progress=progress)
    return model


def _quantize_with_fallback(model: nn.Module, config: QuantConfig, calib_tokens, progress: bool,
                            device: torch.device | str | None) -> nn.Module:
    if not (config.fallback and config.method == "gptq"):
        model = quantize(model, config, calib_tokens, progress=progress, device=device)
        model.quant_config = config
        return model
    if calib_tokens is None:
        raise ValueError("GPTQ needs calibration tokens")
    windows = calibration_windows(calib_tokens, config.calib_samples, model.config.block_size + 1,
                                  config.calib_seed + HELD_OUT_SEED)
    candidates = [("quality", config), ("act-order", plain_config(config))]
    results = []
    for i, (name, cfg) in enumerate(candidates):
        target = model if i == len(candidates) - 1 else copy.deepcopy(model)
        quantized = quantize(target, cfg, calib_tokens, progress=progress, device=device)
        results.append((heldout_loss(quantized, windows), name, cfg, quantized))
    loss, name, cfg, best = min(results, key=lambda r: r[0])
    best.quant_selection = {"heldout_windows": len(windows), "kept": name,
                            "heldout_loss": {n: round(v, 6) for v, n, _, _ in results}}
    best.quant_config = dataclasses.replace(config, clip_search=cfg.clip_search, rotate=cfg.rotate)
    return best
