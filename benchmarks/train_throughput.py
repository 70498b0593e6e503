"""Training throughput (tokens/s) of the presets on this machine's CPU and, if present, its GPU.

Times full optimizer steps (forward, backward, AdamW) on random tokens after warm-up; the data
pipeline is not in the loop. Prints a table and writes results/train_throughput.json.

    python benchmarks/train_throughput.py [--presets tiny small shakespeare] [--steps 20]
    python benchmarks/train_throughput.py --presets tiny --cpu-batch 24 --cpu-compile --dropout 0 0.1
"""

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from nanogptq.model import GPT, preset_config
from nanogptq.train import TrainConfig, make_optimizer


def time_steps(preset: str, device: str, batch: int, steps: int, compile_model: bool, dropout: float | None) -> float:
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

    for _ in range(5 if compile_model else 3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * block * steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "shakespeare"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu-batch", type=int, default=16)
    parser.add_argument("--gpu-batch", type=int, default=64)
    parser.add_argument("--cpu-compile", action="store_true", help="time torch.compile on the CPU too")
    parser.add_argument("--dropout", type=float, nargs="+", default=[None], help="default: the preset's")
    parser.add_argument("--out", default="results/train_throughput.json")
    args = parser.parse_args()
    rows = []
    print("| device | preset | batch | dropout | compile | tokens/s |\n|---|---|---|---|---|---|")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for preset in args.presets:
            batch = args.gpu_batch if device == "cuda" else args.cpu_batch
            modes = [False, True] if device == "cuda" or args.cpu_compile else [False]
            for dropout, compiled in itertools.product(args.dropout, modes):
                steps = args.steps if device == "cuda" else max(3, args.steps // 4)
                tok_s = time_steps(preset, device, batch, steps, compiled, dropout)
                name = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}"
                rows.append({"device": name, "preset": preset, "batch": batch, "dropout": dropout,
                             "compile": compiled, "tokens_per_s": round(tok_s)})
                print(f"| {name} | {preset} | {batch} | {dropout} | {compiled} | {tok_s:,.0f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
