"""Quantization-aware training of ternary (1.58-bit) weights, after BitNet b1.58 (Ma et al. 2024).

    model = apply_qat(GPT(config), load_qat_config("configs/qat/weights_only.json"))  # then train as usual
    pack_checkpoint("runs/qat/best", "runs/qat-ternary")  # pipeline.py: packed 1.6-bit weights, same logits

BitLinear keeps full-precision latent weights and, in every forward pass (the paper's recipe):
    x   <- norm(x)                                   parameter-free RMSNorm (the "LN" before quantizing)
    x_q <- round(clip(x * Qb / max|x|)) * max|x| / Qb  per token, Qb = 2^(b-1) - 1 (b=8: 127), if act_bits
           (act_scale "absmean", for 4 bits and below: the step is mean|x| / sqrt(Qb) and the tails clip,
           the absmean rule BitNet a4.8 uses for 4-bit activations, instead of max|x| / Qb)
    s   <- mean|W| + eps;  W_q <- clip(round(W / s), -1, 1) * s   per tensor ("absmean"; weight_scale
           "channel": one s per output row, mean over the row, a finer variant BitNet does not use)
    y   <- x_q W_q^T
Rounding has no useful gradient, so both quantizers use the straight-through estimator: the forward
pass sees q(x), the backward pass treats q as the identity (x + (q(x) - x).detach(), as in the paper's
code).

16-to-1.58-bit training (Nielsen et al. 2025, "Continual quantization-aware pre-training"): train
`--qat-start` of the steps in full precision, then switch the quantizers on, optionally phased in over
`--qat-ramp` of the steps. Every quantizer then computes x + lambda (q(x) - x), lambda rising from 0
(float) to 1 (fully quantized; the default, and the only value an exported model knows).

Export packs each ternary matrix base-3, five trits per byte (3^5 = 243 <= 256: 1.6 bits per weight),
with one fp32 scale; TernaryLinear unpacks and multiplies by the same scale, so logits are unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogptq.config import StrictConfig
from nanogptq.quant.config import BLOCK_LINEARS
from nanogptq.quant.walk import check_block_linears, find_layers, named_linears, of_type, replace_layers

NORMS = ("rms", "layer", "none")
ATTN_ACTS = (None, "int8", "int4", "ternary")
ACT_SCALES = ("absmax", "absmean")
WEIGHT_SCALES = ("tensor", "channel")
TRITS_PER_BYTE = 5
EXPORT_FORMAT = 1


# ---------------------------------------------------------------------------------------------------
# config


@dataclass
class QATConfig(StrictConfig):
    layers: tuple[str, ...] = BLOCK_LINEARS  # linears inside each Block that become ternary BitLinears
    act_bits: int | None = None  # per-token absmax quantization of every BitLinear input; None: float
    norm: str = "rms"  # parameter-free input norm of BitLinear: "rms" (BitNet), "layer" or "none"
    attn_act: str | None = None  # q and k per token and head: None, "int8", "int4" or "ternary"
    head_act_bits: int | None = None  # per-token quantization of the (float, tied) lm_head's input
    act_scale: str = "absmax"  # the step of act_bits and head_act_bits: "absmax" or "absmean" (clips)
    weight_scale: str = "tensor"  # the absmean ternary scale: per "tensor" (BitNet) or per output "channel"
    eps: float = 1e-5  # floor of every quantization scale (BitNet's code clamps at 1e-5)

    def validate(self) -> None:
        if not isinstance(self.layers, (list, tuple)) or not all(isinstance(n, str) and n for n in self.layers):
            raise ValueError(f"qat layers must be a list of linear names, got {self.layers!r}")
        self.layers = tuple(self.layers)
        if not self.layers:
            raise ValueError("qat layers must name at least one linear")
        for name in ("act_bits", "head_act_bits"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8):
                raise ValueError(f"qat {name} must be null or an integer from 2 to 8, got {v!r}")
        if self.norm not in NORMS:
            raise ValueError(f"qat norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.act_scale not in ACT_SCALES:
            raise ValueError(f"qat act_scale must be absmax or absmean, got {self.act_scale!r}")
        if self.weight_scale not in WEIGHT_SCALES:
            raise ValueError(f"qat weight_scale must be tensor or channel, got {self.weight_scale!r}")
        if self.attn_act not in ATTN_ACTS:
            raise ValueError(f"qat attn_act must be null, int8, int4 or ternary, got {self.attn_act!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"qat eps must be a positive number, got {self.eps!r}")


def load_qat_config(path: str | Path) -> QATConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: QAT config file not found (ready ones are in configs/qat/)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (a QAT config is UTF-8 JSON)") from None
    return QATConfig.from_dict(d, source=str(path))


# ---------------------------------------------------------------------------------------------------
# quantizers (forward values) and the straight-through estimator


def ternary_weight(w: torch.Tensor, eps: float, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternarization: trits clip(round(w / s), -1, 1) (float) and scale s = mean|w| + eps, over
    the whole matrix (a 0-d s) or, per_channel, over each output row (s of shape (out, 1))."""
    # one reduction kernel for mean|w|, no |w| temporary; +eps (BitNet's clamp(min=eps) differs only
    # for an all-zero matrix, where both give zero trits)
    if per_channel:
        scale = torch.linalg.vector_norm(w, 1, dim=1, keepdim=True) / w.shape[1] + eps
    else:
        scale = torch.linalg.vector_norm(w, 1) / w.numel() + eps
    return (w / scale).round().clamp(-1, 1), scale


def absmax_quant(x: torch.Tensor, bits: int, eps: float, act_scale: str = "absmax") -> torch.Tensor:
    """Symmetric per-row (last dim) quantization to `bits`, returned dequantized. The step is max|x| / Qb
    ("absmax": nothing clips), or mean|x| / sqrt(Qb) ("absmean": a grid of +-sqrt(Qb) mean|x|, about
    +-2.1 sigma for Gaussian rows at 4 bits; the outliers clip, the bulk gets finer steps)."""
    qmax = 2 ** (bits - 1) - 1  # 127 for 8 bits; the grid is symmetric, as BitNet's clip(-Qb, Qb)
    if act_scale == "absmean":
        scale = x.abs().mean(dim=-1, keepdim=True).clamp(min=eps) / math.sqrt(qmax)
    else:
        scale = torch.linalg.vector_norm(x, math.inf, dim=-1, keepdim=True).clamp(min=eps) / qmax
    return (x / scale).round().clamp(-qmax, qmax) * scale


def absmean_ternary_act(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Ternary activations per row (last dim), the weights' absmean rule applied to each row."""
    scale = x.abs().mean(dim=-1, keepdim=True) + eps
    return (x / scale).round().clamp(-1, 1) * scale


def ste(x: torch.Tensor, quant: Callable[[torch.Tensor], torch.Tensor],
        strength: torch.Tensor | None = None) -> torch.Tensor:
    """Forward q(x), backward the identity: the paper's x + (q(x) - x).detach().

    The difference is computed under no_grad, so autograd records one add instead of the quantizer's
    ops (the eager training step is bound by per-op overhead at nanoGPT sizes); torch.compile fuses it.
    With `strength` (a 0-d tensor lambda in [0, 1]) the forward value is x + lambda (q(x) - x).
    """
    if not (x.requires_grad and torch.is_grad_enabled()):
        # no gradient wanted: the exact q(x) (x + (q(x) - x) can be an ulp off); lerp is exact at 0 and 1
        if strength is None:
            return quant(x)
        q = quant(x)  # may be fp32 for a bf16 x under autocast (its reductions run in fp32)
        return torch.lerp(x.to(q.dtype), q, strength.to(q.dtype))
    with torch.no_grad():
        delta = quant(x).sub_(x)
        if strength is not None:
            delta.mul_(strength.to(delta.dtype))
    return x + delta


def ternary_dequant(w: torch.Tensor, eps: float, per_channel: bool = False) -> torch.Tensor:
    trits, scale = ternary_weight(w, eps, per_channel)
    return trits * scale


def prepare_input(
    x: torch.Tensor, norm: str, act_bits: int | None, eps: float, act_scale: str = "absmax",
    strength: torch.Tensor | None = None,
) -> torch.Tensor:
    """BitLinear's input path, shared by training (BitLinear) and inference (TernaryLinear)."""
    if norm == "rms":
        x = F.rms_norm(x, (x.size(-1),), eps=eps)
    elif norm == "layer":
        x = F.layer_norm(x, (x.size(-1),), eps=eps)
    if act_bits is not None:
        x = ste(x, lambda t: absmax_quant(t, act_bits, eps, act_scale), strength)
    return x


# ---------------------------------------------------------------------------------------------------
# training modules


class BitLinear(nn.Linear):
    """nn.Linear with full-precision latent weights that computes with absmean-ternary weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, act_bits: int | None = None,
                 norm: str = "rms", eps: float = 1e-5, act_scale: str = "absmax", weight_scale: str = "tensor",
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.act_bits, self.norm, self.eps, self.act_scale = act_bits, norm, eps, act_scale
        self.per_channel = weight_scale == "channel"
        self.register_buffer("strength", None, persistent=False)  # see set_qat_strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = prepare_input(x, self.norm, self.act_bits, self.eps, self.act_scale, self.strength)
        w = ste(self.weight, lambda t: ternary_dequant(t, self.eps, self.per_channel), self.strength)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act_bits={self.act_bits}, norm={self.norm}, per_channel={self.per_channel}"


class ActQuant(nn.Module):
    """Per-row (last dim) activation quantization with STE; the attention q/k hook points use it."""

    def __init__(self, mode: str, eps: float = 1e-5):
        super().__init__()
        if mode not in ATTN_ACTS or mode is None:
            raise ValueError(f"unknown activation quantization {mode!r}")
        self.mode, self.eps = mode, eps
        self.register_buffer("strength", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "ternary":
            return ste(x, lambda t: absmean_ternary_act(t, self.eps), self.strength)
        bits = 8 if self.mode == "int8" else 4
        return ste(x, lambda t: absmax_quant(t, bits, self.eps), self.strength)

    def extra_repr(self) -> str:
        return self.mode


class ActQuantLinear(nn.Linear):
    """A float linear whose input is quantized per token (the tied lm_head; same state-dict keys)."""

    def __init__(self, in_features: int, out_features: int, act_bits: int, eps: float = 1e-5,
                 act_scale: str = "absmax", bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.act_bits, self.eps, self.act_scale = act_bits, eps, act_scale
        self.register_buffer("strength", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ste(x, lambda t: absmax_quant(t, self.act_bits, self.eps, self.act_scale), self.strength)
        return F.linear(x, self.weight, self.bias)


def _install_activation_quant(model: nn.Module, config: QATConfig) -> None:
    """The attention q/k hooks and the head's input quantization (shared by training and export)."""
    if config.attn_act is not None:
        for block in model.transformer.h:
            block.attn.q_quant = ActQuant(config.attn_act, config.eps)
            block.attn.k_quant = ActQuant(config.attn_act, config.eps)
    if config.head_act_bits is not None:
        old = model.lm_head
        head = ActQuantLinear(old.in_features, old.out_features, config.head_act_bits, config.eps,
                              config.act_scale, device="meta")
        head.weight = old.weight  # keep the tie to wte (and the checkpoint's keys)
        model.lm_head = head


def apply_qat(model: nn.Module, config: QATConfig) -> nn.Module:
    """Swap the chosen block linears for BitLinear (sharing their weights) and install the activation
    quantizers, in place; sets `model.qat_config` (the checkpoint's "qat" entry)."""
    for name, layer in check_block_linears(model, config.layers, "qat").items():
        # on the meta device: no init, the old tensors move in
        bit = BitLinear(layer.in_features, layer.out_features, layer.bias is not None, config.act_bits,
                        config.norm, config.eps, config.act_scale, config.weight_scale, device="meta")
        bit.weight = layer.weight  # the same Parameter: a float checkpoint's weights fine-tune as is
        if layer.bias is not None:
            bit.bias = layer.bias
        model.set_submodule(name, bit)
    _install_activation_quant(model, config)
    model.qat_config = config.to_dict()
    return model


def qat_strength(step: int, max_steps: int, start: float, ramp: float) -> float:
    """lambda at `step`: 0 for the first start * max_steps steps, then linear to 1 over ramp * max_steps."""
    begin, length = round(start * max_steps), ramp * max_steps
    if step < begin:
        return 0.0
    return 1.0 if step >= begin + length else (step - begin + 1) / (length + 1)


def set_qat_strength(model: nn.Module, value: float) -> None:
    """Set lambda of every quantizer in the model (one 0-d buffer each, filled in place, so a compiled
    model is not recompiled). Until first called, modules quantize fully with no extra op."""
    device = next(model.parameters()).device
    for m in model.modules():
        if isinstance(m, (BitLinear, ActQuant, ActQuantLinear)):
            if m.strength is None:
                m.strength = torch.tensor(float(value), device=device)
            else:
                m.strength.fill_(value)


# ---------------------------------------------------------------------------------------------------
# base-3 packing


_POW3 = (1, 3, 9, 27, 81)


def ternary_pack(trits: torch.Tensor) -> torch.Tensor:
    """Trits in {-1, 0, 1} (any shape, flattened) -> uint8 of ceil(n / 5) bytes, sum (t_i + 1) 3^i."""
    t = trits.reshape(-1)
    if t.numel() and (t.min() < -1 or t.max() > 1 or (t.is_floating_point() and (t != t.round()).any())):
        raise ValueError("ternary_pack: values must be -1, 0 or 1")
    digits = (t.to(torch.int16) + 1).to(torch.uint8)
    pad = -t.numel() % TRITS_PER_BYTE
    digits = F.pad(digits, (0, pad), value=1).view(-1, TRITS_PER_BYTE)  # padding packs trit 0
    pow3 = torch.tensor(_POW3, dtype=torch.int16, device=t.device)
    return (digits.to(torch.int16) * pow3).sum(dim=1, dtype=torch.int16).to(torch.uint8)  # max 242


def ternary_unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ternary_pack: the first n trits, int8 in {-1, 0, 1}."""
    if n > packed.numel() * TRITS_PER_BYTE:
        raise ValueError(f"ternary_unpack: {packed.numel()} bytes hold {packed.numel() * 5} trits, not {n}")
    pow3 = torch.tensor(_POW3, dtype=torch.int16, device=packed.device)
    digits = packed.reshape(-1, 1).to(torch.int16) // pow3 % 3
    return (digits.reshape(-1)[:n] - 1).to(torch.int8)


# ---------------------------------------------------------------------------------------------------
# inference module and export


class TernaryLinear(nn.Module):
    """Packed ternary weights (`qweight`, 5 trits a byte) and fp32 `scale`s, one per tensor (shape (1,)) or
    one per output row (shape (out,), weight_scale "channel").

    Input normalization and activation quantization are BitLinear's. Its own forward is the exact reference:
    unpack on every call, then matmul in fp32 as BitLinear does, caching nothing, so outputs equal the
    trained BitLinear's. The runtime swaps in a kernel-backed subclass at load (runtime/linear.py).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, act_bits: int | None = None,
                 norm: str = "rms", eps: float = 1e-5, act_scale: str = "absmax", weight_scale: str = "tensor"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_bits, self.norm, self.eps, self.act_scale = act_bits, norm, eps, act_scale
        self.per_channel = weight_scale == "channel"
        n = in_features * out_features
        self.register_buffer("qweight", torch.zeros(math.ceil(n / TRITS_PER_BYTE), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features if self.per_channel else 1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def weight_scale(self) -> str:
        return "channel" if self.per_channel else "tensor"

    @classmethod
    def from_bitlinear(cls, layer: BitLinear) -> TernaryLinear:
        m = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.act_bits, layer.norm,
                layer.eps, layer.act_scale, "channel" if layer.per_channel else "tensor")
        with torch.no_grad():
            trits, scale = ternary_weight(layer.weight.detach().float(), layer.eps, layer.per_channel)
            m.qweight = ternary_pack(trits).to(layer.weight.device)
            m.scale = scale.reshape(-1).to(layer.weight.device)
            if layer.bias is not None:
                m.bias = nn.Parameter(layer.bias.detach().clone())
        return m

    def trits(self) -> torch.Tensor:
        return ternary_unpack(self.qweight, self.in_features * self.out_features).view(
            self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = prepare_input(x, self.norm, self.act_bits, self.eps, self.act_scale)
        w = self.trits().float() * self.scale[:, None]  # in fp32 as in BitLinear: the values are identical
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, act_bits={self.act_bits}, norm={self.norm}")


def export_ternary(model: nn.Module) -> nn.Module:
    """Replace every BitLinear by a packed TernaryLinear, in place (the activation quantizers stay)."""
    layers = find_layers(model, of_type(BitLinear))
    if not layers:
        raise ValueError("export_ternary: the model has no BitLinear layers (was it trained with QAT?)")
    replace_layers(model, layers, lambda name, layer: TernaryLinear.from_bitlinear(layer))
    return model


def ternary_meta(model: nn.Module, qat: dict) -> dict:
    """The exported checkpoint's "quantization" entry."""
    layers = list(find_layers(model, of_type(TernaryLinear)))
    group_size = -1 if qat.get("weight_scale") == "channel" else 0  # quant.config's codes: -1 per row, 0 per tensor
    return {"method": "ternary", "bits": 1.58, "group_size": group_size, "format": EXPORT_FORMAT,
            "packing": "base3-5-per-byte", "bits_per_weight": 8 / TRITS_PER_BYTE,
            "quantized_layers": layers, "qat": qat}


def prepare_ternary_model(model: nn.Module, quant_meta: dict) -> nn.Module:
    """Swap empty TernaryLinear modules (and the activation quantizers) into a fresh GPT, for its weights to
    load into."""
    config = QATConfig.from_dict(quant_meta["qat"], source="checkpoint quantization.qat")
    names = quant_meta["quantized_layers"]
    layers = named_linears(model, names, "ternary")
    replace_layers(model, layers, lambda name, layer: TernaryLinear(
        layer.in_features, layer.out_features, layer.bias is not None, config.act_bits, config.norm, config.eps,
        config.act_scale, config.weight_scale))
    _install_activation_quant(model, config)
    return model
