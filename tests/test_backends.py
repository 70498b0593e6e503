"""The runtime backends (runtime/backends/) against the dequant reference, as RuntimeLinear layers, and the
models prepare_for_inference makes of them (backend choice, fusion, freeing the stored codes).

Tolerances are relative L2 errors. The CPU int8pack / int4pack backends run in bf16 (activations, and int4's
scales/zeros), so they match the fp32 reference to BF16_TOL; int4's layout itself is checked exactly by
running the same op in fp32. W8A8 also rounds activations to 8 bits: W8A8_TOL. The kernels themselves are
tested in test_kernels_mma.py and test_kernels_triton.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanogptq.checkpoint import load_checkpoint, save_checkpoint
from nanogptq.data import CharTokenizer
from nanogptq.kernels import mma
from nanogptq.model import GPT, GPTConfig
from nanogptq.quant import QuantConfig, QuantLinear, quant_meta, quantize
from nanogptq.quant.grid import QuantizedWeight, dequantize_weight
from nanogptq.quant.rtn import rtn_quantize_weight
from nanogptq.runtime.backends import AUTO_ORDER, BACKENDS, auto_backend, int4pack
from nanogptq.runtime.backends import mma as mma_backend
from nanogptq.runtime.backends import triton as triton_backend
from nanogptq.runtime.fusion import DecodeAttention, FusedBlock, fuse_blocks, fuse_mlp_gelu, use_decode_attention
from nanogptq.runtime.generate import compile_blocks, generate, setup_kv_cache
from nanogptq.runtime.linear import RuntimeLinear
from nanogptq.runtime.load import prepare_for_inference

BF16_TOL = 1e-2  # measured ~3e-3 per layer
W8A8_TOL = 3e-2  # measured ~6e-3 per layer
CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def layer(
    out_f: int, in_f: int, bits: int, group_size: int, symmetric: bool, kernel: str, device="cpu", **kw
) -> RuntimeLinear:
    """An RTN-quantized random layer on backend `kernel`, prepared on `device`."""
    torch.manual_seed(out_f + in_f + bits)
    W = torch.randn(out_f, in_f) * 0.05
    cfg = QuantConfig(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric)
    bias = torch.randn(out_f) * 0.1 if kw.get("bias") else None
    m = RuntimeLinear.from_stored(QuantLinear.from_quantized(rtn_quantize_weight(W, cfg), bias, kw.get("rot_seed")),
                                  kernel)
    m.to(device).prepare()
    return m


def reference(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    y = F.linear(x.float(), m.dequantize().to(x.device))
    return y if m.bias is None else y + m.bias


@pytest.mark.parametrize("kernel, bits, group_size", [("int8pack", 8, -1), ("w8a8", 8, -1), ("int4pack", 4, 32)])
def test_choosing_another_kernel_drops_the_previous_layout(kernel, bits, group_size):
    """prepare removes every buffer the previous backend's prepare registered (no stale copies)."""
    m = layer(64, 128, bits, group_size, False, kernel)
    built = set(m._buffers) - {"qweight", "scales", "qzeros", "bias", "g_idx", "rot_seed", "rot"}
    assert built
    m.backend = "dequant"
    m.prepare()
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
    y32 = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, m.w_int4, m.w_group, int4pack.int4_scales_and_zeros(m))
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
    m = RuntimeLinear.from_stored(QuantLinear.from_quantized(qw), "auto")
    m.prepare()
    assert m.backend == "int4pack"
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
    assert m.backend == "dequant"
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
    assert layer(64, 128, 8, -1, True, "auto").backend == "int8pack"
    assert layer(64, 128, 8, 0, False, "auto").backend == "int8pack"
    assert layer(64, 256, 4, 128, False, "auto").backend == "int4pack"
    assert "w8a8" in BACKENDS and "w8a8" not in AUTO_ORDER  # it changes numerics: opt-in only


def test_switching_kernels_drops_the_old_layout():
    m = layer(64, 256, 4, 128, False, "int4pack")
    assert m.w_int4 is not None and {"w_int4", "w_sz"} <= m._buffers.keys()
    m.backend = "dequant"
    m.prepare()
    assert not {"w_int4", "w_sz", "in_perm"} & m._buffers.keys()  # freed, not kept beside the new backend
    x = torch.randn(3, 256)
    assert torch.allclose(m(x), reference(m, x), atol=1e-5)
    m.backend = "int4pack"
    m.prepare()
    assert rel_err(m(x), reference(m, x)) < BF16_TOL


def test_auto_choice_for_cuda_layers():
    """What "auto" resolves to on a CUDA device (the choice only reads the layer and the device type, so
    it is checked here without a GPU): the tensor-core GEMV at 4 bits where its chunks fit, Triton where
    Triton is installed, else PyTorch's ops."""
    has_triton = triton_backend._triton_gemv() is not None
    gpu = torch.device("cuda")
    assert auto_backend(layer(64, 128, 8, -1, True, "dequant"), gpu) == ("triton" if has_triton else "int8pack")
    assert auto_backend(layer(64, 256, 4, 128, False, "dequant"), gpu) == "mma"
    assert auto_backend(layer(64, 256, 4, 32, False, "dequant"), gpu) == ("triton" if has_triton else "int4pack")
    assert auto_backend(layer(64, 1600, 4, 128, False, "dequant"), gpu) == ("triton" if has_triton else "dequant")
    assert auto_backend(layer(64, 128, 8, -1, True, "dequant"), CPU) == "int8pack"  # never Triton on the CPU


def test_auto_falls_back_where_the_tensor_core_gemv_cannot_run(monkeypatch):
    """A GPU older than sm_80, or one where NVRTC cannot build the kernel: 4-bit layers go to Triton."""
    has_triton = triton_backend._triton_gemv() is not None
    m, gpu = layer(64, 256, 4, 128, False, "dequant"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mma, "compiles", lambda index: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    assert auto_backend(m, gpu) == ("triton" if has_triton else "int4pack")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    assert auto_backend(m, gpu) == "mma"
    monkeypatch.setattr(mma, "compiles", lambda index: False)
    assert auto_backend(m, gpu) == ("triton" if has_triton else "int4pack")


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


def load_prepared(path, device="cpu", **kw) -> GPT:
    """The checkpoint's model on `device`, made ready by prepare_for_inference(**kw)."""
    return prepare_for_inference(load_checkpoint(path, device).model, **kw)


def runtime_layers(module: torch.nn.Module) -> list[RuntimeLinear]:
    return [m for m in module.modules() if isinstance(m, RuntimeLinear)]


@pytest.mark.parametrize("bits, group_size", [(8, -1), (4, 64)])
def test_checkpoint_auto_matches_dequant(tmp_path, bits, group_size):
    path = saved_quantized_tiny(tmp_path, bits, group_size)
    fast, ref = load_prepared(path, kernel="auto"), load_prepared(path, kernel="dequant")
    assert fast.lm_head.backend == "int8pack"  # the 8-bit tied head / embedding is served too
    blocks = [m.backend for m in runtime_layers(fast.transformer.h)]
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
        model = load_prepared(path, kernel="int4pack")
    assert model.lm_head.backend == "int8pack" and "cannot run 1 of the 9 quantized layers" in caplog.text
    assert {m.backend for m in runtime_layers(model.transformer.h)} == {"int4pack"}
    with pytest.raises(ValueError, match="'triton' runs none of this model's quantized layers on cpu"):
        load_prepared(path, kernel="triton")
    m = layer(64, 128, 8, -1, True, "dequant")
    m.backend = "int4pack"
    with pytest.raises(ValueError, match="'int4pack' cannot run this 8-bit layer"):
        m.prepare()


def test_quantized_mlps_hand_their_gelu_to_c_fc_with_the_same_outputs():
    q = quantize(tiny_gpt(), QuantConfig(method="rtn", bits=4, group_size=64), None, progress=False)
    prepare_for_inference(q)
    mlps = [b.mlp for b in q.transformer.h]
    assert all(m.c_fc.gelu and isinstance(m.act, torch.nn.Identity) for m in mlps)  # fuse_mlp_gelu moved them
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
    for action in (m.state_dict, m.dequantize_stored, m.prepare):
        with pytest.raises(RuntimeError, match="inference only"):
            action()


def test_free_packed_keeps_what_the_kernel_reads():
    assert not layer(32, 64, 4, 32, False, "dequant").free_packed()


@pytest.mark.parametrize("bits, group_size", [(4, 64), (4, 128), (4, -1), (4, 0), (8, -1), (8, 0)])
def test_triton_layout_holds_the_stored_grid(bits, group_size):
    """Prefill on the Triton backend dequantizes from its own layout: it holds the same weights as stored
    (the backend's prepare, which RuntimeLinear.prepare runs on CUDA only, called here on the CPU)."""
    pytest.importorskip("triton")
    from nanogptq.kernels.triton_gemv import from_interleaved

    m = layer(47, 200, bits, group_size, group_size != 64, "dequant")  # 47 rows: the last word row part padding
    triton_backend.prepare(m)
    codes = from_interleaved(m.t_qweight, 200, bits, 47)
    assert torch.equal(dequantize_weight(codes, m.scales, m.z_codes, bits, group_size), m.dequantize_stored())


def test_checkpoint_for_generation_frees_codes_but_not_the_embedding_head(tmp_path):
    path = saved_quantized_tiny(tmp_path, 4, 64)
    full, lean = load_prepared(path), load_prepared(path, keep_packed=False)
    blocks = runtime_layers(lean.transformer.h)
    assert all(m.packed_freed for m in blocks) and not lean.lm_head.packed_freed  # the embedding reads it
    resident = [sum(b.numel() * b.element_size() for b in model.buffers()) for model in (full, lean)]
    assert resident[1] < 0.75 * resident[0]
    prompt = torch.randint(0, 40, (1, 5))
    assert torch.equal(generate(full, prompt, 12, temperature=0.8, seed=3),
                       generate(lean, prompt, 12, temperature=0.8, seed=3))


def test_fuse_epilogue_folds_the_layer_norm():
    """fuse_epilogue's vectors in the arithmetic the mma kernel's epilogue does (store_sums): rstd (W (gamma *
    x) - mean W gamma) + (W beta + b) is the layer applied to LayerNorm(x). Preparing a backend again undoes
    it; models on CPU backends have no block to fuse."""
    m = layer(48, 256, 4, 128, False, "dequant", bias=True)
    m.backend = "mma"
    mma_backend.prepare(m)  # the layout, on the CPU (the kernel itself runs on CUDA)
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
    m.backend = "dequant"
    m.prepare()
    assert not m.fused and not {"e_bias", "ln_weight", "ln_u"} & m._buffers.keys()
    cfg = QuantConfig(method="rtn", bits=4, group_size=64)
    model = prepare_for_inference(quantize(tiny_gpt(), cfg, None, progress=False), fuse=False)
    assert fuse_blocks(model) == 0 and not any(isinstance(b, FusedBlock) for b in model.transformer.h)


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
    assert m.backend == kernel and BACKENDS[kernel].supports(m, torch.device("cuda"))
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
    torch._dynamo.reset()  # every case compiles RuntimeLinear.forward anew: stay under the recompile limit
    f = torch.compile(m, fullgraph=True) if compiled else m
    with torch.no_grad():
        y = f(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 272)
    assert rel_err(y, reference(m, x)) < BF16_TOL


@cuda
@pytest.mark.gpu
def test_cuda_auto_picks_the_gemvs_and_falls_back():
    assert layer(64, 128, 8, -1, True, "auto", device="cuda").backend == "triton"
    assert layer(64, 256, 4, 128, False, "auto", device="cuda").backend == "mma"
    assert layer(64, 256, 4, 32, False, "auto", device="cuda").backend == "triton"  # groups of 32: not mma's
    assert layer(64, 1600, 4, 128, False, "auto", device="cuda").backend == "triton"  # 128 does not divide 1600
    assert layer(65, 128, 8, -1, True, "auto", device="cuda").backend == "triton"  # a char head: 65 rows
    assert layer(64, 96, 4, 48, False, "auto", device="cuda").backend == "dequant"  # 48: not a Triton tile


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
    prepare_for_inference(model, fuse=False)  # backends chosen for CUDA, the split-cache decode attention
    prompt = torch.randint(0, 40, (1, 5), device="cuda")
    runs = [generate(model, prompt, 100, cuda_graph=g, **sampling) for g in (False, True)]
    # 100 tokens > the context of 32 (window refills) and > Sampler.NOISE_STEPS (noise drawn again)
    assert torch.equal(runs[0], runs[1])


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_generation_load_runs_fp16_on_the_gemvs(tmp_path, bits):
    """What `sample` and the demo load on CUDA by default: fp16 activations (the GEMVs' fast path) on the
    Triton kernel (8 bits) or the tensor-core one (4 bits), logits near the fp32 load's, graph-replayed
    decoding as eager."""
    from nanogptq.sample import load_for_generation

    path = saved_quantized_tiny(tmp_path, bits, 64 if bits == 4 else -1)
    half, full = load_for_generation(path, "cuda").model, load_for_generation(path, "cuda", dtype="fp32").model
    assert half.transformer.wpe.weight.dtype == torch.float16 and full.transformer.wpe.weight.dtype == torch.float32
    blocks = runtime_layers(half.transformer.h)
    assert {m.backend for m in blocks} == {"triton" if bits == 8 else "mma"} and all(m.packed_freed for m in blocks)
    idx = torch.randint(0, 40, (1, 32), device="cuda")
    with torch.no_grad():
        a = half(idx[:, :1], input_pos=torch.zeros(1, dtype=torch.long, device="cuda"))[0]
        b = full(idx[:, :1], input_pos=torch.zeros(1, dtype=torch.long, device="cuda"))[0]
    assert a.dtype == torch.float16 and rel_err(a, b) < 2e-2
    prompt = idx[:, :5]
    runs = [generate(half, prompt, 40, temperature=0.0, cuda_graph=g) for g in (False, True)]
    assert torch.equal(runs[0], runs[1])


@cuda
@pytest.mark.gpu
def test_cuda_compiled_step_in_the_graph_gives_the_same_tokens():
    """sample --compile on CUDA: the compiled one-token step, captured with the sampling in the graph."""
    model = prepare_for_inference(tiny_gpt().cuda())
    prompt = torch.randint(0, 40, (1, 5), device="cuda")
    eager = generate(model, prompt, 60, temperature=0.0, cuda_graph=False)
    compile_blocks(model)
    assert torch.equal(generate(model, prompt, 60, temperature=0.0), eager)


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
    assert m.backend == kernel
    m.gelu = gelu
    x = torch.randn(1, in_f, device="cuda", dtype=dtype)
    ref = reference(m, x).float()
    ref = F.gelu(ref) if gelu else ref
    torch._dynamo.reset()
    for f in (m, torch.compile(m, fullgraph=True)):
        with torch.no_grad():
            y = f(x)
        assert y.dtype == dtype and y.shape == (1, out_f) and rel_err(y, ref) < BF16_TOL


@cuda
@pytest.mark.gpu
def test_cuda_fused_blocks_decode_as_unfused():
    """Blocks whose linears all run on mma are fused (fuse_blocks, which prepare_for_inference runs): the
    one-token step gives the unfused step's logits, and graph-replayed generation the eager tokens."""
    cfg = QuantConfig(method="rtn", bits=4, group_size=64, quantize_embeddings=True)
    model = prepare_for_inference(quantize(tiny_gpt(), cfg, None, progress=False).cuda(), fuse=False)
    assert fuse_blocks(model) == 2 and all(isinstance(b, FusedBlock) and b.fused for b in model.transformer.h)
    prompt = torch.randint(0, 40, (1, 20), device="cuda")

    def step_logits() -> torch.Tensor:
        setup_kv_cache(model, 1)
        model(prompt[:, :-1], input_pos=torch.arange(19, device="cuda"))  # prefill: the unfused path
        out = model(prompt[:, -1:], input_pos=torch.tensor([19], device="cuda"))[0].float()
        model.clear_kv_cache()
        return out

    runs = [generate(model, prompt[:, :5], 40, temperature=0.0, cuda_graph=g) for g in (False, True)]
    assert torch.equal(runs[0], runs[1])
    with torch.no_grad():
        fused = step_logits()
        for b in model.transformer.h:
            b.attn.c_attn.fused = False  # FusedBlock.fused needs all four
        assert not any(b.fused for b in model.transformer.h)
        unfused = step_logits()
    assert rel_err(fused, unfused) < 5e-3


@cuda
@pytest.mark.gpu
def test_cuda_model_decodes_with_split_attention_like_sdpa():
    model = tiny_gpt().cuda().eval()
    assert use_decode_attention(model) == 2
    prompt = torch.randint(0, 40, (1, 30), device="cuda")
    with torch.no_grad():
        full = model(prompt)[0][:, -1]
        setup_kv_cache(model, 1)
        assert isinstance(model.transformer.h[0].attn, DecodeAttention)
        model(prompt[:, :-1], input_pos=torch.arange(29, device="cuda"))
        step = model(prompt[:, -1:], input_pos=torch.tensor([29], device="cuda"))[0][:, -1]
        cached = [b.attn.kv_cache.kv[:, :, :, :30].clone() for b in model.transformer.h]
        setup_kv_cache(model, 1)  # the same cache from a prefill of all 30 tokens (index_copy_)
        model(prompt, input_pos=torch.arange(30, device="cuda"))
    assert torch.allclose(step, full, atol=1e-4, rtol=1e-4)
    for b, c in zip(model.transformer.h, cached, strict=True):
        assert torch.allclose(b.attn.kv_cache.kv[:, :, :, :30], c, atol=1e-5)
