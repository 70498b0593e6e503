"""QuantConfig: every knob of post-training quantization, round-tripped through config.json."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from nanogptq.config import StrictConfig

BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
METHODS = ("rtn", "gptq")
BITS = (8, 4, 3, 2)
# named settings for `quantize --preset NAME` (flags given beside it override them). "quality" is `quantize`'s
# default for GPTQ: act-order, a clipping search by the layer's output error and rotation where it lowers that
# error, then the fallback: the model is also quantized with act-order alone, and the one with the lower
# loss on held-out calibration windows is kept (quant/select.py); then 200 steps of block tuning (quant/tune.py),
# each block's kept only where held-out windows say it helps. Lower layer errors alone did not make a lower
# perplexity (3 bits on the tiny model); the fallback compares whole models, so the preset can only lose to
# plain act-order where held-out calibration text disagrees with the validation text. 200 tuning steps keep
# `quantize` of the `small` preset under 2 minutes on 2 CPU cores (docs/results.md). "plain" is QuantConfig's
# own defaults.
PRESETS = {
    "quality": {"method": "gptq", "act_order": True, "clip_search": True, "rotate": True, "fallback": True,
                "tune_steps": 200},
    "plain": {},
}


@dataclass
class QuantConfig(StrictConfig):
    VERSION = 2  # version 1 named lazy_batch block_size
    method: str = "gptq"  # "rtn" | "gptq"
    bits: int = 4  # 8, 4, 3 or 2
    # 0: one scale per matrix; -1: one per output row; G > 0: one per row and run of G input columns
    # (G need not divide in_features: the last group is simply shorter)
    group_size: int = 128
    symmetric: bool = False  # symmetric grids have a fixed zero point, asymmetric ones store it
    act_order: bool = False  # GPTQ: quantize columns in order of decreasing Hessian diagonal
    static_groups: bool = False  # GPTQ + act_order: fix group grids before permuting (no g_idx needed)
    damp: float = 0.01  # GPTQ: dampening, as a fraction of mean(diag H)
    lazy_batch: int = 128  # GPTQ: columns per lazy batch update (the paper's B)
    calib_samples: int = 128  # calibration windows of model.config.block_size tokens
    calib_seed: int = 0
    clip_search: bool = False  # search each grid's clipping ratio (by output error with data) instead of max|w|
    rotate: bool = False  # QuIP-style random orthogonal rotation of each layer's input side, where it helps
    rotate_seed: int = 0
    # GPTQ: also quantize with act-order alone (no clip search, no rotation) and keep the model whose loss on
    # held-out calibration windows is lower
    fallback: bool = False
    quantize_embeddings: bool = False  # tied embedding/head table to 8 bits per row
    # GPTQ, > 0: then tune each block's rounding and scales against the float block's output for this many
    # signed-gradient steps (quant/tune.py, AutoRound's method), kept where held-out windows say it helps
    tune_steps: int = 0
    # > 0: bits and group size per layer (quant/budget.py) so the stored bits per weight, the embedding's
    # counted, stay <= target_bpw; the chosen plan (layer name -> [bits, group_size]) is kept in `plan`
    target_bpw: float = 0.0
    plan: dict = field(default_factory=dict)
    layers: tuple[str, ...] = BLOCK_LINEARS  # linears inside each Block to quantize

    def validate(self) -> None:
        if isinstance(self.layers, str):  # from a command line: "attn.c_attn,mlp.c_fc"
            self.layers = [n.strip() for n in self.layers.split(",")]
        self.layers = tuple(self.layers)
        for name in (
            "symmetric",
            "act_order",
            "static_groups",
            "clip_search",
            "rotate",
            "quantize_embeddings",
            "fallback",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"quantization {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bits", "group_size", "lazy_batch", "calib_samples", "calib_seed", "rotate_seed", "tune_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"quantization {name} must be an integer, got {v!r}")
        if self.method not in METHODS:
            raise ValueError(f"quantization method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.bits not in BITS:
            raise ValueError(f"quantization bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.group_size < -1:
            raise ValueError(
                f"group_size must be 0 (per tensor), -1 (per channel) or > 0, got {self.group_size}"
            )
        if not isinstance(self.damp, (int, float)) or not self.damp > 0:
            raise ValueError(f"damp must be a positive number, got {self.damp!r}")
        if self.lazy_batch < 1 or self.calib_samples < 1:
            raise ValueError("lazy_batch and calib_samples must be at least 1")
        if self.tune_steps < 0:
            raise ValueError(f"tune_steps must be 0 (off) or a number of steps, got {self.tune_steps}")
        if self.act_order and self.method != "gptq":
            raise ValueError("act_order only applies to method 'gptq'")
        if self.fallback and self.method != "gptq":
            raise ValueError("fallback only applies to method 'gptq'")
        if self.tune_steps and self.method != "gptq":
            raise ValueError("tune_steps only applies to method 'gptq' (it tunes on GPTQ's calibration windows)")
        if self.static_groups and self.method != "gptq":
            raise ValueError("static_groups only applies to method 'gptq'")
        if isinstance(self.target_bpw, bool) or not isinstance(self.target_bpw, (int, float)) \
                or self.target_bpw < 0:
            raise ValueError(f"target_bpw must be a number of bits per weight (0: off), got {self.target_bpw!r}")
        if not isinstance(self.plan, dict):
            raise ValueError(f"plan must map layer names to [bits, group_size], got {self.plan!r}")
        self.plan = {name: list(entry) if isinstance(entry, (list, tuple)) else entry
                     for name, entry in self.plan.items()}
        for name, entry in self.plan.items():
            if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in BITS and isinstance(entry[1], int)
                    and not isinstance(entry[1], bool) and entry[1] >= -1):
                raise ValueError(f"plan entry {name!r} must be [bits ({', '.join(map(str, BITS))}), group_size], "
                                 f"got {entry!r}")
        if not self.layers or not all(isinstance(n, str) and n for n in self.layers):
            raise ValueError(f"layers must be a non-empty list of linear names, got {list(self.layers)!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> QuantConfig:
        """The named preset (PRESETS), with `overrides` on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown quantization preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def upgrade(cls, d: dict, version: int) -> dict:
        if version < 2 and "block_size" in d:
            d["lazy_batch"] = d.pop("block_size")
        return d

    def layer_config(self, name: str) -> QuantConfig:
        """The settings of one layer: the plan's bits and group size where it names the layer."""
        if name not in self.plan:
            return self
        bits, group_size = self.plan[name]
        return replace(self, bits=bits, group_size=group_size)

    @property
    def uses_g_idx(self) -> bool:
        """Act-order groups formed on the fly are not contiguous in the original column order."""
        return self.method == "gptq" and self.act_order and self.group_size > 0 and not self.static_groups
