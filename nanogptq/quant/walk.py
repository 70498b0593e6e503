"""The one walk over a model's quantizable layers, chosen by a filter (as torchao's `quantize_(model,
config, filter_fn)`): quantization, QAT, loading a stored checkpoint and the runtime's preparation all find
their layers through `find_layers` and replace them through `replace_layers`.

Names are full module paths (`transformer.h.0.attn.c_attn`), in the model's definition order, which is each
block's forward order (c_attn, c_proj, c_fc, c_proj).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch.nn as nn

Filter = Callable[[str, nn.Module], bool]
BLOCK_NAME = re.compile(r"transformer\.h\.(\d+)\.(.+)")


def find_layers(model: nn.Module, filter_fn: Filter) -> dict[str, nn.Module]:
    """Every module (name -> module) for which filter_fn(name, module) holds."""
    return {name: m for name, m in model.named_modules() if filter_fn(name, m)}


def replace_layers(model: nn.Module, layers: dict[str, nn.Module], make: Callable[[str, nn.Module], nn.Module]) -> None:
    """Swap each of `layers` (from find_layers) for make(name, layer), in place."""
    for name, layer in layers.items():
        model.set_submodule(name, make(name, layer))


def block_linears(names: tuple[str, ...] | list[str], kind: type = nn.Linear) -> Filter:
    """The filter of the linears named `names` (`attn.c_attn`, ...) inside every transformer block, of exactly
    type `kind` (a float nn.Linear, not a subclass such as QAT's BitLinear)."""
    wanted = set(names)

    def filter_fn(name: str, m: nn.Module) -> bool:
        match = BLOCK_NAME.fullmatch(name)
        return match is not None and match.group(2) in wanted and type(m) is kind

    return filter_fn


def named(names: list[str] | tuple[str, ...]) -> Filter:
    """The filter of the modules with these full names (a checkpoint's list of quantized layers)."""
    wanted = set(names)
    return lambda name, m: name in wanted


def of_type(*kinds: type) -> Filter:
    """The filter of every module that is an instance of one of `kinds`."""
    return lambda name, m: isinstance(m, kinds)


def check_block_linears(model: nn.Module, names: tuple[str, ...] | list[str], what: str) -> dict[str, nn.Module]:
    """find_layers(model, block_linears(names)), refusing a name that some block lacks or that is not a float
    nn.Linear there (a typo, or a model already quantized), with a one-line error naming it."""
    found = find_layers(model, block_linears(names))
    for b, block in enumerate(model.transformer.h):
        for name in names:
            if f"transformer.h.{b}.{name}" in found:
                continue
            try:
                layer = block.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{what} layer {name!r}: block {b} has no such module") from None
            raise ValueError(f"{what} layer {name!r} in block {b} is a {type(layer).__name__}, not nn.Linear "
                             f"({what} already applied?)")
    return found


def named_linears(model: nn.Module, names: list[str] | tuple[str, ...], what: str) -> dict[str, nn.Module]:
    """find_layers(model, named(names)), refusing a name that is missing or not a float nn.Linear (a checkpoint
    whose layer list does not fit its model config) with a one-line error naming it."""
    layers = find_layers(model, named(names))
    for name in names:
        if type(layers.get(name)) is not nn.Linear:
            kind = type(layers[name]).__name__ if name in layers else "missing"
            raise ValueError(f"{what} layer {name!r} is {kind} in this model, not nn.Linear")
    return layers
