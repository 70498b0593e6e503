"""Checkpoint-to-checkpoint jobs: post-training quantization, and packing a ternary QAT run.

    quantize_checkpoint("runs/tiny/best", "runs/tiny/gptq-int4", QuantConfig(bits=4, group_size=64))
    pack_checkpoint("runs/qat/best", "runs/qat/ternary")

Each refuses an output that would destroy something else before it starts the work (checkpoint.check_output),
and writes the new folder atomically; the new checkpoint's config.json names its parent and keeps the
parent's metrics as `source_metrics` (its own are measured by `eval`).
"""

from __future__ import annotations

import time
from pathlib import Path

from nanogptq.checkpoint import check_output, checkpoint_data, load_checkpoint, save_checkpoint
from nanogptq.data import tokenizer_files
from nanogptq.quant.budget import stored_bpw
from nanogptq.quant.config import QuantConfig
from nanogptq.quant.qat import export_ternary, ternary_meta
from nanogptq.quant.quantize import quant_meta
from nanogptq.quant.select import quantize_model


def _derived_meta(meta: dict, src: str | Path) -> dict:
    """The source's config.json entries for a checkpoint made from it."""
    meta = dict(meta)
    meta.pop("format_version", None)  # save_checkpoint writes its own
    meta["source_metrics"] = meta.get("metrics")
    meta["metrics"] = {}  # measured again by evaluate: the source's numbers describe another model
    meta["parent"] = str(src)
    return meta


def quantize_checkpoint(src: str | Path, out: str | Path, config: QuantConfig, data_dir: str | None = None,
                        device: str = "cpu", progress: bool = True, dataset: str | None = None) -> Path:
    """Load a float checkpoint, quantize it (GPTQ calibrates on its training split; a checkpoint without
    training data, on the train split of `dataset`) and save it to `out`. The model is loaded on the CPU and
    quantized on `device` one block at a time (quant.quantize), so a GPU holds a block, not the model."""
    check_output(out, src)  # before the work, not after it
    ckpt = load_checkpoint(src, device="cpu")
    if ckpt.meta.get("quantization"):
        raise ValueError(f"{src}: already quantized; quantize the float checkpoint instead")
    if ckpt.meta.get("qat"):
        raise ValueError(f"{src}: trained with ternary QAT; pack it with `nanogptq pack {src} --out DIR`")
    tokens = checkpoint_data(ckpt, data_dir, dataset).train if config.method == "gptq" else None
    t0 = time.perf_counter()
    model = quantize_model(ckpt.model, config, tokens, progress=progress, device=device)
    meta = _derived_meta(ckpt.meta, src)
    meta["quantization"] = quant_meta(model, model.quant_config)  # with the plan and the options kept
    meta["quant_log"] = model.quant_log
    meta["bits_per_weight"] = round(stored_bpw(model), 4)  # block linears and embedding, as stored
    if hasattr(model, "quant_selection"):
        meta["quant_selection"] = model.quant_selection
    meta["quant_time_s"] = time.perf_counter() - t0
    if tokens is not None and not ckpt.meta.get("data"):
        meta["calibration"] = {"dataset": dataset}  # not training data: the model was trained elsewhere
    return save_checkpoint(out, model, meta, files=tokenizer_files(ckpt.tokenizer))


def pack_checkpoint(src: str | Path, out: str | Path) -> Path:
    """Load a QAT checkpoint, pack its ternary weights and save the inference checkpoint to `out`: the same
    logits, from 1.6 bits per weight."""
    check_output(out, src)
    ckpt = load_checkpoint(src)
    qat = ckpt.meta.get("qat")
    if not qat:
        raise ValueError(f"{src}: not a QAT checkpoint (its config.json has no 'qat' entry)")
    model = export_ternary(ckpt.model)
    meta = _derived_meta(ckpt.meta, src)
    meta["quantization"] = ternary_meta(model, qat)
    meta["qat"] = None
    return save_checkpoint(out, model, meta, files=tokenizer_files(ckpt.tokenizer))
