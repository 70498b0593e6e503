"""Evaluate finished training runs side by side: best and final checkpoints on the whole validation
split, median step time from metrics.jsonl, file size; QAT runs are also exported to packed ternary
weights and evaluated again. Prints a Markdown table and writes JSON (the rows, the table, the command,
commit and device; benchmarks/qat_gpu_runs.sh records its own command line beside it as "run_by").

    python benchmarks/summarize_runs.py runs/qat/shakespeare/{fp32,...} --device cuda \
        --out results/qat/ablation_shakespeare_h100.json

The first run is the baseline the others are compared with.
"""

import json
import statistics
from pathlib import Path

from common import add_device, parser, table, write_result

from nanogptq.checkpoint import read_meta
from nanogptq.evaluate import evaluate_checkpoint
from nanogptq.pipeline import pack_checkpoint


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
        exported = pack_checkpoint(run / "best", run / "ternary")
        row["exported"] = evaluate_checkpoint(exported, data_dir, device, progress=False)
        row["size_bytes"] = row["exported"]["size_bytes"]
    return row


def summary_table(rows: list[dict]) -> str:
    base = rows[0]

    def step_ratio(r: dict) -> str:
        if not (r["step_time_s"] and base["step_time_s"]):
            return "n/a"
        return f"{r['step_time_s'] / base['step_time_s']:.2f}x"

    return table(rows, [
        ("run", "run", ""),
        ("steps", "steps", ""),
        ("lr, schedule", lambda r: f"{r['lr']:g}, {r['schedule']}", ""),
        ("best val loss", lambda r: r["best"]["val_loss"], ".4f"),
        ("best ppl", lambda r: r["best"]["val_ppl"], ".3f"),
        ("final ppl", lambda r: r["last"]["val_ppl"], ".3f"),
        ("exported ppl", lambda r: r["exported"]["val_ppl"] if "exported" in r else None, ".3f"),
        ("vs baseline (best)", lambda r: f"{100 * (r['best']['val_ppl'] / base['best']['val_ppl'] - 1):+.1f}%", ""),
        ("step time vs baseline", step_ratio, ""),
        ("file size", lambda r: f"{r['size_bytes'] / 1e6:.2f} MB", ""),
    ]) + "\n"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--data-dir", default=None)
    add_device(p, default="cpu")
    args = p.parse_args()
    rows = [summarize(Path(r), args.data_dir, args.device) for r in args.runs]
    text = summary_table(rows)
    print(text)
    write_result(args.out, rows, args.device, table=text)


if __name__ == "__main__":
    main()
