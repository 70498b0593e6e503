"""One decode step's attention on the GPU: SDPA with a mask, the explicit matmul-softmax-matmul, and
nanogptq's split-cache Triton kernel (nanogptq/kernels/decode_attention.py).

    python benchmarks/decode_attention.py          # 7 B shape (32 heads x 128), caches of 512..4096

At batch 1 a decode step has one query per head; the whole static KV cache is read and later slots are
masked out. This times each form (eager and torch.compile'd, each call inside a CUDA graph, as in the
decode benchmark, over copies of the cache that overflow the L2 cache, as the layers of a model do) and
reports microseconds per layer and the cache bandwidth reached. --programs, --block and --warps sweep the
split kernel's TARGET_PROGRAMS, BLOCK_L and NUM_WARPS, --splits sets its MAX_SPLITS. Writes
results/gpu/decode_attention_7b_<gpu>.json.
"""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from common import add_output, graph_seconds, hbm_peak, parser, print_table, result_path, write_result

from nanogptq.kernels import decode_attention as attention  # registers torch.ops.nanogptq.decode_attention
from nanogptq.kernels import mma


def split_heads(qkv, kv):  # the one query (B, H, 1, D) and the cache's keys and values, as PyTorch takes them
    _, B, H, L, D = kv.shape
    return qkv[..., : H * D].view(B, 1, H, D).transpose(1, 2), kv[0], kv[1]


def sdpa(qkv, kv, mask, pos):
    return F.scaled_dot_product_attention(*split_heads(qkv, kv), attn_mask=mask)


def split_triton(qkv, kv, mask, pos, counts):  # nanogptq's kernel: the position is the mask, it writes the slot
    return torch.ops.nanogptq.decode_attention(qkv, kv, pos, counts)


def matmul_softmax(qkv, kv, mask, pos):
    q, k, v = split_heads(qkv, kv)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    return att.masked_fill(~mask, float("-inf")).float().softmax(-1).to(v.dtype) @ v


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--cache", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    p.add_argument("--calls", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--programs", type=int, nargs="*", default=[attention.TARGET_PROGRAMS])
    p.add_argument("--block", type=int, nargs="*", default=[attention.BLOCK_L])
    p.add_argument("--warps", type=int, nargs="*", default=[attention.NUM_WARPS])
    p.add_argument("--splits", type=int, default=attention.MAX_SPLITS, help="MAX_SPLITS")
    add_output(p, where="results/gpu/decode_attention_7b_<gpu>.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_attention.py needs a CUDA GPU")
    attention.MAX_SPLITS = args.splits
    rows = []
    for L in args.cache:
        shape = (2, 1, args.heads, L, args.head_dim)
        cache_bytes = math.prod(shape) * 2
        C = args.heads * args.head_dim
        qkv = torch.randn(1, 1, 3 * C, device="cuda", dtype=torch.bfloat16)
        pos = torch.tensor([L - 8], device="cuda")  # a nearly full cache, as late in decoding
        # one cache per layer of a model whose caches are three times the L2 cache; the new token's key and
        # value already in place (the split kernel writes them again, the other forms only read)
        n_caches = -(-3 * mma.l2_bytes() // cache_bytes)
        caches = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(n_caches)]
        for kv in caches:
            kv[:, :, :, L - 8] = qkv[0, 0, C:].view(2, 1, args.heads, args.head_dim)
        mask = (torch.arange(L, device="cuda") <= pos)[None, :]
        ref = sdpa(qkv, caches[0], mask, pos).float().reshape(1, 1, C)
        forms = [("sdpa", sdpa, None), ("matmul-softmax", matmul_softmax, None)]
        counts = torch.zeros(args.heads, device="cuda", dtype=torch.int32)  # as the model's KV cache holds them
        forms += [
            (f"split-cache triton p{tp} b{bl} w{nw}", functools.partial(split_triton, counts=counts), (tp, bl, nw))
            for tp in args.programs
            for bl in args.block
            for nw in args.warps
        ]
        for name, fn, tune in forms:
            if tune:
                attention.TARGET_PROGRAMS, attention.BLOCK_L, attention.NUM_WARPS = tune
            for compiled in (False, True):
                torch._dynamo.reset()
                f = torch.compile(fn, dynamic=False) if compiled else fn
                y = f(qkv, caches[0], mask, pos).float().reshape(1, 1, C)
                err = ((y - ref).norm() / ref.norm()).item()
                turn = itertools.cycle(caches)
                s = graph_seconds(
                    lambda x, f=f, t=turn, m=mask, p=pos: f(x, next(t), m, p), qkv, args.calls, args.repeats
                )
                label = name + (" compiled" if compiled else "")
                row = {
                    "cache": L,
                    "form": label,
                    "us": s * 1e6,
                    "GB_s": cache_bytes / s / 1e9,
                    "roofline": cache_bytes / s / hbm_peak(),
                    "err": err,
                }
                rows.append(row)
                print(f"cache {L}, {label}: {row['us']:.1f} us", flush=True)
    print_table(rows, [
        ("cache", "cache", ""),
        ("form", "form", ""),
        ("us", "us", ".1f"),
        ("GB/s", "GB_s", ".0f"),
        ("HBM roofline", "roofline", ".0%"),
        ("err", "err", ".1e"),
    ])
    shape = args.heads == 32 and args.head_dim == 128
    out = Path(args.json) if args.json else result_path("gpu", "decode_attention" + ("_7b" if shape else ""), "cuda")
    write_result(out, rows, "cuda", torch=torch.__version__, args=vars(args))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
