"""nanogptq: train a small GPT, compress it by integer weight quantization (RTN, GPTQ, ternary QAT), and
see what each compression costs and buys: perplexity, size on disk, speed.

  nanogptq train --preset tiny --dataset shakespeare --out-dir runs/tiny
  nanogptq quantize runs/tiny/best --method gptq --bits 4 --group-size 64 --out runs/tiny/gptq-int4
  nanogptq compare runs/tiny/best runs/tiny/gptq-int4
  nanogptq sample runs/tiny/gptq-int4 --prompt "ROMEO:"
  nanogptq demo runs/tiny/best runs/tiny/gptq-int4
  nanogptq import-hf gpt2 --out ckpts/gpt2          # then quantize, eval, compare with --dataset

`nanogptq COMMAND --help` lists a command's options and their defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import MISSING, fields
from importlib.metadata import PackageNotFoundError, version

from nanogptq.app import launch
from nanogptq.checkpoint import CheckpointError, read_meta
from nanogptq.data import DataError
from nanogptq.evaluate import compare, evaluate_checkpoint, markdown_table, report_folder
from nanogptq.interop.gguf import export_gguf
from nanogptq.interop.hf import export_hf, import_hf
from nanogptq.pipeline import pack_checkpoint, quantize_checkpoint
from nanogptq.quant.config import PRESETS, QuantConfig
from nanogptq.runtime.backends import BACKENDS
from nanogptq.runtime.load import DTYPE_CHOICES
from nanogptq.sample import ENGINE, SampleSettings, generate_text, load_for_generation
from nanogptq.train import TrainConfig, pick_device, train

TRAIN_HELP = {
    "out_dir": "run folder (holds last/, best/, metrics.jsonl)",
    "dataset": "shakespeare, tinystories, or file:PATH for any UTF-8 text",
    "tokenizer": "char, byte or bpe",
    "split": "chunks (seeded 64 KiB chunks to validation) or tail (nanoGPT's: the last val-fraction)",
    "vocab_size": "BPE vocabulary size",
    "data_dir": "local data folder (default: $NANOGPTQ_DATA_DIR, then the cache, then download)",
    "preset": "model size: tiny (0.8 M), small (2.7 M) or shakespeare (10.6 M)",
    "max_steps": "optimizer steps in the whole run (the schedule's length)",
    "max_time": "stop after this many seconds of training (saving first)",
    "time_schedule": "with --max-time: decay the learning rate by the clock too, so it ends at --min-lr in time",
    "resume": "continue the run in --out-dir from its last checkpoint; flags given with it override the run's "
    "saved settings (e.g. a larger --max-steps extends it), except the data and model ones",
    "overwrite": "start a new run in an --out-dir that holds one, replacing its checkpoints",
    "init_from": "start from this fp32 checkpoint's weights (fine-tuning, e.g. QAT)",
    "qat_config": "quantization-aware training config (JSON), e.g. configs/qat/weights_only.json",
    "qat_start": "with --qat-config: train this fraction of the steps in float first (16-to-1.58-bit training)",
    "qat_ramp": "with --qat-config: then phase the quantization in linearly over this fraction of the steps",
    "qat_restart": "with --qat-start: end the float phase's schedule at the switch and start warm-up + cosine anew",
    "lr_schedule": "cosine, or bitnet (cosine with weight decay dropped halfway)",
    "grad_accum": "micro-batches per optimizer step",
    "compile": "torch.compile the model (worth it on CUDA; a small gain on CPU after ~20 s of compiling)",
}
QUANT_HELP = {
    "method": "rtn (round to nearest) or gptq (Hessian-aware, calibrated on the training split)",
    "bits": "8, 4, 3 or 2",
    "group_size": "0: per tensor, -1: per channel, G: groups of G input columns",
    "symmetric": "a fixed zero point (symmetric grid) instead of a stored one",
    "act_order": "gptq: quantize columns in order of decreasing Hessian diagonal",
    "static_groups": "gptq: fix the group grids from the unquantized weights first (with --act-order: no "
    "per-column group index stored)",
    "damp": "gptq: dampening added to the Hessian's diagonal, as a fraction of its mean",
    "lazy_batch": "gptq: columns per lazy batch update",
    "calib_samples": "gptq: calibration windows of the model's context length",
    "calib_seed": "gptq: seed of the calibration windows",
    "clip_search": "search each grid's clipping ratio instead of taking max|w| (minimum output error with "
    "calibration data, weight error without)",
    "rotate": "random orthogonal rotation of each layer's input side (QuIP-style), kept where it lowers the "
    "layer's error",
    "rotate_seed": "seed of the rotations",
    "quantize_embeddings": "store the tied embedding/head table at 8 bits per row too",
    "fallback": "gptq: also quantize with act-order alone and keep the model with the lower loss on held-out "
    "calibration windows",
    "target_bpw": "choose bits (2, 3, 4, 8) and group size per layer from measured output errors so that the "
    "stored bits per weight, the 8-bit embedding's counted, are at most this (0: off)",
    "tune_steps": "gptq: then tune each block's rounding and scales against the float model's block output for this "
    "many signed-gradient steps (AutoRound's method), kept where held-out calibration windows say it helps (0: off)",
    "layers": "comma-separated linears inside each block to quantize",
}
DATASET_HELP = ("for a checkpoint without training data (an imported one): the text to evaluate on (validation "
                "split) and calibrate GPTQ with (train split), encoded by its own tokenizer: shakespeare, "
                "tinystories or file:PATH")
KERNEL_NAMES = ", ".join(("auto", *BACKENDS))  # a named one runs the layers it can; auto picks for the rest
EXACT_KERNEL_HELP = f"quantized kernel: {KERNEL_NAMES} (default: dequant, the exact path)"
# --dtype is checked by resolve_dtype, not argparse's choices: a bad name is then one line, not usage + error
DTYPE_ARGS = dict(default="auto", metavar="{" + ",".join(DTYPE_CHOICES) + "}",
                  help="activation dtype (default auto: fp32 on CPU; on CUDA fp16 for quantized checkpoints, "
                  "the GEMVs' fast path, and bf16 for float ones)")


def _add_dataclass_args(parser: argparse.ArgumentParser, cls, help_text: dict, suppress: bool = False) -> None:
    """A flag per field. With `suppress`, flags not given are absent from the parsed namespace (the dataclass
    default applies), so that the caller knows which were given."""
    for f in fields(cls):
        if str(f.type).startswith("dict"):  # set by the program (a --target-bpw plan), not by a flag
            continue
        flag = "--" + f.name.replace("_", "-")
        value = f.default if f.default is not MISSING else None
        default = argparse.SUPPRESS if suppress else value
        shown = ",".join(value) if isinstance(value, tuple) else value
        help = f"{help_text[f.name]} (default: {shown})" if f.name in help_text else f"default: {shown}"
        help = help.replace("%", "%%")  # argparse %-formats help strings
        typ = eval_type(f.type)
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
        else:
            parser.add_argument(flag, type=typ, default=default, help=help, metavar=f.name.upper())


def eval_type(annotation: str | type) -> type:
    """The base type of a dataclass field annotation written as a string ('int | None' -> int)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "str")
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if text.split("|")[0].strip() == name:
            return typ
    return str


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"a TCP port is 1-65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanogptq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nanogptq {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (or resume a run)")
    _add_dataclass_args(p, TrainConfig, TRAIN_HELP, suppress=True)  # --resume overrides only the flags given

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("ckpt", help="checkpoint folder")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--num-samples", type=_positive_int, default=1)
    _add_dataclass_args(p, SampleSettings, {})
    p.add_argument("--device", default="auto")
    p.add_argument("--kernel", default="auto", help=f"quantized kernel: {KERNEL_NAMES}, or {ENGINE}: the "
                   "checkpoint's GGUF on llama.cpp (CPU; auto picks it there where a GGUF type holds the grid)")
    p.add_argument("--dtype", **DTYPE_ARGS)
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (faster decoding after a "
                   "one-off compilation; on the GPU with the CUDA graph replay)")

    p = sub.add_parser("eval", help="perplexity over the whole validation split")
    p.add_argument("ckpt", help="checkpoint folder")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-save", action="store_true", help="do not record the result in config.json")
    p.add_argument("--kernel", default="dequant", help=EXACT_KERNEL_HELP)
    p.add_argument("--dataset", default=None, help=DATASET_HELP)

    p = sub.add_parser("quantize", help="post-training quantization of a checkpoint (RTN or GPTQ)")
    p.add_argument("ckpt", help="fp32 checkpoint folder")
    p.add_argument("--out", required=True, help="folder for the quantized checkpoint")
    p.add_argument("--data-dir", default=None, help="where the calibration data lives (GPTQ)")
    p.add_argument("--dataset", default=None, help=DATASET_HELP)
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named setting, flags given beside it override it (default: quality for gptq, plain "
                   "for rtn); plain: the defaults shown below; quality: "
                   + ", ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                               for k, v in PRESETS["quality"].items()))
    _add_dataclass_args(p, QuantConfig, QUANT_HELP, suppress=True)  # --preset takes the flags not given
    p.add_argument("--asym", dest="symmetric", action="store_false", default=argparse.SUPPRESS,
                   help="same as --no-symmetric (the default)")

    p = sub.add_parser("pack", help="pack a QAT checkpoint's ternary weights (1.6 bits/weight)")
    p.add_argument("ckpt", help="QAT checkpoint folder (trained with --qat-config)")
    p.add_argument("--out", required=True, help="folder for the packed checkpoint")

    p = sub.add_parser("export-gguf", help="write a checkpoint as a GGUF file for llama.cpp (architecture gpt2)")
    p.add_argument("ckpt", help="checkpoint folder (float, quantized, or packed ternary)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="F16", choices=("F16", "F32"), help="float tensors' type (default F16)")
    p.add_argument("--requantize", default=None, metavar="TYPE",
                   help="let gguf quantize the (dequantized) block linears to TYPE: Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, "
                   "TQ2_0, TQ1_0; by default a quantized grid is written as it is")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = sub.add_parser("compare", help="evaluate variants side by side: table, JSON and plot")
    p.add_argument("ckpts", nargs="+", help="baseline first, then the variants")
    p.add_argument("--out", default=None, help="folder for compare.md/.json/.png (default: the report folder "
                   "beside the first checkpoint, RUN/report for RUN/best)")
    p.add_argument("--name", default="compare", help="file name stem of the report")
    p.add_argument("--kernel", default="dequant", help=EXACT_KERNEL_HELP)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", default=None, help=DATASET_HELP)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("import-hf", help="a transformers GPT-2 (Hub id or local folder) as a nanogptq checkpoint")
    p.add_argument("source", help="Hub id (gpt2, distilgpt2, ...) or folder with config.json, model.safetensors "
                   "and tokenizer.json")
    p.add_argument("--out", required=True, help="folder for the checkpoint")

    p = sub.add_parser("export-hf", help="a checkpoint as a transformers GPT2LMHeadModel folder (dequantized)")
    p.add_argument("ckpt", help="checkpoint folder (float, quantized or packed ternary)")
    p.add_argument("--out", required=True, help="folder for config.json, model.safetensors and the tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")

    p = sub.add_parser("demo", help="web demo: variants side by side")
    p.add_argument("ckpts", nargs="*", help="checkpoint folders (default: the main job's)")
    p.add_argument("--port", type=_port, default=7860)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--report", default=None, help="folder with the compare report to show (default: the "
                   "report folder beside the first checkpoint, RUN/report for RUN/best)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", **DTYPE_ARGS)
    p.add_argument("--compile", action="store_true", help="torch.compile each model's blocks at start-up")
    return parser


def package_version() -> str:
    try:
        return version("nanogptq")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def quant_config(args: argparse.Namespace) -> QuantConfig:
    """`quantize`'s settings: the flags given, on top of --preset's (by default `quality` for GPTQ, `plain`
    for RTN, whose round to nearest has none of quality's options)."""
    values = {f.name: getattr(args, f.name) for f in fields(QuantConfig) if hasattr(args, f.name)}
    preset = args.preset or ("quality" if values.get("method", QuantConfig.method) == "gptq" else "plain")
    return QuantConfig.preset(preset, **values)


def quant_summary(meta: dict) -> list[str]:
    """What `quantize` chose beyond the per-layer rows: the --target-bpw plan, the fallback's choice, the
    stored bits per weight."""
    q, lines = meta["quantization"], []
    if q.get("plan"):
        mix = Counter(f"{bits} bits, " + ("per channel" if group == -1 else f"groups of {group}")
                      for bits, group in q["plan"].values())
        lines.append(f"plan for --target-bpw {q['target_bpw']:g}: " + "; ".join(
            f"{name}: {bits}/{group}" for name, (bits, group) in q["plan"].items()))
        lines.append("plan mix: " + ", ".join(f"{n} x {what}" for what, n in mix.most_common()))
    selection = meta.get("quant_selection")
    if selection:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in selection["heldout_loss"].items())
        lines.append(f"fallback: kept {selection['kept']} (held-out calibration loss: {losses})")
    lines.append(f"bits per weight as stored (block linears and embedding): {meta['bits_per_weight']:.3f}")
    return lines


def _device(name: str) -> str:
    return pick_device(name)


def run(args: argparse.Namespace) -> None:
    if args.command == "train":
        values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
        out = train(TrainConfig(**values), explicit=set(values))
        if int(os.environ.get("RANK", "0")) == 0:  # once under torchrun
            print(f"run saved in {out}")
    elif args.command == "sample":
        ckpt = load_for_generation(args.ckpt, _device(args.device), dtype=args.dtype, kernel=args.kernel,
                                   compile=args.compile)
        settings = SampleSettings(**{f.name: getattr(args, f.name) for f in fields(SampleSettings)})
        for i in range(args.num_samples):
            if settings.seed is not None and i:
                settings.seed += 1
            gen = generate_text(ckpt, args.prompt, settings)
            for note in gen.notes:
                print(f"note: {note}", file=sys.stderr)
            print(gen.prompt + gen.text)
            print(f"--- {gen.new_tokens} tokens by {gen.engine}, first after {gen.ttft_s * 1000:.1f} ms, "
                  f"{gen.tokens_per_s:,.0f} tokens/s", file=sys.stderr)
    elif args.command == "eval":
        result = evaluate_checkpoint(args.ckpt, args.data_dir, _device(args.device), save=not args.no_save,
                                     kernel=args.kernel, dataset=args.dataset)
        print(json.dumps(result, indent=2))
        if args.kernel != "dequant" and not args.no_save:
            print(f"note: not stored in {args.ckpt}: the stored perplexity is the exact --kernel dequant one",
                  file=sys.stderr)
    elif args.command == "quantize":
        out = quantize_checkpoint(args.ckpt, args.out, quant_config(args), data_dir=args.data_dir,
                                  device=_device(args.device), dataset=args.dataset)
        meta = read_meta(out)
        print("| layer | relative error | time |\n|---|---|---|")
        for row in meta["quant_log"]:
            if "rel_error" not in row:  # a block's tuning (quant/tune.py)
                print(f"| {row['layer']} tuned | block output error {row['heldout_loss_gptq']:.3g} -> "
                      f"{row['heldout_loss_tuned']:.3g} ({'' if row['kept'] else 'not '}kept) | "
                      f"{row['time_s']:.2f} s |")
                continue
            kept = "".join(f", {'' if row[k] else 'not '}{k}" for k in ("clipped", "rotated") if k in row)
            print(f"| {row['layer']} | {row['rel_error']:.3g} ({row['error_kind']}{kept}) | {row['time_s']:.2f} s |")
        for line in quant_summary(meta):
            print(line)
        print(f"quantized checkpoint saved in {out} ({meta['quant_time_s']:.1f} s)")
    elif args.command == "pack":
        print(f"ternary checkpoint saved in {pack_checkpoint(args.ckpt, args.out)}")
    elif args.command == "import-hf":
        print(f"checkpoint saved in {import_hf(args.source, args.out)}")
    elif args.command == "export-hf":
        out, notes = export_hf(args.ckpt, args.out, overwrite=args.overwrite)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"transformers GPT2LMHeadModel saved in {out}")
    elif args.command == "export-gguf":
        result = export_gguf(args.ckpt, args.out, float_type=args.type, requantize=args.requantize,
                             overwrite=args.overwrite)
        for note in result["notes"]:
            print(f"note: {note}", file=sys.stderr)
        counts = Counter(result["types"].values())
        print(f"GGUF file written to {result['path']} ({', '.join(f'{n} {t}' for t, n in sorted(counts.items()))} "
              "tensors)")
    elif args.command == "compare":
        out = report_folder(args.ckpts, args.out)
        rows = compare(args.ckpts, out, args.data_dir, _device(args.device), name=args.name, kernel=args.kernel,
                       dataset=args.dataset)
        print(markdown_table(rows))
        print(f"report written to {out}/{args.name}.md, .json and .png")
    elif args.command == "demo":
        launch(args.ckpts, host=args.host, port=args.port, report_dir=args.report, device=_device(args.device),
               compile=args.compile, dtype=args.dtype)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (DataError, CheckpointError, ValueError, OSError) as e:  # OSError: a path that cannot be written
        if os.environ.get("NANOGPTQ_DEBUG"):
            raise
        parser.exit(2, f"nanogptq {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"\nnanogptq {args.command}: interrupted\n")  # train has said what it saved


if __name__ == "__main__":
    main()

