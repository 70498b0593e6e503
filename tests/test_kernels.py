"""Fast QuantLinear kernels against the dequant reference.

Tolerances are relative L2 errors. The CPU int8pack / int4pack kernels run in bf16 (activations, and int4's
scales/zeros), so they match the fp32 reference to BF16_TOL; int4's layout itself is checked exactly by
running the same op in fp32. W8A8 also rounds activations to 8 bits: W8A8_TOL.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanogptq.checkpoint import load_checkpoint, save_checkpoint
from nanogptq.data import CharTokenizer
from nanogptq.model import GPT, GPTConfig
from nanogptq.quant import QuantConfig, QuantLinear, quant_meta, quantize, rtn_quantize_weight
from nanogptq.quant import kernels as K
from nanogptq.quant.linear import AUTO_ORDER, KERNELS

BF16_TOL = 1e-2  # measured ~3e-3 per layer
W8A8_TOL = 3e-2  # measured ~6e-3 per layer
CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def layer(
    out_f: int, in_f: int, bits: int, group_size: int, symmetric: bool, kernel: str, device="cpu", **kw
) -> QuantLinear:
    torch.manual_seed(out_f + in_f + bits)
    W = torch.randn(out_f, in_f) * 0.05
    cfg = QuantConfig(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric)
    bias = torch.randn(out_f) * 0.1 if kw.get("bias") else None
    m = QuantLinear.from_quantized(rtn_quantize_weight(W, cfg), bias, kw.get("rot_seed"), kernel=kernel)
    m.to(device).prepare_kernel()
    return m


def reference(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    y = F.linear(x.float(), m.dequantize().to(x.device))
    return y if m.bias is None else y + m.bias


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 0])
@pytest.mark.parametrize("rows", [1, 40])  # the decode path and the prefill path
def test_int8pack_matches_dequant(symmetric, group_size, rows):
    m = layer(96, 160, 8, group_size, symmetric, "int8pack", bias=True)
    x = torch.randn(rows, 3, 160)
    y = m(x)
    assert y.shape == (rows, 3, 96) and y.dtype == torch.float32
    assert rel_err(y, reference(m, x)) < BF16_TOL


@pytest.mark.parametrize(
    "group_size, in_f, symmetric",
    [
        (32, 96, False),
        (64, 1600, False),
        (128, 256, True),
        (256, 512, False),
        (-1, 192, False),  # per-channel grids, repeated into groups of 64
        (0, 64, True),  # one grid for the whole tensor
    ],
)
def test_int4pack_matches_dequant(group_size, in_f, symmetric):
    m = layer(48, in_f, 4, group_size, symmetric, "int4pack")
    x = torch.randn(2, 5, in_f)
    ref = reference(m, x)
    assert rel_err(m(x), ref) < BF16_TOL
    # the layout is exact: the same op in fp32 (slow, so not the forward path) matches to float precision
    x2 = x.reshape(-1, in_f)
    y32 = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, m.w_int4, m.w_group, K.int4_scales_and_zeros(m))
    assert rel_err(y32, ref.reshape(-1, 48)) < 1e-5


def test_int8pack_with_rotation():
    m = layer(64, 128, 8, -1, True, "int8pack", rot_seed=7)
    x = torch.randn(4, 128)
    assert rel_err(m(x), reference(m, x)) < BF16_TOL


@pytest.mark.parametrize(
    "shape, bits, group_size",
    [
        ((48, 96), 4, 128),  # 128 does not divide in_features 96
        ((48, 64), 4, 16),  # group size tinygemm does not have
        ((24, 128), 4, 32),  # out_features not a multiple of 16
        ((48, 100), 4, -1),  # no tinygemm group size divides 100
        ((48, 64), 3, 32),  # no 3-bit kernel
        ((48, 64), 8, 32),  # 8-bit in groups: int8pack is per row only
    ],
)
def test_unsupported_layers_fall_back_to_dequant(shape, bits, group_size):
    out_f, in_f = shape
    m = layer(out_f, in_f, bits, group_size, False, "auto")
    assert m.kernel == "dequant"
    x = torch.randn(3, in_f)
    assert torch.allclose(m(x), reference(m, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 33])
def test_w8a8_within_looser_tolerance(rows):
    for symmetric in (True, False):
        m = layer(96, 160, 8, -1, symmetric, "w8a8", bias=True)
        x = torch.randn(rows, 160)
        err = rel_err(m(x), reference(m, x))
        assert BF16_TOL / 10 < err < W8A8_TOL  # activation rounding shows, but stays small


def test_auto_picks_fast_kernels_on_cpu():
    assert layer(64, 128, 8, -1, True, "auto").kernel == "int8pack"
    assert layer(64, 128, 8, 0, False, "auto").kernel == "int8pack"
    assert layer(64, 256, 4, 128, False, "auto").kernel == "int4pack"
    assert "w8a8" in KERNELS and "w8a8" not in AUTO_ORDER  # it changes numerics: opt-in only


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=128))


@pytest.mark.parametrize("bits, group_size", [(8, -1), (4, 64)])
def test_checkpoint_auto_matches_dequant(tmp_path, bits, group_size):
    cfg = QuantConfig(method="rtn", bits=bits, group_size=group_size, quantize_embeddings=True)
    q = quantize(tiny_gpt(), cfg, None, progress=False)
    meta = {
        "model": q.config.to_dict(),
        "tokenizer": CharTokenizer(" ,.0123456789;abcdefghijklmnopqrstuvwxyz").to_dict(),
        "quantization": quant_meta(q, cfg),
    }
    path = save_checkpoint(tmp_path / "q", q, meta)
    fast, ref = load_checkpoint(path, kernel="auto").model, load_checkpoint(path, kernel="dequant").model
    assert fast.lm_head.kernel == "int8pack"  # the 8-bit tied head / embedding is served too
    blocks = [m.kernel for m in fast.transformer.h.modules() if isinstance(m, QuantLinear)]
    assert set(blocks) == {"int8pack" if bits == 8 else "int4pack"}
    idx = torch.randint(0, 40, (2, 32))
    with torch.no_grad():
        assert rel_err(fast(idx)[0], ref(idx)[0]) < 2 * BF16_TOL
        # one token per sequence: the CPU decode (GEMV) path
        first = torch.zeros(1, dtype=torch.long)
        assert rel_err(fast(idx[:, :1], input_pos=first)[0], ref(idx[:, :1], input_pos=first)[0]) < 2 * BF16_TOL


# ---- CUDA: run on a GPU only ----


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "kernel, bits, group_size, in_f, tol",
    [
        ("int8pack", 8, -1, 1600, BF16_TOL),
        ("int4pack", 4, 128, 4096, BF16_TOL),
        ("int4pack", 4, 64, 1600, BF16_TOL),  # inner_k_tiles 4
        ("w8a8", 8, -1, 1600, W8A8_TOL),
    ],
)
@pytest.mark.parametrize("rows", [1, 40])
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_kernels_match_dequant(kernel, bits, group_size, in_f, tol, rows, compiled):
    m = layer(256, in_f, bits, group_size, False, kernel, device="cuda", bias=True)
    assert m.kernel == kernel and KERNELS[kernel].supports(m, torch.device("cuda"))
    x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(m, fullgraph=True) if compiled else m
    with torch.no_grad():
        y = f(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, reference(m, x)) < tol


@cuda
@pytest.mark.gpu
def test_cuda_auto_picks_fast_kernels():
    assert layer(64, 128, 8, -1, True, "auto", device="cuda").kernel == "int8pack"
    assert layer(64, 256, 4, 128, False, "auto", device="cuda").kernel == "int4pack"
