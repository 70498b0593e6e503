"""The Triton kernels: the GEMV (kernels/triton_gemv.py) and its INTERLEAVED layout, the prefill dequant
(kernels/triton_dequant.py) and the split-cache decode attention (kernels/decode_attention.py).

Without a GPU they run in Triton's CPU interpreter (a fresh Python with TRITON_INTERPRET=1) and through
Triton's compiler for sm_90; on CUDA, every tile the autotuner may pick. The layers running them as a
backend are tested in test_backends.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_backends import BF16_TOL, layer, reference, rel_err

from nanogptq.quant import QuantConfig, QuantLinear
from nanogptq.quant.rtn import rtn_quantize_weight

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 13), n=st.integers(1, 300), group_size=st.sampled_from([16, 32, 64, 128, 256]),
       bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**31))
def test_interleaved_layout_round_trip(rows, n, group_size, bits, seed):
    pytest.importorskip("triton")
    from nanogptq.kernels.triton_gemv import from_interleaved, rows_per_word, to_interleaved

    rpw, tile = rows_per_word(bits), group_size  # a group of up to 256 columns is one tile group
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=gen).to(torch.uint8)
    w = to_interleaved(codes, group_size, bits)
    tiles, words = -(-n // tile), -(-rows // rpw)
    assert w.shape == (words, tiles * tile // 2) and w.dtype == torch.int32
    # zero codes pad the columns to whole tiles and the rows to whole words
    padded = torch.nn.functional.pad(codes, (0, tiles * tile - n, 0, words * rpw - rows)).to(torch.int64)
    w64 = w.to(torch.int64) & 0xFFFFFFFF
    for r in range(rpw):  # code (row r of the word, column 2p + c) at bits 16 c + bits r
        for c in range(2):
            assert torch.equal((w64 >> (16 * c + bits * r)) & (2**bits - 1), padded[r::rpw, c::2])
    assert torch.equal(from_interleaved(w, n, bits, rows), codes)


def test_interleaved_layout_holds_4_or_8_bits():
    pytest.importorskip("triton")
    from nanogptq.kernels.triton_gemv import rows_per_word

    with pytest.raises(ValueError, match="4 or 8 bit"):
        rows_per_word(3)


def rtn_layer_and_zeros(bits: int, group_size: int, symmetric: bool, in_f: int, out_f: int):
    """An RTN QuantLinear (random weights) and its unpacked zero codes (None if symmetric), on the CPU."""
    W = torch.randn(out_f, in_f) * 0.05
    cfg = QuantConfig(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric)
    m = QuantLinear.from_quantized(rtn_quantize_weight(W, cfg))
    return m, m.zero_codes()


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
from nanogptq.kernels.triton_gemv import gemv, launch, to_interleaved
from test_kernels_triton import rtn_layer_and_zeros
# rows: 24 fill whole words and tiles; 65 (a char vocabulary's head) and 66 leave the last word row part padding
for bits, gs, sym, K, N in [(4, 128, False, 256, 24), (4, 64, False, 1600, 24), (4, -1, True, 192, 66),
                            (8, -1, False, 1600, 65), (8, 0, True, 64, 24), (4, 512, False, 1024, 24),
                            (4, 32, True, 104, 24), (4, 0, False, 200, 65)]:
    m, z = rtn_layer_and_zeros(bits, gs, sym, K, N)
    x = torch.randn(2, K)
    ref = x @ m.dequantize().T
    words = to_interleaved(m.codes(), gs, bits)
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
    quant.grid.dequantize_weight's values, for row counts off the layouts' tiles, short last groups and
    per-row and per-tensor grids (fp32 and fp16; the interpreter rounds to bf16 toward zero, the GPU to
    nearest: the CUDA test below checks bf16)."""
    code = """
import torch
from nanogptq.kernels import mma, triton_gemv
from nanogptq.quant.grid import dequantize_weight
from nanogptq.kernels.triton_dequant import dequantize
from test_kernels_triton import rtn_layer_and_zeros
torch.manual_seed(0)
for bits, gs, sym, K, N in [(4, 128, False, 256, 24), (4, 64, False, 1600, 40), (4, -1, True, 192, 66),
                            (8, -1, False, 1600, 65), (8, 0, True, 64, 24), (4, 0, False, 256, 65),
                            (4, 32, True, 104, 24), (4, 256, False, 512, 17)]:
    m, z = rtn_layer_and_zeros(bits, gs, sym, K, N)
    codes = m.codes()
    ref = dequantize_weight(codes, m.scales, z, bits, gs)
    layouts = [("interleaved", triton_gemv.to_interleaved(codes, gs, bits))]
    if bits == 4 and mma.supports(bits, gs, K):
        layouts.append(("mma", mma.to_mma_layout(codes, mma.chunk_words(gs, K))))
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
    from nanogptq.runtime.backends.triton import layout_weight

    m = layer(272, in_f, bits, group_size, False, kernel, device="cuda")
    words, name = (m.m_words, "mma") if kernel == "mma" else (m.t_qweight, "interleaved")
    assert torch.equal(layout_weight(m, words, name, dtype), m.dequantize_stored().to(dtype))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "bits, group_size, in_f, symmetric, dtype",
    [(4, 128, 4096, False, torch.bfloat16), (4, 64, 1600, True, torch.bfloat16), (4, -1, 256, False, torch.float16),
     (4, 32, 104, True, torch.bfloat16), (8, -1, 1600, True, torch.bfloat16), (8, -1, 768, False, torch.float16)],
)
def test_cuda_interleaved_gemv_every_tuned_config_matches_dequant(bits, group_size, in_f, symmetric, dtype):
    """The packed-fp16 assembly path of the INTERLEAVED kernel, in every tile the autotuner may pick."""
    from nanogptq.kernels.triton_gemv import _rows_configs, launch, tile_group

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
    from nanogptq.kernels.decode_attention import decode_attention

    p = torch.tensor([pos], device="cuda")
    counts = torch.zeros(B * H, device="cuda", dtype=torch.int32)
    for fn in (decode_attention, torch.compile(decode_attention)):
        qkv, kv, want_kv, ref = attention_case(B, H, L, D, pos, "cuda", torch.bfloat16)
        for _ in range(3):  # the same counters each time: the kernel leaves them zero
            y = fn(qkv, kv, p, counts)
            assert y.shape == (B, 1, H * D) and y.dtype == qkv.dtype
            assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
            assert torch.equal(kv, want_kv) and not counts.any()


@pytest.mark.parametrize("pdl", [False, True])
def test_decode_attention_compiles_for_sm90(pdl):
    """Triton's compiler for an H100/H200 (sm_90) takes the kernel, with and without its PDL wait: no GPU is
    needed to compile, and the interpreter below does not type-check as the compiler does."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nanogptq.kernels.decode_attention import BLOCK_L, NUM_WARPS, _decode_kernel

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

    from nanogptq.kernels import triton_gemv as tg

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
from nanogptq.kernels.decode_attention import decode_attention
from test_kernels_triton import attention_case
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
