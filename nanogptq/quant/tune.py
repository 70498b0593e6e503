"""Block output reconstruction after GPTQ: learned rounding and grid scales by signed gradient descent.

GPTQ settles one layer at a time against that layer's own output error. AutoRound (Cheng et al. 2023,
"Optimize Weight Rounding via Signed Gradient Descent") instead tunes each weight's rounding and each
group's range against the *block's* output, a few hundred signed-gradient steps per block. Here the tuning
starts from GPTQ's solution: for each stored linear of a block, with codes q0, scales s0 and zero points z,

    W(V, g) = s0 * exp(g) * (clamp(round(q0 + V), 0, 2^bits - 1) - z)    V per weight, |V| <= CODE_RANGE
                                                                         g per group,  |g| <= SCALE_RANGE
    loss(V, g) = mean over the calibration windows of || block_W(x_q) - block_float(x_f) ||^2

where x_q are the block's inputs in the quantized model, through the blocks before it already tuned, and x_f
the float model's (so a block also makes up for the error of the blocks before it, as GPTQ's sequential
calibration does). round passes the gradient straight through. Each step moves every V by lr_t *
sign(dloss/dV) and every g by SCALE_LR * lr_t * sign(dloss/dg), lr_t falling linearly to zero over the steps
(AutoRound's Eq. 5 with its schedule). V starts at 0 (GPTQ's codes); its total travel, lr * steps / 2, is
`travel` codes, so a code moves at most one step either way. The stored grid keeps its layout (bits,
groups, zero points), so every runtime runs the result unchanged. It runs after the whole model is quantized
(`tune_model`, called by quant/select.py), so the fallback's choice between two GPTQ candidates is made first
and only the kept one is tuned.

Some calibration windows are held out of the steps and score the stored form of the grids along the way;
the best scored one is kept, GPTQ's own included, so the tuning can only help on text it did not fit.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from nanogptq.quant.config import QuantConfig
from nanogptq.quant.grid import dequantize_weight, max_code
from nanogptq.quant.linear import QuantLinear, dequantized_once
from nanogptq.quant.pack import pack
from nanogptq.quant.quantize import calibration_windows

log = logging.getLogger(__name__)

SCALE_RANGE = 0.25  # |g| bound: each group's scale may move by up to exp(0.25) ~ 1.28x either way
CODE_RANGE = 1.0  # |V| bound: a code moves one step either way at most
SCALE_LR = 0.3  # g's step relative to V's: a scale moves every weight of its group at once
# windows per step: 8, or fewer where the context is long, so a step sees at most about 2,048 tokens (8 windows of
# the `small` preset's 256); GPT-2's 1,024-token windows go 2 at a time
STEP_WINDOWS, STEP_TOKENS = 8, 2048


class _TunedGrid:
    """One QuantLinear's tunable rounding offsets and log-scales, around its stored (GPTQ) grid."""

    def __init__(self, layer: QuantLinear):
        self.layer = layer
        self.q0 = layer.codes().float()
        self.s0 = layer.scales.float()
        self.zeros = layer.zero_codes()
        self.V = torch.zeros_like(self.q0, requires_grad=True)
        self.g = torch.zeros_like(self.s0, requires_grad=True)

    def codes(self) -> torch.Tensor:
        rounded = torch.round(self.q0 + self.V)
        rounded = (self.q0 + self.V) + (rounded - (self.q0 + self.V)).detach()  # straight-through round
        return rounded.clamp(0, max_code(self.layer.bits))

    def scales(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.g)

    def weight(self) -> torch.Tensor:
        m = self.layer
        return dequantize_weight(self.codes(), self.scales(), self.zeros, m.bits, m.group_size, m.g_idx)

    def step(self, lr: float) -> None:
        with torch.no_grad():
            self.V -= lr * torch.sign(self.V.grad)
            self.V.clamp_(-CODE_RANGE, CODE_RANGE)
            self.g -= lr * SCALE_LR * torch.sign(self.g.grad)
            self.g.clamp_(-SCALE_RANGE, SCALE_RANGE)
            self.V.grad = self.g.grad = None

    @torch.no_grad()
    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed codes and fp16 scales this grid stands for now."""
        codes = torch.round(self.q0 + self.V).clamp(0, max_code(self.layer.bits)).to(torch.uint8)
        return pack(codes, self.layer.bits), self.scales().half()


@torch.no_grad()
def block_loss(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean squared error of the block's outputs on `inputs` against `targets` (batch lists)."""
    total = count = 0.0
    for x, y in zip(inputs, targets, strict=True):
        total += F.mse_loss(block(x), y, reduction="sum").item()
        count += y.numel()
    return total / count


def tune_block(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int,
               batch_size: int = STEP_WINDOWS, heldout: int = 16, checks: int = 8, seed: int = 0,
               travel: float = 2.0) -> dict:
    """Tune the rounding and scales of every QuantLinear in `block` (in place) so block(inputs) ~ targets.

    inputs, targets: (n, T, C) windows (the quantized model's inputs, the float block's outputs). The last
    `heldout` windows are never stepped on: `checks` times along the way (and at the end) the stored form of
    the tuned grids is scored on them, and the best scored one is kept, GPTQ's own (step 0) included.
    Returns a log row."""
    t0 = time.perf_counter()
    layers = [m for m in block.modules() if isinstance(m, QuantLinear)]
    n = inputs.shape[0]
    heldout = min(heldout, n // 4)
    fit_x, fit_y = inputs[: n - heldout], targets[: n - heldout]
    check_x, check_y = list(inputs[n - heldout:].split(batch_size)), list(targets[n - heldout:].split(batch_size))
    best = (block_loss(block, check_x, check_y), 0, [(m.qweight, m.scales) for m in layers])
    gptq_loss = best[0]
    grids = [_TunedGrid(m) for m in layers]
    gen = torch.Generator().manual_seed(seed)
    lr = 2.0 * travel / steps  # total travel lr * steps / 2 (module docstring)
    check_every = max(1, steps // checks)
    try:
        for step in range(1, steps + 1):
            idx = torch.randint(0, fit_x.shape[0], (batch_size,), generator=gen).to(inputs.device)
            with torch.enable_grad():
                for grid in grids:
                    grid.layer.hold_dequantized(grid.weight())
                F.mse_loss(block(fit_x[idx]), fit_y[idx]).backward()
            for grid in grids:
                grid.step(lr * (1 - (step - 1) / steps))
            if step % check_every == 0 or step == steps:
                stored = [grid.stored() for grid in grids]
                for m, (qweight, scales) in zip(layers, stored, strict=True):
                    m.qweight, m.scales = qweight, scales
                    m.hold_dequantized()
                loss = block_loss(block, check_x, check_y)
                if loss < best[0]:
                    best = (loss, step, stored)
    finally:
        for m in layers:
            m.release_dequantized()
    for m, (qweight, scales) in zip(layers, best[2], strict=True):
        m.qweight, m.scales = qweight, scales
    return {"heldout_loss_gptq": gptq_loss, "heldout_loss_tuned": best[0], "kept": best[1] > 0,
            "best_step": best[1], "time_s": time.perf_counter() - t0}


@torch.no_grad()
def tune_model(model: nn.Module, reference: nn.Module, calib_tokens, config: QuantConfig, batch_size: int = 16,
               device: torch.device | str | None = None, progress: bool = True) -> list[dict]:
    """Tune every block of the quantized `model` in turn (tune_block) against the float `reference` model's
    blocks, on the calibration windows of `config` (GPTQ's own): block b sees the outputs of the quantized, already
    tuned blocks 0..b-1 and is fitted to the float block b's outputs on the float model's activations. Returns a
    log row per block. `device`: where each block pair runs (quantize's)."""
    home = next(model.parameters()).device
    device = home if device is None else torch.device(device)
    windows = calibration_windows(calib_tokens, config.calib_samples, model.config.block_size, config.calib_seed)
    xq = torch.cat([model.embed(w.to(home)).to(device) for w in windows.split(batch_size)])
    xf = torch.cat([reference.embed(w.to(home)).to(device) for w in windows.split(batch_size)])
    step_windows = max(1, min(STEP_WINDOWS, STEP_TOKENS // model.config.block_size))
    rows = []
    blocks = zip(model.transformer.h, reference.transformer.h, strict=True)
    for b, (block, float_block) in enumerate(tqdm(blocks, total=len(model.transformer.h), desc="tune",
                                                  disable=not progress, leave=False)):
        block.to(device)
        float_block.to(device)
        xf = torch.cat([float_block(x) for x in xf.split(batch_size)])
        row = tune_block(block, xq, xf, config.tune_steps, batch_size=step_windows, seed=config.calib_seed + b)
        rows.append({"layer": f"transformer.h.{b}", **row})
        log.info("block %d tuned: held-out loss %.4g -> %.4g (%s)", b, row["heldout_loss_gptq"],
                 row["heldout_loss_tuned"], "kept" if row["kept"] else "not kept")
        with dequantized_once(block):
            xq = torch.cat([block(x) for x in xq.split(batch_size)])
        block.to(home)
        float_block.to(home)
    return rows
