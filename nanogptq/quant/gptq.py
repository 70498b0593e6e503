"""GPTQ for one linear layer (Frantar et al., ICLR 2023, Algorithm 1) and its Hessian.

Notation follows the paper: W is (d_row, d_col) = (out, in), X is (d_col, rows) and the layer-wise objective
||WX - QX||^2 has Hessian H = 2 X X^T. Columns are quantized one at a time; each column's error, scaled by
the Cholesky factor of H^-1, is spread over the not-yet-quantized columns:

    Hinv = Cholesky(H^-1)^T  (upper)          # Algorithm 1, line 2
    q_i  = quant(w_i)
    e_i  = (w_i - q_i) / Hinv[i, i]
    W[:, i:] -= e_i Hinv[i, i:]              # lines 5-8, applied lazily: inside a block of B columns
    W[:, next blocks] -= E Hinv[block, next]  # line 10, once per block

Grids come from grid.find_grid, so with H = I (nothing to spread) GPTQ returns exactly the RTN codes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from nanogptq.quant.config import QuantConfig
from nanogptq.quant.grid import (
    QuantizedWeight,
    find_grid,
    group_cols,
    max_code,
)

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running H = 2/N sum_n x_n x_n^T over the N input rows seen so far (as the reference's add_batch)."""

    def __init__(self, n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.H = torch.zeros(n, n, device=device, dtype=dtype)
        self.rows = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.H.shape[0]).to(self.H.dtype)
        m = x.shape[0]
        self.H *= self.rows / (self.rows + m)
        self.rows += m
        x = x * (2 / self.rows) ** 0.5
        self.H.addmm_(x.T, x)

    def hook(self, module, inputs, output) -> None:
        """Forward hook: accumulates the module's input."""
        self.add(inputs[0].detach())


def inverse_cholesky(H: torch.Tensor, damp: float, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, retrying with damp x10 when it fails."""
    mean_diag = H.diagonal().mean()
    for _ in range(max_tries):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0:
                return U, damp
        log.warning("Cholesky failed at damp=%g; retrying with damp=%g", damp, damp * 10)
        damp *= 10
    raise RuntimeError(f"Hessian is not positive definite even with damp={damp / 10:g}")


class GraphedColumns:
    """The column loop of one lazy batch (below) captured once as a CUDA graph and replayed for every full
    batch of a layer: the loop is some 1,000 tiny kernels per batch of 128 columns, and launching them one by
    one from Python takes longer than running them (a GPT-2-XL shape has half a million columns). For grids
    known before the loop (per row, per tensor, static groups): S and Z hold each column's scale and zero.
    The kernels are the eager loop's, on the same values, so the results are the same."""

    def __init__(self, B: int, rows: int, maxq: int, device: torch.device):
        self.W, self.Q, self.E, self.S, self.Z = (torch.zeros(B, rows, device=device) for _ in range(5))
        self.Hinv = torch.eye(B, device=device)
        self.maxq = maxq
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # a warm-up run before capture, as CUDA graphs want
            self._loop()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._loop()

    def _loop(self) -> None:
        W, Q, E, S, Z, Hinv = self.W, self.Q, self.E, self.S, self.Z, self.Hinv
        for i in range(W.shape[0]):  # as gptq_quantize_weight's inner loop
            w, q, err, s, z = W[i], Q[i], E[i], S[i], Z[i]
            torch.div(w, s, out=q)
            q.round_().add_(z).clamp_(0, self.maxq)
            torch.sub(q, z, out=err)
            torch.addcmul(w, err, s, value=-1, out=err)
            err.div_(Hinv[i, i])
            W[i:].addr_(Hinv[i, i:], err, alpha=-1)

    def run(self, W1t: torch.Tensor, Hinv1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor):
        """(codes, scaled errors) of the batch, as (B, rows) views of buffers the next run overwrites."""
        self.W.copy_(W1t)
        self.Hinv.copy_(Hinv1)
        self.S.copy_(S1)
        self.Z.copy_(Z1)
        self.graph.replay()
        return self.Q, self.E


@dataclass
class PreparedHessian:
    """What GPTQ derives from a layer's Hessian before its column loop. It depends on the Hessian, act-order
    and the damping only, not on the grid, so the candidates quantized against one Hessian (quantize_layer's
    options, the bits budget's (bits, group size) choices) share one, and one Cholesky inverse."""

    H: torch.Tensor  # float32, dead inputs' diagonal set to 1, original column order
    dead: torch.Tensor  # (in,) bool: inputs that are always zero
    perm: torch.Tensor | None  # act-order's column order
    Hp: torch.Tensor  # H in that order (H itself without act-order)
    Hinv: torch.Tensor  # upper Cholesky factor of Hp's damped inverse
    damp: float  # the damping that worked
    act_order: bool
    requested_damp: float


@torch.no_grad()
def prepare_hessian(H: torch.Tensor, act_order: bool, damp: float,
                    device: torch.device | str | None = None) -> PreparedHessian:
    """H's PreparedHessian for GPTQ with (or without) act-order, on `device` (default: H's)."""
    H = H.detach().to(H.device if device is None else device, torch.float32, copy=True)
    dead = H.diagonal() == 0  # inputs that are always zero: their weights cannot matter
    H[dead, dead] = 1
    perm, Hp = None, H
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        Hp = H[perm][:, perm]
    Hinv, used = inverse_cholesky(Hp, damp)
    return PreparedHessian(H, dead, perm, Hp, Hinv, used, act_order, damp)


@torch.no_grad()
def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor | None, cfg: QuantConfig, graphs: bool = True,
                         prepared: PreparedHessian | None = None) -> QuantizedWeight:
    """Quantize W (out, in) against the Hessian H (in, in) of its inputs; device-agnostic, float32. On CUDA,
    with grids known before the loop, full lazy batches replay a CUDA graph (GraphedColumns; graphs=False:
    launched one by one). `prepared`: prepare_hessian(H, cfg.act_order, cfg.damp), made once for several
    calls (H is then not read)."""
    t0 = time.perf_counter()
    W = W.detach().clone().float()
    if prepared is None:
        prepared = prepare_hessian(H, cfg.act_order, cfg.damp, W.device)
    elif (prepared.act_order, prepared.requested_damp) != (cfg.act_order, cfg.damp):
        raise ValueError("the prepared Hessian was made for another act_order or damp")
    H, dead, perm = prepared.H, prepared.dead, prepared.perm
    n = W.shape[1]
    bits, sym, maxq = cfg.bits, cfg.symmetric, max_code(cfg.bits)
    grouped = cfg.group_size > 0
    G = group_cols(cfg.group_size, n)
    W[:, dead] = 0

    def grid(cols: torch.Tensor, first: int, H: torch.Tensor):
        """The grid of W's columns first.. (given as `cols`, rows = out); the clipping search weighs their
        error by H's diagonal block for them (grid.find_grid says why the block)."""
        block = H[first : first + cols.shape[1], first : first + cols.shape[1]] if cfg.clip_search else None
        return find_grid(cols, bits, sym, cfg.group_size == 0, cfg.clip_search, block)

    static = None
    if not grouped:  # one grid per row (or per tensor) from the whole matrix, as the reference does
        scale, zero = grid(W, 0, H)
    elif cfg.static_groups:  # group grids from the original column order, before any permutation
        static = [grid(W[:, g : g + G], g, H) for g in range(0, n, G)]

    if perm is not None:
        W, H = W[:, perm], prepared.Hp
    col_group = ((perm.cpu() if perm is not None else torch.arange(n)) // G).tolist()  # original group
    Hinv, damp = prepared.Hinv, prepared.damp
    # The loop works on Wt = W^T, so the paper's column i is the contiguous row Wt[i] and each step is a few
    # in-place kernels on it: at these sizes GPTQ's time is kernel launches, not arithmetic.
    Wt = W.T.contiguous()
    Qt = torch.zeros_like(Wt)
    losses = torch.zeros(W.shape[0], device=W.device)
    dyn_scales, dyn_zeros = [], []
    # a group's grid is computed when its first column is reached, from the up-to-date (error-compensated)
    # block copy W1t and the permuted H, whose block for the group's columns is the output error's quadratic
    # form there; so blocks hold whole groups
    B = max(G, cfg.lazy_batch // G * G) if grouped else cfg.lazy_batch
    s = z = None  # the current grid as (out,) vectors (or (1,) per tensor)
    if not grouped:
        s, z = scale.reshape(-1), zero.reshape(-1)
    graphed = _graphed_columns(Wt, B, maxq, static if grouped else [(scale, zero)], col_group if grouped else None,
                               graphs and W.is_cuda and n >= B and (static is not None or not grouped))
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        if graphed is not None and i2 - i1 == B:
            S_all, Z_all, columns = graphed
            Q1t, Err1t = columns.run(Wt[i1:i2], Hinv[i1:i2, i1:i2], S_all[i1:i2], Z_all[i1:i2])
            Qt[i1:i2] = Q1t
            losses += Err1t.square().sum(dim=0) / 2
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1t, alpha=-1)
            continue
        W1t, Q1t, Err1t = Wt[i1:i2].clone(), Qt[i1:i2], torch.zeros(i2 - i1, Wt.shape[1], device=W.device)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                scale, zero = static[col_group[col]]
                s, z = scale.reshape(-1), zero.reshape(-1)
            elif grouped and col % G == 0:
                scale, zero = grid(W1t[i : i + G].T, col, H)
                dyn_scales.append(scale)
                dyn_zeros.append(zero)
                s, z = scale.reshape(-1), zero.reshape(-1)
            w, q, err = W1t[i], Q1t[i], Err1t[i]
            torch.div(w, s, out=q)  # q = clamp(round(w / s) + z, 0, maxq), as grid.quantize_codes
            q.round_().add_(z).clamp_(0, maxq)
            torch.sub(q, z, out=err)  # err = (w - s (q - z)) / Hinv[i, i]
            torch.addcmul(w, err, s, value=-1, out=err)
            err.div_(Hinv1[i, i])
            # W[:, i:] -= err Hinv[i, i:]; addr_ is one kernel on CUDA (measured), while on CPU its OpenMP
            # threading stalls badly when the cores are shared, and BLAS addmm_ does not
            if Wt.is_cuda:
                W1t[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            else:
                W1t[i:].addmm_(Hinv1[i, i:, None], err[None], alpha=-1)
        losses += Err1t.square().sum(dim=0) / 2
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1t, alpha=-1)  # W[:, i2:] -= Err Hinv[block, i2:]
    Q = Qt.T

    g_idx = None
    if static is not None:
        scale, zero = torch.cat([s for s, _ in static], 1), torch.cat([z for _, z in static], 1)
    elif grouped:
        scale, zero = torch.cat(dyn_scales, 1), torch.cat(dyn_zeros, 1)
    if perm is not None:
        invperm = torch.argsort(perm)
        Q = Q[:, invperm]
        if cfg.uses_g_idx:  # groups were formed in permuted order: column c is in group invperm[c] // G
            g_idx = (invperm // G).to(torch.int32)
    return QuantizedWeight(
        codes=Q.to(torch.uint8),
        scales=scale.half(),
        zeros=None if sym else zero.to(torch.uint8),
        bits=bits,
        group_size=cfg.group_size,
        g_idx=g_idx,
        stats={"gptq_loss": losses.sum().item(), "damp": damp, "time_s": time.perf_counter() - t0},
    )


def _graphed_columns(Wt: torch.Tensor, B: int, maxq: int, grids: list, col_group: list[int] | None, use: bool):
    """(per-column scales (n, out), zeros (n, out), GraphedColumns) for the graphed path, or None where it is
    not used or a CUDA graph cannot be captured here (then the loop launches its kernels one by one)."""
    if not use:
        return None
    n, rows = Wt.shape
    S = torch.stack([g[0].reshape(-1).expand(rows) for g in grids])  # (groups, out)
    Z = torch.stack([g[1].reshape(-1).expand(rows) for g in grids])
    index = torch.tensor(col_group if col_group is not None else [0] * n, device=Wt.device)
    try:
        columns = GraphedColumns(B, rows, maxq, Wt.device)
    except RuntimeError as e:  # no graph capture on this setup: launch the kernels eagerly
        log.warning("GPTQ: CUDA graph capture failed (%s); running the column loop eagerly", e)
        return None
    return S.float()[index], Z.float()[index], columns
