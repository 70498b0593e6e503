"""Perplexity on the whole validation split, size on disk, and the side-by-side `compare` report."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
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

BOOTSTRAP_SAMPLES = 1000  # resamples of the validation windows behind each perplexity change's band
BOOTSTRAP_SEED = 0


@dataclass
class WindowStats:
    """Per validation window: summed NLL and target count; with a reference model, the summed KL divergence of
    the model's next-token distribution from the reference's and the count of equal top-1 tokens."""

    nll: np.ndarray
    tokens: np.ndarray
    kl: np.ndarray | None = None
    top1: np.ndarray | None = None

    def summary(self) -> dict:
        count = int(self.tokens.sum())
        mean_nll = float(self.nll.sum()) / count
        result = {"val_loss": mean_nll, "val_ppl": math.exp(mean_nll), "val_tokens": count}
        if self.kl is not None:
            result["kl_mean"] = float(self.kl.sum()) / count
            result["top1_agreement"] = float(self.top1.sum()) / count
        return result


@torch.inference_mode()
def window_stats(model, tokens: np.ndarray, batch_size: int = 32, device: str = "cpu", progress: bool = True,
                 reference=None) -> WindowStats:
    """NLL of every token of `tokens` after the first, in non-overlapping context windows, per window; with
    `reference`, both models run on the same windows batch by batch, so no logits outlive their batch.

    Each window starts fresh (no carried-over context), the standard nanoGPT-style evaluation. KL is
    KL(reference || model), as llama.cpp's perplexity tool reports it: the float model's distribution first.
    """
    block = model.config.block_size
    windows = list(val_windows(tokens, block))
    nll, counts, kl, top1 = [], [], [], []
    for i in tqdm(range(0, len(windows), batch_size), desc="eval", disable=not progress, leave=False):
        chunk = windows[i : i + batch_size]
        # the last window may be shorter: evaluate it on its own so batches stay rectangular
        groups = [chunk] if len({x.size(1) for x, _ in chunk}) == 1 else [[w] for w in chunk]
        for group in groups:
            x = torch.cat([w[0] for w in group]).to(device)
            y = torch.cat([w[1] for w in group]).to(device)
            logp = torch.log_softmax(model(x)[0].float(), dim=-1)
            nll.append(-logp.gather(-1, y[..., None])[..., 0].sum(dim=1).double().cpu())
            counts.append(torch.full((x.size(0),), y.size(1)))
            if reference is not None:
                ref_logp = torch.log_softmax(reference(x)[0].float(), dim=-1)
                kl.append((ref_logp.exp() * (ref_logp - logp)).sum(dim=-1).sum(dim=1).double().cpu())
                top1.append((ref_logp.argmax(-1) == logp.argmax(-1)).sum(dim=1).cpu())
    return WindowStats(_joined(nll), _joined(counts), _joined(kl), _joined(top1))


def _joined(per_batch: list[torch.Tensor]) -> np.ndarray | None:
    return torch.cat(per_batch).numpy() if per_batch else None


def perplexity(model, tokens: np.ndarray, batch_size: int = 32, device: str = "cpu", progress: bool = True) -> dict:
    """exp(mean NLL) over every token of `tokens` after the first, in non-overlapping context windows."""
    return window_stats(model, tokens, batch_size, device, progress).summary()


def bootstrap_change(stats: WindowStats, base: WindowStats, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float]:
    """The `level` band (percentiles) of the perplexity change in percent, stats against base, from resampling
    the validation windows with replacement; paired (both models on the same resampled windows), so the
    noise of the text itself cancels and what is left is how much the change depends on which text it saw."""
    rng = np.random.default_rng(seed)
    n = len(stats.nll)
    diff, tokens = stats.nll - base.nll, stats.tokens.astype(np.float64)
    change = []
    for start in range(0, samples, 50):  # a resample is how often it picks each window; 50 at a time in memory
        picked = rng.multinomial(n, np.full(n, 1 / n), size=min(50, samples - start)).astype(np.float64)
        change.append(np.expm1(picked @ diff / (picked @ tokens)) * 100)
    change = np.concatenate(change)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(change, [tail, 100 - tail])
    return float(lo), float(hi)


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
    return _evaluate(ckpt, data_dir, device, save, progress, kernel, dataset)[0]


def _evaluate(ckpt: Checkpoint | str | Path, data_dir: str | None, device: str, save: bool, progress: bool,
              kernel: str, dataset: str | None = None, reference=None) -> tuple[dict, WindowStats]:
    """evaluate_checkpoint's result and the per-window figures behind it (against `reference`'s model if given:
    the KL and top-1 agreement are not stored in config.json, being a pair's figures, not the checkpoint's)."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_to_evaluate(ckpt, device, kernel)
    data = checkpoint_data(ckpt, data_dir, dataset)
    t0 = time.time()
    stats = window_stats(ckpt.model, data.val, device=device, progress=progress, reference=reference)
    result = stats.summary()
    result["eval_s"] = round(time.time() - t0, 2)  # with a reference, its forward passes included
    result["size_bytes"] = ckpt.size_bytes()
    result["kernel"] = kernel
    if not ckpt.meta.get("data"):
        result["dataset"] = dataset
    if save and kernel == "dequant":
        meta = dict(ckpt.meta)
        own = {k: v for k, v in result.items() if k not in ("kl_mean", "top1_agreement")}
        meta["metrics"] = {**meta.get("metrics", {}), **own}
        update_meta(ckpt.path, meta)
        ckpt.meta = meta
    return result, stats


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
    if q.get("tune_steps"):
        options.append(f"tune {q['tune_steps']}")
    if q.get("plan"):  # a --target-bpw mix: bits and groups per layer, in the plan
        bits, group = "mix", None
        options.append(f"target-bpw {q['target_bpw']:g}")
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
    data); write NAME.md, NAME.json and NAME.png into `out_dir` (default: report_folder's). Beside perplexity,
    each row has its mean KL divergence from the first checkpoint's next-token distribution and top-1 agreement
    with it (kl_mean, top1_agreement), and the 95% bootstrap band over validation windows of its perplexity
    change (ppl_change_band_pct, in percent)."""
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
    baseline, base_stats = None, None  # the first checkpoint, held to stream beside each variant
    for path, variant in zip(paths, short_names(paths), strict=True):
        ckpt = load_to_evaluate(path, device, kernel)
        row = {**describe(ckpt), "variant": variant, "path": str(path)}
        result, stats = _evaluate(ckpt, data_dir, device, True, progress, kernel, dataset,
                                  None if baseline is None else baseline.model)
        row.update(result)
        if baseline is None:
            baseline, base_stats = ckpt, stats
            row.update(kl_mean=0.0, top1_agreement=1.0)  # the baseline against itself
        row["ppl_change_pct"] = 100.0 * (row["val_ppl"] / rows[0]["val_ppl"] - 1.0) if rows else 0.0
        row["ppl_change_band_pct"] = list(bootstrap_change(stats, base_stats))
        rows.append(row)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    (out / f"{name}.md").write_text(markdown_table(rows))
    plot(rows, out / f"{name}.png")
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| variant | method | bits | group | options | perplexity | vs baseline | 95% band | KL to baseline "
            "| top-1 agreement | bytes on disk | bits/weight | quant time |\n")
    head += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        qt = "" if r.get("quant_time_s") is None else f"{r['quant_time_s']:.1f} s"
        group = {None: "", 0: "tensor", -1: "channel"}.get(r["group"], r["group"])
        band = r.get("ppl_change_band_pct")
        band = "" if band is None else f"{band[0]:+.2f}% to {band[1]:+.2f}%"
        kl = "" if r.get("kl_mean") is None else f"{r['kl_mean']:.2e}"
        top1 = "" if r.get("top1_agreement") is None else f"{100 * r['top1_agreement']:.2f}%"
        lines.append(
            f"| {r['variant']} | {r['method']} | {r['bits']} | {group} | {', '.join(r.get('options', []))} | "
            f"{r['val_ppl']:.4f} | {r['ppl_change_pct']:+.2f}% | {band} | {kl} | {top1} | "
            f"{r['size_bytes']:,} | {r['bits_per_weight']:.2f} | {qt} |"
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
        ppl = np.array([r["val_ppl"] for r in rs])
        base = ppl / (1 + np.array([r["ppl_change_pct"] for r in rs]) / 100)  # the baseline's perplexity
        bands = np.array([r.get("ppl_change_band_pct") or [r["ppl_change_pct"]] * 2 for r in rs])
        # the bootstrap band of the change, drawn around the perplexity as baseline * (1 + change)
        yerr = np.abs(np.stack([ppl - base * (1 + bands[:, 0] / 100), base * (1 + bands[:, 1] / 100) - ppl]))
        ax.errorbar([r["bits_per_weight"] for r in rs], ppl, yerr=yerr, fmt="o-", capsize=3, label=method)
        for r in rs:
            ax.annotate(r["variant"], (r["bits_per_weight"], r["val_ppl"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight (quantized layers, scales included)")
    ax.set_ylabel("validation perplexity (bars: 95% band)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
