"""Training-step time of ternary QAT vs fp32 on CUDA: one optimizer step (forward, backward, clipping,
AdamW) on random tokens, eager and torch.compile, the variants taking turns so clock drift hits all alike.
Prints a table and writes results/qat/step_time_<preset>_<gpu>.json.

    python benchmarks/qat_step_time.py --preset small

The QAT ablation itself (training every config, evaluating, exporting) is benchmarks/qat_gpu_runs.sh.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from common import add_output, parser, print_table, result_path, run_seconds, write_result

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
    def run(step: Callable[[], None]) -> None:
        for _ in range(n):
            step()

    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name] += [t / n for t in run_seconds(lambda step=step: run(step), 1, "cuda", warmup=0)]
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
    print(f"{torch.cuda.get_device_name()}, preset {args.preset}, batch {args.batch_size}, bf16 autocast, "
          f"median of {args.rounds} interleaved runs of {args.time_steps} steps")
    table = print_table(rows, [
        ("config", "config", ""),
        ("mode", lambda r: "compile" if r["compile"] else "eager", ""),
        ("step (ms)", "step_ms", ".2f"),
        ("vs fp32", lambda r: f"{r['ratio']:.2f}x", ""),
    ])
    out = Path(args.json) if args.json else result_path("qat", f"step_time_{args.preset}", "cuda")
    info = {"torch": torch.__version__, "preset": args.preset, "batch_size": args.batch_size,
            "rounds": args.rounds, "steps_per_round": args.time_steps, "table": table}
    write_result(out, rows, "cuda", **info)
    print(f"wrote {out}")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--step-configs", nargs="+", default=["weights_only", "all_act8"], choices=QAT_CONFIGS)
    p.add_argument("--time-steps", type=int, default=20, help="steps per timed run")
    p.add_argument("--rounds", type=int, default=10, help="timed runs per variant")
    add_output(p, where="results/qat/step_time_<preset>_<gpu>.json")
    step_time_only(p.parse_args())


if __name__ == "__main__":
    main()
