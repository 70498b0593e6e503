"""Batch-1 decode and prefill speed of float and quantized GPTs, per QuantLinear kernel.

    python benchmarks/decode.py                                   # CPU: GPT-2-small shape
    python benchmarks/decode.py --device cuda --sizes 7b gpt2-xl gpt2-small
    python benchmarks/decode.py --ckpt runs/tiny-gptq4 --sizes    # trained checkpoints only

Models have random weights (speed does not depend on values), quantized with RTN (or, by default for 7b,
random codes: same shapes and kernels, no quantization time). Variants: fp32, bf16, int8 weight-only,
int4 g128 (g64 where in_features is not a multiple of 128), W8A8; the quantized ones also quantize the
tied head/embedding to 8 bits per row. The ratio column is against fp32 on CPU and bf16 on CUDA, measured
in the same run. "err" is the relative L2 error of the last-token logits (that token decoded as a one-token
step after a prefill of the others: the step the timing runs) against the same weights through the fp32
dequant reference (fp32 model for float variants): it catches a wrong kernel layout or fusion. Memory:
peak torch.cuda.max_memory_allocated over prefill + decode on CUDA; on CPU "resident" counts every model
tensor left once the stored codes a kernel's layout replaced are freed (as `sample` loads), and the JSON
adds the RSS delta.

Decoding uses the model's own static KV cache, so every step has the same shapes; on CUDA the step is
replayed from a CUDA graph (model.CUDAGraphStep, as `nanogptq sample` does) unless --no-graph, and with
--compile each transformer block is also compiled by torch.compile first (regional compilation: the 32-48
identical blocks share one compiled graph), which fuses the small elementwise kernels between the matmuls.
int8 and int4 run on the kernels --kernel auto picks: on CUDA the tensor-core GEMV at 4 bits and the Triton
GEMV at 8 (the int4 model's head is 8-bit); for comparison in the same run, the "stock-" variants run
PyTorch's own ops alone (tinygemm at 4 bits; their 8-bit head on int8pack), "triton-int4" the int4 model
on the Triton GEMV, and "nopdl-int4" the int4 model compiled without programmatic dependent launch
(model.compile_blocks; the tensor-core GEMV itself still waits on and releases its neighbours), and
"unfused-int4" the int4 model with its LayerNorms and residual adds as kernels of their own (quant.fuse_blocks
off: by default the tensor-core GEMVs apply them on one-token steps).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from nanogptq.checkpoint import DTYPES, cast_activations
from nanogptq.model import GPT, PRESETS, CUDAGraphStep, GPTConfig, compile_blocks
from nanogptq.quant import (
    QuantConfig,
    QuantEmbedding,
    QuantizedWeight,
    QuantLinear,
    cuda_gemv,
    free_packed_buffers,
    fuse_blocks,
    fuse_mlp_gelu,
    quantize,
)
from nanogptq.quant.linear import AUTO_ORDER, auto_kernel

SIZES = {
    **{name: GPTConfig(vocab_size=65, **cfg) for name, cfg in PRESETS.items()},  # char-level presets
    "gpt2-small": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-xl": GPTConfig(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
    "7b": GPTConfig(vocab_size=32000, block_size=1024, n_layer=32, n_head=32, n_embd=4096),
}
ACT_DTYPES = {name: DTYPES[name] for name in ("bf16", "fp16")}  # the quantized variants' on CUDA
# datasheet HBM peaks, bytes/s, by a word of the device name (the roofline's denominator)
HBM_PEAKS = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def hbm_peak() -> float:
    """The GPU's memory-bandwidth peak: $NANOGPTQ_HBM_GBS if set, else by name, else the H100's."""
    if os.environ.get("NANOGPTQ_HBM_GBS"):
        return float(os.environ["NANOGPTQ_HBM_GBS"]) * 1e9
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((peak for key, peak in HBM_PEAKS.items() if key in name), HBM_PEAKS["H100"])


@dataclass
class Variant:
    name: str
    bits: int | None  # None: float weights
    kernels: tuple[str, ...] = ()  # per layer, the first that supports it ("dequant" always does)
    group_size: int = -1
    symmetric: bool = True
    pdl: bool = True  # --compile: fused kernels with programmatic dependent launch (model.compile_blocks)
    fuse: bool = True  # LayerNorms and residual adds inside the GEMVs where they can apply them (fuse_blocks)


def variants(cfg: GPTConfig, gpu: bool) -> list[Variant]:
    # tinygemm needs groups that divide in_features: 1600 = 25 * 64. The Triton GEMV takes g128 anywhere
    # (the last group is shorter), but one group size per row keeps the variants comparable.
    g4 = 128 if cfg.n_embd % 128 == 0 else 64
    # asymmetric int4: the quantizer's default, and the zero point costs the kernels nothing
    # int8 and int4 take the kernels `--kernel auto` picks (AUTO_ORDER): on the GPU the Triton GEMV
    out = [
        Variant("fp32", None),
        Variant("bf16", None),
        Variant("int8", 8, AUTO_ORDER),
        Variant(f"int4-g{g4}", 4, AUTO_ORDER, group_size=g4, symmetric=False),
        Variant("w8a8", 8, ("w8a8", "int8pack", "dequant")),  # the head falls back where _int_mm can't
    ]
    if gpu:  # PyTorch's own ops alone, for comparison
        out.insert(3, Variant("stock-int8", 8, ("int8pack", "dequant")))
        out.insert(5, Variant(f"stock-int4-g{g4}", 4, ("int4pack", "int8pack", "dequant"), g4, False))
        out.insert(6, Variant(f"triton-int4-g{g4}", 4, ("triton", "int8pack", "dequant"), g4, False))
        out.insert(7, Variant(f"nopdl-int4-g{g4}", 4, AUTO_ORDER, g4, False, pdl=False))
        out.insert(8, Variant(f"unfused-int4-g{g4}", 4, AUTO_ORDER, g4, False, fuse=False))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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
    kernel: str = "auto",
) -> QuantLinear:
    """A QuantLinear of random codes (speed does not depend on the values), weights of about std 0.02."""
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
    q = QuantLinear.from_quantized(qw, bias, kernel=kernel)
    q.prepare_kernel()
    return q


def random_codes_quantize(model: GPT, bits: int, group_size: int, symmetric: bool) -> GPT:
    """What quantize() builds (block linears + 8-bit per-row head/embedding), from random codes: for
    shapes where RTN would take long."""

    def qlinear(layer: nn.Linear, bits: int, group_size: int, symmetric: bool) -> QuantLinear:
        out_f, in_f = layer.weight.shape
        return random_quant_linear(out_f, in_f, bits, group_size, symmetric, layer.weight.device, layer.bias)

    for block in model.transformer.h:
        for name in QuantConfig().layers:
            block.set_submodule(name, qlinear(block.get_submodule(name), bits, group_size, symmetric))
    model.lm_head = qlinear(model.lm_head, 8, -1, True)
    model.transformer.wte = QuantEmbedding(model.lm_head)
    return model


def set_kernels(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """Each QuantLinear gets the first of `names` that supports it; returns the distinct choices."""
    used = []
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = auto_kernel(m, m.qweight.device, names)
            m.prepare_kernel()
            used += [m.kernel] if m.kernel not in used else []
    return used


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights read per decoded token (each tensor once; the KV cache is not a weight)."""
    seen, total = set(), 0
    for mod in model.modules():
        tensors = list(mod._parameters.values())
        if isinstance(mod, QuantLinear):
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
def last_logits(model: GPT, prompt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The prompt's last logits through the model's own cached decoding path (cache in the model's dtype):
    all tokens but the last as a prefill, then the last as a one-token step, the step the timing runs."""
    n = prompt.size(1)
    model.setup_kv_cache(1, n)
    try:
        model(prompt[:, :-1], input_pos=torch.arange(n - 1, device=prompt.device))
        return model(prompt[:, -1:], input_pos=torch.tensor([n - 1], device=prompt.device))[0].float()
    finally:
        model.clear_kv_cache()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


@torch.inference_mode()
def time_decode(
    model: GPT, args, device: torch.device, pdl: bool = True, label: str = ""
) -> tuple[float, float, list[float]]:
    """(prefill tokens/s, median decode tokens/s, every repeat's decode tokens/s). `label` names the
    --trace file (PATH_label.json)."""
    # a small model's context may be short: keep prompt + generated + warm-up tokens inside it
    room = model.config.block_size - args.warmup
    P = min(args.prompt_len, room // 2)
    n = min(args.new_tokens, room - P)
    # the model's own static KV cache: every decode step has the same shapes, so it can be graph-captured
    model.setup_kv_cache(1, P + n + args.warmup)
    if args.sdpa:  # PyTorch's attention for the one-token steps too, for comparison
        for block in model.transformer.h:
            block.attn.kv_cache.split_decode = False
    prompt = torch.randint(0, model.config.vocab_size, (1, P), device=device)
    positions = torch.arange(P, device=device)

    prefill = []
    for _ in range(args.repeats + 1):  # the first run warms up
        sync(device)
        t0 = time.perf_counter()
        logits = model(prompt, input_pos=positions)[0]
        sync(device)
        prefill.append(P / (time.perf_counter() - t0))

    if args.compile:  # after the prefill, which stays eager: one compilation per variant, for decoding
        torch._dynamo.reset()  # fresh guards per variant: else the cache limit silently falls back to eager
        compile_blocks(model, warm_up=False, pdl=pdl)  # the warm-up steps below compile it, on this cache
    step = CUDAGraphStep(model, 1) if args.graph else model
    decode = []
    for r in range(args.repeats + 1):
        tok = logits.argmax(-1)  # (1, 1); greedy, so no sampling cost
        pos = torch.tensor([P], device=device)
        steps = n if r else args.warmup  # run 0 warms up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = step(tok, input_pos=pos)[0].argmax(-1)
            pos += 1
        sync(device)
        if r:
            decode.append(n / (time.perf_counter() - t0))
    if args.profile:
        trace = args.trace and f"{args.trace.removesuffix('.json')}_{label}.json"
        profile_steps(step, logits.argmax(-1), P, args.profile, device, trace)
    model.clear_kv_cache()
    return statistics.median(prefill[1:]), statistics.median(decode), decode


def profile_steps(step, tok: torch.Tensor, pos0: int, steps: int, device: torch.device, trace: str | None) -> None:
    """Print where a decode step's GPU time goes: the kernels' share of `steps` profiled steps, and on the GPU
    the timeline: the steps' span, the time some kernel runs (the union of their intervals: under
    programmatic dependent launch neighbours overlap, so the kernels' sum exceeds it) and the idle gaps.
    `trace`: also write the profile as a Chrome trace (JSON) there."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    pos = torch.tensor([pos0], device=device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tok = step(tok, input_pos=pos)[0].argmax(-1)
            pos += 1
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [(getattr(e, key), e.count, e.key) for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(t for t, _, _ in events)
    print(f"  profile: {total / steps:.0f} us of {device.type} time per step")
    for t, count, name in sorted(events, reverse=True)[:14]:
        print(f"  {t / steps:8.1f} us {100 * t / total:5.1f}% {count / steps:6.1f}x  {name[:90]}")
    if device.type != "cuda":
        return
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
    print(
        f"  timeline: {span / steps:.0f} us per step from the first kernel's start to the last one's end, "
        f"some kernel running {busy / steps:.0f} us, idle {(span - busy) / steps:.0f} us; the kernels' "
        f"durations sum to {summed / steps:.0f} us ({len(kernels) / steps:.0f} kernels per step). "
        f"Each kernel's time past the ones before it, per step:"
    )
    for name, t in sorted(added.items(), key=lambda kv: -kv[1])[:14]:
        print(f"  {t / steps:8.1f} us {100 * t / busy:5.1f}%  {name[:90]}")


def run_variant(name_cfg: tuple[str, GPTConfig], v: Variant, args, device: torch.device) -> dict:
    size, cfg = name_cfg
    gpu = device.type == "cuda"
    row = {"size": size, "variant": v.name, "act_dtype": args.act_dtype if gpu and v.bits else None}
    rss0 = rss_bytes()
    model = random_model(cfg, device)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
    if v.bits is None:
        dtype = torch.float32 if v.name == "fp32" else torch.bfloat16
        ref = last_logits(model, prompt, torch.float32) if dtype != torch.float32 else None
        model.to(dtype)
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
            quantize(model, qcfg, None, progress=False)
        row["quant"] = "random codes" if use_random else "rtn"
        row["quant_time_s"] = round(time.perf_counter() - t0, 2)
        set_kernels(model, ("dequant",))
        ref = last_logits(model, prompt, torch.float32)  # the reference kernel, in fp32
        cast_activations(model, dtype)  # LayerNorms, embeddings; the grids stay as stored
        row["kernels"] = "+".join(set_kernels(model, v.kernels))
        fuse_mlp_gelu(model)  # as finalize_quantized_model does on load (quantize() has done it already)
        row["fused_blocks"] = fuse_blocks(model) if v.fuse else 0  # as finalize_quantized_model does
        row["freed_layers"] = free_packed_buffers(model)  # as `sample` and the demo load: layouts only
    row["err"] = 0.0 if ref is None else rel_err(last_logits(model, prompt, dtype), ref)
    row["weight_bytes"] = weight_bytes(model)
    row["resident_bytes"] = resident_bytes(model)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    prefill, decode, runs = time_decode(model, args, device, v.pdl, f"{size}_{v.name}")
    row.update(prefill_tok_s=prefill, decode_tok_s=decode, decode_runs=runs)
    if gpu:
        row["mma_tiles"] = cuda_gemv.tuned_configs()  # the tensor-core GEMV's tuned tiles so far
        row["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        row["hbm_roofline"] = row["weight_bytes"] * decode / hbm_peak()
    else:
        row["rss_delta_bytes"] = rss_bytes() - rss0
    del model
    return row


def run_checkpoint(path: str, kernel: str, args, device: torch.device) -> dict:
    """A trained checkpoint as `nanogptq sample` runs it: its own kernels ("auto" unless --ckpt-kernel), the
    activation dtype of --ckpt-dtype (auto: fp32 on CPU; on CUDA fp16 when quantized, else bf16)."""
    from nanogptq.generate import load_for_generation

    model = load_for_generation(path, device, dtype=args.ckpt_dtype, kernel=kernel).model
    kernels = sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear)}) or ["-"]
    row = {
        "size": Path(path).name,
        "variant": "checkpoint",
        "kernels": "+".join(kernels),
        "err": None,
        "act_dtype": {v: k for k, v in DTYPES.items()}[model.transformer.wpe.weight.dtype],
    }
    row["weight_bytes"], row["resident_bytes"] = weight_bytes(model), resident_bytes(model)
    row["prefill_tok_s"], row["decode_tok_s"], row["decode_runs"] = time_decode(model, args, device)
    return row


def error_row(size: str, variant: str, e: Exception) -> dict:
    return {"size": size, "variant": variant, "error": f"{type(e).__name__}: {e}"[:300]}


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(rows: list[dict], gpu: bool) -> None:
    base_name = "bf16" if gpu else "fp32"
    cols = ["size", "variant", "kernels", "decode tok/s", f"x {base_name}", "prefill tok/s", "weights MB"]
    cols += ["peak MB", "HBM roofline"] if gpu else ["resident MB"]
    cols += ["err"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | {r['variant']} | ERROR: {r['error']} |" + " |" * (len(cols) - 3))
            continue
        base = next(
            (b for b in rows if b["size"] == r["size"] and b["variant"] == base_name and "error" not in b),
            None,
        )
        ratio = r["decode_tok_s"] / base["decode_tok_s"] if base else None
        mem = r.get("peak_mem_bytes") if gpu else r.get("resident_bytes")
        act = r.get("act_dtype")
        cells = [
            r["size"],
            r["variant"] + (f" ({act} act)" if act not in (None, "bf16") else ""),
            r["kernels"],
            fmt(r["decode_tok_s"], ".1f"),
            fmt(ratio, ".2f"),
            fmt(r["prefill_tok_s"], ".0f"),
            fmt(r["weight_bytes"] / 2**20, ".1f"),
            fmt(None if mem is None else mem / 2**20, ".1f"),
        ]
        if gpu:
            cells.append(fmt(r.get("hbm_roofline"), ".0%"))
        err = r.get("err")
        flag = " CHECK" if err is not None and err > 0.1 else ""  # a layout bug gives errors near 1
        cells.append(fmt(err, ".1e") + flag)
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="*", default=None, choices=list(SIZES), help="default: gpt2-small")
    p.add_argument("--variants", nargs="*", default=None, help="names from fp32 bf16 int8 int4 w8a8")
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
    p.add_argument("--json", default=None, help="default results/decode_<device>.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.attention:
        import nanogptq.attention_triton as attention

        attention.TARGET_PROGRAMS, attention.BLOCK_L, attention.NUM_WARPS, attention.MAX_SPLITS = args.attention
    args.graph = gpu if args.graph is None else args.graph
    if args.graph and not gpu:
        p.error("--graph needs --device cuda")
    args.prompt_len = args.prompt_len or (512 if gpu else 128)
    args.new_tokens = args.new_tokens or (128 if gpu else 32)
    sizes = ["gpt2-small"] if args.sizes is None else args.sizes
    out = Path(args.json or f"results/decode_{device.type}.json")
    meta = {
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "hbm_peak_bytes_s": hbm_peak() if gpu else None,
        **{k: v for k, v in vars(args).items() if k not in ("json",)},
    }
    rows: list[dict] = []

    def record(row: dict) -> None:  # after every variant, so a killed run keeps what it measured
        rows.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(json.dumps({k: v for k, v in row.items() if k != "decode_runs"}), flush=True)

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
    print_table(rows, gpu)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
