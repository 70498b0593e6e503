"""Fast QuantLinear kernels against the dequant reference.

Tolerances are relative L2 errors. The CPU int8pack / int4pack kernels run in bf16 (activations, and int4's
scales/zeros), so they match the fp32 reference to BF16_TOL; int4's layout itself is checked exactly by
running the same op in fp32. W8A8 also rounds activations to 8 bits: W8A8_TOL.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanogptq.checkpoint import load_checkpoint, save_checkpoint
from nanogptq.data import CharTokenizer
from nanogptq.model import GPT, GPTConfig
from nanogptq.quant import (
    QuantConfig,
    QuantizedWeight,
    QuantLinear,
    fuse_blocks,
    fuse_mlp_gelu,
    quant_meta,
    quantize,
    rtn_quantize_weight,
)
from nanogptq.quant import kernels as K
from nanogptq.quant.linear import AUTO_ORDER, KERNELS, auto_kernel
from nanogptq.quant.pack import unpack

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


@pytest.mark.parametrize("kernel, bits, group_size", [("int8pack", 8, -1), ("w8a8", 8, -1), ("int4pack", 4, 32)])
def test_choosing_another_kernel_drops_the_previous_layout(kernel, bits, group_size):
    """prepare_kernel removes every buffer the previous kernel's prepare registered (no stale copies)."""
    m = layer(64, 128, bits, group_size, False, kernel)
    built = set(m._buffers) - {"qweight", "scales", "qzeros", "bias", "g_idx", "rot_seed", "rot"}
    assert built
    m.kernel = "dequant"
    m.prepare_kernel()
    assert not built & set(m._buffers)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 0])
@pytest.mark.parametrize("rows", [1, 40])  # the decode path and the prefill path
def test_int8pack_matches_dequant(symmetric, group_size, rows):
    m = layer(96, 160, 8, group_size, symmetric, "int8pack", bias=True)
    x = torch.randn(rows, 3, 160)
    y = m(x)
    assert y.shape == (rows, 3, 96) and y.dtype == torch.float32
    assert rel_err(y, reference(m, x)) < BF16_TOL


@pytest.mark.parametrize("in_f", [40, 72])  # not multiples of 16
@pytest.mark.parametrize("rows", [1, 3])
def test_int8pack_any_width(in_f, rows):
    """torch 2.13's CPU _weight_int8pack_mm gave wrong sums (about half the calls at K = 40) and crashed
    the process at 2 or more rows for K % 16 != 0; such layers must still come out right, every call."""
    m = layer(96, in_f, 8, -1, False, "int8pack", bias=True)
    for seed in range(20):
        x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(seed))
        assert rel_err(m(x), reference(m, x)) < BF16_TOL


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


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4pack_serves_act_order_groups(symmetric):
    """GPTQ act-order groups (g_idx) are runs of columns in GPTQ's order: the layout is stored in that
    order and the activations gathered into it, so these layers get the fast kernel, not dequant."""
    torch.manual_seed(0)
    out_f, in_f, G = 48, 256, 64
    invperm = torch.argsort(torch.randperm(in_f))
    qw = QuantizedWeight(
        codes=torch.randint(0, 16, (out_f, in_f), dtype=torch.uint8),
        scales=(torch.rand(out_f, in_f // G) * 0.01 + 0.001).half(),
        zeros=None if symmetric else torch.randint(0, 16, (out_f, in_f // G), dtype=torch.uint8),
        bits=4,
        group_size=G,
        g_idx=(invperm // G).to(torch.int32),
    )
    m = QuantLinear.from_quantized(qw, kernel="auto")
    m.prepare_kernel()
    assert m.kernel == "int4pack"
    x = torch.randn(3, 5, in_f)
    assert rel_err(m(x), reference(m, x)) < BF16_TOL


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


def test_switching_kernels_drops_the_old_layout():
    m = layer(64, 256, 4, 128, False, "int4pack")
    assert m.w_int4 is not None and {"w_int4", "w_sz"} <= m._buffers.keys()
    m.kernel = "dequant"
    m.prepare_kernel()
    assert not {"w_int4", "w_sz", "in_perm"} & m._buffers.keys()  # freed, not kept beside the new kernel
    x = torch.randn(3, 256)
    assert torch.allclose(m(x), reference(m, x), atol=1e-5)
    m.kernel = "int4pack"
    m.prepare_kernel()
    assert rel_err(m(x), reference(m, x)) < BF16_TOL


def test_auto_choice_for_cuda_layers():
    """What "auto" resolves to on a CUDA device (the choice only reads the layer and the device type, so
    it is checked here without a GPU): the tensor-core GEMV at 4 bits where its chunks fit, Triton where
    Triton is installed, else PyTorch's ops."""
    has_triton = K._triton_gemv() is not None
    gpu = torch.device("cuda")
    assert auto_kernel(layer(64, 128, 8, -1, True, "dequant"), gpu) == ("triton" if has_triton else "int8pack")
    assert auto_kernel(layer(64, 256, 4, 128, False, "dequant"), gpu) == "mma"
    assert auto_kernel(layer(64, 256, 4, 32, False, "dequant"), gpu) == ("triton" if has_triton else "int4pack")
    assert auto_kernel(layer(64, 1600, 4, 128, False, "dequant"), gpu) == ("triton" if has_triton else "dequant")
    assert auto_kernel(layer(64, 128, 8, -1, True, "dequant"), CPU) == "int8pack"  # never Triton on the CPU


def test_auto_falls_back_where_the_tensor_core_gemv_cannot_run(monkeypatch):
    """A GPU older than sm_80, or one where NVRTC cannot build the kernel: 4-bit layers go to Triton."""
    from nanogptq.quant import cuda_gemv

    has_triton = K._triton_gemv() is not None
    m, gpu = layer(64, 256, 4, 128, False, "dequant"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_gemv, "compiles", lambda index: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    assert auto_kernel(m, gpu) == ("triton" if has_triton else "int4pack")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    assert auto_kernel(m, gpu) == "mma"
    monkeypatch.setattr(cuda_gemv, "compiles", lambda index: False)
    assert auto_kernel(m, gpu) == ("triton" if has_triton else "int4pack")


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=128))


def saved_quantized_tiny(tmp_path, bits: int, group_size: int):
    """tiny_gpt quantized with RTN (the head and embedding too), saved as a checkpoint folder; its path."""
    cfg = QuantConfig(method="rtn", bits=bits, group_size=group_size, quantize_embeddings=True)
    q = quantize(tiny_gpt(), cfg, None, progress=False)
    meta = {"model": q.config.to_dict(),
            "tokenizer": CharTokenizer(" ,.0123456789;abcdefghijklmnopqrstuvwxyz").to_dict(),
            "quantization": quant_meta(q, cfg)}
    return save_checkpoint(tmp_path / "q", q, meta)


@pytest.mark.parametrize("bits, group_size", [(8, -1), (4, 64)])
def test_checkpoint_auto_matches_dequant(tmp_path, bits, group_size):
    path = saved_quantized_tiny(tmp_path, bits, group_size)
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


def test_a_requested_kernel_serves_the_layers_it_can(tmp_path, caplog):
    """--kernel int4pack on a 4-bit model: its 8-bit head takes auto's pick, with a warning; a kernel that runs
    none of the layers here (Triton on the CPU) is a clear error, not a traceback from inside a kernel."""
    path = saved_quantized_tiny(tmp_path, 4, 64)
    with caplog.at_level("WARNING"):
        model = load_checkpoint(path, kernel="int4pack").model
    assert model.lm_head.kernel == "int8pack" and "cannot run 1 of the 9 quantized layers" in caplog.text
    assert {m.kernel for m in model.transformer.h.modules() if isinstance(m, QuantLinear)} == {"int4pack"}
    with pytest.raises(ValueError, match="'triton' runs none of this model's quantized layers on cpu"):
        load_checkpoint(path, kernel="triton")
    m = layer(64, 128, 8, -1, True, "dequant")
    m.kernel = "int4pack"
    with pytest.raises(ValueError, match="'int4pack' cannot run this 8-bit layer"):
        m.prepare_kernel()


def test_quantized_mlps_hand_their_gelu_to_c_fc_with_the_same_outputs():
    q = quantize(tiny_gpt(), QuantConfig(method="rtn", bits=4, group_size=64), None, progress=False)
    mlps = [b.mlp for b in q.transformer.h]
    assert all(m.c_fc.gelu and isinstance(m.act, torch.nn.Identity) for m in mlps)  # finalize fused them
    assert "act" not in "".join(q.state_dict())  # nothing new in checkpoints
    idx = torch.randint(0, 40, (1, 12))
    with torch.no_grad():
        fused = q(idx)[0]
        for m in mlps:  # back to GELU in the MLP
            m.c_fc.gelu, m.act = False, torch.nn.GELU()
        assert torch.equal(q(idx)[0], fused)
    assert fuse_mlp_gelu(q) == 2 and fuse_mlp_gelu(q) == 0  # once only


@pytest.mark.parametrize("kernel, bits, group_size", [("int4pack", 4, 64), ("int8pack", 8, -1), ("w8a8", 8, -1)])
def test_free_packed_keeps_outputs_and_frees_the_codes(kernel, bits, group_size):
    m = layer(64, 256, bits, group_size, False, kernel, bias=True)
    x1, x40 = torch.randn(1, 256), torch.randn(40, 256)  # decode and prefill paths
    before = (m(x1), m(x40))
    size = sum(b.numel() * b.element_size() for b in m.buffers())
    assert m.free_packed() and m.qweight is None and m.qzeros is None
    assert torch.equal(m(x1), before[0]) and torch.equal(m(x40), before[1])
    assert sum(b.numel() * b.element_size() for b in m.buffers()) < size - 64 * 256 * bits // 8 + 1
    for action in (m.state_dict, m.dequantize_stored, m.prepare_kernel):
        with pytest.raises(RuntimeError, match="inference only"):
            action()


def test_free_packed_keeps_what_the_kernel_reads():
    assert not layer(32, 64, 4, 32, False, "dequant").free_packed()


@pytest.mark.parametrize("bits, group_size", [(4, 64), (4, 128), (4, -1), (4, 0), (8, -1), (8, 0)])
def test_triton_layout_holds_the_stored_grid(bits, group_size):
    """Prefill on the Triton kernel dequantizes from its own layout: it holds the same weights as stored (checked
    on CPU with the layout built by hand, as prepare_triton builds it on CUDA)."""
    from nanogptq.quant.pack import from_interleaved, to_interleaved
    from nanogptq.quant.rtn import dequantize_weight

    m = layer(47, 200, bits, group_size, group_size != 64, "dequant")  # 47 rows: the last word row part padding
    tile = min(group_size, 256) if group_size > 0 else 128
    m.t_qweight = to_interleaved(m.qweight, 200, tile, bits)
    m.z_codes = None if m.qzeros is None else unpack(m.qzeros, bits, m.scales.shape[1])
    codes = from_interleaved(m.t_qweight, 200, bits, 47)
    assert torch.equal(dequantize_weight(codes, m.scales, m.z_codes, bits, group_size), m.dequantize_stored())


def test_checkpoint_for_generation_frees_codes_but_not_the_embedding_head(tmp_path):
    path = saved_quantized_tiny(tmp_path, 4, 64)
    full, lean = load_checkpoint(path).model, load_checkpoint(path, keep_packed=False).model
    blocks = [m for m in lean.transformer.h.modules() if isinstance(m, QuantLinear)]
    assert all(m.packed_freed for m in blocks) and not lean.lm_head.packed_freed  # the embedding reads it
    resident = [sum(b.numel() * b.element_size() for b in model.buffers()) for model in (full, lean)]
    assert resident[1] < 0.75 * resident[0]
    prompt = torch.randint(0, 40, (1, 5))
    assert torch.equal(full.generate(prompt, 12, temperature=0.8, seed=3),
                       lean.generate(prompt, 12, temperature=0.8, seed=3))


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
    torch._dynamo.reset()
    f = torch.compile(m, fullgraph=True) if compiled else m
    with torch.no_grad():
        y = f(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, reference(m, x)) < tol


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "bits, group_size, in_f, symmetric",
    [
        (8, -1, 1600, True),
        (8, -1, 768, False),
        (8, 0, 256, True),
        (4, 128, 4096, False),
        (4, 128, 1600, False),  # a shorter last group
        (4, 64, 1600, True),
        (4, 512, 1024, False),  # a scale group spans two tile groups
        (4, -1, 192, False),
    ],
)
# 40 rows: the prefill path (dequantize + cuBLAS)
@pytest.mark.parametrize("rows, compiled", [(1, False), (3, False), (40, False), (1, True)])
def test_cuda_triton_gemv_matches_dequant(bits, group_size, in_f, symmetric, rows, compiled):
    m = layer(272, in_f, bits, group_size, symmetric, "triton", device="cuda", bias=True)
    x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()  # every case compiles QuantLinear.forward anew: stay under the recompile limit
    f = torch.compile(m, fullgraph=True) if compiled else m
    with torch.no_grad():
        y = f(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 272)
    assert rel_err(y, reference(m, x)) < BF16_TOL


@cuda
@pytest.mark.gpu
def test_cuda_auto_picks_the_gemvs_and_falls_back():
    assert layer(64, 128, 8, -1, True, "auto", device="cuda").kernel == "triton"
    assert layer(64, 256, 4, 128, False, "auto", device="cuda").kernel == "mma"
    assert layer(64, 256, 4, 32, False, "auto", device="cuda").kernel == "triton"  # groups of 32: not mma's
    assert layer(64, 1600, 4, 128, False, "auto", device="cuda").kernel == "triton"  # 128 does not divide 1600
    assert layer(65, 128, 8, -1, True, "auto", device="cuda").kernel == "triton"  # a char head: 65 rows
    assert layer(64, 96, 4, 48, False, "auto", device="cuda").kernel == "dequant"  # 48: not a Triton tile


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.8, "top_k": 5, "seed": 3}])
def test_cuda_graph_decoding_gives_the_same_tokens(bits, sampling):
    """The graph step samples inside the graph, from the same pre-drawn noise as the eager step."""
    model = tiny_gpt().cuda()
    if bits:
        cfg = QuantConfig(method="rtn", bits=bits, group_size=64 if bits == 4 else -1, quantize_embeddings=True)
        model = quantize(model.cpu(), cfg, None, progress=False).cuda()
        for mod in model.modules():
            if isinstance(mod, QuantLinear):
                mod.kernel = "auto"  # resolved on the CPU by quantize(): resolve again for CUDA
                mod.prepare_kernel()
    prompt = torch.randint(0, 40, (1, 5), device="cuda")
    runs = [model.generate(prompt, 100, cuda_graph=g, **sampling) for g in (False, True)]
    # 100 tokens > the context of 32 (window refills) and > Sampler.NOISE_STEPS (noise drawn again)
    assert torch.equal(runs[0], runs[1])


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_generation_load_runs_fp16_on_the_gemvs(tmp_path, bits):
    """What `sample` and the demo load on CUDA by default: fp16 activations (the GEMVs' fast path) on the
    Triton kernel (8 bits) or the tensor-core one (4 bits), logits near the fp32 load's, graph-replayed
    decoding as eager."""
    from nanogptq.generate import load_for_generation

    path = saved_quantized_tiny(tmp_path, bits, 64 if bits == 4 else -1)
    half, full = load_for_generation(path, "cuda").model, load_for_generation(path, "cuda", dtype="fp32").model
    assert half.transformer.wpe.weight.dtype == torch.float16 and full.transformer.wpe.weight.dtype == torch.float32
    blocks = [m for m in half.transformer.h.modules() if isinstance(m, QuantLinear)]
    assert {m.kernel for m in blocks} == {"triton" if bits == 8 else "mma"} and all(m.packed_freed for m in blocks)
    idx = torch.randint(0, 40, (1, 32), device="cuda")
    with torch.no_grad():
        a = half(idx[:, :1], input_pos=torch.zeros(1, dtype=torch.long, device="cuda"))[0]
        b = full(idx[:, :1], input_pos=torch.zeros(1, dtype=torch.long, device="cuda"))[0]
    assert a.dtype == torch.float16 and rel_err(a, b) < 2e-2
    prompt = idx[:, :5]
    runs = [half.generate(prompt, 40, temperature=0.0, cuda_graph=g) for g in (False, True)]
    assert torch.equal(runs[0], runs[1])


@cuda
@pytest.mark.gpu
def test_cuda_compiled_step_in_the_graph_gives_the_same_tokens():
    """sample --compile on CUDA: the compiled one-token step, captured with the sampling in the graph."""
    from nanogptq.model import compile_blocks

    model = tiny_gpt().cuda()
    prompt = torch.randint(0, 40, (1, 5), device="cuda")
    eager = model.generate(prompt, 60, temperature=0.0, cuda_graph=False)
    compile_blocks(model)
    assert torch.equal(model.generate(prompt, 60, temperature=0.0), eager)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "group_size, in_f, symmetric",
    [(128, 4096, False), (64, 1600, True), (256, 1024, False), (-1, 192, False), (0, 256, True)],
)
# 40 rows: the prefill path (dequantize the layout + cuBLAS)
@pytest.mark.parametrize("rows, compiled, dtype", [(1, False, torch.float16), (8, False, torch.float16),
                                                    (3, False, torch.bfloat16), (40, False, torch.float16),
                                                    (1, True, torch.float16)])
def test_cuda_mma_gemv_matches_dequant(group_size, in_f, symmetric, rows, compiled, dtype):
    m = layer(272, in_f, 4, group_size, symmetric, "mma", device="cuda", bias=True)
    x = torch.randn(rows, in_f, device="cuda", dtype=dtype)
    torch._dynamo.reset()
    f = torch.compile(m, fullgraph=True) if compiled else m
    with torch.no_grad():
        y = f(x)
    assert y.dtype == dtype and y.shape == (rows, 272)
    assert rel_err(y, reference(m, x)) < BF16_TOL


def test_fuse_epilogue_folds_the_layer_norm():
    """fuse_epilogue's vectors in the arithmetic the mma kernel's epilogue does (store_sums): rstd (W (gamma *
    x) - mean W gamma) + (W beta + b) is the layer applied to LayerNorm(x). Choosing a kernel again undoes it;
    models on CPU kernels have no block to fuse."""
    m = layer(48, 256, 4, 128, False, "dequant", bias=True)
    m.kernel = "mma"
    K.prepare_mma(m)  # the layout, on the CPU (the kernel itself runs on CUDA)
    ln = torch.nn.LayerNorm(256)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5), ln.bias.normal_(0, 0.1)
    m.fuse_epilogue(ln)
    x = torch.randn(1, 256) * 2 + 0.3
    mean, var = x.mean(), x.var(unbiased=False)
    W = m.dequantize()
    folded = torch.rsqrt(var + ln.eps) * (F.linear(x * m.ln_weight.float(), W) - mean * m.ln_u) + m.e_bias
    with torch.no_grad():
        assert rel_err(folded, F.linear(ln(x), W) + m.bias) < 2e-3  # gamma in fp16, as the kernel reads it
    m.kernel = "dequant"
    m.prepare_kernel()
    assert not m.fused and not {"e_bias", "ln_weight", "ln_u"} & m._buffers.keys()
    cfg = QuantConfig(method="rtn", bits=4, group_size=64)
    model = quantize(tiny_gpt(), cfg, None, progress=False)
    assert fuse_blocks(model) == 0 and not any(b.fused for b in model.transformer.h)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("group_size, symmetric", [(128, False), (64, True), (-1, False)])
def test_cuda_mma_epilogue_folds_layer_norm_bias_gelu_residual(group_size, symmetric):
    """Every config adds a bias and a residual; those that stage x fold a LayerNorm too (with and without
    GELU), the others refuse it."""
    from nanogptq.quant import cuda_gemv

    m = layer(100, 512, 4, group_size, symmetric, "mma", device="cuda", bias=True)
    ln = torch.nn.LayerNorm(512, device="cuda")
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5), ln.bias.normal_(0, 0.1)
    W = m.dequantize().cuda()
    m.fuse_epilogue(ln)
    x = (torch.randn(1, 512, device="cuda") * 2 + 0.3).half()
    r = torch.randn(1, 100, device="cuda").half()
    plain = F.linear(x.float(), W) + m.bias + r.float()
    with torch.no_grad():
        normed = F.linear(ln(x.float()), W) + m.bias
    norm = (m.ln_weight, m.ln_u, m.ln_eps)
    for cfg in cuda_gemv.CONFIGS:
        if cuda_gemv.x_shared_bytes(1, 512, cfg) is None:
            continue
        y = cuda_gemv.launch(x, m.m_words, m.m_scales, m.m_zeros, 100, group_size, config=cfg, bias=m.bias, residual=r)
        assert rel_err(y, plain) < 2e-3, cfg
        if not cfg[4]:
            with pytest.raises(ValueError, match="does not stage x"):
                cuda_gemv.launch(x, m.m_words, m.m_scales, m.m_zeros, 100, group_size, config=cfg, norm=norm)
            continue
        for gelu in (False, True):
            y = cuda_gemv.launch(x, m.m_words, m.m_scales, m.m_zeros, 100, group_size, gelu, config=cfg, norm=norm,
                                 bias=m.e_bias)
            assert rel_err(y, F.gelu(normed) if gelu else normed) < 3e-3, (cfg, gelu)


@cuda
@pytest.mark.gpu
def test_cuda_fused_blocks_decode_as_unfused():
    """Blocks whose linears all run on mma are fused on load (finalize_quantized_model): the one-token step
    gives the unfused step's logits, and graph-replayed generation the eager tokens."""
    cfg = QuantConfig(method="rtn", bits=4, group_size=64, quantize_embeddings=True)
    model = quantize(tiny_gpt(), cfg, None, progress=False).cuda()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.kernel = "auto"  # resolved on the CPU by quantize(): resolve again for CUDA
            mod.prepare_kernel()
    assert fuse_blocks(model) == 2 and all(b.fused for b in model.transformer.h)
    prompt = torch.randint(0, 40, (1, 20), device="cuda")

    def step_logits() -> torch.Tensor:
        model.setup_kv_cache(1)
        model(prompt[:, :-1], input_pos=torch.arange(19, device="cuda"))  # prefill: the unfused path
        out = model(prompt[:, -1:], input_pos=torch.tensor([19], device="cuda"))[0].float()
        model.clear_kv_cache()
        return out

    runs = [model.generate(prompt[:, :5], 40, temperature=0.0, cuda_graph=g) for g in (False, True)]
    assert torch.equal(runs[0], runs[1])
    with torch.no_grad():
        fused = step_logits()
        for b in model.transformer.h:
            b.attn.c_attn.fused = False  # Block.fused needs all four
        assert not any(b.fused for b in model.transformer.h)
        unfused = step_logits()
    assert rel_err(fused, unfused) < 5e-3


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("gelu", [False, True])
def test_cuda_mma_gemv_every_config_and_in_a_graph(gelu):
    """Every tuner candidate gives the dequantized weights' output (fp32 sums: far inside BF16_TOL), and a
    first call inside a CUDA-graph capture (no timing there) runs on the heuristic's config."""
    from nanogptq.quant import cuda_gemv

    m = layer(100, 512, 4, 128, False, "mma", device="cuda")  # 100 rows: a padded last tile
    for rows in (1, 2):  # x staged in shared memory takes one row only
        x = torch.randn(rows, 512, device="cuda", dtype=torch.float16)
        ref = reference(m, x).float()
        ref = F.gelu(ref) if gelu else ref
        for cfg in cuda_gemv.CONFIGS:
            if cuda_gemv.x_shared_bytes(rows, 512, cfg) is None:
                with pytest.raises(ValueError, match="shared memory"):
                    cuda_gemv.launch(x, m.m_words, m.m_scales, m.m_zeros, 100, 128, gelu, config=cfg)
                continue
            y = cuda_gemv.launch(x, m.m_words, m.m_scales, m.m_zeros, 100, 128, gelu, config=cfg)
            assert rel_err(y, ref) < 2e-3, (rows, cfg)
    fresh = torch.randn(3, 512, device="cuda", dtype=torch.float16)  # 3 rows: a shape not yet tuned
    cuda_gemv._TUNED.pop((100, 512, 3, 8, 128, fresh.device), None)
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        out = cuda_gemv.launch(fresh, m.m_words, m.m_scales, m.m_zeros, 100, 128, gelu)
    graph.replay()
    ref = reference(m, fresh).float()
    assert rel_err(out, F.gelu(ref) if gelu else ref) < 2e-3


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kernel, bits", [("mma", 4), ("triton", 4), ("triton", 8)])
def test_cuda_gemv_chain_under_pdl_matches_serial_launches(kernel, bits):
    """Launched as programmatic dependents, GEMVs that read the previous kernel's output (another GEMV's, a
    LayerNorm's) must still wait for it: a chain replayed from a graph gives the serial launches' bits."""
    from nanogptq.quant import cuda_gemv, triton_gemv

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    group = 128 if bits == 4 else -1
    a, b = (layer(2048, 2048, bits, group, False, kernel, device="cuda") for _ in range(2))
    ln = torch.nn.LayerNorm(2048, device="cuda", dtype=torch.float16)

    def gemv(m, x, gelu, pdl):
        if kernel == "mma":
            return cuda_gemv.launch(x, m.m_words, m.m_scales, m.m_zeros, 2048, group, gelu, pdl=pdl)
        return triton_gemv.launch(x, m.t_qweight, m.scales, m.z_codes, bits, group, 2048, gelu, pdl=pdl)

    def chain(x, pdl):
        for _ in range(4):
            x = ln(x + gemv(b, gemv(a, x, False, pdl), True, pdl))
        return x

    x = torch.randn(1, 2048, device="cuda", dtype=torch.float16)
    outs = {}
    with torch.no_grad():
        for pdl in (False, True):
            chain(x, pdl)  # tune and compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain(x, pdl)
            runs = []
            for _ in range(5):
                graph.replay()
                runs.append(out.clone())
            outs[pdl] = runs
    assert all(torch.equal(r, outs[False][0]) for r in outs[True] + outs[False])
    assert rel_err(outs[False][0], chain(x, False)) == 0


def rtn_layer_and_zeros(bits: int, group_size: int, symmetric: bool, in_f: int, out_f: int):
    """An RTN QuantLinear (random weights) and its unpacked zero codes (None if symmetric), on the CPU."""
    W = torch.randn(out_f, in_f) * 0.05
    cfg = QuantConfig(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric)
    m = QuantLinear.from_quantized(rtn_quantize_weight(W, cfg))
    return m, None if m.qzeros is None else unpack(m.qzeros, bits, m.scales.shape[1])


def run_in_triton_interpreter(code: str) -> None:
    """Run `code` in a fresh Python under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before
    Triton is imported); skip where Triton or a numpy it can use is missing."""
    pytest.importorskip("triton")
    np = pytest.importorskip("numpy")
    if tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 3):
        pytest.skip("Triton 3.6's interpreter needs numpy < 2.3")
    tests = os.path.dirname(__file__)  # `code` may import this file's helpers
    path = os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_triton_gemv_in_the_interpreter():
    """The Triton kernel's indexing on CPU, through Triton's interpreter (where Triton is installed): the
    interpreter runs the fp32 twin of the packed-fp16 assembly, with the same tiles, masks and groups."""
    code = """
import torch
from nanogptq.quant.triton_gemv import gemv, launch, to_interleaved
from test_kernels import rtn_layer_and_zeros
# rows: 24 fill whole words and tiles; 65 (a char vocabulary's head) and 66 leave the last word row part padding
for bits, gs, sym, K, N in [(4, 128, False, 256, 24), (4, 64, False, 1600, 24), (4, -1, True, 192, 66),
                            (8, -1, False, 1600, 65), (8, 0, True, 64, 24), (4, 512, False, 1024, 24),
                            (4, 32, True, 104, 24), (4, 0, False, 200, 65)]:
    m, z = rtn_layer_and_zeros(bits, gs, sym, K, N)
    x = torch.randn(2, K)
    ref = x @ m.dequantize().T
    words = to_interleaved(m.qweight, K, gs, bits)
    ys = [gemv(x, words, m.scales, z, bits, gs, N)]  # the custom op
    for cfg in ({"BLOCK_W": 1, "GPI": 1, "R": 1, "STAGES": 1}, {"BLOCK_W": 4, "GPI": 4, "R": 4, "STAGES": 2}):
        ys += [launch(x, words, m.scales, z, bits, gs, N, config=cfg)]
    for y in ys:
        err = ((y - ref).norm() / ref.norm()).item()
        assert y.shape == (2, N) and err < 1e-5, (bits, gs, sym, K, N, err)
    y = gemv(x, words, m.scales, z, bits, gs, N, gelu=True)  # the GELU epilogue
    err = ((y - torch.nn.functional.gelu(ref)).norm() / torch.nn.functional.gelu(ref).norm()).item()
    assert err < 1e-5, ("gelu", bits, gs, err)
"""
    run_in_triton_interpreter(code)


def test_prefill_dequant_kernel_in_the_interpreter():
    """triton_dequant's index arithmetic for both GEMV layouts, through Triton's CPU interpreter: exactly
    rtn.dequantize_weight's values, for row counts off the layouts' tiles, short last groups and per-row and
    per-tensor grids (fp32 and fp16; the interpreter rounds to bf16 toward zero, the GPU to nearest: the CUDA
    test below checks bf16)."""
    code = """
import torch
from nanogptq.quant import cuda_gemv, triton_gemv
from nanogptq.quant.pack import unpack
from nanogptq.quant.rtn import dequantize_weight
from nanogptq.quant.triton_dequant import dequantize
from test_kernels import rtn_layer_and_zeros
torch.manual_seed(0)
for bits, gs, sym, K, N in [(4, 128, False, 256, 24), (4, 64, False, 1600, 40), (4, -1, True, 192, 66),
                            (8, -1, False, 1600, 65), (8, 0, True, 64, 24), (4, 0, False, 256, 65),
                            (4, 32, True, 104, 24), (4, 256, False, 512, 17)]:
    m, z = rtn_layer_and_zeros(bits, gs, sym, K, N)
    codes = unpack(m.qweight, bits, K)
    ref = dequantize_weight(codes, m.scales, z, bits, gs)
    layouts = [("interleaved", triton_gemv.to_interleaved(m.qweight, K, gs, bits))]
    if bits == 4 and cuda_gemv.supports(bits, gs, K):
        layouts.append(("mma", cuda_gemv.to_mma_layout(codes, cuda_gemv.chunk_words(gs, K))))
    assert len(layouts) == 2 or bits == 8 or gs == 32
    for name, words in layouts:
        for dt in (torch.float32, torch.float16):
            w = dequantize(words, name, m.scales, z, bits, gs, N, K, dt)
            assert w.dtype == dt and torch.equal(w, ref.to(dt)), (bits, gs, sym, K, N, name, dt)
"""
    run_in_triton_interpreter(code)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kernel, bits, group_size, in_f", [("mma", 4, 128, 4096), ("mma", 4, -1, 192),
                                                            ("triton", 4, 64, 1600), ("triton", 8, -1, 1600)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_prefill_weight_is_the_stored_grid(kernel, bits, group_size, in_f, dtype):
    """The weight prefill multiplies by, made on the GPU from the kernel's layout, is the stored grid rounded
    once to the activation dtype, bit for bit."""
    from nanogptq.quant.kernels import _layout_weight

    m = layer(272, in_f, bits, group_size, False, kernel, device="cuda")
    words, name = (m.m_words, "mma") if kernel == "mma" else (m.t_qweight, "interleaved")
    assert torch.equal(_layout_weight(m, words, name, dtype), m.dequantize_stored().to(dtype))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "bits, group_size, in_f, symmetric, dtype",
    [(4, 128, 4096, False, torch.bfloat16), (4, 64, 1600, True, torch.bfloat16), (4, -1, 256, False, torch.float16),
     (4, 32, 104, True, torch.bfloat16), (8, -1, 1600, True, torch.bfloat16), (8, -1, 768, False, torch.float16)],
)
def test_cuda_interleaved_gemv_every_tuned_config_matches_dequant(bits, group_size, in_f, symmetric, dtype):
    """The packed-fp16 assembly path of the INTERLEAVED kernel, in every tile the autotuner may pick."""
    from nanogptq.quant.triton_gemv import _rows_configs, launch, tile_group

    m = layer(272, in_f, bits, group_size, symmetric, "triton", device="cuda")
    x = torch.randn(1, in_f, device="cuda", dtype=dtype)
    ref = reference(m, x)
    pg = tile_group(group_size, in_f, bits)[0] // 2
    for c in _rows_configs():
        if pg % c.kwargs["R"]:
            continue
        cfg = {**c.kwargs, "num_warps": c.num_warps}
        y = launch(x, m.t_qweight, m.scales, m.z_codes, bits, group_size, m.out_features, config=cfg)
        assert rel_err(y, ref) < BF16_TOL, c


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "bits, group_size, in_f, out_f",
    [(4, 128, 4096, 512), (4, 64, 1600, 272), (8, -1, 768, 272), (8, -1, 1600, 65), (4, 128, 256, 66)],
)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", ["triton", "mma"])
def test_cuda_gemv_tiles_rows_and_gelu_epilogue(bits, group_size, in_f, out_f, gelu, dtype, kernel):
    """Whole tiles (EVEN, no masks: 4096 x 512) and ragged ones, row counts that leave the last word row
    (Triton) or row tile (mma) part padding (65: a char vocabulary's head, 66), with and without the GELU
    epilogue, both activation dtypes; the custom ops inside torch.compile too."""
    if kernel == "mma" and bits != 4:
        pytest.skip("the tensor-core GEMV is 4-bit only")
    m = layer(out_f, in_f, bits, group_size, False, kernel, device="cuda")
    assert m.kernel == kernel
    m.gelu = gelu
    x = torch.randn(1, in_f, device="cuda", dtype=dtype)
    ref = reference(m, x).float()
    ref = F.gelu(ref) if gelu else ref
    torch._dynamo.reset()
    for f in (m, torch.compile(m, fullgraph=True)):
        with torch.no_grad():
            y = f(x)
        assert y.dtype == dtype and y.shape == (1, out_f) and rel_err(y, ref) < BF16_TOL


def attention_case(B, H, L, D, pos, device="cpu", dtype=torch.float32):
    """c_attn's output for one token, a KV cache of random values everywhere (also past `pos`: the kernel
    must not read them), and what decode_attention must return and leave in the cache."""
    qkv = torch.randn(B, 1, 3 * H * D, device=device, dtype=dtype)
    kv = torch.randn(2, B, H, L, D, device=device, dtype=dtype)
    q, k, v = qkv.view(B, 3, H, D).unbind(1)
    want_kv = kv.clone()
    want_kv[:, :, :, pos] = torch.stack((k, v))
    mask = (torch.arange(L, device=device) <= pos)[None]
    ref = F.scaled_dot_product_attention(q[:, :, None].float(), *want_kv.float(), attn_mask=mask)
    return qkv, kv, want_kv, ref.reshape(B, 1, H * D)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("B, H, L, D, pos", [(1, 32, 584, 128, 583), (1, 6, 256, 32, 0), (2, 4, 100, 64, 57)])
def test_cuda_decode_attention_matches_sdpa(B, H, L, D, pos):
    from nanogptq.attention_triton import decode_attention

    p = torch.tensor([pos], device="cuda")
    counts = torch.zeros(B * H, device="cuda", dtype=torch.int32)
    for fn in (decode_attention, torch.compile(decode_attention)):
        qkv, kv, want_kv, ref = attention_case(B, H, L, D, pos, "cuda", torch.bfloat16)
        for _ in range(3):  # the same counters each time: the kernel leaves them zero
            y = fn(qkv, kv, p, counts)
            assert y.shape == (B, 1, H * D) and y.dtype == qkv.dtype
            assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
            assert torch.equal(kv, want_kv) and not counts.any()


@cuda
@pytest.mark.gpu
def test_cuda_model_decodes_with_split_attention_like_sdpa():
    model = tiny_gpt().cuda().eval()
    prompt = torch.randint(0, 40, (1, 30), device="cuda")
    with torch.no_grad():
        full = model(prompt)[0][:, -1]
        model.setup_kv_cache(1)
        assert model.transformer.h[0].attn.kv_cache.split_decode
        model(prompt[:, :-1], input_pos=torch.arange(29, device="cuda"))
        step = model(prompt[:, -1:], input_pos=torch.tensor([29], device="cuda"))[0][:, -1]
        cached = [b.attn.kv_cache.kv[:, :, :, :30].clone() for b in model.transformer.h]
        model.setup_kv_cache(1)  # the same cache from a prefill of all 30 tokens (index_copy_)
        model(prompt, input_pos=torch.arange(30, device="cuda"))
    assert torch.allclose(step, full, atol=1e-4, rtol=1e-4)
    for b, c in zip(model.transformer.h, cached, strict=True):
        assert torch.allclose(b.attn.kv_cache.kv[:, :, :, :30], c, atol=1e-5)


@pytest.mark.parametrize("pdl", [False, True])
def test_decode_attention_compiles_for_sm90(pdl):
    """Triton's compiler for an H100/H200 (sm_90) takes the kernel, with and without its PDL wait: no GPU is
    needed to compile, and the interpreter below does not type-check as the compiler does."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nanogptq.attention_triton import BLOCK_L, NUM_WARPS, _decode_kernel

    ints = ["H", "CHUNK", "S", "stride_qkv", "stride_kv", "stride_kb", "stride_kh", "stride_kl"]
    sig = {"qkv_ptr": "*fp16", "kv_ptr": "*fp16", "pos_ptr": "*i64", "m_ptr": "*fp32", "l_ptr": "*fp32",
           "a_ptr": "*fp32", "y_ptr": "*fp16", "count_ptr": "*i32", **dict.fromkeys(ints, "i32"), "sm_scale": "fp32",
           **dict.fromkeys(["D", "BLOCK_L", "BLOCK_S", "PDL"], "constexpr")}
    src = ASTSource(_decode_kernel, sig, constexprs={"D": 128, "BLOCK_L": BLOCK_L, "BLOCK_S": 32, "PDL": pdl})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": NUM_WARPS})
    assert ("griddepcontrol.wait" in kernel.asm["ptx"]) == pdl


@pytest.mark.parametrize("bits, has_z", [(4, True), (8, False)])
def test_triton_gemv_compiles_for_sm90(bits, has_z):
    """The Triton GEMV's GPU path (packed-fp16 inline assembly, the PDL wait, the GELU epilogue), which the
    interpreter does not run (it runs the fp32 twin), through Triton's compiler for sm_90, in one tile of each
    kind the autotuner has (one and two stages)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nanogptq.quant import triton_gemv as tg

    sig = tg.compile_signature()
    for stages in (1, 2):
        cfg = next(c for c in tg._rows_configs() if c.kwargs["STAGES"] == stages)
        consts = {"BITS": bits, "PG": 64, "HAS_Z": has_z, "X_BF16": False, "FAST": True, "GELU": True, "EVEN": False,
                  "PDL": True, "SG_DIV": 1, **cfg.kwargs}
        src = ASTSource(tg._gemv_rows_kernel, sig, constexprs=consts)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
        assert "griddepcontrol.wait" in kernel.asm["ptx"] and "fma.rn.f16x2" in kernel.asm["ptx"]


def test_decode_attention_in_the_interpreter():
    """The split-cache attention's arithmetic and its cache write on CPU, through Triton's interpreter (where
    Triton is installed)."""
    code = """
import torch
from nanogptq.attention_triton import decode_attention
from test_kernels import attention_case
for B, H, L, D, pos in [(1, 3, 100, 16, 99), (2, 2, 70, 32, 0), (1, 4, 200, 16, 130)]:
    qkv, kv, want_kv, ref = attention_case(B, H, L, D, pos)
    p = torch.tensor([pos])
    counts = torch.zeros(B * H, dtype=torch.int32)
    for _ in range(2):  # the same counters twice: the kernel must leave them zero
        y = decode_attention(qkv, kv, p, counts)
        err = ((y - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (B, H, L, D, pos, err)
        assert torch.equal(kv, want_kv) and not counts.any()
"""
    run_in_triton_interpreter(code)
