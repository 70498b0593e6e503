"""The tensor-core GEMV (kernels/mma.py): its layout, checked on the CPU against the PTX fragment tables,
and the kernel on CUDA in every config the tuner may pick.

The kernel itself runs on CUDA only (the tests at the end, and the mma backend's in test_backends.py); on
the CPU an emulation of one warp's work, written from the mma.m16n8k16 fragment tables and the fp16 bit
tricks the kernel uses, must reproduce x W^T from the layout the kernel reads. A wrong nibble order, row
pairing or activation order fails it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_backends import layer, reference, rel_err

from nanogptq.kernels import mma
from nanogptq.quant.grid import dequantize_weight

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def f16_pair(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint32 -> (low half, high half) as float64, read as fp16 bit patterns."""
    lo = (bits & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
    hi = (bits >> 16).astype(np.uint16).view(np.float16).astype(np.float64)
    return lo, hi


def emulate(x: torch.Tensor, words, s_pairs, z_pairs, N: int, group_size: int) -> torch.Tensor:
    """y (M, N) as the kernel computes it, one lane at a time, from the fragment tables:
    A reg j: rows g + 8 (j & 1), mma columns 2 t + 8 (j >> 1) + e; B reg j: mma rows 2 t + 8 j + e of
    column g (the activation row); C reg j: row g + 8 (j >> 1), column 2 t + (j & 1)."""
    M, K = x.shape
    w = words.numpy().view(np.uint32)
    NT, NC, V = w.shape[:3]
    cw = 4 * V
    cpg = NC if group_size <= 0 else group_size // (16 * cw)
    s = s_pairs.numpy().view(np.uint32)
    z = None if z_pairs is None else z_pairs.numpy().view(np.uint16).astype(np.uint32)
    xb = x.to(torch.float16).numpy().view(np.uint16).astype(np.uint32)
    y = np.zeros((M, NT * 16))
    for T in range(NT):
        for c in range(NC):
            gr = c // cpg
            for lane in range(32):
                g, t = lane // 4, lane % 4
                zz = 0x0808 if z is None else int(z[T, gr, g])
                olo = f16_pair(np.uint32(((0xE400 + (zz & 0xFF)) * 0x10001) & 0xFFFFFFFF))
                ohi = f16_pair(np.uint32(((0xD400 + 16 * (zz >> 8)) * 0x10001) & 0xFFFFFFFF))
                for i in range(cw):
                    q = np.uint32(w[T, c, i // 4, lane, i % 4])
                    regs = []
                    for j, src in enumerate((q, q, q >> 8, q >> 8)):
                        mask = 0x000F000F if j % 2 == 0 else 0x00F000F0
                        lo, hi = f16_pair(np.uint32((src & mask) | 0x64006400))
                        if j % 2 == 0:
                            regs.append((lo + olo[0], hi + olo[1]))
                        else:
                            regs.append((lo / 16 + ohi[0], hi / 16 + ohi[1]))
                    # this lane's A entries: (row in tile, mma column) -> value
                    for j in range(4):
                        for e in range(2):
                            r, mcol = g + 8 * (j & 1), 2 * t + 8 * (j >> 1) + e
                            # mma column mcol multiplies B row mcol, held by lane t' = (mcol % 8) // 2 as
                            # B reg mcol // 8, half mcol % 2: activation 4 i + 2 (reg) + half of its 4 cw
                            tp, breg, half = (mcol % 8) // 2, mcol // 8, mcol % 2
                            k = 16 * cw * c + 4 * cw * tp + 4 * i + 2 * breg + half
                            xk = xb[:, k].astype(np.uint16).view(np.float16).astype(np.float64)
                            scale = f16_pair(np.uint32(s[T, gr, g]))[r // 8]
                            y[:, 16 * T + r] += regs[j][e] * xk * scale
    return torch.from_numpy(y[:, :N]).float()


def random_grid(N: int, K: int, group_size: int, symmetric: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    ng = 1 if group_size <= 0 else K // group_size
    rows = 1 if group_size == 0 else N
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scales = (torch.rand(rows, ng, generator=g) * 0.1 + 0.01).to(torch.float16)
    zeros = None if symmetric else torch.randint(0, 16, (rows, ng), generator=g, dtype=torch.uint8)
    return codes, scales, zeros


@pytest.mark.parametrize("N, K, group_size, symmetric, M", [
    (16, 128, 128, False, 1),
    (20, 256, 64, True, 3),  # a padded tile, 64-column chunks, symmetric
    (32, 256, -1, False, 8),  # one grid per row
    (16, 128, 0, True, 2),  # per tensor
])
def test_emulated_kernel_matches_dequant(N, K, group_size, symmetric, M):
    codes, scales, zeros = random_grid(N, K, group_size, symmetric, seed=N + K)
    cw = mma.chunk_words(group_size, K)
    words = mma.to_mma_layout(codes, cw)
    s_pairs, z_pairs = mma.grid_layout(scales, zeros, N)
    x = torch.randn(M, K).to(torch.float16).float()
    ref = x @ dequantize_weight(codes, scales, zeros, 4, group_size).T
    y = emulate(x, words, s_pairs, z_pairs, N, group_size)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 40), chunks=st.integers(1, 3), cw=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_layout_roundtrip(N, chunks, cw, seed):
    K = 16 * cw * chunks
    codes = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    words = mma.to_mma_layout(codes, cw)
    assert words.shape == (-(-N // 16), chunks, cw // 4, 32, 4) and words.dtype == torch.int32
    assert torch.equal(mma.from_mma_layout(words, N), codes)


def test_supports_and_chunks():
    assert mma.supports(4, 128, 4096) and mma.supports(4, -1, 1600)
    assert not mma.supports(8, 128, 4096)  # 4 bits only
    assert not mma.supports(4, 32, 4096)  # groups hold whole 64-column chunks
    assert not mma.supports(4, 192, 1536)  # a power of two (the kernel shifts)
    assert not mma.supports(4, -1, 1000)
    assert mma.chunk_words(128, 4096) == 8 and mma.chunk_words(64, 1600) == 4
    assert mma.chunk_words(-1, 1600) == 4 and mma.chunk_words(-1, 4096) == 8


def test_launch_rejects_what_the_kernel_cannot_read():
    """Checked before anything reaches the GPU (so on the CPU too): fp16 only, 1-8 rows, the layout's width."""
    codes, scales, zeros = random_grid(16, 128, 128, False, seed=0)
    words = mma.to_mma_layout(codes, 8)
    s_pairs, z_pairs = mma.grid_layout(scales, zeros, 16)
    for x in (torch.zeros(1, 128, dtype=torch.bfloat16), torch.zeros(9, 128, dtype=torch.float16),
              torch.zeros(1, 256, dtype=torch.float16), torch.zeros(0, 128, dtype=torch.float16)):
        with pytest.raises(ValueError, match="mma GEMV: x must be fp16"):
            mma.launch(x, words, s_pairs, z_pairs, 16, 128)
    # a block of 4 row tiles on a layer of one (the tuner skips such configs)
    with pytest.raises(ValueError, match="4 row tiles per block, but the layer has 1"):
        mma.launch(torch.zeros(1, 128, dtype=torch.float16), words, s_pairs, z_pairs, 16, 128,
                   config=(1, 8, 4, True, False))
    # x staged in shared memory: one activation row only
    with pytest.raises(ValueError, match="stages x in shared memory"):
        mma.launch(torch.zeros(2, 128, dtype=torch.float16), words, s_pairs, z_pairs, 16, 128,
                   config=(2, 8, 1, False, True))


def test_x_shared_bytes_fit_the_block_shared_memory():
    """Staging x takes 2 K bytes of one row, beside the reduction's 512 bytes per warp and tile and 8 per warp
    (the LayerNorm sums, store_sums); where they would pass the 48 KB a block gets without opting in, the
    config cannot run (the tuner skips it)."""
    assert mma.x_shared_bytes(1, 4096, (2, 8, 1, False, True)) == 8192
    assert mma.x_shared_bytes(1, 4096, (2, 8, 1, False, False)) == 0
    assert mma.x_shared_bytes(2, 4096, (2, 8, 1, False, True)) is None
    assert mma.x_shared_bytes(1, 16384, (4, 8, 2, False, True)) == 32768  # + 8 KB: fits
    assert mma.x_shared_bytes(1, 22496, (2, 8, 1, False, True)) == 44992  # + 4 KB + 64 = 48 KB: fits
    assert mma.x_shared_bytes(1, 22528, (2, 8, 1, False, True)) is None  # 44 + 4 KB + 64 > 48 KB
    assert mma.x_shared_bytes(1, 16384, (1, 8, 4, False, True)) is None  # 32 + 16 KB + 64 > 48 KB
    assert mma.x_shared_bytes(1, 16352, (1, 8, 4, False, True)) == 32704  # 64 bytes less: fits
    assert all(mma.x_shared_bytes(1, 1600, cfg) is not None for cfg in mma.CONFIGS)


def test_launch_structs_have_cuda_h_layout():
    """cuLaunchKernelEx reads these as C structs: a wrong offset would launch with garbage attributes."""
    import ctypes

    from nanogptq.kernels import launch

    attr, config = launch._LaunchAttribute, launch._LaunchConfig  # launch.py's, for every kernel it launches
    assert ctypes.sizeof(attr) == 72 and attr.value.offset == 8  # id, pad to 8, a 64-byte union
    assert ctypes.sizeof(config) == 56  # 7 uints, then 8-byte aligned stream, attrs, count
    epilogue = mma._Epilogue  # the kernel's Epilogue: 4 pointers, then a float (8-byte aligned)
    assert ctypes.sizeof(epilogue) == 40 and epilogue.eps.offset == 32
    assert (config.stream.offset, config.attrs.offset, config.num_attrs.offset) == (32, 40, 48)


def test_random_layer_copies_overflow_l2_three_times():
    """What the tuner times a shape on: enough copies of the layer's words that they exceed the L2 cache three
    times, at most 256, all sharing one grid."""
    copies, s_pairs, z_pairs = mma.random_layer_copies(100, 512, 8, 128, "cpu", l2=2**20)
    words = 7 * 4 * 2 * 32 * 4 * 4  # 7 row tiles (the last padded), 4 chunks of 128 columns
    assert len(copies) == -(-3 * 2**20 // words) and all(c.shape == (7, 4, 2, 32, 4) for c in copies)
    assert (s_pairs.shape, z_pairs.shape) == ((7, 4, 8), (7, 4, 8))
    assert len(mma.random_layer_copies(100, 512, 8, 128, "cpu", l2=2**40)[0]) == 256


# ---- CUDA: run on a GPU only ----


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("group_size, symmetric", [(128, False), (64, True), (-1, False)])
def test_cuda_mma_epilogue_folds_layer_norm_bias_gelu_residual(group_size, symmetric):
    """Every config adds a bias and a residual; those that stage x fold a LayerNorm too (with and without
    GELU), the others refuse it."""
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
    for cfg in mma.CONFIGS:
        if mma.x_shared_bytes(1, 512, cfg) is None:
            continue
        y = mma.launch(x, m.m_words, m.m_scales, m.m_zeros, 100, group_size, config=cfg, bias=m.bias, residual=r)
        assert rel_err(y, plain) < 2e-3, cfg
        if not cfg[4]:
            with pytest.raises(ValueError, match="does not stage x"):
                mma.launch(x, m.m_words, m.m_scales, m.m_zeros, 100, group_size, config=cfg, norm=norm)
            continue
        for gelu in (False, True):
            y = mma.launch(x, m.m_words, m.m_scales, m.m_zeros, 100, group_size, gelu, config=cfg, norm=norm,
                           bias=m.e_bias)
            assert rel_err(y, F.gelu(normed) if gelu else normed) < 3e-3, (cfg, gelu)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("gelu", [False, True])
def test_cuda_mma_gemv_every_config_and_in_a_graph(gelu):
    """Every tuner candidate gives the dequantized weights' output (fp32 sums: far inside the backends'
    bf16 tolerance), and a first call inside a CUDA-graph capture (no timing there) runs on the heuristic's
    config."""
    m = layer(100, 512, 4, 128, False, "mma", device="cuda")  # 100 rows: a padded last tile
    for rows in (1, 2):  # x staged in shared memory takes one row only
        x = torch.randn(rows, 512, device="cuda", dtype=torch.float16)
        ref = reference(m, x).float()
        ref = F.gelu(ref) if gelu else ref
        for cfg in mma.CONFIGS:
            if mma.x_shared_bytes(rows, 512, cfg) is None:
                with pytest.raises(ValueError, match="shared memory"):
                    mma.launch(x, m.m_words, m.m_scales, m.m_zeros, 100, 128, gelu, config=cfg)
                continue
            y = mma.launch(x, m.m_words, m.m_scales, m.m_zeros, 100, 128, gelu, config=cfg)
            assert rel_err(y, ref) < 2e-3, (rows, cfg)
    fresh = torch.randn(3, 512, device="cuda", dtype=torch.float16)  # 3 rows: a shape not yet tuned
    mma._TUNED.pop((100, 512, 3, 8, 128, fresh.device, False), None)  # (N, K, rows, cw, group, device, fold)
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        out = mma.launch(fresh, m.m_words, m.m_scales, m.m_zeros, 100, 128, gelu)
    graph.replay()
    ref = reference(m, fresh).float()
    assert rel_err(out, F.gelu(ref) if gelu else ref) < 2e-3


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kernel, bits", [("mma", 4), ("triton", 4), ("triton", 8)])
def test_cuda_gemv_chain_under_pdl_matches_serial_launches(kernel, bits):
    """Launched as programmatic dependents, GEMVs that read the previous kernel's output (another GEMV's, a
    LayerNorm's) must still wait for it: a chain replayed from a graph gives the serial launches' bits."""
    from nanogptq.kernels import triton_gemv

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    group = 128 if bits == 4 else -1
    a, b = (layer(2048, 2048, bits, group, False, kernel, device="cuda") for _ in range(2))
    ln = torch.nn.LayerNorm(2048, device="cuda", dtype=torch.float16)

    def gemv(m, x, gelu, pdl):
        if kernel == "mma":
            return mma.launch(x, m.m_words, m.m_scales, m.m_zeros, 2048, group, gelu, pdl=pdl)
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
