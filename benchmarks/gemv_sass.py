"""The interleaved GEMV's machine code, without a GPU: compile it for sm_90 through Triton (its own ptxas and
cuobjdump), then count the instructions in the main loop per weight, and check for register spills and for
shared-memory shuffles (barriers) inside the loop.

    python benchmarks/gemv_sass.py                 # the tiles the H200's autotuner picked (results JSON)
    python benchmarks/gemv_sass.py --all           # every tile of the autotuner, at 4 and 8 bits
    python benchmarks/gemv_sass.py --x bf16        # bf16 activations (converted in the loop); default fp16
    python benchmarks/gemv_sass.py --mma "8, 1, 8, 4, true, false, 6"   # the tensor-core GEMV (cuda_gemv.py)

Counts are static (one pass of the loop body), not a profile. --mma takes w4_gemv's template arguments (CW,
UNROLL, WARPS, TILES, XNC, XS, FLAGS) and reports ptxas's registers and spills for each instance; it needs
nvcc (CUDA's compiler: $NVCC, on PATH, or under /usr/local/cuda*), as the kernel is CUDA C.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanogptq.quant import cuda_gemv
from nanogptq.quant import triton_gemv as tg

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# the integers are multiples of 16 for these shapes, as Triton specializes them, but NG
UNALIGNED = {"NG"}


def compile_sass(bits: int, pg: int, has_z: bool, cfg: triton.Config, x_bf16: bool) -> tuple[str, str]:
    """(ptxas's report, the SASS) of one specialization: whole tiles (EVEN), as the 7 B shapes are."""
    sig = tg.compile_signature()
    if x_bf16:
        sig["x_ptr"] = "*bf16"
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if t != "constexpr" and n not in UNALIGNED}
    consts = {"BITS": bits, "PG": pg, "HAS_Z": has_z, "X_BF16": x_bf16, "FAST": True, "EVEN": True, "SG_DIV": 1,
              **cfg.kwargs}
    src = ASTSource(fn=tg._gemv_rows_kernel, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        ptx.write_text(k.asm["ptx"])
        report = subprocess.run([BIN / "ptxas", "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True,
                                text=True, check=True).stderr
        sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return report, sass


def mma_report(instance: str) -> str:
    """ptxas's report (registers, spills) for one instance of the tensor-core GEMV, compiled for sm_90."""
    installed = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or (installed[-1] if installed else None)
    if nvcc is None or not Path(nvcc).is_file():
        raise SystemExit(f"gemv_sass.py --mma needs nvcc ({nvcc or 'not found'}): set $NVCC or put CUDA's bin on PATH")
    args = "const u32*, const u16*, const u32*, const u16*, u16*, " + "int, " * 8 + "Epilogue"
    with tempfile.TemporaryDirectory() as d:
        cu = Path(d) / "k.cu"
        cu.write_text(f"{cuda_gemv.SOURCE}\ntemplate __global__ void w4_gemv<{instance}>({args});\n")
        cmd = [nvcc, "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o", Path(d) / "k.cubin", cu]
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"nvcc failed on w4_gemv<{instance}>: {r.stderr.strip()[-500:]}")
    return r.stderr


def loop_ops(sass: str) -> dict[str, int]:
    """Opcode counts between the main loop's head and its backward branch."""
    lines = sass.splitlines()
    addr = [int(m.group(1), 16) if (m := re.search(r"/\*([0-9a-f]{4})\*/", line)) else None for line in lines]
    back = next(i for i, line in enumerate(lines)
                if (m := re.search(r"BRA 0x([0-9a-f]+) ;", line)) and int(m.group(1), 16) < (addr[i] or 0))
    head = int(re.search(r"BRA 0x([0-9a-f]+)", lines[back]).group(1), 16)
    ops: dict[str, int] = {}
    for line, a in zip(lines, addr, strict=True):
        if a is not None and head <= a <= addr[back] and (m := re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)):
            ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    return ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="every autotuner tile, not only the H200's picks")
    p.add_argument("--x", choices=("fp16", "bf16"), default="fp16", help="the activations' dtype")
    p.add_argument("--mma", nargs="+", metavar="INSTANCE", help="tensor-core GEMV instances instead (see above)")
    args = p.parse_args()
    if args.mma:
        print("| w4_gemv<CW, UNROLL, WARPS, TILES, XNC, XS, FLAGS> | registers | spill stores |")
        print("|---|---|---|")
        for instance in args.mma:
            report = mma_report(instance)
            regs = re.search(r"Used (\d+) registers", report).group(1)
            spills = re.search(r"(\d+) bytes spill stores", report).group(1)
            print(f"| {instance} | {regs} | {spills} |")
        return
    picked = [(1, 32, 4, 4), (1, 16, 4, 2), (1, 16, 2, 4), (1, 16, 2, 2), (1, 16, 1, 4)]  # results/gemv_even_h200.json
    configs = tg._rows_configs() if args.all else [
        triton.Config({"BLOCK_W": bw, "GPI": gpi, "R": r, "STAGES": 1}, num_warps=w) for bw, gpi, r, w in picked]
    print("| bits | tile | registers | spills | loop instructions | per weight | barriers in loop |")
    print("|---|---|---|---|---|---|---|")
    for bits in (4, 8):
        for cfg in configs:
            report, sass = compile_sass(bits, 64, True, cfg, args.x == "bf16")
            ops = loop_ops(sass)
            c = cfg.kwargs
            # weights per thread per loop pass: the tile's words / threads x codes per word
            words = c["BLOCK_W"] * c["GPI"] * 64 // (32 * cfg.num_warps)
            weights = words * 32 // bits
            regs = re.search(r"Used (\d+) registers", report).group(1)
            spills = "none" if "0 bytes spill stores" in report else "yes"
            n = sum(ops.values())
            tile = f"{c['BLOCK_W']}x{c['GPI']} R{c['R']} S{c['STAGES']} w{cfg.num_warps}"
            print(f"| {bits} | {tile} | {regs} | {spills} | {n} | {n / weights:.1f} | {ops.get('BAR', 0)} |")


if __name__ == "__main__":
    main()
