"""Batch-1 linear layers alone on the GPU: each kernel's time and memory bandwidth per weight shape.

    python benchmarks/gemv.py                      # the 7 B shape's four linears
    python benchmarks/gemv.py --shapes 4800x1600 1600x1600 6400x1600 1600x6400

Each variant's layer (in copies that overflow the L2 cache) is called R times inside one CUDA graph
(launch overhead excluded, as in a decoded model replayed from a graph); the graph is replayed --repeats
times and the median per-call time is reported with the bytes the kernel reads (weights, scales, zero
points) per second and as a fraction of the GPU's HBM peak. Variants: bf16 and fp16 F.linear (cuBLAS), the
Triton GEMV at 8 bits (per row) and 4 bits (g128, asymmetric) on bf16 or (-fp16) fp16 activations, the
tensor-core GEMV ("mma-"), a kernel that only reads the mma layout's code words ("read-int4": what
streaming these bytes costs with no arithmetic, the ceiling for a kernel of this shape; the best of a few
tiles), and PyTorch's stock int8 weight-only and int4 tinygemm ops. Every quantized variant's output is
checked against its dequantized weights first (the `err` column, relative L2), so a wrong kernel cannot post
a time. On sm_90 and later the Triton, mma and read-only kernels launch as programmatic dependents, as in a
decoded model (each call waits for the one before it but may start during its end); cuBLAS and PyTorch's
ops do not. Writes results/gpu/gemv_7b_<gpu>.json (gemv_<gpu>.json for other shapes).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from common import add_output, device_name, graph_seconds, hbm_peak, parser, print_table, result_path, write_result
from decode import random_quant_linear

from nanogptq.kernels import launch, mma, triton_gemv

SHAPES_7B = ["12288x4096", "4096x4096", "16384x4096", "4096x16384"]
# name: (bits, group size, symmetric, kernel), None for the float matrix; names ending in fp16 run on fp16
# activations (and weights, for the float one), the others on bf16
VARIANTS = {
    "bf16": None,
    "fp16": None,
    "triton-int8": (8, -1, True, "triton"),
    "triton-int4-g128": (4, 128, False, "triton"),
    "triton-int8-fp16": (8, -1, True, "triton"),
    "triton-int4-g128-fp16": (4, 128, False, "triton"),
    "mma-int4-g128-fp16": (4, 128, False, "mma"),
    "read-int4-g128-fp16": (4, 128, False, "read"),
    "stock-int8": (8, -1, True, "int8pack"),
    "stock-int4-g128": (4, 128, False, "int4pack"),
}


def act_dtype(name: str) -> torch.dtype:
    return torch.float16 if name.endswith("fp16") else torch.bfloat16


def make_layer(n: int, k: int, spec: tuple | None, dtype: torch.dtype):
    if spec is None:
        return torch.randn(n, k, device="cuda", dtype=dtype)
    bits, group_size, symmetric, kernel = spec
    if kernel == "read":
        return ReadOnly(random_quant_linear(n, k, bits, group_size, symmetric, "cuda", kernel="mma"))
    return random_quant_linear(n, k, bits, group_size, symmetric, "cuda", kernel=kernel)


READ_SOURCE = mma.SOURCE + r"""
template <int CW, int UNROLL, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) read_words(const u32* __restrict__ w, u32* __restrict__ out, int NC) {
  // w4_gemv's loads of the code words alone (same tiles, warps and batches), XORed so they stay
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cbeg = (NC * warp) / WARPS, cend = (NC * (warp + 1)) / WARPS;
  const u32* wl = w + (size_t)blockIdx.x * NC * CW * 32 + lane * 4;
  u32 acc = 0;
  bool waited = false;
  for (int c = cbeg; c + UNROLL <= cend; c += UNROLL) {
    u32 r[UNROLL][CW];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
      for (int v = 0; v < CW / 4; ++v) ld_stream(r[u] + 4 * v, wl + (size_t)(c + u) * CW * 32 + 128 * v);
    if (!waited) wait_previous_kernel(), waited = true;  // after the first batch's loads, as w4_gemv
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
      for (int i = 0; i < CW; ++i) acc ^= r[u][i];
  }
  if (!waited) wait_previous_kernel();
  if (acc == 0x9E3779B9u) out[0] = acc;  // almost never true, but the compiler cannot know
}
"""
READ_TILES = ((2, 8), (2, 2), (4, 4), (8, 4))  # (chunks per batch, warps): the ceiling is the best of them


class ReadOnly:
    """Reads a 4-bit layer's mma code words and nothing else (no activations, no arithmetic, no output)."""

    def __init__(self, m):  # a layer prepared for the mma kernel: its words are m_words
        self.words, self.tile, self.run = m.m_words, None, None
        self.out = torch.zeros(1, dtype=torch.int32, device="cuda")

    def use(self, tile: tuple[int, int], kernel) -> None:
        self.tile, self.run = tile, kernel

    def kernel(self, tile: tuple[int, int]):
        cw = 4 * self.words.shape[2]
        return launch.build(READ_SOURCE, f"read_words<{cw}, {tile[0]}, {tile[1]}>", self.words.device.index or 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        index = self.words.device.index or 0  # launched as the mma GEMV is
        launch.launch_kernel(self.run, self.words.shape[0], 32 * self.tile[1], [self.words, self.out,
                             self.words.shape[1]], torch.cuda.current_stream(), launch.pdl_available(index))
        return self.out

    def read_tensors(self) -> list[torch.Tensor]:
        return [self.words]


MAX_ERR = 3e-2  # bf16 activations and outputs: a right kernel lands near 4e-3


@torch.inference_mode()
def rel_err(layer, x: torch.Tensor) -> float | None:
    """Relative L2 error of a quantized layer's output against x times its dequantized weights in fp32."""
    if isinstance(layer, (torch.Tensor, ReadOnly)):
        return None
    y, ref = layer(x).float(), x.float() @ layer.dequantize().to(x.device).T
    return ((y - ref).norm() / ref.norm()).item()


def bytes_read(m) -> int:
    tensors = [m] if isinstance(m, torch.Tensor) else m.read_tensors()
    return sum(t.numel() * t.element_size() for t in tensors)


def time_read(copies: list[ReadOnly], fn, x: torch.Tensor, tile: tuple[int, int], args) -> float:
    kernel = copies[0].kernel(tile)
    for c in copies:
        c.use(tile, kernel)
    return graph_seconds(fn, x, args.calls, args.repeats)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--shapes", nargs="*", default=SHAPES_7B, help="OUTxIN (default: the 7 B shape's linears)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--repeats", type=int, default=10)
    add_output(p, where="results/gpu/gemv_7b_<gpu>.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemv.py measures GPU kernels: no CUDA device found")
    peak = hbm_peak()
    print(f"{device_name('cuda')}: HBM peak {peak / 1e12:.2f} TB/s, L2 {mma.l2_bytes() / 2**20:.0f} MiB")
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        base = None
        for name in args.variants:
            spec = VARIANTS[name]
            # enough copies of the layer, called in turn, that their bytes exceed the L2 cache three times
            # over: a decoded model reads each weight once per token, from HBM
            first = make_layer(n, k, spec, act_dtype(name))
            more = -(-3 * mma.l2_bytes() // bytes_read(first)) - 1
            copies = [first] + [make_layer(n, k, spec, act_dtype(name)) for _ in range(more)]
            xv = x.to(act_dtype(name))
            turn = itertools.cycle(copies)

            def fn(x, turn=turn):
                layer = next(turn)
                return F.linear(x, layer) if isinstance(layer, torch.Tensor) else layer(x)

            try:
                err = rel_err(first, xv)
                if err is not None and not err < MAX_ERR:
                    raise ValueError(f"output off the dequantized weights' by {err:.1e} (relative)")
                if isinstance(first, ReadOnly):  # the ceiling: the best of a few tiles
                    t = min(time_read(copies, fn, xv, tile, args) for tile in READ_TILES)
                else:
                    t = graph_seconds(fn, xv, args.calls, args.repeats)
            except Exception as e:  # a kernel that fails on this GPU gets a row, not a crash
                rows.append({"shape": shape, "variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"{shape} {name}: {rows[-1]['error']}", flush=True)
                continue
            base = t if name == "bf16" else base
            gbs = bytes_read(first) / t
            rows.append({
                "shape": shape,
                "variant": name,
                "us": t * 1e6,
                "bytes": bytes_read(first),
                "GB_s": gbs / 1e9,
                "roofline": gbs / peak,
                "x_bf16": base / t if base else None,
                "err": err,
            })
            print(f"{shape} {name}: {t * 1e6:.1f} us", flush=True)
    tuned = {**triton_gemv.tuned_configs(), **mma.tuned_configs()}
    for key, cfg in tuned.items():
        print(f"autotuned {key}: {cfg}")
    print_table(rows, [
        ("shape", "shape", ""),
        ("variant", "variant", ""),
        ("us/call", "us", ".1f"),
        ("GB/s", "GB_s", ".0f"),
        ("HBM roofline", "roofline", ".0%"),
        ("x bf16", "x_bf16", ".2f"),
        ("err", lambda r: r.get("error") or r.get("err"), ".1e"),
    ])
    what = "gemv_7b" if args.shapes == SHAPES_7B else "gemv"
    out = Path(args.json) if args.json else result_path("gpu", what, "cuda")
    write_result(out, rows, "cuda", torch=torch.__version__, hbm_peak_bytes_s=peak, args=vars(args), tuned=tuned)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
