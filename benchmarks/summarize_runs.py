"""Evaluate finished training runs side by side: best and final checkpoints on the whole validation
split, mean step time from metrics.jsonl, file size; QAT runs are also exported to packed ternary
weights and evaluated again. Prints a Markdown table and writes JSON.

    python benchmarks/summarize_runs.py runs/qat/shakespeare/{fp32,...} --out results/qat_shakespeare_tail.json

The first run is the baseline the others are compared with.
"""

import argparse
import json
import statistics
from pathlib import Path

from nanogptq.checkpoint import read_meta
from nanogptq.evaluate import evaluate_checkpoint
from nanogptq.quant.qat import export_checkpoint


def step_time(run: Path) -> float | None:
    """Median seconds per optimizer step, from the tokens/s logged at each evaluation (first skipped)."""
    train = read_meta(run / "last")["train"]
    block = read_meta(run / "last")["model"]["block_size"]
    tokens = train["batch_size"] * train["grad_accum"] * block
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = [tokens / r["tokens_per_s"] for r in records[1:] if r.get("tokens_per_s")]
    return statistics.median(times) if times else None


def summarize(run: Path, data_dir: str | None, device: str) -> dict:
    meta = read_meta(run / "last")
    row = {"run": run.name, "qat_config": meta["train"].get("qat_config"),
           "steps": meta["metrics"]["step"], "lr": meta["train"]["lr"], "schedule": meta["train"]["lr_schedule"],
           "step_time_s": step_time(run)}
    for which in ("best", "last"):
        row[which] = evaluate_checkpoint(run / which, data_dir, device, progress=False)
    row["size_bytes"] = row["best"]["size_bytes"]
    if meta.get("qat"):
        exported = export_checkpoint(run / "best", run / "ternary")
        row["exported"] = evaluate_checkpoint(exported, data_dir, device, progress=False)
        row["size_bytes"] = row["exported"]["size_bytes"]
    return row


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| run | steps | lr, schedule | best val loss | best ppl | final ppl | exported ppl | vs baseline "
             "(best) | step time vs baseline | file size |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{r['step_time_s'] / base['step_time_s']:.2f}x"
                 if r["step_time_s"] and base["step_time_s"] else "n/a")
        exported = f"{r['exported']['val_ppl']:.3f}" if "exported" in r else "-"
        change = 100 * (r["best"]["val_ppl"] / base["best"]["val_ppl"] - 1)
        lines.append(f"| {r['run']} | {r['steps']} | {r['lr']:g}, {r['schedule']} | {r['best']['val_loss']:.4f} "
                     f"| {r['best']['val_ppl']:.3f} | {r['last']['val_ppl']:.3f} | {exported} | {change:+.1f}% "
                     f"| {ratio} | {r['size_bytes'] / 1e6:.2f} MB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    rows = [summarize(Path(r), args.data_dir, args.device) for r in args.runs]
    text = table(rows)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "table": text}, indent=2))


if __name__ == "__main__":
    main()
