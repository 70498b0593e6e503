"""One decode step's attention on the GPU: SDPA with a mask, the explicit matmul-softmax-matmul, and
nanogptq's split-cache Triton kernel (nanogptq/attention_triton.py).

    python benchmarks/decode_attention.py          # 7 B shape (32 heads x 128), caches of 512..4096

At batch 1 a decode step has one query per head; the whole static KV cache is read and later slots are
masked out. This times each form (eager and torch.compile'd, each call inside a CUDA graph, as in the
decode benchmark) and reports microseconds per layer and the cache bandwidth reached. Writes
results/decode_attention_<gpu>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from decode import HBM_BYTES_PER_S  # benchmarks/ is on sys.path when run as a script
from gemv import time_call

import nanogptq.attention_triton  # noqa: F401  (registers torch.ops.nanogptq.decode_attention)


def sdpa(q, k, v, mask, pos):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def split_triton(q, k, v, mask, pos):  # nanogptq's kernel: the position is the mask
    return torch.ops.nanogptq.decode_attention(q, k, v, pos)


def matmul_softmax(q, k, v, mask, pos):
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    return att.masked_fill(~mask, float("-inf")).float().softmax(-1).to(v.dtype) @ v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--cache", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    p.add_argument("--calls", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_attention.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    rows = []
    print(f"{'cache':>6} {'form':>22} {'us':>8} {'GB/s':>8} {'roofline':>8}")
    for L in args.cache:
        shape = (1, args.heads, L, args.head_dim)
        k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        q = torch.randn(1, args.heads, 1, args.head_dim, device="cuda", dtype=torch.bfloat16)
        pos = torch.tensor([L - 8], device="cuda")  # a nearly full cache, as late in decoding
        mask = (torch.arange(L, device="cuda") <= pos)[None, :]
        ref = sdpa(q, k, v, mask, pos).float()
        cache_bytes = 2 * k.numel() * k.element_size()
        for name, fn in [("sdpa", sdpa), ("matmul-softmax", matmul_softmax), ("split-cache triton", split_triton)]:
            for compiled in (False, True):
                f = torch.compile(fn, dynamic=False) if compiled else fn
                err = ((f(q, k, v, mask, pos).float() - ref).norm() / ref.norm()).item()
                s = time_call(functools.partial(f, k=k, v=v, mask=mask, pos=pos), q, args.calls, args.repeats)
                label = name + (" compiled" if compiled else "")
                row = {
                    "cache": L,
                    "form": label,
                    "us": s * 1e6,
                    "GB_s": cache_bytes / s / 1e9,
                    "roofline": cache_bytes / s / HBM_BYTES_PER_S,
                    "err": err,
                }
                rows.append(row)
                print(f"{L:>6} {label:>22} {row['us']:>8.1f} {row['GB_s']:>8.0f} {row['roofline']:>8.2f}  {err:.1e}")
    out = Path(args.json or "results/decode_attention_h100.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
