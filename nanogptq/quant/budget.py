"""A bits budget: bits and group size per layer, from measured sensitivity, under a bits-per-weight limit.

    config = plan_budget(model, QuantConfig(target_bpw=2.5, act_order=True), train_tokens)
    config.plan  # {"transformer.h.0.attn.c_attn": [3, 64], ...}

Each block linear is quantized by GPTQ (the config's act-order and damping; no clipping search or rotation,
to keep the measurement cheap; with act-order, static groups, whose grids need no per-column group index: at
4 bytes per input column that index costs a 128-row layer 0.25 bits per weight) at every candidate (bits,
group size), against the Hessian of its inputs in the float model; its output error tr(dW H dW^T), scaled
by the layer's measured sensitivity (`measure`), and its exact stored bytes (packed codes, fp16 scales,
packed zero points, a group index) are recorded. The plan is the choice with the least summed error whose
bytes fit the budget (a knapsack, `choose`), so a larger budget never ends with a larger summed error. The
tied embedding/head is stored at 8 bits per row in every plan and counted in the budget.

Bits per weight = 8 x (stored bytes of the block linears' grids and codes + the embedding's) / (their
weights): biases, norms and position embeddings are not weights here (and stay float).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from nanogptq.quant.config import QuantConfig
from nanogptq.quant.gptq import HessianAccumulator, gptq_quantize_weight, prepare_hessian
from nanogptq.quant.grid import n_groups
from nanogptq.quant.linear import QuantEmbedding, QuantLinear
from nanogptq.quant.pack import packed_len
from nanogptq.quant.quantize import EMBED_CONFIG, calibration_windows
from nanogptq.quant.walk import BLOCK_NAME, check_block_linears, find_layers

log = logging.getLogger(__name__)
# (bits, group size); a group as wide as the layer's input is its per-channel grid
CANDIDATES = ((2, -1), (2, 128), (2, 64), (2, 32), (3, -1), (3, 128), (3, 64), (3, 32), (4, -1), (4, 128), (4, 64),
              (4, 32), (8, -1))


def layer_bytes(in_features: int, out_features: int, cfg: QuantConfig) -> int:
    """Stored bytes of one QuantLinear's codes and grid under cfg (bias and rotation seed not counted)."""
    rows = 1 if cfg.group_size == 0 else out_features
    ng = n_groups(cfg.group_size, in_features)
    total = out_features * packed_len(in_features, cfg.bits) + rows * ng * 2
    total += 0 if cfg.symmetric else rows * packed_len(ng, cfg.bits)
    return total + (in_features * 4 if cfg.uses_g_idx else 0)


def embedding_bytes(model: nn.Module) -> int:
    """The tied embedding/head at EMBED_CONFIG (8 bits per row)."""
    vocab, dim = model.transformer.wte.weight.shape
    return layer_bytes(dim, vocab, EMBED_CONFIG)


def candidate_configs(config: QuantConfig, in_features: int) -> list[QuantConfig]:
    """The distinct candidate settings for a layer with `in_features` inputs."""
    seen, out = set(), []
    for bits, group in CANDIDATES:
        group = -1 if group >= in_features else group
        if (bits, group) not in seen:
            seen.add((bits, group))
            out.append(dataclasses.replace(config, bits=bits, group_size=group, clip_search=False, rotate=False,
                                           fallback=False, target_bpw=0.0, plan={},
                                           static_groups=config.act_order))
    return out


@torch.no_grad()
def measure(model: nn.Module, config: QuantConfig, calib_tokens, progress: bool = True,
            batch_size: int = 16) -> dict[str, list[tuple[int, float, tuple[int, int]]]]:
    """Layer name -> [(stored bytes, estimated KL divergence, (bits, group size))] for every candidate.

    A layer's output error tr(dW H dW^T) (H from the float model's inputs on the calibration windows) says
    how its candidates compare; how much that error costs the model differs between layers (a summed output
    error planned worse than uniform 3 bits at 4 bits per weight on the tiny model). So each layer's errors
    are scaled by its sensitivity: the model's KL divergence from the float model with that layer alone at
    its cheapest candidate, per unit of that candidate's output error."""
    device = next(model.parameters()).device
    layers = check_block_linears(model, config.layers, "quantization")
    windows = calibration_windows(calib_tokens, config.calib_samples, model.config.block_size, config.calib_seed)
    xs = [model.embed(w.to(device)) for w in windows.split(batch_size)]
    table, cheapest = {}, {}
    for b, block in enumerate(model.transformer.h):
        names = [name for name in layers if name.startswith(f"transformer.h.{b}.")]
        accs = {name: HessianAccumulator(layers[name].in_features, device) for name in names}
        handles = [layers[name].register_forward_hook(accs[name].hook) for name in names]
        next_xs = [block(x) for x in xs]  # float inputs of the next block
        for h in handles:
            h.remove()
        for name in tqdm(names, desc=f"measure block {b}", disable=not progress, leave=False):
            layer, H = layers[name], accs[name].H
            W = layer.weight.detach().float()
            rows = []
            prepared = prepare_hessian(H, config.act_order, config.damp, W.device)  # one Cholesky for them all
            for cfg in candidate_configs(config, layer.in_features):
                dW = gptq_quantize_weight(W, H, cfg, prepared=prepared).dequantize().to(W.device) - W
                nbytes = layer_bytes(layer.in_features, layer.out_features, cfg)
                rows.append((nbytes, ((dW @ H) * dW).sum().item(), (cfg.bits, cfg.group_size)))
                if name not in cheapest or nbytes < cheapest[name][0]:
                    cheapest[name] = (nbytes, rows[-1][1], dW)
            table[name] = rows
        xs = next_xs
    kl = sensitivity(model, layers, {name: c[2] for name, c in cheapest.items()}, windows, batch_size)
    return {name: [(nbytes, err * kl[name] / max(cheapest[name][1], 1e-30), choice) for nbytes, err, choice in rows]
            for name, rows in table.items()}


@torch.no_grad()
def sensitivity(model: nn.Module, layers: dict[str, nn.Linear], errors: dict[str, torch.Tensor],
                windows: torch.Tensor, batch_size: int, max_logits: int = 2**22) -> dict[str, float]:
    """Layer name -> mean KL divergence of the model's next-token distribution from the float model's with
    that layer's weight moved by errors[name] alone, over (a share of) the windows: at most `max_logits`
    float log-probabilities are held."""
    n = max(1, min(len(windows), max_logits // (windows.shape[1] * model.config.vocab_size)))
    batches = [w.to(next(model.parameters()).device) for w in windows[:n].split(batch_size)]
    # each block's float inputs, per batch: a layer in block b changes nothing before it, so the model runs
    # from there (the same forward as model(x), split at a block)
    block_inputs = []
    for x in batches:
        h = [model.embed(x)]
        for block in model.transformer.h:
            h.append(block(h[-1]))
        block_inputs.append(h)
    base = [F.log_softmax(model.head(h[-1]).float(), -1) for h in block_inputs]
    tokens = n * windows.shape[1]
    out = {}
    for name, dW in errors.items():
        b = int(BLOCK_NAME.fullmatch(name).group(1))
        weight = layers[name].weight
        kept = weight.detach().clone()
        weight.data.add_(dW.to(weight.dtype))
        out[name] = sum(F.kl_div(F.log_softmax(model.head(_blocks_from(model, b, h[b])).float(), -1), p,
                                 log_target=True, reduction="sum").item()
                        for h, p in zip(block_inputs, base, strict=True)) / tokens
        weight.data.copy_(kept)
    return out


def _blocks_from(model: nn.Module, first: int, x: torch.Tensor) -> torch.Tensor:
    for block in model.transformer.h[first:]:
        x = block(x)
    return x


def choose(table: dict[str, list[tuple[int, float, tuple[int, int]]]], weights: int, fixed_bytes: int,
           target_bpw: float, units: int = 20_000) -> tuple[dict[str, list[int]], float, float]:
    """The plan for target_bpw from measured candidates: (layer -> [bits, group], bits per weight, summed
    error). `weights` counts every weight in the budget, `fixed_bytes` the bytes outside the choice.

    A knapsack by dynamic programming over the bytes, in `units` steps of the largest plan's size (costs
    rounded up to whole steps, so the plan fits): the least summed error over all plans that fit, so a larger
    budget, which lets more plans fit, never ends with more error."""
    cheapest = fixed_bytes + sum(min(r[0] for r in rows) for rows in table.values())
    check_reachable(target_bpw, 8 * cheapest / weights)
    step = (fixed_bytes + sum(max(r[0] for r in rows) for rows in table.values())) / units
    capacity = int((target_bpw * weights / 8 - fixed_bytes) / step)
    best = np.zeros(capacity + 1)  # best[c]: least error of the layers so far within c steps
    picks = []
    for rows in table.values():
        new = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int64)
        for k, (nbytes, err, _) in enumerate(rows):
            cost = math.ceil(nbytes / step)
            if cost > capacity:
                continue
            shifted = np.full(capacity + 1, np.inf)
            shifted[cost:] = best[: capacity + 1 - cost] + err
            better = shifted < new
            new[better], pick[better] = shifted[better], k
        best = new
        picks.append(pick)
    chosen, c = {}, capacity
    if not np.isfinite(best[capacity]):  # the rounding up left out the cheapest plan, which fits (checked)
        chosen = {name: min(rows, key=lambda r: (r[0], r[1])) for name, rows in table.items()}
    for (name, rows), pick in reversed(list(zip(table.items(), picks, strict=True)) if not chosen else []):
        k = int(pick[c])
        chosen[name] = rows[k]
        c -= math.ceil(rows[k][0] / step)
    total = fixed_bytes + sum(r[0] for r in chosen.values())
    plan = {name: list(chosen[name][2]) for name in table}
    return plan, 8 * total / weights, sum(r[1] for r in chosen.values())


def check_reachable(target_bpw: float, lowest: float) -> None:
    if not lowest <= target_bpw <= 8:
        raise ValueError(f"--target-bpw {target_bpw:g} is out of reach: this model's plans span "
                         f"{lowest:.3f} to 8 bits per weight")


def lowest_bpw(model: nn.Module, config: QuantConfig) -> float:
    """The bits per weight of the cheapest plan (every layer at its cheapest candidate)."""
    layers = check_block_linears(model, config.layers, "quantization")
    total = embedding_bytes(model) + sum(
        min(layer_bytes(m.in_features, m.out_features, c) for c in candidate_configs(config, m.in_features))
        for m in layers.values())
    return 8 * total / budget_weights(model, config)


def budget_weights(model: nn.Module, config: QuantConfig) -> int:
    """Weights in the budget: the block linears' and the tied embedding's."""
    layers = check_block_linears(model, config.layers, "quantization")
    return sum(m.weight.numel() for m in layers.values()) + model.transformer.wte.weight.numel()


def plan_budget(model: nn.Module, config: QuantConfig, calib_tokens, progress: bool = True) -> QuantConfig:
    """config with a plan for config.target_bpw (and the embedding quantized): module docstring."""
    check_reachable(config.target_bpw, lowest_bpw(model, config))  # before the work
    if calib_tokens is None:
        raise ValueError("--target-bpw measures each layer on calibration data: it needs GPTQ's training text")
    table = measure(model, config, calib_tokens, progress)
    plan, bpw, error = choose(table, budget_weights(model, config), embedding_bytes(model), config.target_bpw)
    log.info("plan for %.3g bits/weight: %.4f bits/weight, summed output error %.4g", config.target_bpw, bpw, error)
    return dataclasses.replace(config, plan=plan, quantize_embeddings=True, static_groups=config.act_order)


def stored_bpw(model: nn.Module) -> float:
    """Bits per weight of a quantized model as stored: the bytes of its block linears' codes and grids
    (qweight, scales, qzeros, g_idx) and of the tied embedding (quantized or float), over their weights."""
    layers = find_layers(model, lambda name, m: isinstance(m, QuantLinear) and name.startswith("transformer.h."))
    total = sum(t.numel() * t.element_size() for m in layers.values()
                for t in (m.qweight, m.scales, m.qzeros, m.g_idx) if t is not None)
    wte = model.transformer.wte
    if isinstance(wte, QuantEmbedding):
        head = model.lm_head
        total += sum(t.numel() * t.element_size() for t in (head.qweight, head.scales, head.qzeros, head.g_idx)
                     if t is not None)
        embedded = head.in_features * head.out_features
    else:
        total += wte.weight.numel() * wte.weight.element_size()
        embedded = wte.weight.numel()
    weights = sum(m.in_features * m.out_features for m in layers.values()) + embedded
    return 8 * total / weights
