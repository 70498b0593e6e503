"""GPTQ on a GPT-2-XL-shaped model, end to end on one GPU: wall time and peak GPU memory.

    python benchmarks/gptq_scale.py                  # 48 layers x 1600 wide, 25 heads, vocab 50,257, context 1,024
    python benchmarks/gptq_scale.py --device cpu --layers 2 --width 256 --heads 4 --vocab 1000 --context 128 \\
        --windows 8                                  # the same code path, small enough for a CPU

The model is GPT-2-XL's shape (1.56 B parameters, biases, tanh GELU) with random weights (GPT-2's
initialisation), and the 128 calibration windows of 1,024 tokens are random token ids: GPTQ's time and memory
do not depend on the values. It is built in fp32 on the CPU, as `nanogptq quantize` loads a checkpoint, and
quant.quantize runs with device=GPU: each block visits the GPU for its turn (its four linears quantized in
order, each from a calibration pass that stops at it, --batch-size windows at a time), then goes back to the
CPU quantized; the GPU holds the calibration activations (fp32), one block and one Hessian (fp32), never the
whole model. Calibration forwards run under autocast in --calib-dtype (fp16 by default on the GPU, as the
reference GPTQ runs its models), GPTQ itself in fp32 (TF32 matmuls only with --tf32).

Timed: from embedding the calibration windows to the last block back on the CPU (building the random model and
its windows is not). Peak memory: torch.cuda.max_memory_allocated over that span, against the fp16 weights
(2 bytes per parameter, the tied table counted once). Writes results/ptq/gptq_scale_<device>.json.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_device, add_output, device_name, parser, result_path, sync, write_result

from nanogptq.model import GPT, GPTConfig
from nanogptq.quant.config import QuantConfig
from nanogptq.quant.quantize import quantize

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
TIME_BOUND_S = 60.0  # the issue's figures: <= 60 s, and <= 2x the fp16 weights' bytes
MEMORY_BOUND = 2.0


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--heads", type=int, default=25)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--context", type=int, default=1024, help="block_size, and the calibration windows' length")
    p.add_argument("--windows", type=int, default=128, help="calibration windows")
    p.add_argument("--batch-size", type=int, default=16, help="windows per calibration forward")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=True,
                   help="act-order groups fixed before the permutation (exportable, no g_idx)")
    p.add_argument("--calib-dtype", choices=sorted(DTYPES), default=None,
                   help="calibration forwards' autocast dtype (default: fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls (Hessians, GPTQ's updates) on CUDA")
    add_device(p)
    add_output(p, where="results/ptq/gptq_scale_<device>.json")
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    calib_name = args.calib_dtype or ("fp16" if cuda else "fp32")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.context, n_layer=args.layers, n_head=args.heads,
                    n_embd=args.width, bias=True, activation="gelu_tanh")
    qcfg = QuantConfig(method="gptq", bits=args.bits, group_size=args.group_size, act_order=args.act_order,
                       static_groups=args.static_groups and args.act_order, calib_samples=args.windows)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = GPT(cfg).eval()  # fp32, on the CPU
    params = sum(t.numel() for t in model.parameters())  # the tied table once
    # random ids, enough for `windows` windows (calibration_windows draws seeded random starts in them)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.windows * args.context * 2,), generator=gen)
    print(f"{params / 1e9:.3f} B parameters, built in {time.perf_counter() - t0:.0f} s; quantizing on "
          f"{device_name(device)}", flush=True)

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    quantize(model, qcfg, tokens, progress=False, batch_size=args.batch_size, device=device,
             calib_dtype=DTYPES[calib_name])
    sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    fp16_bytes = 2 * params
    solve = sum(r["time_s"] for r in model.quant_log)  # GPTQ proper, per layer: grids, solve, error
    result = {
        "wall_s": wall,
        "gptq_solve_s": solve,
        "calibration_and_transfer_s": wall - solve,
        "peak_gpu_bytes": peak,
        "fp16_weight_bytes": fp16_bytes,
        "peak_over_fp16_weights": None if peak is None else peak / fp16_bytes,
        "meets_time_bound": wall <= TIME_BOUND_S if cuda else None,
        "meets_memory_bound": None if peak is None else peak <= MEMORY_BOUND * fp16_bytes,
    }
    print(f"wall {wall:.1f} s (GPTQ solves {solve:.1f} s, the rest {wall - solve:.1f} s)", flush=True)
    if peak is not None:
        print(f"peak GPU memory {peak / 1e9:.2f} GB = {peak / fp16_bytes:.2f} x the fp16 weights "
              f"({fp16_bytes / 1e9:.2f} GB)", flush=True)
    out = args.json or result_path("ptq", "gptq_scale", device)
    write_result(out, None, device, model=cfg.to_dict(), parameters=params, quant_config=qcfg.to_dict(),
                 calibration={"windows": args.windows, "tokens_per_window": args.context,
                              "token_ids": "random (uniform over the vocabulary)", "batch_size": args.batch_size,
                              "forward_dtype": calib_name, "hessian_dtype": "fp32"},
                 weights="random (GPT-2 initialisation), fp32, held on the CPU", tf32=args.tf32,
                 torch=torch.__version__, threads=torch.get_num_threads(), **result,
                 slowest_layers=sorted(model.quant_log, key=lambda r: -r["time_s"])[:5])
    print("wrote", out)


if __name__ == "__main__":
    main()
