"""Ternary QAT ablation: a float baseline and each configs/qat/*.json, trained alike, then measured.

For each variant: train (nanogptq.train), evaluate the final and best checkpoints on the whole
validation split, export QAT runs to packed ternary weights and evaluate those, read the mean training
step time from metrics.jsonl. Prints a Markdown table and writes results/qat_<dataset>.json.

    python benchmarks/qat_ablation.py --dataset shakespeare --preset small --steps 2000
    python benchmarks/qat_ablation.py --step-time-only          # CUDA: fp32 vs BitLinear step time

Step times from metrics.jsonl are the single step before each evaluation (the first, which holds
compilation, is skipped when there are others), so they are rough; --step-time-only times many steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nanogptq.evaluate import evaluate_checkpoint
from nanogptq.model import GPT, preset_config
from nanogptq.quant.qat import apply_qat, export_checkpoint, load_qat_config, load_ternary_checkpoint
from nanogptq.train import TrainConfig, make_optimizer, train

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "qat"
QAT_CONFIGS = ("weights_only", "weights_attn_act", "all_act8", "extreme")


def mean_step_time(run: Path, tokens_per_step: int) -> float | None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [tokens_per_step / r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    if len(times) > 1:
        times = times[1:]  # the first holds warm-up (and compilation)
    return statistics.mean(times) if times else None


def run_variant(name: str, args: argparse.Namespace) -> dict:
    run = Path(args.out_dir) / args.dataset / name
    qat = None if name == "fp32" else str(CONFIG_DIR / f"{name}.json")
    cfg = TrainConfig(
        out_dir=str(run), dataset=args.dataset, tokenizer=args.tokenizer, data_dir=args.data_dir,
        preset=args.preset, batch_size=args.batch_size, max_steps=args.steps, lr=args.lr,
        min_lr=args.lr / 10, warmup_steps=min(100, args.steps // 10),
        lr_schedule="cosine" if qat is None else args.qat_schedule,
        eval_interval=max(1, args.steps // args.evals), eval_batches=args.eval_batches,
        device=args.device, compile=args.compile, qat_config=qat, progress=not args.quiet, seed=args.seed,
    )
    if run.exists():
        raise SystemExit(f"{run} exists: remove it or pick another --out-dir")
    t0 = time.time()
    train(cfg)
    row: dict = {"config": name, "train_s": round(time.time() - t0, 1)}
    block = preset_config(args.preset, vocab_size=1).block_size
    row["step_time_s"] = mean_step_time(run, args.batch_size * block)
    for which in ("last", "best"):
        row[which] = evaluate_checkpoint(run / which, args.data_dir, args.device, save=True,
                                         progress=not args.quiet)
    row["size_bytes"] = row["best"]["size_bytes"]
    if qat is not None:
        exported = export_checkpoint(run / "best", run / "ternary")
        ckpt = load_ternary_checkpoint(exported, args.device)
        row["exported"] = evaluate_checkpoint(ckpt, args.data_dir, args.device, save=True,
                                              progress=not args.quiet)
        row["latent_size_bytes"] = row["size_bytes"]
        row["size_bytes"] = row["exported"]["size_bytes"]
    return row


def markdown(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| config | val loss (best) | ppl (best) | ppl (final) | ppl (exported) | vs fp32 | step time "
        "| size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best, ppl = r["best"], r["best"]["val_ppl"]
        ratio = (f"{r['step_time_s'] / base['step_time_s']:.2f}x"
                 if r["step_time_s"] and base["step_time_s"] else "n/a")
        exported = f"{r['exported']['val_ppl']:.3f}" if "exported" in r else "-"
        lines.append(
            f"| {r['config']} | {best['val_loss']:.4f} | {ppl:.3f} | {r['last']['val_ppl']:.3f} | {exported} "
            f"| {100 * (ppl / base['best']['val_ppl'] - 1):+.1f}% | {ratio} "
            f"| {r['size_bytes'] / 1024:.0f} KiB |"
        )
    return "\n".join(lines)


def ablation(args: argparse.Namespace) -> None:
    rows = [run_variant(name, args) for name in ["fp32", *args.configs]]
    table = markdown(rows)
    print(table)
    out = Path(args.results) / f"qat_{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "table": table}, indent=2))
    print(f"wrote {out}")


# ---------------------------------------------------------------------------------------------------
# --step-time-only


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
        raise SystemExit("--step-time-only needs CUDA")
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
    p.add_argument("--dataset", default="shakespeare", help="shakespeare or tinystories")
    p.add_argument("--tokenizer", default=None, help="char or bpe (default: char for shakespeare, else bpe)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--qat-schedule", default="bitnet", choices=["bitnet", "cosine"])
    p.add_argument("--evals", type=int, default=10, help="evaluations (and step-time samples) per run")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--configs", nargs="+", default=list(QAT_CONFIGS), choices=QAT_CONFIGS)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training (default: on with CUDA; eager BitLinear is launch-bound)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out-dir", default="runs/qat_ablation")
    p.add_argument("--results", default="results")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--step-time-only", action="store_true")
    p.add_argument("--step-configs", nargs="+", default=["weights_only", "all_act8"], choices=QAT_CONFIGS)
    p.add_argument("--time-steps", type=int, default=20, help="--step-time-only: steps per timed run")
    p.add_argument("--rounds", type=int, default=10, help="--step-time-only: timed runs per variant")
    args = p.parse_args()
    if args.tokenizer is None:
        args.tokenizer = "char" if args.dataset == "shakespeare" else "bpe"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    step_time_only(args) if args.step_time_only else ablation(args)


if __name__ == "__main__":
    main()
