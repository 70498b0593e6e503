"""Post-training weight quantization: RTN and GPTQ to 8/4/3/2-bit packed integer weights.

    model = quantize(model, QuantConfig(method="gptq", bits=4, group_size=128), train_tokens)
    quantize_checkpoint("runs/tiny", "runs/tiny-gptq4", QuantConfig(bits=4))

The checkpoint's config.json "quantization" entry is QuantConfig.to_dict() plus "format" (1) and
"quantized_layers" (full module names); `prepare_quantized_model` rebuilds the module shapes from it.
"""

from __future__ import annotations

import time
from pathlib import Path

from nanogptq.quant.apply import (
    bits_per_weight,
    finalize_quantized_model,
    free_packed_buffers,
    fuse_blocks,
    fuse_mlp_gelu,
    prepare_quantized_model,
    quant_meta,
    quantize,
    quantize_layer,
    theoretical_size_bytes,
)
from nanogptq.quant.config import QuantConfig
from nanogptq.quant.gptq import HessianAccumulator, gptq_quantize_weight
from nanogptq.quant.linear import KERNELS, QuantEmbedding, QuantLinear
from nanogptq.quant.rtn import QuantizedWeight, rtn_quantize_weight

__all__ = [
    "KERNELS",
    "HessianAccumulator",
    "QuantConfig",
    "QuantEmbedding",
    "QuantLinear",
    "QuantizedWeight",
    "bits_per_weight",
    "finalize_quantized_model",
    "free_packed_buffers",
    "fuse_blocks",
    "fuse_mlp_gelu",
    "gptq_quantize_weight",
    "prepare_quantized_model",
    "quant_meta",
    "quantize",
    "quantize_checkpoint",
    "quantize_layer",
    "rtn_quantize_weight",
    "theoretical_size_bytes",
]


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    config: QuantConfig,
    data_dir: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Load a float checkpoint, quantize it (GPTQ calibrates on its training split) and save it to `out`."""
    from nanogptq.checkpoint import check_output, checkpoint_data, load_checkpoint, save_checkpoint

    check_output(out, src)  # before the work, not after it
    ckpt = load_checkpoint(src, device=device)
    if ckpt.meta.get("quantization"):
        raise ValueError(f"{src}: already quantized; quantize the float checkpoint instead")
    if ckpt.meta.get("qat"):
        raise ValueError(f"{src}: trained with ternary QAT; pack it with `nanogptq export {src} --out DIR`")
    tokens = None
    if config.method == "gptq":
        tokens = checkpoint_data(ckpt, data_dir).train
    t0 = time.perf_counter()
    model = quantize(ckpt.model, config, tokens, progress=progress)
    meta = dict(ckpt.meta)
    meta.pop("format_version", None)  # save_checkpoint writes its own
    meta["quantization"] = quant_meta(model, config)
    meta["quant_log"] = model.quant_log
    meta["quant_time_s"] = time.perf_counter() - t0
    meta["source_metrics"] = ckpt.meta.get("metrics")
    meta["metrics"] = {}  # the float model's validation numbers do not describe this one
    meta["parent"] = str(src)
    return save_checkpoint(out, model, meta)
