"""QuantConfig validation and round-to-nearest grids."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanogptq.quant import QuantConfig, grid
from nanogptq.quant.grid import expand_groups, n_groups
from nanogptq.quant.rtn import rtn_quantize_weight


def test_config_round_trip_through_json():
    cfg = QuantConfig(method="rtn", bits=3, group_size=-1, symmetric=True, rotate=True, layers=("mlp.c_fc",))
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert QuantConfig(layers="attn.c_attn, mlp.c_fc").layers == ("attn.c_attn", "mlp.c_fc")  # CLI form


@pytest.mark.parametrize(
    "d,match",
    [
        ({"bitz": 4}, "'bitz'"),
        ({"bits": 5}, "bits must be one of"),
        ({"method": "awq"}, "method must be one of"),
        ({"group_size": -2}, "group_size"),
        ({"damp": 0}, "damp"),
        ({"symmetric": "yes"}, "symmetric must be true or false"),
        ({"method": "rtn", "act_order": True}, "act_order"),
        ({"layers": []}, "layers"),
    ],
)
def test_config_rejects_bad_values(d, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig.from_dict(d)


def test_rtn_grids_are_the_standard_ones():
    """Asymmetric: the range [min(w, 0), max(w, 0)] in 2^b - 1 steps, zero = round(-min / step), so min and
    max get codes 0 and 2^b - 1; symmetric: step 2 max|w| / (2^b - 1), zero 2^(b-1) (GPTQ's grids). Scales are
    stored in fp16, rounded up so that the extremes stay on the grid."""
    W = torch.tensor([[-1.0, 0.7, 2.0, 0.25], [0.4, 1.6, 3.0, 0.0]])
    q = rtn_quantize_weight(W, QuantConfig(method="rtn", bits=2, group_size=-1, symmetric=False))
    assert q.scales.float().flatten().tolist() == [1.0, 1.0] and q.zeros.flatten().tolist() == [1, 0]
    assert q.codes.tolist() == [[0, 2, 3, 1], [0, 2, 3, 0]]
    q = rtn_quantize_weight(torch.tensor([[-2.0, 1.0, 0.1, 0.0]]), QuantConfig(method="rtn", bits=4, group_size=-1,
                                                                              symmetric=True))
    step = q.scales.float().item()
    assert 4 / 15 <= step < 4 / 15 * (1 + 2**-10) and q.zeros is None
    assert q.codes.tolist() == [[1, 12, 8, 8]]  # -2 / step = -7.5 + a little: -7, so code 8 - 7


def _scale_per_element(q, n):
    return expand_groups(q.scales.float(), q.group_size, n)


@settings(max_examples=80, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([0, -1, 8, 16, 24, 7]),
    symmetric=st.booleans(),
    rows=st.integers(1, 6),
    cols=st.integers(1, 50),
    spread=st.floats(1e-3, 1e2),
    seed=st.integers(0, 2**31),
)
def test_rtn_round_trip_error_is_at_most_half_a_step(bits, group_size, symmetric, rows, cols, spread, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * spread
    W[0, 0] = 0.0 if cols > 1 else W[0, 0]  # exact zeros are common (dead inputs)
    cfg = QuantConfig(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric)
    q = rtn_quantize_weight(W, cfg)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == W.shape
    assert int(q.codes.max()) <= 2**bits - 1
    assert q.scales.dtype == torch.float16
    assert q.scales.shape == (1 if group_size == 0 else rows, n_groups(group_size, cols))
    assert (q.zeros is None) == symmetric
    if q.zeros is not None:
        assert int(q.zeros.max()) <= 2**bits - 1
    err = (q.dequantize() - W).abs()
    assert torch.all(err <= _scale_per_element(q, cols) * (0.5 + 1e-4) + 1e-12)


def test_group_size_that_does_not_divide_makes_a_short_last_group():
    W = torch.randn(4, 40)
    W[:, 32:] *= 100  # the short last group (8 columns) gets its own, larger scale
    q = rtn_quantize_weight(W, QuantConfig(method="rtn", bits=4, group_size=16))
    assert q.scales.shape == (4, 3)
    assert torch.all(q.scales[:, 2] > 10 * q.scales[:, :2].max(dim=1).values)


def test_all_zero_rows_quantize_to_zero():
    q = rtn_quantize_weight(torch.zeros(3, 16), QuantConfig(method="rtn", bits=2, group_size=-1))
    assert torch.equal(q.dequantize(), torch.zeros(3, 16))


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_increases_a_grids_error(symmetric):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=g)
    W[:, 5] *= 8  # outliers make clipping worthwhile
    base = QuantConfig(method="rtn", bits=3, group_size=16, symmetric=symmetric)
    clip = QuantConfig.from_dict({**base.to_dict(), "clip_search": True})
    e0 = (rtn_quantize_weight(W, base).dequantize() - W).square().reshape(32, 4, 16).sum(-1)
    e1 = (rtn_quantize_weight(W, clip).dequantize() - W).square().reshape(32, 4, 16).sum(-1)
    assert torch.all(e1 <= e0 * (1 + 1e-6))
    assert e1.sum() < 0.95 * e0.sum()


def test_clip_search_with_a_hessian_minimises_each_groups_output_error():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=g)
    W[:, 5] *= 8
    X = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    X[:, 40:] *= 5  # and columns of very different weight
    H = 2 * X.T @ X / len(X)
    base = QuantConfig(method="rtn", bits=3, group_size=16)
    clip = QuantConfig.from_dict({**base.to_dict(), "clip_search": True})

    def group_errors(qw):  # each row's d H_gg d^T, per group of 16 columns
        d = (qw.dequantize() - W).reshape(32, 4, 16)
        return torch.stack([((d[:, k] @ H[16 * k : 16 * k + 16, 16 * k : 16 * k + 16]) * d[:, k]).sum(-1)
                            for k in range(4)], dim=1)

    plain, by_weight, by_output = (group_errors(rtn_quantize_weight(W, c, h))
                                   for c, h in ((base, None), (clip, None), (clip, H)))
    assert torch.all(by_output <= plain * (1 + 1e-5))  # ratio 1.0 is one of the candidates
    assert torch.all(by_output <= by_weight * (1 + 1e-5))  # the output-error search is the best of the three
    assert by_output.sum() < 0.98 * by_weight.sum()


def clip_search_one_ratio_at_a_time(w, bits, symmetric, per_tensor, hessian):
    """The clipping search written as the plain loop over ratios: find_grid's batched search must pick the
    same grids, bit for bit."""
    x = w.float().reshape(1, -1) if per_tensor else w.float()
    xmin = x.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = x.max(dim=1, keepdim=True).values.clamp(min=0)
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax

    def error(s, z):
        d = (grid.dequantize_codes(grid.quantize_codes(x, s, z, 2**bits - 1), s, z) - x).reshape(w.shape[0], -1)
        e = ((d @ hessian) * d if hessian is not None and hessian.dim() == 2
             else d.square() * (1 if hessian is None else hessian)).sum(dim=1, keepdim=True)
        return e.sum(dim=0, keepdim=True) if per_tensor else e

    best = None
    for ratio in grid.CLIP_RATIOS:
        s, z = grid._grid_at(xmin, xmax, ratio, bits, symmetric)
        err = error(s, z)
        if best is None:
            scale, zero, best = s, z, err
            continue
        better = err < best
        scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.minimum(err, best)
    return scale, zero


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("hessian", [None, "diagonal", "block"])
def test_batched_clip_search_picks_the_grids_of_the_loop_over_ratios(symmetric, per_tensor, hessian, monkeypatch):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 32, generator=g)
    w[:, 3] *= 6
    X = torch.randn(256, 32, generator=g) @ torch.randn(32, 32, generator=g)
    H = {"diagonal": (X.square().mean(0)), "block": X.T @ X / 256, None: None}[hessian]
    want = clip_search_one_ratio_at_a_time(w, 3, symmetric, per_tensor, H)
    got = grid.find_grid(w, 3, symmetric, per_tensor, True, H)
    monkeypatch.setattr(grid, "CLIP_CHUNK", 5 * w.numel())  # ratios in chunks of 5: the same picks
    chunked = grid.find_grid(w, 3, symmetric, per_tensor, True, H)
    for s, z in (got, chunked):
        assert s.shape == want[0].shape and torch.equal(s, want[0]) and torch.equal(z, want[1])
    if not per_tensor:  # some rows are clipped, some are not: the picks are not all the same ratio
        unclipped = grid.find_grid(w, 3, symmetric, per_tensor)[0]
        assert (got[0] != unclipped).any() and (got[0] == unclipped).any()
