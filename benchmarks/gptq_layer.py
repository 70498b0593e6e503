"""Time GPTQ on one layer: Hessian accumulation + gptq_quantize_weight, and RTN for reference.

    python benchmarks/gptq_layer.py                       # 4096x4096, 262,144 rows on CUDA (16,384 on CPU)
    python benchmarks/gptq_layer.py --device cpu --rows 262144 --size 4096

Prints a table and writes results/ptq/gptq_layer_<device>.json (the best and the median of --repeats runs).
Inputs are random with correlated features; they are
made on the device in chunks of --chunk rows (as forward hooks would deliver them), and that generation is
not timed.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from common import add_device, add_output, device_name, parser, print_table, result_path, sync, write_result

from nanogptq.quant.config import QuantConfig
from nanogptq.quant.gptq import HessianAccumulator, gptq_quantize_weight
from nanogptq.quant.rtn import rtn_quantize_weight


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--size", type=int, default=4096, help="in = out features")
    p.add_argument("--out-features", type=int, default=None, help="default: --size")
    p.add_argument(
        "--rows", type=int, default=None, help="calibration rows (default 262144 on CUDA, 16384 on CPU)"
    )
    p.add_argument("--chunk", type=int, default=16384, help="rows per Hessian update")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true")
    add_device(p)
    p.add_argument("--no-tf32", action="store_true", help="full fp32 matmuls on CUDA")
    p.add_argument("--repeats", type=int, default=3)
    add_output(p, where="results/ptq/gptq_layer_<device>.json")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32  # TF32 for the Hessian and GPTQ matmuls
    rows = args.rows or (262_144 if device.type == "cuda" else 16_384)
    n, out = args.size, args.out_features or args.size
    cfg = QuantConfig(method="gptq", bits=args.bits, group_size=args.group_size, act_order=args.act_order)
    g = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(out, n, device=device, generator=g) * 0.02
    mix = torch.randn(n, n, device=device, generator=g) / n**0.5  # correlated input features
    chunks = [
        torch.randn(min(args.chunk, rows - i), n, device=device, generator=g) @ mix
        for i in range(0, rows, args.chunk)
    ]

    results = []
    for rep in range(args.repeats + 1):  # the first run warms up kernels and allocator
        sync(device)
        t0 = time.perf_counter()
        acc = HessianAccumulator(n, device)
        for x in chunks:
            acc.add(x)
        sync(device)
        t1 = time.perf_counter()
        qw = gptq_quantize_weight(W, acc.H, cfg)
        sync(device)
        t2 = time.perf_counter()
        rtn_quantize_weight(W, cfg)
        sync(device)
        t3 = time.perf_counter()
        if rep:
            results.append({"hessian_s": t1 - t0, "gptq_s": t2 - t1, "total_s": t2 - t0, "rtn_s": t3 - t2})

    best = {k: min(r[k] for r in results) for k in results[0]}
    median = {k: statistics.median(r[k] for r in results) for k in results[0]}
    H = acc.H
    dW = qw.dequantize() - W
    rel = ((dW @ H) * dW).sum().item() / ((W @ H) * W).sum().item()
    info = {
        "size": [out, n],
        "calibration_rows": rows,
        "bits": args.bits,
        "group_size": args.group_size,
        "act_order": args.act_order,
        "tf32": device.type == "cuda" and not args.no_tf32,
        "threads": torch.get_num_threads(),
        "best": best,
        "median": median,
        "rel_error": rel,
    }
    print(f"GPTQ layer {out}x{n}, {rows:,} rows, {args.bits} bits, group {args.group_size}, on {device_name(device)}")
    parts = ("hessian_s", "gptq_s", "total_s", "rtn_s")
    steps = [{"step": k[:-2], "best": best[k], "median": median[k]} for k in parts]
    print_table(steps, [("step", "step", ""), ("best s", "best", ".3f"), ("median s", "median", ".3f")])
    print(f"relative output error ||(W-Q)X||^2/||WX||^2 = {rel:.4g}")
    path = Path(args.json) if args.json else result_path("ptq", "gptq_layer", device)
    write_result(path, results, device, **info)
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
