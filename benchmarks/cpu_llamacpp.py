"""nanogptq against llama.cpp on the CPU: the same weights, batch-1 decode and prefill tokens/s, side by side.

    python benchmarks/cpu_llamacpp.py                                  # the GPT-2-small shape, random weights
    python benchmarks/cpu_llamacpp.py --sizes --ckpt runs/tiny/best runs/small/best --compile

Each model (random weights at a named shape, or a trained float checkpoint) is saved as a checkpoint in fp32
and quantized by nanogptq's RTN to 8 and 4 bits in groups of 32, symmetric, and to 8 bits per row (the 8-bit grid
nanogptq's own CPU kernel runs), with the tied head/embedding at 8 bits per row (--quantize-embeddings);
export_gguf writes each as it is stored: F32, Q8_0 and Q4_0 blocks holding exactly the same grids (the 8-bit
head as Q8_0). Speed does not depend on the values, so the random
models measure what the trained ones would.

Runners, in one process, interleaved round by round (median of --rounds after a warm-up round):
  own        nanogptq's own kernels, as `sample --kernel auto` loaded them before llama.cpp was an engine
             (prepare_for_inference: the kernels auto picks on the CPU, fusion, fp32 activations)
  own-comp   the same with the blocks' one-token step compiled (compile_blocks; `sample --compile`)
  engine     nanogptq's llama.cpp engine (interop/llamacpp.py, what `sample --kernel auto` runs now where a
             GGUF type holds the grid): llama.cpp behind nanogptq's model interface, logits as a tensor
  bare       llama_decode called on the engine's own context with nothing around it but the batch's fields
             (--bare): the floor of any Python caller of llama.cpp, so engine - bare is the engine's overhead
  llama.cpp  llama-cpp-python itself on the same GGUF file: Llama.eval, no logits copied out
Each run is a prefill of --prompt-len tokens, then --new-tokens one-token steps on fixed tokens (no sampling:
the forward steps only). torch.set_num_threads(--threads); Llama(n_threads=n_threads_batch=--threads).
"ratio" columns are runner / llama.cpp tokens/s. "dlogit" is the largest |logit| difference between nanogptq's
own kernels and llama.cpp at the prompt's last position. With --profile, the own runner's decode step is
profiled once per variant (torch.profiler, top operators by self CPU time) and the profile kept in the JSON.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import numpy as np
import torch
from common import add_output, fmt, parser, print_table, write_result

from nanogptq.checkpoint import load_checkpoint, save_checkpoint
from nanogptq.data import ByteTokenizer, CharTokenizer
from nanogptq.interop.gguf import export_gguf
from nanogptq.interop.llamacpp import load_llamacpp
from nanogptq.model import GPT, PRESETS, GPTConfig
from nanogptq.quant.config import QuantConfig
from nanogptq.quant.quantize import quant_meta, quantize
from nanogptq.runtime.generate import compile_blocks, setup_kv_cache
from nanogptq.runtime.linear import RuntimeLinear
from nanogptq.runtime.load import prepare_for_inference

SIZES = {
    "gpt2-small": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    **{name: GPTConfig(vocab_size=65, **cfg) for name, cfg in PRESETS.items()},  # random char-level presets
}
VARIANTS = {  # name -> (GGUF type, nanogptq's quantize settings; None: the float model)
    "fp32": ("F32", None),
    "int8-g32": ("Q8_0", QuantConfig(method="rtn", bits=8, group_size=32, symmetric=True, quantize_embeddings=True)),
    # one grid per row: also held exactly by Q8_0 (every block of a row gets the row's scale), and the 8-bit grid
    # nanogptq's CPU kernel runs (PyTorch's int8 op takes one scale per row; groups of 32 run the dequant path)
    "int8-row": ("Q8_0", QuantConfig(method="rtn", bits=8, group_size=-1, symmetric=True, quantize_embeddings=True)),
    "int4-g32": ("Q4_0", QuantConfig(method="rtn", bits=4, group_size=32, symmetric=True, quantize_embeddings=True)),
}


def float_checkpoints(args, root: Path) -> list[tuple[str, Path]]:
    """(name, fp32 checkpoint) per model: random ones at --sizes, then --ckpt as given."""
    out = []
    for size in args.sizes:
        torch.manual_seed(0)
        model = GPT(SIZES[size]).eval()
        # nanogptq's ids go straight in: any tokenizer of the size does (a vocabulary past it is padded)
        vocab = SIZES[size].vocab_size
        tok = ByteTokenizer() if vocab >= 256 else CharTokenizer("".join(chr(32 + i) for i in range(vocab)))
        meta = {"model": SIZES[size].to_dict(), "tokenizer": tok.to_dict(), "quantization": None}
        out.append((f"{size} (random)", save_checkpoint(root / size, model, meta)))
    out += [(str(p), Path(p)) for p in args.ckpt]
    return out


def make_variant(float_ckpt: Path, variant: str, root: Path) -> tuple[Path, Path]:
    """The variant's checkpoint and its GGUF file."""
    qtype, qcfg = VARIANTS[variant]
    path = float_ckpt
    if qcfg is not None:
        ckpt = load_checkpoint(float_ckpt)
        q = quantize(ckpt.model, qcfg, progress=False)
        path = save_checkpoint(root / variant, q, {**ckpt.meta, "quantization": quant_meta(q, qcfg)},
                               files=ckpt_files(float_ckpt))
    gguf_path = root / f"{variant}.gguf"
    summary = export_gguf(path, gguf_path, float_type="F32", overwrite=True)
    blocks = {t for n, t in summary["types"].items() if n.startswith("blk.") and n.endswith("attn_qkv.weight")}
    assert blocks == {qtype}, (variant, blocks)
    return path, gguf_path


def ckpt_files(path: Path) -> dict[str, str]:
    """A pretrained tokenizer's file kept beside config.json, carried to the quantized checkpoint."""
    tok = path / "tokenizer.json"
    return {"tokenizer.json": tok.read_text()} if tok.exists() else {}


class Own:
    """nanogptq's own kernels: prefill, then one-token steps, on the model's static KV cache."""

    def __init__(self, path: Path, compile: bool):
        self.model = load_checkpoint(path).model
        prepare_for_inference(self.model, kernel="auto", dtype=torch.float32, keep_packed=False)
        if compile:
            compile_blocks(self.model)
        self.kernels = "+".join(sorted({m.backend for m in self.model.modules() if isinstance(m, RuntimeLinear)}))

    @torch.inference_mode()
    def run(self, prompt: list[int], steps: list[int]) -> tuple[float, float, torch.Tensor]:
        setup_kv_cache(self.model, 1)
        try:
            t0 = time.perf_counter()
            logits, _ = self.model(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))
            t1 = time.perf_counter()
            for i, tok in enumerate(steps):
                self.model(torch.tensor([[tok]]), input_pos=torch.tensor([len(prompt) + i]))
            t2 = time.perf_counter()
        finally:
            self.model.clear_kv_cache()
        return t1 - t0, t2 - t1, logits[0, -1]

    def profile(self, prompt: list[int], steps: list[int], top: int = 10) -> list[dict]:
        with torch.inference_mode():
            setup_kv_cache(self.model, 1)
            self.model(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for i, tok in enumerate(steps):
                    self.model(torch.tensor([[tok]]), input_pos=torch.tensor([len(prompt) + i]))
            self.model.clear_kv_cache()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        return [{"op": e.key, "calls_per_step": e.count / len(steps), "self_ms_per_step": e.self_cpu_time_total / 1e3
                 / len(steps), "share": e.self_cpu_time_total / total} for e in events[:top]]


class Engine:
    """nanogptq's llama.cpp engine, called as the decode loop calls a model."""

    def __init__(self, path: Path, gguf_path: Path, threads: int):
        self.model = load_llamacpp(load_checkpoint(path), threads=threads, cache=gguf_path)

    def run(self, prompt: list[int], steps: list[int]) -> tuple[float, float, torch.Tensor]:
        t0 = time.perf_counter()
        logits, _ = self.model(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))
        t1 = time.perf_counter()
        for i, tok in enumerate(steps):
            self.model(torch.tensor([[tok]]), input_pos=torch.tensor([len(prompt) + i]))
        return t1 - t0, time.perf_counter() - t1, logits[0, -1]


class BareDecode:
    """llama_decode on the engine's context, one token per call, nothing else per step (the engine's private
    batch and context are used on purpose: the same llama.cpp state, minus the engine's Python)."""

    def __init__(self, engine: Engine):
        self.model = engine.model

    def run(self, prompt: list[int], steps: list[int]) -> tuple[float, float, torch.Tensor]:
        m = self.model
        t0 = time.perf_counter()
        logits, _ = m(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))
        t1 = time.perf_counter()
        b, ctx, n = m._batch, m._ctx, len(prompt)
        for i, tok in enumerate(steps):
            b.n_tokens, b.token[0], b.pos[0], b.logits[0] = 1, tok, n + i, True
            llama_cpp.llama_decode(ctx, b)
        t2 = time.perf_counter()
        m._n_past = n + len(steps)
        return t1 - t0, t2 - t1, logits[0, -1]


class LlamaCpp:
    """llama-cpp-python itself."""

    def __init__(self, gguf_path: Path, n_ctx: int, threads: int):
        self.llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.logits_ith = llama_cpp.llama_get_logits_ith

    def run(self, prompt: list[int], steps: list[int]) -> tuple[float, float, torch.Tensor]:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        t1 = time.perf_counter()
        logits = np.ctypeslib.as_array(self.logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),)).copy()
        t1b = time.perf_counter()
        for tok in steps:
            self.llm.eval([tok])
        return t1 - t0, time.perf_counter() - t1b, torch.from_numpy(logits)


def measure(runners: dict[str, object], prompt: list[int], steps: list[int], rounds: int) -> dict[str, dict]:
    """Interleaved rounds (one untimed first): per runner the median prefill and decode tokens/s, and every
    round's decode tokens/s."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for r in range(rounds + 1):
        for name, runner in runners.items():
            prefill_s, decode_s, _ = runner.run(prompt, steps)
            if r:
                runs[name].append((len(prompt) / prefill_s, len(steps) / decode_s))
    return {name: {"prefill_tok_s": statistics.median(p for p, _ in rs),
                   "decode_tok_s": statistics.median(d for _, d in rs),
                   "decode_runs": [round(d, 1) for _, d in rs]} for name, rs in runs.items()}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sizes", nargs="*", default=["gpt2-small"], choices=list(SIZES))
    p.add_argument("--ckpt", nargs="*", default=[], help="trained float checkpoints, quantized here")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=128, help="capped at half the model's context")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="also the own kernels with the step compiled")
    p.add_argument("--profile", action="store_true", help="profile the own kernels' decode step")
    p.add_argument("--bare", action="store_true", help="also llama_decode alone on the engine's context")
    p.add_argument("--note", default="", help="recorded in the result file (the machine's state, say)")
    add_output(p, where="results/cpu/llamacpp_<first model>_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, float_ckpt in float_checkpoints(args, Path(tmp)):
            cfg = load_checkpoint(float_ckpt).model.config
            n = min(args.prompt_len, cfg.block_size // 2)
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(cfg.vocab_size, (n + args.new_tokens,), generator=g).tolist()
            prompt, steps = ids[:n], ids[n:]
            for variant in args.variants:
                root = Path(tmp) / f"{len(rows)}"
                path, gguf_path = make_variant(float_ckpt, variant, root)
                own = Own(path, compile=False)
                runners = {"own": own}
                if args.compile:
                    runners["own-comp"] = Own(path, compile=True)
                runners["engine"] = Engine(path, gguf_path, args.threads)
                if args.bare:
                    runners["bare"] = BareDecode(runners["engine"])
                runners["llama.cpp"] = LlamaCpp(gguf_path, cfg.block_size, args.threads)
                result = measure(runners, prompt, steps, args.rounds)
                dlogit = float((own.run(prompt, steps)[2] - runners["llama.cpp"].run(prompt, steps)[2]).abs().max())
                base = result["llama.cpp"]
                row = {"model": name, "variant": variant, "gguf": VARIANTS[variant][0], "own_kernels": own.kernels,
                       "prompt_len": n, "new_tokens": len(steps), "dlogit": dlogit}
                for runner, res in result.items():
                    row[runner] = res
                    row[f"{runner}_decode_ratio"] = res["decode_tok_s"] / base["decode_tok_s"]
                    row[f"{runner}_prefill_ratio"] = res["prefill_tok_s"] / base["prefill_tok_s"]
                if args.profile:
                    row["own_profile"] = own.profile(prompt, steps)
                rows.append(row)
                speeds = ", ".join(f"{k} {v['decode_tok_s']:.0f} tok/s" for k, v in result.items())
                print(f"{name} {variant}: {speeds}", flush=True)
                del runners, own
    columns: list[tuple[str, str | Callable[[dict], object], str]] = [
        ("model", "model", ""), ("variant", "variant", ""), ("GGUF", "gguf", ""), ("own kernels", "own_kernels", "")]
    for runner in ["own", *(["own-comp"] if args.compile else []), "engine", *(["bare"] if args.bare else []),
                   "llama.cpp"]:
        columns.append((f"{runner} decode tok/s", lambda r, k=runner: r[k]["decode_tok_s"], ".0f"))
        if runner != "llama.cpp":
            columns.append((f"{runner} ratio", f"{runner}_decode_ratio", ".2f"))
    for runner in ["own", "engine", "llama.cpp"]:
        columns.append((f"{runner} prefill tok/s", lambda r, k=runner: r[k]["prefill_tok_s"], ".0f"))
    columns.append(("dlogit", "dlogit", ".3g"))
    text = print_table(rows, columns)
    out = args.json or f"results/cpu/llamacpp_{(args.sizes or [Path(args.ckpt[0]).parent.name])[0]}_cpu.json"

    write_result(out, rows, "cpu", table=text, threads=args.threads, rounds=args.rounds, torch=torch.__version__,
                 llama_cpp=llama_cpp.__version__, note=args.note, compile=args.compile, bare=args.bare)
    print(f"wrote {out}; {fmt(len(rows))} rows")


if __name__ == "__main__":
    main()
