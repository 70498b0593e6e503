"""The default GPTQ setting (the `quality` preset: act-order, clipping search and rotation per layer where
they lower its output error, the fallback to act-order alone by held-out calibration loss, then the block
tuning) against plain
GPTQ with act-order, as a mean over calibration seeds: at each bit
width, both settings quantize the same fp32 checkpoint with each calibration seed, and every variant is
evaluated (perplexity, KL divergence and top-1 agreement with the fp32 model, a bootstrap band) on the
same whole validation split.

    PYTHONPATH=. python benchmarks/ptq_defaults.py runs/tiny-shakespeare/best --device cpu

writes results/ptq/defaults_<run>_<device>.json: the compare rows (with the command, commit and device) and,
per bit width and setting, the mean perplexity change and KL over the seeds. Quantized checkpoints go to
--ckpt-dir (default runs/ptq_defaults/<run>); finished ones are kept, so a stopped run resumes.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from common import add_device, parser, result_path, write_result

from nanogptq.evaluate import compare, markdown_table
from nanogptq.pipeline import quantize_checkpoint
from nanogptq.quant.config import QuantConfig

SETTINGS = {"act-order": lambda **kw: QuantConfig(method="gptq", act_order=True, **kw),
            "quality": lambda **kw: QuantConfig.preset("quality", **kw)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("ckpt", help="the fp32 checkpoint (the baseline)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--ckpt-dir", default=None, help="where the quantized checkpoints go")
    p.add_argument("--data-dir", default=None)
    add_device(p, default="cpu")
    args = p.parse_args()
    run = Path(args.ckpt).resolve().parent.name.replace("-", "_")
    out = result_path("ptq", f"defaults_{run}", args.device)
    ckpt_dir = Path(args.ckpt_dir or Path("runs/ptq_defaults") / run)
    paths, labels = [args.ckpt], [None]
    for bits in args.bits:
        for setting, make in SETTINGS.items():
            for seed in args.seeds:
                name = f"{setting}-{bits}b-g{args.group_size}-seed{seed}"
                dest = ckpt_dir / name
                if not (dest / "config.json").exists():
                    cfg = make(bits=bits, group_size=args.group_size, calib_seed=seed)
                    quantize_checkpoint(args.ckpt, dest, cfg, data_dir=args.data_dir, device=args.device,
                                        progress=False)
                paths.append(str(dest))
                labels.append((bits, setting))
                print(f"quantized {name}", flush=True)
    rows = compare(paths, out.parent, data_dir=args.data_dir, device=args.device, name=out.stem)
    means = []
    for bits in args.bits:
        for setting in SETTINGS:
            picked = [r for r, label in zip(rows, labels, strict=True) if label == (bits, setting)]
            means.append({"bits": bits, "setting": setting, "seeds": len(picked),
                          "mean_ppl_change_pct": statistics.fmean(r["ppl_change_pct"] for r in picked),
                          "mean_kl": statistics.fmean(r["kl_mean"] for r in picked),
                          "mean_top1_agreement": statistics.fmean(r["top1_agreement"] for r in picked)})
    write_result(out, rows, args.device, group_size=args.group_size, means=means)
    print(markdown_table(rows))
    for m in means:
        print(f"{m['bits']} bits, {m['setting']}: {m['mean_ppl_change_pct']:+.2f}% perplexity, "
              f"KL {m['mean_kl']:.2e}, top-1 agreement {100 * m['mean_top1_agreement']:.2f}% "
              f"(mean of {m['seeds']} seeds)")


if __name__ == "__main__":
    main()
