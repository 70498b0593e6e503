"""Where a tensor-core GEMV call's time goes: the kernel against copies of it with parts taken out.

    python benchmarks/gemv_breakdown.py            # the 7 B linears, on the configs the tuner picked there

Each variant is cuda_gemv's CUDA source with one part replaced (checked to match exactly once, so a kernel
change that moves the part fails here loudly instead of timing the wrong thing): the mma by an XOR of its
operands, the code-to-fp16 conversion too, the scale and zero-point loads (constants instead), the
activation loads (constants, so staging copies constants), the output stores (kept behind a test that
never holds), the epilogue's loads of its vectors (constants), the warps' reduction (warp 0 stores its own
sums), everything but the code loads ("code loads only": the block's reduction and epilogue stay), or
everything but the code loads, the staging of x and the launch. The outputs of these variants are wrong;
their timings are true, as in benchmarks/gemv.py: each layer in copies that overflow the L2 cache, called
in turn in a CUDA graph, as programmatic dependents. "full" runs first and last, to show the drift within the run.
The last column is benchmarks/gemv.py's read-only kernel on the same copies (the same code loads in the
config's batches and warps, one row tile per block, nothing else), so the row says what the arithmetic,
the side loads and the block's reduction and epilogue cost. Writes
results/gemv_breakdown_<gpu>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from gemv import ReadOnly, gpu_tag, time_call  # benchmarks/ is on sys.path when run as a script

from nanogptq.quant import cuda_gemv

MMA = "      mma(d, a0, a1, a2, a3, ch.x[2 * i], ch.x[2 * i + 1]);\n"
XOR = "      d[i & 3] = __int_as_float(__float_as_int(d[i & 3]) ^ a0 ^ a1 ^ a2 ^ a3 ^ ch.x[2 * i] ^ ch.x[2 * i + 1]);\n"
CONVERT = """      const u32 a0 = hadd2(lop3_or(q, 0x000F000Fu), olo);        // nibbles 0, 4: row g
      const u32 a1 = hfma2(lop3_or(q, 0x00F000F0u), k16, ohi);   // nibbles 1, 5: row g + 8
      const u32 a2 = hadd2(lop3_or(q2, 0x000F000Fu), olo);       // nibbles 2, 6: row g
      const u32 a3 = hfma2(lop3_or(q2, 0x00F000F0u), k16, ohi);  // nibbles 3, 7: row g + 8
"""
GRID = """    ch.s[tt] = s[tt * tile_grids];
    ch.z[tt] = has_z ? (u32)z[tt * tile_grids] : 0x0808u;"""
X_LOAD = "    if (XNC) {\n"
X_CONST = ("    if (true) {\n      xr[4 * v] = xr[4 * v + 1] = xr[4 * v + 2] = xr[4 * v + 3] = 0x3C003C00u;\n"
           "    } else if (XNC) {\n")
STORE = "      y[(size_t)m * y_stride + n] = f2h(v);"
VARIANTS: dict[str, list[tuple[str, str]]] = {
    "full": [],
    "no mma": [(MMA, XOR)],
    "no mma, no conversion": [(MMA, XOR), (CONVERT, "      const u32 a0 = q, a1 = q2, a2 = q ^ q2, a3 = q + q2;\n")],
    "no scale/zero loads": [(GRID, "    ch.s[tt] = 0x3C003C00u;\n    ch.z[tt] = 0x0808u;")],
    "no activation loads": [(X_LOAD, X_CONST)],
    "no output stores": [(STORE, "      if (v == 123.456f) " + STORE.lstrip())],
}
VARIANTS["no epilogue loads"] = [  # what warp 0 loads before the reduction
    ("vec.u[tt][j] = in ? ep.u[n] : 0.f;", "vec.u[tt][j] = 0.5f;"),
    ("vec.c[tt][j] = in ? ep.c[n] : 0.f;", "vec.c[tt][j] = 0.25f;"),
    ("vec.r[tt][j] = in ? h2f(ep.res[(size_t)m * y_stride + n]) : 0.f;", "vec.r[tt][j] = 0.125f;"),
]
# the warps' sums not reduced: warp 0 stores its own, the others stop (no shared memory, no barrier)
VARIANTS["no reduction"] = [("  if (WARPS > 1) {  // the warps' partial sums over their parts of K\n",
                             "  if (WARPS > 1 && warp) return;\n  if (false) {\n")]
VARIANTS["code loads only"] = (VARIANTS["no mma, no conversion"] + VARIANTS["no scale/zero loads"]
                               + VARIANTS["no activation loads"])
VARIANTS["code loads, staging, launch"] = (VARIANTS["code loads only"] + VARIANTS["no epilogue loads"]
                                          + VARIANTS["no reduction"] + VARIANTS["no output stores"])
# (out, in, LayerNorm folded, config): the 7 B linears on the configs the tuner picked in the `early4` decode
# run (results/decode_cuda_7b_early4_h200.json), and c_fc unfolded on its unfolded pick
SHAPES = [(12288, 4096, True, (2, 8, 1, False, True)), (4096, 4096, False, (8, 4, 1, False, True)),
          (16384, 4096, True, (1, 8, 4, False, True)), (4096, 16384, False, (4, 8, 1, False, True)),
          (16384, 4096, False, (1, 8, 4, True, False))]


def variant_source(name: str) -> str:
    source = cuda_gemv.SOURCE
    for old, new in VARIANTS[name]:
        if source.count(old) != 1:
            raise SystemExit(f"variant {name!r}: cuda_gemv.SOURCE no longer holds the part it replaces once: "
                             f"{old.strip()[:60]!r}")
        source = source.replace(old, new)
    return source


def time_variant(name: str, call, copies: list[torch.Tensor], repeats: int) -> float:
    """Median microseconds per call of the variant's kernel, over the copies in turn inside one graph."""
    original = cuda_gemv.SOURCE
    cuda_gemv.SOURCE = variant_source(name)
    cuda_gemv._kernel.cache_clear()
    try:
        turn = itertools.cycle(copies)
        return 1e6 * time_call(lambda x: call(next(turn)), None, 2 * len(copies), repeats)
    finally:
        cuda_gemv.SOURCE = original
        cuda_gemv._kernel.cache_clear()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemv_breakdown.py measures GPU kernels: no CUDA device found")
    gpu = torch.cuda.get_device_name()
    names = ["full"] + [n for n in args.variants if n != "full"] + ["full"]
    print(f"{gpu}; microseconds per call")
    print("| layer | LayerNorm folded | config | " + " | ".join(names) + " | read only |")
    print("|---" * (4 + len(names)) + "|")
    rows = []
    for N, K, fold, config in SHAPES:
        copies, s, z = cuda_gemv.random_layer_copies(N, K, 8, 128, "cuda")  # as the tuner times
        x = torch.randn(1, K, dtype=torch.float16, device="cuda")
        norm = (torch.rand(K, dtype=torch.float16, device="cuda") + 0.5, torch.randn(N, device="cuda"), 1e-5) \
            if fold else None
        bias = torch.randn(N, device="cuda")
        gelu = N == 4 * K  # c_fc, as in the model

        def call(words, x=x, s=s, z=z, N=N, config=config, norm=norm, bias=bias, gelu=gelu):
            return cuda_gemv.launch(x, words, s, z, N, 128, gelu=gelu, config=config, norm=norm, bias=bias)

        us = [time_variant(name, call, copies, args.repeats) for name in names]
        readers = [ReadOnly(SimpleNamespace(m_words=words)) for words in copies]
        kernel = readers[0].kernel(config[:2])
        for reader in readers:
            reader.use(config[:2], kernel)
        turn = itertools.cycle(readers)
        read_us = 1e6 * time_call(lambda x, turn=turn: next(turn)(x), None, 2 * len(readers), args.repeats)
        rows.append({"shape": f"{N}x{K}", "fold": fold, "config": config,
                     "us": dict(zip(names[:-1], us[:-1], strict=True)), "full_last": us[-1], "read_only": read_us})
        times = " | ".join(f"{t:.2f}" for t in [*us, read_us])
        print(f"| {N} x {K} | {'yes' if fold else 'no'} | {config} | {times} |")
    out = Path(args.json or f"results/gemv_breakdown_{gpu_tag(gpu)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
