"""Training-step time of ternary QAT vs fp32 on CUDA: one optimizer step (forward, backward, clipping,
AdamW) on random tokens, eager and torch.compile, the variants taking turns so clock drift hits all alike.
Prints a table and writes results/qat_step_time_<preset>.json.

    python benchmarks/qat_step_time.py --preset small

The QAT ablation itself (training every config, evaluating, exporting) is benchmarks/qat_gpu_runs.sh.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nanogptq.model import GPT, preset_config
from nanogptq.quant.qat import apply_qat, load_qat_config
from nanogptq.train import TrainConfig, make_optimizer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "qat"
QAT_CONFIGS = ("weights_only", "weights_attn_act", "all_act8", "extreme")


def make_step(preset: str, qat: str | None, compile_model: bool, batch: int) -> Callable[[], None]:
    """One optimizer step (forward, backward, clipping, AdamW) on random tokens, as train.py runs it."""
    torch.manual_seed(0)
    model = GPT(preset_config(preset, vocab_size=65))
    if qat is not None:
        apply_qat(model, load_qat_config(CONFIG_DIR / f"{qat}.json"))
    model.cuda()
    opt = make_optimizer(model, TrainConfig(), fused=True)
    step_model = torch.compile(model) if compile_model else model
    x = torch.randint(0, 65, (batch, model.config.block_size), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = step_model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(10):  # warm-up (and compilation)
        step()
    return step


def time_steps(steps: dict[str, Callable[[], None]], n: int, rounds: int) -> dict[str, float]:
    """Median seconds per step of each variant; variants take turns, so drift hits them all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(t) for name, t in times.items()}


def step_time_only(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs CUDA")
    rows = []
    for compile_model in (False, True):
        names = ["fp32", *args.step_configs]
        steps = {}
        for name in names:
            qat = None if name == "fp32" else name
            steps[name] = make_step(args.preset, qat, compile_model, args.batch_size)
        times = time_steps(steps, args.time_steps, args.rounds)
        for name in names:
            rows.append({"config": name, "compile": compile_model, "step_ms": 1000 * times[name],
                         "ratio": times[name] / times["fp32"]})
    lines = ["| config | mode | step (ms) | vs fp32 |", "|---|---|---|---|"]
    for r in rows:
        mode = "compile" if r["compile"] else "eager"
        lines.append(f"| {r['config']} | {mode} | {r['step_ms']:.2f} | {r['ratio']:.2f}x |")
    table = "\n".join(lines)
    print(f"{torch.cuda.get_device_name()}, preset {args.preset}, batch {args.batch_size}, bf16 autocast, "
          f"median of {args.rounds} interleaved runs of {args.time_steps} steps")
    print(table)
    out = Path(args.results) / f"qat_step_time_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset,
            "batch_size": args.batch_size, "rounds": args.rounds, "steps_per_round": args.time_steps}
    out.write_text(json.dumps({**info, "rows": rows, "table": table}, indent=2))
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--results", default="results")
    p.add_argument("--step-configs", nargs="+", default=["weights_only", "all_act8"], choices=QAT_CONFIGS)
    p.add_argument("--time-steps", type=int, default=20, help="steps per timed run")
    p.add_argument("--rounds", type=int, default=10, help="timed runs per variant")
    step_time_only(p.parse_args())


if __name__ == "__main__":
    main()
