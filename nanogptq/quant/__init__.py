"""Quantization: the algorithms and the stored format. Knows nothing of kernels, checkpoints or the CLI.

    config.py    QuantConfig, every knob of post-training quantization
    grid.py      grids (scale, zero point), codes, dequantization
    rtn.py       round-to-nearest
    gptq.py      GPTQ for one layer, and its Hessian
    rotation.py  random orthogonal input rotation
    pack.py      bit packing of codes
    linear.py    the stored layers: QuantLinear, QuantEmbedding
    qat.py       ternary quantization-aware training (BitNet b1.58) and its stored TernaryLinear
    walk.py      the one walk over a model's quantizable layers
    quantize.py  a whole model into stored layers, and back from checkpoint metadata

    model = quantize(model, QuantConfig(method="gptq", bits=4, group_size=128), train_tokens)
"""

from nanogptq.quant.config import QuantConfig
from nanogptq.quant.linear import QuantEmbedding, QuantLinear
from nanogptq.quant.quantize import bits_per_weight, quant_meta, quantize

__all__ = ["QuantConfig", "QuantEmbedding", "QuantLinear", "bits_per_weight", "quant_meta", "quantize"]
