"""Batch-1 decode and prefill speed of float and quantized GPTs, per kernel.

    python benchmarks/decode.py                                   # CPU: GPT-2-small shape
    python benchmarks/decode.py --device cuda --sizes 7b gpt2-xl gpt2-small
    python benchmarks/decode.py --ckpt runs/tiny/gptq4 --sizes    # trained checkpoints only

Models have random weights (speed does not depend on values), quantized with RTN (or, by default for 7b,
random codes: same shapes and kernels, no quantization time). Variants: fp32, bf16, int8 weight-only,
int4 g128 (g64 where in_features is not a multiple of 128), W8A8; the quantized ones also quantize the
tied head/embedding to 8 bits per row. The ratio column is against fp32 on CPU and bf16 on CUDA, measured
in the same run. "err" is the relative L2 error of the last-token logits (that token decoded as a one-token
step after a prefill of the others: the step the timing runs) against the same stored weights in fp32 on
the exact dequant path (the fp32 model for float variants): it catches a wrong kernel layout or fusion.
Memory: peak torch.cuda.max_memory_allocated over prefill + decode on CUDA; on CPU "resident" counts every
model tensor left once the stored codes a kernel's layout replaced are freed (as `sample` loads), and the
JSON adds the RSS delta.

Each model is made ready to run as `nanogptq sample` loads a checkpoint (runtime.load.prepare_for_inference:
kernel layouts, fused blocks, activation dtype, stored codes freed). Decoding uses the model's own static KV
cache, so every step has the same shapes; on CUDA the step is replayed from a CUDA graph (CUDAGraphStep, as
`sample` does) unless --no-graph, and with --compile each transformer block is also compiled by
torch.compile first (regional compilation: the 32-48 identical blocks share one compiled graph), which
fuses the small elementwise kernels between the matmuls. int8 and int4 run on the kernels `--kernel auto`
picks: on CUDA the tensor-core GEMV at 4 bits and the Triton GEMV at 8 (the int4 model's head is 8-bit).
For comparison in the same run: the "stock-" variants name PyTorch's own ops (int8pack, tinygemm's
int4pack), "triton-int4" the int4 model on the Triton GEMV, "nopdl-int4" the int4 model compiled without
programmatic dependent launch (compile_blocks; the tensor-core GEMV itself still waits on and releases its
neighbours), and "unfused-int4" the int4 model with its LayerNorms and residual adds as kernels of their
own (by default the tensor-core GEMVs apply them on one-token steps). A named kernel runs the layers it
can; the others take auto's pick.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from common import (
    add_device,
    add_output,
    device_name,
    fmt,
    hbm_peak,
    median_seconds,
    parser,
    print_table,
    result_path,
    run_seconds,
    sync,
    write_result,
)

from nanogptq.kernels import decode_attention, mma
from nanogptq.model import GPT, PRESETS, GPTConfig
from nanogptq.quant.config import BLOCK_LINEARS, QuantConfig
from nanogptq.quant.grid import QuantizedWeight
from nanogptq.quant.linear import QuantEmbedding, QuantLinear
from nanogptq.quant.quantize import quantize
from nanogptq.runtime.generate import CUDAGraphStep, compile_blocks, setup_kv_cache
from nanogptq.runtime.linear import RuntimeLinear, RuntimeTernaryLinear
from nanogptq.runtime.load import DTYPES, prepare_for_inference
from nanogptq.sample import load_for_generation

SIZES = {
    **{name: GPTConfig(vocab_size=65, **cfg) for name, cfg in PRESETS.items()},  # char-level presets
    "gpt2-small": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-xl": GPTConfig(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
    "7b": GPTConfig(vocab_size=32000, block_size=1024, n_layer=32, n_head=32, n_embd=4096),
}
ACT_DTYPES = {name: DTYPES[name] for name in ("bf16", "fp16")}  # the quantized variants' on CUDA


@dataclass
class Variant:
    name: str
    bits: int | None  # None: float weights
    kernel: str = "auto"  # as `sample --kernel`: layers it cannot run take auto's pick
    group_size: int = -1
    symmetric: bool = True
    pdl: bool = True  # --compile: fused kernels with programmatic dependent launch (compile_blocks)
    fuse: bool = True  # LayerNorms and residual adds inside the GEMVs where they can apply them


def variants(cfg: GPTConfig, gpu: bool) -> list[Variant]:
    # tinygemm needs groups that divide in_features: 1600 = 25 * 64. The Triton GEMV takes g128 anywhere
    # (the last group is shorter), but one group size per row keeps the variants comparable.
    g4 = 128 if cfg.n_embd % 128 == 0 else 64
    # asymmetric int4: the quantizer's default, and the zero point costs the kernels nothing
    out = [
        Variant("fp32", None),
        Variant("bf16", None),
        Variant("int8", 8),
        Variant(f"int4-g{g4}", 4, group_size=g4, symmetric=False),
        Variant("w8a8", 8, "w8a8"),  # the head takes auto's pick where _int_mm can't run it
    ]
    if gpu:  # PyTorch's own ops, and the int4 model without one part of the fast path each
        out.insert(3, Variant("stock-int8", 8, "int8pack"))
        out.insert(5, Variant(f"stock-int4-g{g4}", 4, "int4pack", g4, False))
        out.insert(6, Variant(f"triton-int4-g{g4}", 4, "triton", g4, False))
        out.insert(7, Variant(f"nopdl-int4-g{g4}", 4, "auto", g4, False, pdl=False))
        out.insert(8, Variant(f"unfused-int4-g{g4}", 4, "auto", g4, False, fuse=False))
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def random_model(cfg: GPTConfig, device: torch.device) -> GPT:
    torch.manual_seed(0)  # the same weights for every variant
    with torch.device(device):
        return GPT(cfg).eval()


def random_quant_linear(
    out_f: int,
    in_f: int,
    bits: int,
    group_size: int,
    symmetric: bool,
    device: torch.device | str,
    bias: torch.Tensor | None = None,
    kernel: str | None = None,
) -> nn.Module:
    """A stored QuantLinear of random codes (speed does not depend on the values), weights of about std 0.02;
    with `kernel`, its RuntimeLinear on that backend, layout built (stored codes kept)."""
    ng = 1 if group_size <= 0 else -(-in_f // group_size)
    half = 2 ** (bits - 1)
    qw = QuantizedWeight(
        # codes 1 .. 2 * half - 1 are symmetric about the zero point: weights of mean 0, as trained ones
        # (with 0 .. 2 * half - 1 the mean is -s / 2, which 4-bit scales make large enough to blow up
        # the activations of a deep random model)
        codes=torch.randint(1, 2 * half, (out_f, in_f), dtype=torch.uint8, device=device),
        scales=torch.full((out_f, ng), 0.02 / (0.58 * half), dtype=torch.float16, device=device),
        zeros=None if symmetric else torch.full((out_f, ng), half, dtype=torch.uint8, device=device),
        bits=bits,
        group_size=group_size,
    )
    q = QuantLinear.from_quantized(qw, bias)
    if kernel is None:
        return q
    m = RuntimeLinear.from_stored(q, kernel)
    m.prepare()
    return m


def random_codes_quantize(model: GPT, bits: int, group_size: int, symmetric: bool) -> GPT:
    """What quantize() builds (stored block linears + 8-bit per-row head/embedding), from random codes: for
    shapes where RTN would take long."""

    def qlinear(layer: nn.Linear, bits: int, group_size: int, symmetric: bool) -> nn.Module:
        out_f, in_f = layer.weight.shape
        return random_quant_linear(out_f, in_f, bits, group_size, symmetric, layer.weight.device, layer.bias)

    for block in model.transformer.h:
        for name in BLOCK_LINEARS:
            block.set_submodule(name, qlinear(block.get_submodule(name), bits, group_size, symmetric))
    model.lm_head = qlinear(model.lm_head, 8, -1, True)
    model.transformer.wte = QuantEmbedding(model.lm_head)
    return model


def kernels_used(model: nn.Module) -> list[str]:
    """The distinct kernels the model's quantized layers run on, in the order met."""
    used = []
    for m in model.modules():
        if isinstance(m, (RuntimeLinear, RuntimeTernaryLinear)) and m.backend not in used:
            used.append(m.backend)
    return used


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights read per decoded token (each tensor once; the KV cache is not a weight)."""
    seen, total = set(), 0
    for mod in model.modules():
        tensors = list(mod._parameters.values())
        if isinstance(mod, RuntimeLinear):
            tensors += mod.read_tensors()
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds: the packed checkpoint buffers plus the kernel layouts."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.inference_mode()
def last_logits(model: GPT, prompt: torch.Tensor) -> torch.Tensor:
    """The prompt's last logits through the model's own cached decoding path (cache in the model's dtype):
    all tokens but the last as a prefill, then the last as a one-token step, the step the timing runs."""
    n = prompt.size(1)
    setup_kv_cache(model, 1, n)
    try:
        model(prompt[:, :-1], input_pos=torch.arange(n - 1, device=prompt.device))
        return model(prompt[:, -1:], input_pos=torch.tensor([n - 1], device=prompt.device))[0].float()
    finally:
        model.clear_kv_cache()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


@torch.inference_mode()
def time_decode(model: GPT, args, device: torch.device, pdl: bool = True, label: str = "") -> dict:
    """Prefill tokens/s (median), decode tokens/s (median and every repeat) and, with --profile, what the
    profile printed. `label` names the --trace file (PATH_label.json)."""
    # a small model's context may be short: keep prompt + generated + warm-up tokens inside it
    room = model.config.block_size - args.warmup
    P = min(args.prompt_len, room // 2)
    n = min(args.new_tokens, room - P)
    # the model's own static KV cache: every decode step has the same shapes, so it can be graph-captured
    setup_kv_cache(model, 1, P + n + args.warmup)
    prompt = torch.randint(0, model.config.vocab_size, (1, P), device=device)
    positions = torch.arange(P, device=device)
    last = {}

    def prefill() -> None:
        last["logits"] = model(prompt, input_pos=positions)[0]

    prefill_s = median_seconds(prefill, args.repeats, device, warmup=1)
    if args.compile:  # after the prefill, which stays eager: one compilation per variant, for decoding
        torch._dynamo.reset()  # fresh guards per variant: else the cache limit silently falls back to eager
        compile_blocks(model, warm_up=False, pdl=pdl)  # the warm-up steps below compile it, on this cache
    step = CUDAGraphStep(model, 1) if args.graph else model

    def decode(steps: int) -> None:
        tok = last["logits"].argmax(-1)  # (1, 1); greedy, so no sampling cost
        pos = torch.tensor([P], device=device)
        for _ in range(steps):
            tok = step(tok, input_pos=pos)[0].argmax(-1)
            pos += 1

    decode(args.warmup)  # compiles, captures the graph
    sync(device)
    decode_runs = [n / t for t in run_seconds(lambda: decode(n), args.repeats, device, warmup=0)]
    out = {"prefill_tok_s": P / prefill_s, "decode_tok_s": statistics.median(decode_runs), "decode_runs": decode_runs}
    if args.profile:
        trace = args.trace and f"{args.trace.removesuffix('.json')}_{label}.json"
        out["profile"] = profile_steps(step, last["logits"].argmax(-1), P, args.profile, device, trace)
    model.clear_kv_cache()
    return out


def profile_steps(step, tok: torch.Tensor, pos0: int, steps: int, device: torch.device, trace: str | None) -> list:
    """Print (and return, line by line) where a decode step's time goes: the kernels' share of `steps`
    profiled steps, and on the GPU the timeline: the steps' span, the time some kernel runs (the union of
    their intervals: under programmatic dependent launch neighbours overlap, so the kernels' sum exceeds it)
    and the idle gaps. `trace`: also write the profile as a Chrome trace (JSON) there."""
    from torch.profiler import ProfilerActivity, profile

    lines = []

    def say(line: str) -> None:
        print(line)
        lines.append(line)

    pos = torch.tensor([pos0], device=device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tok = step(tok, input_pos=pos)[0].argmax(-1)
            pos += 1
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [(getattr(e, key), e.count, e.key) for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(t for t, _, _ in events)
    say(f"  profile: {total / steps:.0f} us of {device.type} time per step")
    for t, count, name in sorted(events, reverse=True)[:14]:
        say(f"  {t / steps:8.1f} us {100 * t / total:5.1f}% {count / steps:6.1f}x  {name[:90]}")
    if device.type != "cuda":
        return lines
    with tempfile.TemporaryDirectory() as tmp:
        path = trace or str(Path(tmp) / "trace.json")
        prof.export_chrome_trace(path)
        kernels = sorted(
            (e["ts"], e["ts"] + e["dur"], e["name"])
            for e in json.loads(Path(path).read_text())["traceEvents"]
            if e.get("cat") == "kernel"
        )
    # Each kernel's share of the timeline: the time it runs past every kernel that started before it. Under
    # programmatic dependent launch a kernel starts before its predecessor ends and waits in its first
    # instructions, so its own duration counts that wait; this counts what it adds to the step.
    added: dict[str, float] = {}
    busy, end = 0.0, -math.inf
    for t0, t1, name in kernels:
        extra = max(0.0, t1 - max(t0, end))
        added[name] = added.get(name, 0.0) + extra
        busy += extra
        end = max(end, t1)
    span = kernels[-1][1] - kernels[0][0]
    summed = sum(t1 - t0 for t0, t1, _ in kernels)
    say(
        f"  timeline: {span / steps:.0f} us per step from the first kernel's start to the last one's end, "
        f"some kernel running {busy / steps:.0f} us, idle {(span - busy) / steps:.0f} us; the kernels' "
        f"durations sum to {summed / steps:.0f} us ({len(kernels) / steps:.0f} kernels per step). "
        f"Each kernel's time past the ones before it, per step:"
    )
    for name, t in sorted(added.items(), key=lambda kv: -kv[1])[:14]:
        say(f"  {t / steps:8.1f} us {100 * t / busy:5.1f}%  {name[:90]}")
    return lines


def run_variant(name_cfg: tuple[str, GPTConfig], v: Variant, args, device: torch.device) -> dict:
    size, cfg = name_cfg
    gpu = device.type == "cuda"
    row = {"size": size, "variant": v.name, "act_dtype": args.act_dtype if gpu and v.bits else None}
    rss0 = rss_bytes()
    model = random_model(cfg, device)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
    if v.bits is None:
        dtype = torch.float32 if v.name == "fp32" else torch.bfloat16
        row["kernels"] = "-"
    else:
        # quantized weights; activations in bf16 (or --act-dtype) on CUDA, fp32 on CPU (the CPU kernels
        # take bf16 internally where that is their fast path)
        dtype = ACT_DTYPES[args.act_dtype] if gpu else torch.float32
        use_random = args.quant == "random" or (args.quant == "auto" and cfg.n_embd >= 4096)
        t0 = time.perf_counter()
        if use_random:
            random_codes_quantize(model, v.bits, v.group_size, v.symmetric)
        else:
            qcfg = QuantConfig(
                method="rtn",
                bits=v.bits,
                group_size=v.group_size,
                symmetric=v.symmetric,
                quantize_embeddings=True,
            )
            model = quantize(model, qcfg, None, progress=False)
        row["quant"] = "random codes" if use_random else "rtn"
        row["quant_time_s"] = round(time.perf_counter() - t0, 2)
    # the reference: the float model, or the stored layers on the exact dequant path, in fp32
    ref = last_logits(model, prompt) if dtype != torch.float32 or v.bits else None
    model = prepare_for_inference(
        model,
        kernel=v.kernel,
        dtype=dtype,
        keep_packed=False,  # as `sample` and the demo load: the kernels' layouts only
        fuse=v.fuse,
        split_attention=not args.sdpa,
    )
    if v.bits is not None:
        row["kernels"] = "+".join(kernels_used(model))
    row["err"] = 0.0 if ref is None else rel_err(last_logits(model, prompt), ref)
    row["weight_bytes"] = weight_bytes(model)
    row["resident_bytes"] = resident_bytes(model)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    row.update(time_decode(model, args, device, v.pdl, f"{size}_{v.name}"))
    if gpu:
        row["mma_tiles"] = mma.tuned_configs()  # the tensor-core GEMV's tuned tiles so far
        row["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        row["hbm_roofline"] = row["weight_bytes"] * row["decode_tok_s"] / hbm_peak()
    else:
        row["rss_delta_bytes"] = rss_bytes() - rss0
    del model
    return row


def run_checkpoint(path: str, kernel: str, args, device: torch.device) -> dict:
    """A trained checkpoint as `nanogptq sample` runs it: its own kernels ("auto" unless --ckpt-kernel), the
    activation dtype of --ckpt-dtype (auto: fp32 on CPU; on CUDA fp16 when quantized, else bf16)."""
    model = load_for_generation(path, device, dtype=args.ckpt_dtype, kernel=kernel).model
    row = {
        "size": Path(path).name,
        "variant": "checkpoint",
        "kernels": "+".join(sorted(kernels_used(model))) or "-",
        "err": None,
        "act_dtype": {v: k for k, v in DTYPES.items()}[model.transformer.wpe.weight.dtype],
    }
    row["weight_bytes"], row["resident_bytes"] = weight_bytes(model), resident_bytes(model)
    row.update(time_decode(model, args, device))
    return row


def error_row(size: str, variant: str, e: Exception) -> dict:
    return {"size": size, "variant": variant, "error": f"{type(e).__name__}: {e}"[:300]}


def show_table(rows: list[dict], gpu: bool) -> None:
    base_name = "bf16" if gpu else "fp32"
    bases = {r["size"]: r["decode_tok_s"] for r in rows if r["variant"] == base_name and "error" not in r}

    def variant(r: dict) -> str:
        act = r.get("act_dtype")
        return r["variant"] + (f" ({act} act)" if act not in (None, "bf16") else "")

    def ratio(r: dict) -> float | None:
        return r["decode_tok_s"] / bases[r["size"]] if r["size"] in bases and "decode_tok_s" in r else None

    def mib(key: str):
        return lambda r: None if r.get(key) is None else r[key] / 2**20

    def err(r: dict) -> str:
        if "error" in r:
            return "ERROR: " + r["error"]
        flag = " CHECK" if r.get("err") is not None and r["err"] > 0.1 else ""  # a layout bug gives errors near 1
        return fmt(r.get("err"), ".1e") + flag

    columns = [
        ("size", "size", ""),
        ("variant", variant, ""),
        ("kernels", "kernels", ""),
        ("decode tok/s", "decode_tok_s", ".1f"),
        (f"x {base_name}", ratio, ".2f"),
        ("prefill tok/s", "prefill_tok_s", ".0f"),
        ("weights MiB", mib("weight_bytes"), ".1f"),
    ]
    if gpu:
        columns += [("peak MiB", mib("peak_mem_bytes"), ".1f"), ("HBM roofline", "hbm_roofline", ".0%")]
    else:
        columns += [("resident MiB", mib("resident_bytes"), ".1f")]
    print_table(rows, columns + [("err", err, "")])


def main() -> None:
    p = parser(__doc__)
    add_device(p)
    p.add_argument("--sizes", nargs="*", default=None, choices=list(SIZES), help="default: gpt2-small")
    p.add_argument("--variants", nargs="*", default=None, help="names from fp32 bf16 int8 int4 w8a8 ...")
    p.add_argument("--ckpt", nargs="*", default=[], help="trained checkpoint folders, loaded as saved")
    p.add_argument("--ckpt-kernel", default="auto")
    p.add_argument("--ckpt-dtype", default="auto", help="the checkpoints' activation dtype, as sample --dtype")
    p.add_argument("--quant", choices=("auto", "rtn", "random"), default="auto", help="auto: random for 7b")
    p.add_argument("--prompt-len", type=int, default=None, help="default 128 on CPU, 512 on CUDA")
    p.add_argument("--new-tokens", type=int, default=None, help="timed per repeat; default 32 CPU, 128 CUDA")
    p.add_argument("--warmup", type=int, default=8, help="decode steps before timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile each block for decoding (regional)")
    p.add_argument(
        "--graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay the decode step from a CUDA graph (default: on for CUDA; CUDA only)",
    )
    p.add_argument(
        "--act-dtype",
        choices=list(ACT_DTYPES),
        default="bf16",
        help="CUDA: the quantized variants' activation dtype (the float baseline stays bf16)",
    )
    p.add_argument("--sdpa", action="store_true", help="decode steps on SDPA, not the split-cache Triton kernel")
    p.add_argument(
        "--attention",
        type=int,
        nargs=4,
        metavar=("PROGRAMS", "BLOCK", "WARPS", "SPLITS"),
        default=None,
        help="the split-cache attention's TARGET_PROGRAMS, BLOCK_L, NUM_WARPS and MAX_SPLITS (default: its own)",
    )
    p.add_argument("--profile", type=int, default=0, help="profile this many decode steps, print the top kernels")
    p.add_argument(
        "--trace",
        default=None,
        help="with --profile on CUDA: each variant's profiled steps as a Chrome trace, PATH_<size>_<variant>.json",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_output(p, where="results/cpu|gpu/decode_<sizes>_<device>.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.attention:
        attn = decode_attention
        attn.TARGET_PROGRAMS, attn.BLOCK_L, attn.NUM_WARPS, attn.MAX_SPLITS = args.attention
    args.graph = gpu if args.graph is None else args.graph
    if args.graph and not gpu:
        p.error("--graph needs --device cuda")
    args.prompt_len = args.prompt_len or (512 if gpu else 128)
    args.new_tokens = args.new_tokens or (128 if gpu else 32)
    sizes = ["gpt2-small"] if args.sizes is None else args.sizes
    what = "decode_" + ("_".join(s.replace("-", "") for s in sizes) or "checkpoints")
    out = Path(args.json) if args.json else result_path("gpu" if gpu else "cpu", what, device)
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "hbm_peak_bytes_s": hbm_peak() if gpu else None,
        "args": {k: v for k, v in vars(args).items() if k != "json"},
    }
    rows: list[dict] = []

    def record(row: dict) -> None:  # after every variant, so a killed run keeps what it measured
        rows.append(row)
        write_result(out, rows, device, **info)
        print(json.dumps({k: v for k, v in row.items() if k not in ("decode_runs", "profile")}), flush=True)

    for size in sizes:
        cfg = SIZES[size]
        for v in variants(cfg, gpu):
            if args.variants and not any(v.name.startswith(n) for n in args.variants):
                continue
            try:
                record(run_variant((size, cfg), v, args, device))
            except Exception as e:  # one broken variant must not hide the others: it gets an error row
                record(error_row(size, v.name, e))
            torch._dynamo.reset()  # compiled graphs hold the variant's model: free it before the next
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
    for path in args.ckpt:
        try:
            record(run_checkpoint(path, args.ckpt_kernel, args, device))
        except Exception as e:
            record(error_row(Path(path).name, "checkpoint", e))
    print()
    show_table(rows, gpu)
    print(f"\nwrote {out} ({device_name(device)})")


if __name__ == "__main__":
    main()
