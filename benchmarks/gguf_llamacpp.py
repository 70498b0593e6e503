"""Trained checkpoints in llama.cpp: perplexity of llama.cpp's own quantization against nanogptq's GPTQ in the
same GGUF types, and llama.cpp's decode speed on both Q4_0 files.

    python benchmarks/gguf_llamacpp.py runs/small-bpe/best runs/shakespeare-gpu/best      # the whole validation split
    python benchmarks/gguf_llamacpp.py runs/small-bpe/best --max-windows 20               # a quick try

For each float checkpoint, every variant is a GGUF file that llama.cpp (through llama-cpp-python) evaluates:

    F16                        export-gguf of the float weights
    llama.cpp Q8_0/Q4_0/Q4_1   export-gguf --requantize TYPE: gguf's round to nearest, as llama.cpp's quantize
    GPTQ Q8_0/Q4_0/Q4_1        `quantize` (GPTQ calibrated on the training split: groups of 32, act-order with
                               static groups; symmetric for Q8_0/Q4_0, asymmetric for Q4_1), exported exactly
    GPTQ+clip Q4_0/Q4_1        the same with the clipping search (kept per layer where it lowers the layer's
                               output error), since whether it helps perplexity is what is measured

Perplexity is over the checkpoint's whole validation split in the windows `nanogptq eval` uses (non-overlapping,
block_size tokens, each starting fresh, every token after the first predicted once): llama.cpp is fed the
token ids (Llama.eval, n_ctx = block_size, all logits kept), the NLL of each target summed in float64. Beside it,
nanogptq's own forward on the weights read back from the same GGUF file (gguf's dequantize), as a cross-check:
the two differ only by llama.cpp's arithmetic (its matmuls round activations to 8-bit blocks against quantized
weights, and its gpt2 graph computes the tanh GELU; an exact-GELU model's logits move slightly).

"gap closed" is (ppl(llama.cpp TYPE) - ppl(GPTQ TYPE)) / (ppl(llama.cpp TYPE) - ppl(F16)), from llama.cpp's
perplexities, where llama.cpp's TYPE is worse than F16. Decode speed: llama.cpp decoding --decode-tokens
tokens one at a time (teacher-forced on the validation text, so both files do the same work) from our GPTQ Q4_0
file and from its own Q4_0 file, interleaved over --rounds rounds in one process, --threads threads (2 by
default; the perplexity runs take --eval-threads, every core by default); tokens/s is each file's median.

`--decode-only` measures the decode speeds again from the GGUF files a full run left in --work and rewrites
only that part of each result file (its "decode_command" says so): the perplexities need no quiet machine, the
speeds do.

Writes results/gguf/gguf_llamacpp_<device>.json (every checkpoint's rows and decode speeds; --out-dir to change
the folder) and prints the tables as Markdown; the GGUF files and GPTQ checkpoints go to --work.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import torch
from common import add_device, command_line, device_name, device_tag, parser, table, write_result

from nanogptq.checkpoint import checkpoint_data, load_checkpoint
from nanogptq.data import val_windows
from nanogptq.evaluate import WindowStats, window_stats
from nanogptq.interop.gguf import export_gguf
from nanogptq.pipeline import quantize_checkpoint
from nanogptq.quant.config import QuantConfig

TYPES = ("Q8_0", "Q4_0", "Q4_1")
# the GGUF tensor of each block linear, as export_gguf names them
GGUF_LINEARS = {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc",
                "ffn_down": "mlp.c_proj"}


def gptq_config(qtype: str, clip: bool) -> QuantConfig:
    """The best GPTQ setting the GGUF type holds exactly: groups of 32 (its block), act-order with static groups
    (a run of 32 columns shares one scale), 8 or 4 bits, symmetric but for Q4_1."""
    return QuantConfig(method="gptq", bits=8 if qtype == "Q8_0" else 4, group_size=32, symmetric=qtype != "Q4_1",
                       act_order=True, static_groups=True, clip_search=clip)


def variants(clip: str) -> list[tuple[str, str, QuantConfig | None, str | None]]:
    """(variant name, GGUF type, GPTQ config or None, requantize type or None) in table order."""
    rows = [("F16", "F16", None, None)]
    rows += [(f"llama.cpp {t}", t, None, t) for t in TYPES]
    for t in TYPES:
        if clip in ("off", "both") or t == "Q8_0":  # 8-bit groups of 32 have nothing to clip
            rows.append((f"GPTQ {t}", t, gptq_config(t, False), None))
        if clip in ("on", "both") and t != "Q8_0":
            rows.append((f"GPTQ+clip {t}", t, gptq_config(t, True), None))
    return rows


def llama(path: Path, n_ctx: int, threads: int, logits_all: bool) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                           n_threads=threads, n_threads_batch=threads, verbose=False)


def llama_window_stats(path: Path, tokens: np.ndarray, block: int, threads: int) -> WindowStats:
    """NLL per validation window (the windows of evaluate.window_stats) from llama.cpp's logits."""
    llm = llama(path, block, threads, logits_all=True)
    nll, counts = [], []
    try:
        for x, y in val_windows(tokens, block):
            llm.reset()
            llm.eval(x[0].tolist())
            logits = torch.from_numpy(np.array(llm.scores[: x.size(1)], dtype=np.float64))
            logp = torch.log_softmax(logits, dim=-1)
            nll.append(-logp.gather(-1, y[0, :, None])[:, 0].sum().item())
            counts.append(y.size(1))
    finally:
        llm.close()
    return WindowStats(np.array(nll), np.array(counts))


def model_from_gguf(float_ckpt: Path, path: Path, device: str) -> torch.nn.Module:
    """The float checkpoint's model with its block linears and token table replaced by the GGUF file's tensors,
    dequantized by gguf: the weights llama.cpp runs, on nanogptq's forward."""
    model = load_checkpoint(float_ckpt).model
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}

    def read(name: str, like: torch.Tensor) -> torch.Tensor:
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.asarray(w, dtype=np.float32).reshape(like.shape).copy())

    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte.copy_(read("token_embd.weight", wte))  # the head is tied to it
        for i, block in enumerate(model.transformer.h):
            for gguf_name, name in GGUF_LINEARS.items():
                w = block.get_submodule(name).weight
                w.copy_(read(f"blk.{i}.{gguf_name}.weight", w))
    return model.to(device).eval()


def gguf_path(work: Path, variant: str) -> Path:
    return work / (variant.replace(" ", "-").replace("+", "-").replace(".", "") + ".gguf")


def make_gguf(src: Path, work: Path, name: str, cfg: QuantConfig | None, requantize: str | None,
              device: str) -> tuple[Path, dict]:
    """The variant's GGUF file (GPTQ checkpoint first where it is one) and what making it took."""
    out = gguf_path(work, name)
    info: dict = {}
    source = src
    if cfg is not None:
        source = work / out.stem
        t0 = time.perf_counter()
        quantize_checkpoint(src, source, cfg, device=device, progress=False)
        info["quantize_s"] = round(time.perf_counter() - t0, 2)
        info["quant_config"] = cfg.to_dict()
    summary = export_gguf(source, out, requantize=requantize, overwrite=True)
    info["gguf_types"] = sorted(set(summary["types"].values()))
    info["notes"] = summary["notes"]
    info["gguf_bytes"] = out.stat().st_size
    return out, info


def decode_speed(files: dict[str, Path], tokens: np.ndarray, block: int, threads: int, n: int,
                 rounds: int) -> dict[str, dict]:
    """Tokens/s of llama.cpp decoding `n` tokens one at a time from each file, interleaved over `rounds`
    (the order alternates each round); all the files loaded at once."""
    ids = tokens[: min(n, block - 1) + 1].tolist()
    models = {name: llama(path, block, threads, logits_all=False) for name, path in files.items()}
    rates: dict[str, list[float]] = {name: [] for name in files}
    try:
        for llm in models.values():  # warm-up
            llm.reset()
            llm.eval(ids[:8])
        for r in range(rounds):
            for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
                llm = models[name]
                llm.reset()
                llm.eval(ids[:1])
                t0 = time.perf_counter()
                for t in ids[1:]:
                    llm.eval([t])
                rates[name].append((len(ids) - 1) / (time.perf_counter() - t0))
    finally:
        for llm in models.values():
            llm.close()
    return {name: {"tokens_per_s": statistics.median(r), "runs": r, "tokens": len(ids) - 1}
            for name, r in rates.items()}


def work_dir(src: Path, args) -> Path:
    return Path(args.work) / src.parent.name / src.name


def decode_pair(files: dict[str, Path], val: np.ndarray, block: int, args) -> dict:
    """llama.cpp decoding our GPTQ Q4_0 file (the clipped one where only it was made) against its own Q4_0."""
    pair = {"GPTQ Q4_0": files.get("GPTQ Q4_0") or files.get("GPTQ+clip Q4_0"), "llama.cpp Q4_0":
            files["llama.cpp Q4_0"]}
    decode = decode_speed(pair, val, block, args.threads, args.decode_tokens, args.rounds)
    decode["ratio"] = decode["GPTQ Q4_0"]["tokens_per_s"] / decode["llama.cpp Q4_0"]["tokens_per_s"]
    print(f"  decode, {args.threads} threads: ours {decode['GPTQ Q4_0']['tokens_per_s']:.0f} tok/s, llama.cpp's "
          f"{decode['llama.cpp Q4_0']['tokens_per_s']:.0f} tok/s (x{decode['ratio']:.3f})", flush=True)
    return decode


def bench_checkpoint(src: Path, args) -> dict:
    ckpt = load_checkpoint(src)
    block = ckpt.model.config.block_size
    data = checkpoint_data(ckpt, args.data_dir)
    val = data.val if args.max_windows is None else data.val[: args.max_windows * block + 1]
    n_windows = len(range(0, len(val) - 1, block))
    work = work_dir(src, args)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{src}: {n_windows} validation windows of {block} tokens ({len(val) - 1} targets)", flush=True)

    rows, files = [], {}
    for name, qtype, cfg, requantize in variants(args.clip):
        path, info = make_gguf(src, work, name, cfg, requantize, args.device)
        files[name] = path
        t0 = time.perf_counter()
        ours = llama_window_stats(path, val, block, args.eval_threads).summary()
        llama_s = time.perf_counter() - t0
        model = model_from_gguf(src, path, args.device)
        check = window_stats(model, val, device=args.device, progress=False).summary()
        row = {"variant": name, "type": qtype, "ppl_llama_cpp": ours["val_ppl"], "ppl_nanogptq": check["val_ppl"],
               "loss_llama_cpp": ours["val_loss"], "loss_nanogptq": check["val_loss"], "tokens": ours["val_tokens"],
               "llama_eval_s": round(llama_s, 2), **info}
        rows.append(row)
        print(f"  {name:<16} llama.cpp ppl {row['ppl_llama_cpp']:.4f}   nanogptq ppl {row['ppl_nanogptq']:.4f}   "
              f"({llama_s:.0f} s)", flush=True)

    ppl = {r["variant"]: r["ppl_llama_cpp"] for r in rows}
    for r in rows:
        rtn = ppl.get(f"llama.cpp {r['type']}")
        gap = None if rtn is None else rtn - ppl["F16"]
        r["vs_f16_pct"] = (r["ppl_llama_cpp"] / ppl["F16"] - 1) * 100
        if r["variant"].startswith("GPTQ") and gap is not None and gap > 0:  # no gap, nothing to close
            r["gap_closed"] = (rtn - r["ppl_llama_cpp"]) / gap

    decode = decode_pair(files, data.val, block, args) if args.rounds > 0 else None
    return {"checkpoint": str(src), "model": ckpt.meta.get("model"), "data": ckpt.meta.get("data"),
            "activation": ckpt.model.config.activation, "windows": n_windows, "block_size": block,
            "whole_split": args.max_windows is None, "rows": rows, "decode": decode}


COLUMNS = [
    ("variant", "variant", ""),
    ("GGUF type", "type", ""),
    ("ppl (llama.cpp)", "ppl_llama_cpp", ".4f"),
    ("vs F16", lambda r: f"{r['vs_f16_pct']:+.2f}%", ""),
    ("ppl (nanogptq, same weights)", "ppl_nanogptq", ".4f"),
    ("gap to llama.cpp's type closed", lambda r: None if r.get("gap_closed") is None else f"{r['gap_closed']:.0%}",
     ""),
    ("file", lambda r: f"{r['gguf_bytes'] / 1e6:.2f} MB", ""),
]


def markdown(results: list[dict], command: str, device: str) -> str:
    lines = [f"`{command}` on {device}.", ""]
    for res in results:
        split = "the whole validation split" if res["whole_split"] else "the first validation windows"
        targets = res["rows"][0]["tokens"]
        lines += [f"**{res['checkpoint']}** ({split}: {res['windows']} windows of {res['block_size']} tokens, "
                  f"{targets:,} targets; activation {res['activation']})", "", table(res["rows"], COLUMNS), ""]
        d = res["decode"]
        if d:
            lines += [f"Decode in llama.cpp ({d['GPTQ Q4_0']['tokens']} tokens, median of {len(d['GPTQ Q4_0']['runs'])}"
                      f" interleaved runs): our GPTQ Q4_0 file {d['GPTQ Q4_0']['tokens_per_s']:.0f} tokens/s, "
                      f"llama.cpp's Q4_0 file {d['llama.cpp Q4_0']['tokens_per_s']:.0f} tokens/s "
                      f"(ratio {d['ratio']:.3f}).", ""]
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("ckpts", nargs="+", help="float checkpoint folders (trained by nanogptq)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-windows", type=int, default=None, help="only the first N validation windows (quick tries)")
    p.add_argument("--clip", choices=("both", "on", "off"), default="both",
                   help="GPTQ 4-bit rows with the clipping search, without, or both (default: both)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp's threads for the decode timing")
    p.add_argument("--eval-threads", type=int, default=os.cpu_count(),
                   help="threads for the perplexity runs, llama.cpp's and nanogptq's (default: every core)")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens per decode run (at most block_size - 1)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved decode rounds (0: no decode timing)")
    p.add_argument("--work", default="runs/gguf-bench", help="folder for the GGUF files and GPTQ checkpoints")
    p.add_argument("--out-dir", default="results/gguf", help="folder for the result files")
    p.add_argument("--decode-only", action="store_true",
                   help="only the decode speeds again, from the files of an earlier full run (see above)")
    add_device(p, default="cpu")
    args = p.parse_args()
    if args.max_windows is not None and args.max_windows < 1:
        p.error("--max-windows must be at least 1")
    torch.set_num_threads(args.eval_threads)

    out = Path(args.out_dir) / f"gguf_llamacpp_{device_tag(args.device)}.json"
    if args.decode_only:
        record = json.loads(out.read_text())
        by_path = {res["checkpoint"]: res for res in record["checkpoints"]}
        for src in map(Path, args.ckpts):
            res = by_path[str(src)]
            files = {r["variant"]: gguf_path(work_dir(src, args), r["variant"]) for r in res["rows"]}
            print(f"{src}: decode only", flush=True)
            val = checkpoint_data(load_checkpoint(src), args.data_dir).val
            res["decode"] = decode_pair(files, val, res["block_size"], args)
        info = {k: v for k, v in record.items() if k not in ("command", "commit", "device")}
        write_result(out, None, record["device"], command=record["command"],
                     **{**info, "decode_command": command_line(), "decode_threads": args.threads})
        results = record["checkpoints"]
    else:
        results = [bench_checkpoint(src, args) for src in map(Path, args.ckpts)]
        shared = "a shared 2-core machine: the decode speeds are a ratio measured interleaved"
        write_result(out, None, args.device, threads=args.threads, eval_threads=args.eval_threads,
                     llama_cpp=llama_cpp.__version__, checkpoints=results,
                     **({"machine": shared} if device_tag(args.device) == "cpu" else {}))
    print(markdown(results, command_line(), device_name(args.device)))
    print("wrote", out)
    bad = [r["variant"] for res in results for r in res["rows"] if not math.isfinite(r["ppl_llama_cpp"])]
    if bad:
        raise SystemExit(f"non-finite perplexity from llama.cpp: {', '.join(bad)}")

if __name__ == "__main__":
    main()
