"""The one walk over a model's quantizable layers (quant/walk.py): its filters, the swap, and the check that
names a layer a block lacks."""

import pytest
import torch
import torch.nn as nn

from nanogptq.model import GPT, GPTConfig
from nanogptq.quant import QuantConfig, QuantLinear, quantize
from nanogptq.quant.config import BLOCK_LINEARS
from nanogptq.quant.qat import BitLinear, QATConfig, apply_qat
from nanogptq.quant.walk import block_linears, check_block_linears, find_layers, named, of_type, replace_layers


def small_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32))


def block_names(blocks, names=BLOCK_LINEARS) -> list[str]:
    return [f"transformer.h.{b}.{n}" for b in blocks for n in names]


def test_block_linears_finds_the_named_float_linears_in_forward_order():
    model = small_model()
    found = find_layers(model, block_linears(BLOCK_LINEARS))
    # each block's c_attn, c_proj, c_fc, c_proj in turn; never the head, a float nn.Linear outside the blocks
    assert list(found) == block_names((0, 1))
    assert all(found[name] is model.get_submodule(name) for name in found)
    assert list(find_layers(model, block_linears(["mlp.c_fc"]))) == block_names((0, 1), ["mlp.c_fc"])
    assert find_layers(model, block_linears(["attn"])) == {}  # a block's submodule, but no linear
    assert find_layers(model, block_linears(["nope"])) == {}


def test_block_linears_takes_exactly_the_given_type():
    model = apply_qat(small_model(), QATConfig(layers=("attn.c_attn", "mlp.c_proj")))
    # BitLinear is an nn.Linear subclass: only the layers QAT left float are nn.Linear exactly
    assert list(find_layers(model, block_linears(BLOCK_LINEARS))) == block_names((0, 1), ["attn.c_proj", "mlp.c_fc"])
    bits = find_layers(model, block_linears(BLOCK_LINEARS, BitLinear))
    assert list(bits) == block_names((0, 1), ["attn.c_attn", "mlp.c_proj"])
    assert all(type(m) is BitLinear for m in bits.values())


def test_named_and_of_type_filters():
    model = small_model()
    names = ["transformer.h.1.mlp.c_fc", "lm_head", "transformer.h.0.attn.c_attn", "transformer.h.5.mlp.c_fc"]
    found = find_layers(model, named(names))
    assert list(found) == ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "lm_head"]  # model order
    norms = find_layers(model, of_type(nn.LayerNorm))
    assert len(norms) == 2 * 2 + 1 and all(isinstance(m, nn.LayerNorm) for m in norms.values())
    assert set(find_layers(model, of_type(nn.LayerNorm, nn.Embedding))) == {
        *norms, "transformer.wte", "transformer.wpe"}


def test_replace_layers_swaps_in_place():
    model = small_model()
    layers = find_layers(model, block_linears(["mlp.c_fc"]))
    seen = []

    def make(name, layer):
        seen.append((name, layer))
        return nn.Identity()

    replace_layers(model, layers, make)
    assert seen == list(layers.items())
    assert all(isinstance(block.mlp.c_fc, nn.Identity) for block in model.transformer.h)
    assert all(isinstance(block.attn.c_attn, nn.Linear) for block in model.transformer.h)


def test_check_block_linears_names_a_missing_or_replaced_layer():
    model = small_model()
    assert list(check_block_linears(model, ("attn.c_proj",), "quantization")) == block_names((0, 1), ["attn.c_proj"])
    with pytest.raises(ValueError, match=r"^quantization layer 'mlp.c_gate': block 0 has no such module$"):
        check_block_linears(model, ("attn.c_attn", "mlp.c_gate"), "quantization")
    del model.transformer.h[1].mlp.c_proj  # only block 1 lacks it
    with pytest.raises(ValueError, match=r"^qat layer 'mlp.c_proj': block 1 has no such module$"):
        check_block_linears(model, BLOCK_LINEARS, "qat")

    q = quantize(small_model(), QuantConfig(method="rtn", bits=4, layers=("mlp.c_fc",)), progress=False)
    with pytest.raises(ValueError, match=r"^quantization layer 'mlp.c_fc' in block 0 is a QuantLinear, not "
                                         r"nn.Linear \(quantization already applied\?\)$"):
        check_block_linears(q, BLOCK_LINEARS, "quantization")
    with pytest.raises(ValueError, match="'mlp.c_fc' in block 0 is a QuantLinear"):  # quantize checks the same
        quantize(q, QuantConfig(method="rtn", bits=4), progress=False)
    assert type(q.transformer.h[0].attn.c_attn) is nn.Linear  # refused before anything was replaced
    assert type(q.transformer.h[0].mlp.c_fc) is QuantLinear
