"""The post-training quantization sweep on one checkpoint: RTN and GPTQ, 8/4/3/2 bits, per-channel
and groups of 128 and 64, act-order on and off, and what GPTQ's options (clipping search, rotation)
add at groups of 64. Every variant is evaluated on the same whole validation split.

    python benchmarks/ptq_sweep.py runs/small-shakespeare/best --out results/ptq_small_shakespeare

Quantized checkpoints go to OUT/ckpts/; the table (Markdown), JSON and plot to OUT/ (via `compare`).
`--quick` runs a reduced grid (4 and 8 bits, g64) for a smoke test.
"""

import argparse
from pathlib import Path

from nanogptq.evaluate import compare, markdown_table
from nanogptq.quant import QuantConfig, quantize_checkpoint


def sweep_configs(quick: bool, bits_list: tuple[int, ...] = (8, 4, 3, 2)) -> dict[str, QuantConfig]:
    bits_list = (8, 4) if quick else bits_list
    groups = {"g64": 64} if quick else {"ch": -1, "g128": 128, "g64": 64}
    configs = {}
    for bits in bits_list:
        for gname, g in groups.items():
            configs[f"rtn-{bits}b-{gname}"] = QuantConfig(method="rtn", bits=bits, group_size=g)
            configs[f"gptq-{bits}b-{gname}"] = QuantConfig(method="gptq", bits=bits, group_size=g)
            if not quick:
                configs[f"gptq-{bits}b-{gname}-ao"] = QuantConfig(method="gptq", bits=bits, group_size=g,
                                                                   act_order=True, static_groups=g > 0)
        if bits < 8 and not quick:  # the known improvements, one at a time and together, at g64
            base = dict(method="gptq", bits=bits, group_size=64, act_order=True, static_groups=True)
            configs[f"gptq-{bits}b-g64-ao-clip"] = QuantConfig(**base, clip_search=True)
            configs[f"gptq-{bits}b-g64-ao-rot"] = QuantConfig(**base, rotate=True)
            configs[f"gptq-{bits}b-g64-ao-clip-rot"] = QuantConfig(**base, clip_search=True, rotate=True)
    return configs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="the fp32 checkpoint (the baseline)")
    p.add_argument("--out", default="results/ptq_sweep")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    args = p.parse_args()
    out = Path(args.out)
    paths = [args.ckpt]
    for name, cfg in sweep_configs(args.quick, tuple(args.bits)).items():
        dest = out / "ckpts" / name
        if not (dest / "config.json").exists():  # resumable: finished variants are kept
            quantize_checkpoint(args.ckpt, dest, cfg, data_dir=args.data_dir, device=args.device, progress=False)
        paths.append(str(dest))
        print(f"quantized {name}", flush=True)
    rows = compare(paths, out, data_dir=args.data_dir, device=args.device, name="ptq_sweep")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
