"""Batch-1 linear layers alone on the GPU: each kernel's time and memory bandwidth per weight shape.

    python benchmarks/gemv.py                      # the 7 B shape's four linears
    python benchmarks/gemv.py --shapes 4800x1600 1600x1600 6400x1600 1600x6400

Each variant's layer (in copies that overflow the L2 cache) is called R times inside one CUDA graph
(launch overhead excluded, as in a decoded model replayed from a graph); the graph is replayed --repeats
times and the median per-call time is reported with the bytes the kernel reads (weights, scales, zero
points) per second and as a fraction of the GPU's HBM peak (decode.hbm_peak). Variants: bf16 and fp16
F.linear (cuBLAS), the Triton GEMV at 8 bits (per row) and 4 bits (g128, asymmetric) on bf16 or (-fp16)
fp16 activations, the tensor-core GEMV (cuda_gemv.py, "mma-"), a kernel that only reads the mma layout's
code words ("read-int4": what streaming these bytes costs with no arithmetic, the ceiling for a kernel of
this shape; the best of a few tiles), the first Triton GEMV (gemv_first.py: "-bytes", "-halves", "-pairs"),
and PyTorch's stock int8 weight-only (eager F.linear on the int8 matrix, then scales) and int4 tinygemm
(`_weight_int4pack_mm`). Every quantized variant's output is checked against its dequantized weights first
(the `err` column, relative L2), so a wrong kernel cannot post a time. On sm_90 and later the Triton, mma
and read-only kernels launch as programmatic dependents, as in a decoded model (each call waits for the
one before it but may start during its end); cuBLAS and PyTorch's ops do not.
Writes results/gemv_<gpu>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import gemv_first
import torch
import torch.nn.functional as F
from decode import hbm_peak, random_quant_linear  # benchmarks/ is on sys.path when run as a script

from nanogptq.quant import QuantLinear, cuda_gemv, triton_gemv


def gpu_tag(name: str) -> str:
    """A result file's name for the GPU: "h200" for "NVIDIA H200"."""
    return name.split()[1].lower() if len(name.split()) > 1 else "gpu"


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
    "triton-int8-bytes": (8, -1, True, "triton-pairs"),
    "triton-int4-g128-halves": (4, 128, False, "triton-halves"),
    "triton-int4-g128-pairs": (4, 128, False, "triton-pairs"),
    "stock-int8": (8, -1, True, "int8pack"),
    "stock-int4-g128": (4, 128, False, "int4pack"),
}


def act_dtype(name: str) -> torch.dtype:
    return torch.float16 if name.endswith("fp16") else torch.bfloat16


def make_layer(n: int, k: int, spec: tuple | None, dtype: torch.dtype) -> torch.Tensor | QuantLinear:
    if spec is None:
        return torch.randn(n, k, device="cuda", dtype=dtype)
    bits, group_size, symmetric, kernel = spec
    if kernel == "read":
        return ReadOnly(random_quant_linear(n, k, bits, group_size, symmetric, "cuda", kernel="mma"))
    if kernel in ("triton-pairs", "triton-halves"):  # earlier 4-bit layouts of the Triton GEMV, for comparison
        m = random_quant_linear(n, k, bits, group_size, symmetric, "cuda", kernel="triton")
        return FirstKernelGEMV(m, gemv_first.HALVES if kernel == "triton-halves" else gemv_first.PAIRS)
    return random_quant_linear(n, k, bits, group_size, symmetric, "cuda", kernel=kernel)


class FirstKernelGEMV:
    """The first Triton GEMV (gemv_first.py) on the stored codes (PAIRS: bytes at 8 bits, nibble pairs at
    4) or on HALVES, instead of the interleaved words QuantLinear's kernel runs on."""

    def __init__(self, m: QuantLinear, layout: int):
        self.m, self.layout = m, layout
        pairs = layout == gemv_first.PAIRS
        self.codes = m.qweight if pairs else gemv_first.to_halves(m.qweight, m.in_features, m.group_size)
        m.t_qweight = None  # unread here

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        return gemv_first.launch(x, self.codes, m.scales, m.z_codes, m.bits, m.group_size, self.layout)

    def read_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.m.scales, self.m.z_codes) if t is not None]


READ_SOURCE = cuda_gemv.SOURCE + r"""
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

    def __init__(self, m: QuantLinear):
        self.words, self.tile, self.run = m.m_words, None, None
        self.out = torch.zeros(1, dtype=torch.int32, device="cuda")

    def use(self, tile: tuple[int, int], kernel) -> None:
        self.tile, self.run = tile, kernel

    def kernel(self, tile: tuple[int, int]):
        cw = 4 * self.words.shape[2]
        return cuda_gemv.build(READ_SOURCE, f"read_words<{cw}, {tile[0]}, {tile[1]}>", self.words.device.index or 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        index = self.words.device.index or 0  # launched as the mma GEMV is
        cuda_gemv.launch_kernel(self.run, self.words.shape[0], 32 * self.tile[1], [self.words, self.out,
                                self.words.shape[1]], torch.cuda.current_stream(), cuda_gemv.pdl_available(index))
        return self.out

    def read_tensors(self) -> list[torch.Tensor]:
        return [self.words]


MAX_ERR = 3e-2  # bf16 activations and outputs: a right kernel lands near 4e-3


@torch.inference_mode()
def rel_err(layer, x: torch.Tensor) -> float | None:
    """Relative L2 error of a quantized layer's output against x times its dequantized weights in fp32."""
    if isinstance(layer, (torch.Tensor, ReadOnly)):
        return None
    m = layer.m if isinstance(layer, FirstKernelGEMV) else layer
    y, ref = layer(x).float(), x.float() @ m.dequantize().to(x.device).T
    return ((y - ref).norm() / ref.norm()).item()


def bytes_read(m) -> int:
    tensors = [m] if isinstance(m, torch.Tensor) else m.read_tensors()
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def time_call(fn, x: torch.Tensor, calls: int, repeats: int) -> float:
    """Median seconds per call, from a CUDA graph of `calls` calls replayed `repeats` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: autotuning, lazy initialisation
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(x)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def time_read(copies: list[ReadOnly], fn, x: torch.Tensor, tile: tuple[int, int], args) -> float:
    kernel = copies[0].kernel(tile)
    for c in copies:
        c.use(tile, kernel)
    return time_call(fn, x, args.calls, args.repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shapes", nargs="*", default=["12288x4096", "4096x4096", "16384x4096", "4096x16384"], help="OUTxIN"
    )
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemv.py measures GPU kernels: no CUDA device found")
    gpu = torch.cuda.get_device_name()
    peak = hbm_peak()
    print(f"{gpu}: HBM peak {peak / 1e12:.2f} TB/s, L2 {cuda_gemv.l2_bytes() / 2**20:.0f} MiB")
    rows = []
    print("| shape | variant | us/call | GB/s | HBM roofline | x bf16 | err |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        base = None
        for name in args.variants:
            spec = VARIANTS[name]
            # enough copies of the layer, called in turn, that their bytes exceed the L2 cache three times
            # over: a decoded model reads each weight once per token, from HBM
            first = make_layer(n, k, spec, act_dtype(name))
            more = -(-3 * cuda_gemv.l2_bytes() // bytes_read(first)) - 1
            copies = [first] + [make_layer(n, k, spec, act_dtype(name)) for _ in range(more)]
            xv = x.to(act_dtype(name))
            turn = itertools.cycle(copies)

            def fn(x, turn=turn):
                layer = next(turn)
                return F.linear(x, layer) if isinstance(layer, torch.Tensor) else layer(x)

            reads = first
            try:
                err = rel_err(first, xv)
                if err is not None and not err < MAX_ERR:
                    raise ValueError(f"output off the dequantized weights' by {err:.1e} (relative)")
                if isinstance(first, ReadOnly):  # the ceiling: the best of a few tiles
                    t = min(time_read(copies, fn, xv, tile, args) for tile in READ_TILES)
                else:
                    t = time_call(fn, xv, args.calls, args.repeats)
            except Exception as e:  # a kernel that fails on this GPU gets a row, not a crash
                print(f"| {shape} | {name} | ERROR {type(e).__name__}: {str(e)[:120]} | | | | |")
                rows.append({"shape": shape, "variant": name, "error": str(e)[:300]})
                continue
            base = t if name == "bf16" else base
            gbs = bytes_read(reads) / t
            row = {
                "shape": shape,
                "variant": name,
                "us": t * 1e6,
                "bytes": bytes_read(reads),
                "GB_s": gbs / 1e9,
                "roofline": gbs / peak,
                "x_bf16": base / t if base else None,
                "err": err,
            }
            rows.append(row)
            ratio = "-" if row["x_bf16"] is None else f"{row['x_bf16']:.2f}"
            print(
                f"| {shape} | {name} | {t * 1e6:.1f} | {gbs / 1e9:.0f} | {gbs / peak:.0%} | {ratio} | "
                f"{'-' if err is None else f'{err:.1e}'} |",
                flush=True,
            )
    out = Path(args.json or f"results/gemv_{gpu_tag(gpu)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tuned = {**triton_gemv.tuned_configs(), **cuda_gemv.tuned_configs()}
    for key, cfg in tuned.items():
        print(f"autotuned {key}: {cfg}")
    info = {"gpu": gpu, "hbm_peak_bytes_s": peak, "torch": torch.__version__, "args": vars(args), "tuned": tuned}
    out.write_text(json.dumps({**info, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
