"""Training throughput (tokens/s) of the presets on this machine's CPU and, if present, its GPU.

Times full optimizer steps (forward, backward, AdamW) on random tokens after warm-up; the data
pipeline is not in the loop. Prints a table and writes results/train/throughput_<gpu or cpu>.json.

    python benchmarks/train_throughput.py [--presets tiny small shakespeare] [--steps 20]
    python benchmarks/train_throughput.py --presets tiny --cpu-batch 24 --cpu-compile --dropout 0 0.1
"""

import itertools
from pathlib import Path

import torch
from common import add_output, default_device, device_name, parser, print_table, result_path, run_seconds, write_result

from nanogptq.model import GPT, preset_config
from nanogptq.train import TrainConfig, make_optimizer


def tokens_per_s(preset: str, device: str, batch: int, steps: int, compile_model: bool, dropout: float | None) -> float:
    torch.manual_seed(0)
    overrides = {} if dropout is None else {"dropout": dropout}
    model = GPT(preset_config(preset, vocab_size=65, **overrides)).to(device)
    opt = make_optimizer(model, TrainConfig(), fused=device == "cuda")
    step_model = torch.compile(model) if compile_model else model
    block = model.config.block_size
    x = torch.randint(0, 65, (batch, block), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            _, loss = step_model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5 if compile_model else 3):  # warm-up (and compilation)
        step()

    def run():
        for _ in range(steps):
            step()

    return batch * block * steps / run_seconds(run, 1, device, warmup=0)[0]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--presets", nargs="+", default=["tiny", "small", "shakespeare"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cpu-batch", type=int, default=16)
    p.add_argument("--gpu-batch", type=int, default=64)
    p.add_argument("--cpu-compile", action="store_true", help="time torch.compile on the CPU too")
    p.add_argument("--dropout", type=float, nargs="+", default=[None], help="default: the preset's")
    add_output(p, flag="--out", where="results/train/throughput_<gpu or cpu>.json")
    args = p.parse_args()
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for preset in args.presets:
            batch = args.gpu_batch if device == "cuda" else args.cpu_batch
            modes = [False, True] if device == "cuda" or args.cpu_compile else [False]
            for dropout, compiled in itertools.product(args.dropout, modes):
                steps = args.steps if device == "cuda" else max(3, args.steps // 4)
                tok_s = tokens_per_s(preset, device, batch, steps, compiled, dropout)
                rows.append({"device": device_name(device), "preset": preset, "batch": batch, "dropout": dropout,
                             "compile": compiled, "tokens_per_s": round(tok_s)})
                print(f"{device} {preset} batch {batch} dropout {dropout} compile {compiled}: {tok_s:,.0f} tokens/s",
                      flush=True)
    print_table(rows, [
        ("device", "device", ""),
        ("preset", "preset", ""),
        ("batch", "batch", ""),
        ("dropout", "dropout", ""),
        ("compile", "compile", ""),
        ("tokens/s", "tokens_per_s", ","),
    ])
    out = Path(args.out) if args.out else result_path("train", "throughput", default_device())
    write_result(out, rows, default_device(), torch=torch.__version__)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
