"""GPTQ on single layers: better than RTN, equal to it with H = I, and its options."""

import logging

import pytest
import torch
import torch.nn as nn

from nanogptq.quant import QuantConfig, QuantLinear
from nanogptq.quant.gptq import HessianAccumulator, gptq_quantize_weight, prepare_hessian
from nanogptq.quant.linear import dequantized_once
from nanogptq.quant.quantize import quantize_layer
from nanogptq.quant.rtn import rtn_quantize_weight
from nanogptq.runtime.linear import RuntimeLinear


def correlated_layer(out=48, n=96, rows=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g)
    mix = torch.randn(n, n, generator=g) / n**0.5
    X = torch.randn(rows, n, generator=g) @ mix + 0.3 * torch.randn(n, generator=g)
    acc = HessianAccumulator(n)
    for chunk in X.split(500):
        acc.add(chunk)
    return W, X, acc.H


def output_error(W, Q, X):
    return ((X @ (W - Q).T).square().sum() / (X @ W.T).square().sum()).item()


def test_hessian_accumulator_averages_over_rows():
    _, X, H = correlated_layer(rows=1234)
    assert torch.allclose(H, 2 * X.T @ X / len(X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("group_size,symmetric", [(-1, False), (32, True), (0, False)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size, symmetric):
    W, X, H = correlated_layer(seed=bits)
    cfg = QuantConfig(method="gptq", bits=bits, group_size=group_size, symmetric=symmetric)
    e_rtn = output_error(W, rtn_quantize_weight(W, cfg).dequantize(), X)
    e_gptq = output_error(W, gptq_quantize_weight(W, H, cfg).dequantize(), X)
    assert e_gptq < 0.8 * e_rtn


@pytest.mark.parametrize("group_size", [-1, 20])
def test_lazy_batches_give_the_same_codes_as_one_block(group_size):
    """The lazy batch update is exact algebra: blocks of 16 columns (each carrying its error to the columns
    after it) must round like one block of all 96, up to float rounding on a few codes."""
    W, X, H = correlated_layer()
    cfg = dict(method="gptq", bits=3, group_size=group_size)
    one = gptq_quantize_weight(W, H, QuantConfig(**cfg, lazy_batch=128))
    lazy = gptq_quantize_weight(W, H, QuantConfig(**cfg, lazy_batch=16))
    assert (one.codes == lazy.codes).float().mean() > 0.99
    e_rtn = output_error(W, rtn_quantize_weight(W, QuantConfig(**cfg)).dequantize(), X)
    assert output_error(W, lazy.dequantize(), X) < 0.6 * e_rtn


def test_damping_is_relative_to_the_hessian():
    """damp is a fraction of mean diag(H): scaling the inputs (H by 1e3) changes no code."""
    W, _, H = correlated_layer()
    cfg = QuantConfig(method="gptq", bits=4, group_size=-1, damp=0.1)
    a, b = gptq_quantize_weight(W, H, cfg), gptq_quantize_weight(W, H * 1e3, cfg)
    assert (a.codes == b.codes).float().mean() > 0.99


@pytest.mark.parametrize(
    "kw",
    [
        dict(bits=4, group_size=-1),
        dict(bits=3, group_size=32, symmetric=True),
        dict(bits=2, group_size=20, lazy_batch=16),  # groups that neither divide n nor the block
        dict(bits=4, group_size=0, clip_search=True),
        dict(bits=8, group_size=16, clip_search=True, act_order=True, static_groups=True),
    ],
)
def test_identity_hessian_gives_exactly_rtn(kw):
    W, _, _ = correlated_layer()
    cfg = QuantConfig(method="gptq", **kw)
    g = gptq_quantize_weight(W, torch.eye(W.shape[1]), cfg)
    r = rtn_quantize_weight(W, cfg)
    assert torch.equal(g.codes, r.codes)
    assert torch.equal(g.scales, r.scales)


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_gives_valid_codes_and_unpermuted_layout(static_groups):
    W, X, H = correlated_layer()
    H = H * torch.linspace(0.1, 3, W.shape[1]).sqrt().outer(torch.linspace(0.1, 3, W.shape[1]).sqrt())
    cfg = QuantConfig(method="gptq", bits=3, group_size=32, act_order=True, static_groups=static_groups)
    qw = gptq_quantize_weight(W, H, cfg)
    assert (qw.g_idx is not None) == (not static_groups)
    assert int(qw.codes.max()) <= 7 and qw.scales.shape == (W.shape[0], 3)
    if qw.g_idx is not None:  # every group holds exactly 32 columns, in act order
        assert torch.bincount(qw.g_idx.long()).tolist() == [32, 32, 32]
    # the packed module reproduces the same weight, and GPTQ still beats RTN
    layer = QuantLinear.from_quantized(qw)
    assert torch.equal(layer.dequantize(), qw.dequantize())
    e_rtn = output_error(
        W,
        rtn_quantize_weight(W, QuantConfig(method="rtn", bits=3, group_size=32)).dequantize(),
        X @ torch.linspace(0.1, 3, W.shape[1]).sqrt().diag(),
    )
    e_gptq = output_error(W, qw.dequantize(), X @ torch.linspace(0.1, 3, W.shape[1]).sqrt().diag())
    assert e_gptq < e_rtn
    # and the order matters: the columns of largest diag(H) first beat the stored order, where they come last
    in_order = gptq_quantize_weight(W, H, QuantConfig(method="gptq", bits=3, group_size=32))
    e_in_order = output_error(W, in_order.dequantize(), X @ torch.linspace(0.1, 3, W.shape[1]).sqrt().diag())
    assert e_gptq < 0.85 * e_in_order


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rotation_spreads_outlier_columns(method):
    W, X, H = correlated_layer(out=64, n=128)
    W[:, [3, 40, 77]] *= 25  # a few outlier input channels blow up every row's scale
    lin = nn.Linear(128, 64, bias=False)
    lin.weight.data = W
    errs = {}
    for rotate in (False, True):
        cfg = QuantConfig(method=method, bits=4, group_size=-1, rotate=rotate, rotate_seed=3)
        q, row = quantize_layer(lin, H, cfg, "layer")
        x = torch.randn(5, 128)
        # the stored layer's own forward and the runtime's exact backend (the fast backends are tested
        # against it in test_backends.py): the rotated path equals the reference
        run = RuntimeLinear.from_stored(q, "dequant")
        run.prepare()
        for layer in (q, run):
            assert torch.allclose(layer(x), x @ q.dequantize().T, atol=1e-4, rtol=1e-4)
        assert (q.rot_seed is not None) == rotate
        errs[rotate] = row["rel_error"]
    assert errs[True] < 0.7 * errs[False]


def test_dead_inputs_are_zeroed_and_finite():
    W, _, H = correlated_layer()
    H[:, 7] = 0
    H[7, :] = 0
    qw = gptq_quantize_weight(W, H, QuantConfig(method="gptq", bits=4, group_size=-1, symmetric=True))
    Q = qw.dequantize()
    assert torch.isfinite(Q).all()
    assert torch.all(Q[:, 7] == 0)


def test_failed_cholesky_retries_with_more_damping(caplog):
    n = 16
    H = torch.ones(n, n) - 0.5 * torch.eye(n)  # eigenvalues 15.5 and -0.5: not positive definite
    W = torch.randn(8, n)
    with caplog.at_level(logging.WARNING, logger="nanogptq.quant.gptq"):
        qw = gptq_quantize_weight(W, H, QuantConfig(method="gptq", bits=4, group_size=-1))
    assert qw.stats["damp"] >= 1.0
    assert "retrying with damp" in caplog.text


@pytest.mark.parametrize("act_order", [False, True])
def test_a_prepared_hessian_serves_every_grid_setting_unchanged(act_order):
    W, _, H = correlated_layer()
    H[7, :] = H[:, 7] = 0  # a dead input too
    prepared = prepare_hessian(H, act_order, 0.01)
    for bits, group_size, clip in ((3, 32, True), (2, -1, False), (4, 16, False)):
        cfg = QuantConfig(bits=bits, group_size=group_size, act_order=act_order, clip_search=clip)
        a, b = gptq_quantize_weight(W, H, cfg), gptq_quantize_weight(W, H, cfg, prepared=prepared)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    with pytest.raises(ValueError, match="another act_order or damp"):
        gptq_quantize_weight(W, H, QuantConfig(act_order=not act_order), prepared=prepared)


def test_a_held_dequantized_weight_runs_the_same_forward_and_is_never_saved():
    W, X, H = correlated_layer()
    lin = nn.Linear(W.shape[1], W.shape[0])
    lin.weight.data.copy_(W)
    q, _ = quantize_layer(lin, H, QuantConfig(bits=3, group_size=32, rotate=True), "layer")
    assert q.rot_seed is not None  # the rotation was kept: the held weight is the rotated basis's
    want = q(X[:64])
    with dequantized_once(q):
        assert "held_weight" in q._buffers and "held_weight" not in q.state_dict()
        assert torch.equal(q(X[:64]), want)
    assert "held_weight" not in q._buffers and "held_weight" not in q._non_persistent_buffers_set
