"""Perplexity on the whole validation split, size on disk, and the side-by-side `compare` report."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from nanogptq.checkpoint import Checkpoint, checkpoint_data, load_checkpoint, read_meta, short_names, update_meta
from nanogptq.data import val_windows
from nanogptq.quant.quantize import bits_per_weight
from nanogptq.runtime.backends import check_kernel
from nanogptq.runtime.load import prepare_for_inference


@torch.inference_mode()
def perplexity(model, tokens: np.ndarray, batch_size: int = 32, device: str = "cpu", progress: bool = True) -> dict:
    """exp(mean NLL) over every token of `tokens` after the first, in non-overlapping context windows.

    Each window starts fresh (no carried-over context), the standard nanoGPT-style evaluation.
    """
    block = model.config.block_size
    windows = list(val_windows(tokens, block))
    nll_sum, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="eval", disable=not progress, leave=False):
        chunk = windows[i : i + batch_size]
        # the last window may be shorter: evaluate it on its own so batches stay rectangular
        groups = [chunk] if len({x.size(1) for x, _ in chunk}) == 1 else [[w] for w in chunk]
        for group in groups:
            x = torch.cat([w[0] for w in group]).to(device)
            y = torch.cat([w[1] for w in group]).to(device)
            logits, _ = model(x)
            nll = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
            )
            nll_sum += nll.item()
            count += y.numel()
    mean_nll = nll_sum / count
    return {"val_loss": mean_nll, "val_ppl": math.exp(mean_nll), "val_tokens": count}


def load_to_evaluate(path: str | Path, device: str, kernel: str) -> Checkpoint:
    """A checkpoint with its quantized layers on `kernel` (fp32 activations: the table compares weights)."""
    check_kernel(kernel)  # a bad flag is the flag's error, also for a float checkpoint
    ckpt = load_checkpoint(path, device=device)
    prepare_for_inference(ckpt.model, kernel=kernel)
    return ckpt


def evaluate_checkpoint(ckpt: Checkpoint | str | Path, data_dir: str | None = None, device: str = "cpu",
                        save: bool = True, progress: bool = True, kernel: str = "dequant",
                        dataset: str | None = None) -> dict:
    """Perplexity of a checkpoint on its own dataset's validation split; optionally stored in its config.json.

    Quantized weights are evaluated on the exact "dequant" path by default (fp32 arithmetic, as the
    baseline), so the table measures the weights, not the bf16 rounding of a fast kernel. Only that exact
    figure is stored (the demo shows it as the checkpoint's perplexity); `kernel` is the one `ckpt` was, or
    is to be, loaded with. A checkpoint without training data (an imported one) is evaluated on the
    validation split of `dataset`, which the result names.
    """
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_to_evaluate(ckpt, device, kernel)
    data = checkpoint_data(ckpt, data_dir, dataset)
    t0 = time.time()
    result = perplexity(ckpt.model, data.val, device=device, progress=progress)
    result["eval_s"] = round(time.time() - t0, 2)
    result["size_bytes"] = ckpt.size_bytes()
    result["kernel"] = kernel
    if not ckpt.meta.get("data"):
        result["dataset"] = dataset
    if save and kernel == "dequant":
        meta = dict(ckpt.meta)
        meta["metrics"] = {**meta.get("metrics", {}), **result}
        update_meta(ckpt.path, meta)
        ckpt.meta = meta
    return result


# the quantize flags that tell two variants of one method, bits and group apart
OPTION_FLAGS = ("act-order", "static-groups", "clip-search", "rotate", "symmetric", "quantize-embeddings")


def describe(ckpt: Checkpoint) -> dict:
    """What a variant is: method, bits, group size, bits per weight, as read from its config.json."""
    q = ckpt.meta.get("quantization") or {}
    qat = ckpt.meta.get("qat") or {}
    if q:
        method, bits, group = q.get("method", "?"), q.get("bits"), q.get("group_size")
    elif qat:
        method, bits, group = "qat", 1.58, None
    else:
        method, bits, group = "fp32", 32, None
    options = [flag for flag in OPTION_FLAGS if q.get(flag.replace("-", "_"))]
    return {"variant": ckpt.name, "method": method, "bits": bits, "group": group, "options": options,
            "bits_per_weight": round(bits_per_weight(ckpt.model), 3),
            "quant_time_s": ckpt.meta.get("quant_time_s")}


def report_folder(paths: list[str | Path], report_dir: str | Path | None = None) -> Path:
    """`report_dir`, or by default the report beside the first checkpoint (RUN/report for RUN/best), where
    `compare` writes and the demo looks."""
    return Path(report_dir) if report_dir is not None else Path(paths[0]).parent / "report"


def compare(paths: list[str | Path], out_dir: str | Path | None = None, data_dir: str | None = None,
            device: str = "cpu", name: str = "compare", kernel: str = "dequant", progress: bool = True,
            dataset: str | None = None) -> list[dict]:
    """Evaluate every checkpoint on the same validation split (`dataset`'s for checkpoints without training
    data); write NAME.md, NAME.json and NAME.png into `out_dir` (default: report_folder's)."""
    metas = [read_meta(path) for path in paths]  # every path checked before the first evaluation
    first_data = metas[0].get("data") or {}
    for path, meta in zip(paths[1:], metas[1:], strict=True):
        data = meta.get("data") or {}
        keys = data.keys() | first_data.keys()
        if "text_sha256" not in data.keys() & first_data.keys():
            keys -= {"text_sha256"}  # absent on one side (a checkpoint of an earlier version): not a difference
        differs = [f"{k} {data.get(k)!r} against {first_data.get(k)!r}" for k in sorted(keys)
                   if data.get(k) != first_data.get(k)]
        if meta["tokenizer"] != metas[0]["tokenizer"] and not differs:
            differs = ["another tokenizer"]
        if differs:
            raise ValueError(f"{path}: its data differ from {paths[0]}'s ({'; '.join(differs)}), so their "
                             "per-token perplexities are not comparable")
    out = report_folder(paths, out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path, variant in zip(paths, short_names(paths), strict=True):
        ckpt = load_to_evaluate(path, device, kernel)
        row = {**describe(ckpt), "variant": variant, "path": str(path)}
        row.update(evaluate_checkpoint(ckpt, data_dir=data_dir, device=device, progress=progress, kernel=kernel,
                                       dataset=dataset))
        rows.append(row)
    base = rows[0]["val_ppl"]
    for row in rows:
        row["ppl_change_pct"] = 100.0 * (row["val_ppl"] / base - 1.0)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    (out / f"{name}.md").write_text(markdown_table(rows))
    plot(rows, out / f"{name}.png")
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| variant | method | bits | group | options | perplexity | vs baseline | bytes on disk | bits/weight "
            "| quant time |\n")
    head += "|---|---|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        qt = "" if r.get("quant_time_s") is None else f"{r['quant_time_s']:.1f} s"
        group = {None: "", 0: "tensor", -1: "channel"}.get(r["group"], r["group"])
        lines.append(
            f"| {r['variant']} | {r['method']} | {r['bits']} | {group} | {', '.join(r.get('options', []))} | "
            f"{r['val_ppl']:.4f} | "
            f"{r['ppl_change_pct']:+.2f}% | {r['size_bytes']:,} | {r['bits_per_weight']:.2f} | {qt} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(7, 4.5))  # the object API: no pyplot state, no GUI backend
    ax = fig.subplots()
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in by_method.items():
        rs = sorted(rs, key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in rs], [r["val_ppl"] for r in rs], "o-", label=method)
        for r in rs:
            ax.annotate(r["variant"], (r["bits_per_weight"], r["val_ppl"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight (quantized layers, scales included)")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
