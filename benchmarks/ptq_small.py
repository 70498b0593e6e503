"""The quantization figures of a trained model: RTN, GPTQ with act-order, the default setting (`quality`) and
--target-bpw budgets, on the whole validation split, against the issue's targets; and the Pareto plot.

    python benchmarks/ptq_small.py runs/small-shakespeare/best --device cuda     # one checkpoint -> its JSON
    python benchmarks/ptq_small.py --plot results/ptq/small_*_h100.json --qat runs/qat/ternary ...

Per checkpoint: RTN at 2, 3, 4 bits (groups of 64) and 8 (per channel); GPTQ with act-order alone and the
default setting at the same widths, each with every calibration seed (--seeds; 8 bits: the first); the default with
--target-bpw at each budget (--budgets; one calibration seed, --budget-seed: the per-layer measurement is
made once and each budget planned from it). Writes results/ptq/small_<run>_<device>.json (compare's rows with
the stored bits per weight, embedding included, and the summary: mean change per setting and width, whether
the default is never worse than act-order, the best variant under each target's bits per weight) and prints
the table; compare's own files stay in the checkpoints' folder (--ckpt-dir).

`--plot FILES` draws one Pareto plot (perplexity change against stored bits per weight, one panel per file)
with RTN, GPTQ act-order, the default, the budgets and each --qat checkpoint's (evaluated against its own
file's fp32 baseline when the data match) into results/ptq/pareto_<device>.png, and prints a markdown summary.
`--quick` (a smoke test on the CPU): bits 3 and 8, one seed, budgets 2.5 and 4 unless --budgets says.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from common import add_device, parser, result_path, write_result
from matplotlib.figure import Figure

from nanogptq.checkpoint import checkpoint_data, load_checkpoint, read_meta
from nanogptq.evaluate import compare, markdown_table
from nanogptq.pipeline import quantize_checkpoint
from nanogptq.quant import budget
from nanogptq.quant.config import QuantConfig

TARGETS = ((2.5, 2.0), (3.0, 0.75), (4.3, 0.1))  # (bits per weight at most, perplexity change at most, %)


def variants(bits_list, seeds, group) -> dict[str, tuple[str, QuantConfig]]:
    out = {}
    for bits in bits_list:
        g = -1 if bits == 8 else group
        out[f"rtn-{bits}b"] = ("rtn", QuantConfig(method="rtn", bits=bits, group_size=g))
        for seed in seeds[:1] if bits == 8 else seeds:  # 8 bits: within noise of fp32, one seed says it
            out[f"act-order-{bits}b-seed{seed}"] = ("act-order", QuantConfig(
                method="gptq", bits=bits, group_size=g, act_order=True, calib_seed=seed))
            out[f"default-{bits}b-seed{seed}"] = ("default", QuantConfig.preset(
                "quality", bits=bits, group_size=g, calib_seed=seed))
    return out


def evaluate_checkpoint(args) -> None:
    run = Path(args.ckpt).resolve().parent.name.replace("-", "_")
    out = result_path("ptq", f"small_{run}", args.device)
    ckpt_dir = Path(args.ckpt_dir or Path("runs/ptq_small") / run)
    todo = variants(args.bits, args.seeds, args.group_size)
    paths, labels = [args.ckpt], [("fp32", 32)]
    for name, (setting, cfg) in todo.items():
        dest = ckpt_dir / name
        if not (dest / "config.json").exists():  # resumable
            quantize_checkpoint(args.ckpt, dest, cfg, data_dir=args.data_dir, device=args.device, progress=False)
        paths.append(str(dest))
        labels.append((setting, cfg.bits))
        print(f"quantized {name}", flush=True)
    pending = [b for b in args.budgets if not (ckpt_dir / f"budget-{b:g}" / "config.json").exists()]
    if pending:  # the per-layer errors measured once, every budget planned from them
        ckpt = load_checkpoint(args.ckpt, device=args.device)
        base = QuantConfig.preset("quality", calib_seed=args.budget_seed)
        table = budget.measure(ckpt.model, base, checkpoint_data(ckpt, args.data_dir).train, progress=False)
        weights, fixed = budget.budget_weights(ckpt.model, base), budget.embedding_bytes(ckpt.model)
        for b in pending:
            try:
                plan, _, _ = budget.choose(table, weights, fixed, b)
            except ValueError as e:  # below what this model's smallest plan stores (a large embedding, say)
                print(f"budget {b:g} skipped: {e}", flush=True)
                continue
            cfg = dataclasses.replace(base, target_bpw=b, plan=plan, quantize_embeddings=True, static_groups=True)
            quantize_checkpoint(args.ckpt, ckpt_dir / f"budget-{b:g}", cfg, data_dir=args.data_dir,
                                device=args.device, progress=False)
            print(f"quantized budget-{b:g}", flush=True)
    for b in args.budgets:
        if (ckpt_dir / f"budget-{b:g}" / "config.json").exists():
            paths.append(str(ckpt_dir / f"budget-{b:g}"))
            labels.append(("budget", b))
    # compare's own table, JSON and plot stay beside the checkpoints; results/ gets the one file behind the figures
    rows = compare(paths, ckpt_dir, data_dir=args.data_dir, device=args.device, name="compare", progress=False)
    for row, (setting, bits) in zip(rows, labels, strict=True):
        meta = read_meta(row["path"])
        row.update(setting=setting, width=bits, stored_bpw=meta.get("bits_per_weight", row["bits_per_weight"]))
    write_result(out, rows, args.device, summary=summarize(rows))
    print(markdown_table(rows))
    print(summary_markdown(summarize(rows)))


def summarize(rows: list[dict]) -> dict:
    means = {}
    for r in rows[1:]:
        means.setdefault(f"{r['setting']} {r['width']:g}", []).append(r["ppl_change_pct"])
    means = {k: statistics.fmean(v) for k, v in means.items()}
    never_worse = {f"{bits}": means[f"default {bits}"] <= means[f"act-order {bits}"]
                   for bits in sorted({r["width"] for r in rows if r["setting"] == "default"})}
    targets = []
    for bpw, limit in TARGETS:
        under = [r for r in rows[1:] if r["stored_bpw"] <= bpw]
        best = min(under, key=lambda r: r["ppl_change_pct"], default=None)
        targets.append({"bpw_at_most": bpw, "change_at_most_pct": limit,
                        "best": None if best is None else best["variant"],
                        "best_change_pct": None if best is None else best["ppl_change_pct"],
                        "met": best is not None and best["ppl_change_pct"] <= limit})
    return {"mean_change_pct": means, "default_never_worse": never_worse, "targets": targets}


def summary_markdown(s: dict) -> str:
    lines = ["| setting and width | mean perplexity change |", "|---|---|"]
    lines += [f"| {k} | {v:+.2f}% |" for k, v in s["mean_change_pct"].items()]
    lines += ["", "default never worse than act-order (mean over seeds): " + ", ".join(
        f"{b} bits {'yes' if ok else 'NO'}" for b, ok in s["default_never_worse"].items()), ""]
    for t in s["targets"]:
        got = "none" if t["best"] is None else f"{t['best']} {t['best_change_pct']:+.2f}%"
        lines.append(f"- at <= {t['bpw_at_most']} bits/weight, within {t['change_at_most_pct']}%: {got} "
                     f"({'met' if t['met'] else 'NOT met'})")
    return "\n".join(lines) + "\n"


def pareto(args) -> None:
    files = [json.loads(Path(f).read_text()) for f in args.plot]
    qat_rows = []
    if args.qat:  # each ternary checkpoint against the first file whose fp32 baseline has its data
        for q in args.qat:
            for f in files:
                try:
                    qat_rows.append((f, compare([f["rows"][0]["path"], q], Path(q).parent,
                                                data_dir=args.data_dir, device=args.device, name="qat_tmp",
                                                progress=False)[1]))
                    break
                except ValueError:
                    continue
    fig = Figure(figsize=(6 * len(files), 4.5))
    axes = fig.subplots(1, len(files), squeeze=False)[0]
    for ax, f, name in zip(axes, files, args.plot, strict=True):
        rows = f["rows"][1:]
        for setting, style in (("rtn", "s-"), ("act-order", "o-"), ("default", "o-"), ("budget", "^-")):
            by_width = {}
            for r in rows:
                if r["setting"] == setting:
                    by_width.setdefault(r["width"], []).append(r)
            pts = sorted((statistics.fmean(r["stored_bpw"] for r in rs),
                          statistics.fmean(r["ppl_change_pct"] for r in rs)) for rs in by_width.values())
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=setting)
        for f2, r in qat_rows:
            if f2 is f:
                ax.plot([r["bits_per_weight"]], [r["ppl_change_pct"]], "*", ms=12, label=f"ternary QAT {r['variant']}")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_title(Path(name).stem, fontsize=9)
        ax.set_xlabel("bits per weight as stored (embedding counted)")
        ax.set_ylabel("perplexity change vs fp32, %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = result_path("ptq", "pareto", args.device, suffix=".png")
    fig.savefig(out, dpi=120)
    md = "\n".join(f"## {Path(n).stem}\n\n{summary_markdown(f['summary'])}" for f, n in zip(files, args.plot,
                                                                                          strict=True))
    print(md)
    print("wrote", out)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("ckpt", nargs="?", help="the fp32 checkpoint (the baseline)")
    p.add_argument("--plot", nargs="+", default=None, help="result files to draw (instead of evaluating)")
    p.add_argument("--qat", nargs="+", default=None, help="packed ternary checkpoints for the plot")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds")
    p.add_argument("--budgets", type=float, nargs="+", default=None,
                   help="bits per weight (default: 2.25 2.5 3.0 3.5 4.0 4.3 4.5)")
    p.add_argument("--budget-seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quick", action="store_true", help="bits 3 and 8, one seed, budgets 2.5 and 4")
    add_device(p)
    args = p.parse_args()
    if args.quick:
        args.bits, args.seeds = [3, 8], [0]
    args.budgets = args.budgets or ([2.5, 4.0] if args.quick else [2.25, 2.5, 3.0, 3.5, 4.0, 4.3, 4.5])
    if args.plot:
        pareto(args)
    elif args.ckpt:
        evaluate_checkpoint(args)
    else:
        p.error("name a checkpoint, or --plot result files")


if __name__ == "__main__":
    main()
