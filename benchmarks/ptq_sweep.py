"""The post-training quantization sweep on one checkpoint: RTN and GPTQ, 8/4/3/2 bits, per-channel
and groups of 128 and 64, act-order on and off, and what GPTQ's options (clipping search, rotation)
add at groups of 64. Every variant is evaluated on the same whole validation split.

    python benchmarks/ptq_sweep.py runs/small-shakespeare/best --device cuda \
        --out results/ptq/sweep_small_shakespeare_h100

`--out STEM` gets the table (STEM.md), the rows with the command, commit and device (STEM.json) and the
plot (STEM.png), as `nanogptq compare` writes them; the default STEM is
results/ptq/sweep_<run>_<device>. Quantized checkpoints go to --ckpt-dir (default runs/ptq_sweep/<STEM's
name>); finished ones are kept, so a stopped sweep resumes. `--quick` runs a reduced grid (4 and 8 bits,
g64) for a smoke test.
"""

from pathlib import Path

from common import add_device, parser, result_path, write_result

from nanogptq.evaluate import compare, markdown_table
from nanogptq.pipeline import quantize_checkpoint
from nanogptq.quant.config import QuantConfig


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
    p = parser(__doc__)
    p.add_argument("ckpt", help="the fp32 checkpoint (the baseline)")
    p.add_argument("--out", default=None, help="STEM of the result files (default: results/ptq/sweep_<run>_<device>)")
    p.add_argument("--ckpt-dir", default=None, help="where the quantized checkpoints go")
    p.add_argument("--data-dir", default=None)
    add_device(p, default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    args = p.parse_args()
    run = Path(args.ckpt).resolve().parent.name.replace("-", "_")
    bits = "" if args.bits == [8, 4, 3, 2] else "_" + "".join(map(str, args.bits)) + "bit"
    stem = Path(args.out) if args.out else result_path("ptq", f"sweep{bits}_{run}", args.device, suffix="")
    ckpt_dir = Path(args.ckpt_dir or Path("runs/ptq_sweep") / stem.name)
    paths = [args.ckpt]
    for name, cfg in sweep_configs(args.quick, tuple(args.bits)).items():
        dest = ckpt_dir / name
        if not (dest / "config.json").exists():  # resumable: finished variants are kept
            quantize_checkpoint(args.ckpt, dest, cfg, data_dir=args.data_dir, device=args.device, progress=False)
        paths.append(str(dest))
        print(f"quantized {name}", flush=True)
    rows = compare(paths, stem.parent, data_dir=args.data_dir, device=args.device, name=stem.name)
    write_result(f"{stem}.json", rows, args.device)  # compare's rows, with the command and commit
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
