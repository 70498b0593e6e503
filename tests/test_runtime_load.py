"""quantize() gives stored layers only; prepare_for_inference (runtime/load.py) makes them run on backends."""

import copy

import pytest
import torch
import torch.nn as nn

from nanogptq.model import GPT, MLP, Block, GPTConfig
from nanogptq.quant import QuantConfig, QuantEmbedding, QuantLinear, quantize
from nanogptq.runtime.backends import LAYOUT_BUFFERS
from nanogptq.runtime.linear import RuntimeLinear
from nanogptq.runtime.load import prepare_for_inference

VOCAB = 48


@pytest.fixture(scope="module")
def float_model() -> GPT:
    """A model trained for a moment on a periodic sequence, so that its logits are not noise."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=64, bias=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.stack([(torch.arange(33) * 5 + s) % VOCAB for s in range(16)])
    for _ in range(30):
        _, loss = model(x[:, :-1], x[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


CASES = {
    # int4pack for the blocks and int8pack for the 8-bit head on the CPU
    "rtn4-g32-emb": (QuantConfig(method="rtn", bits=4, group_size=32, quantize_embeddings=True),
                     {"transformer.h.0.attn.c_attn": "int4pack", "lm_head": "int8pack"}),
    "rtn8-channel": (QuantConfig(method="rtn", bits=8, group_size=-1), {"transformer.h.1.mlp.c_proj": "int8pack"}),
    # a 3-bit act-order grid with rotation: no CPU kernel takes it, so "auto" is the exact reference
    "gptq3-actorder-rotate": (QuantConfig(method="gptq", bits=3, group_size=16, act_order=True, rotate=True,
                                          calib_samples=8), {"transformer.h.0.mlp.c_fc": "dequant"}),
}


def quantized(float_model, cfg: QuantConfig) -> GPT:
    calib = torch.arange(4000) * 7 % VOCAB if cfg.method == "gptq" else None
    return quantize(copy.deepcopy(float_model), cfg, calib, progress=False)


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized layer by each of its names (a tied head is both lm_head and transformer.wte.head)."""
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("case", CASES)
def test_quantize_gives_stored_layers_only(float_model, case):
    cfg, _ = CASES[case]
    q = quantized(float_model, cfg)
    layers = quant_layers(q)
    assert len(layers) == 2 * 4 + 2 * cfg.quantize_embeddings
    assert all(type(m) is QuantLinear for m in layers.values())  # not a runtime subclass
    # no backend layout, no fused epilogue: nothing beyond the stored buffers, save the rotation's cache
    for name, m in q.named_modules():
        assert set(m._non_persistent_buffers_set) <= {"rot"}, name
    assert not any(LAYOUT_BUFFERS & m._buffers.keys() for m in layers.values())
    assert not any(hasattr(m, attr) for m in layers.values() for attr in ("backend", "kernel", "gelu", "fused"))
    # no fusion either: every block and MLP is the model's own, the GELU still in the MLP
    assert all(type(b) is Block for b in q.transformer.h)
    assert all(type(m.act) is nn.GELU for m in q.modules() if isinstance(m, MLP))
    if cfg.quantize_embeddings:
        assert type(q.transformer.wte) is QuantEmbedding and q.transformer.wte.head is q.lm_head


@pytest.mark.parametrize("case", CASES)
def test_prepare_for_inference_swaps_in_runtime_layers(float_model, case):
    cfg, picks = CASES[case]
    stored = quantized(float_model, cfg)
    idx = torch.stack([(torch.arange(32) * 5 + s) % VOCAB for s in (1, 2)])
    with torch.no_grad():
        ref = stored(idx)[0]
    names = list(quant_layers(stored))
    stored_state = stored.state_dict()

    exact = prepare_for_inference(copy.deepcopy(stored), kernel="dequant")
    fast = prepare_for_inference(copy.deepcopy(stored))  # "auto": the fastest exact backend here (CPU)
    for model, kernel in ((exact, "dequant"), (fast, "auto")):
        layers = quant_layers(model)
        assert list(layers) == names and all(type(m) is RuntimeLinear for m in layers.values())
        if cfg.quantize_embeddings:  # still one layer: the table reads the rows of the head as it runs
            assert model.lm_head is model.transformer.wte.head
        # layouts are not stored: the state dict is the stored model's, tensor for tensor
        state = model.state_dict()
        assert state.keys() == stored_state.keys()
        assert all(torch.equal(state[k], stored_state[k]) for k in state)
        if kernel == "dequant":
            assert {m.backend for m in layers.values()} == {"dequant"}
        else:
            assert {name: layers[name].backend for name in picks} == picks
    with torch.no_grad():
        a, b = exact(idx)[0], fast(idx)[0]
    assert torch.equal(a, ref)  # the exact backend is the stored layers' own arithmetic
    assert ((b - ref).norm() / ref.norm()).item() < 2e-2  # the CPU kernels compute in bf16


def test_prepare_shares_the_stored_tensors_and_frees_only_what_a_layout_replaced(float_model):
    stored = quantized(float_model, CASES["rtn4-g32-emb"][0])
    before = {n: m.qweight for n, m in quant_layers(stored).items()}
    model = prepare_for_inference(stored, keep_packed=False)  # in place
    assert model is stored
    layers = quant_layers(model)
    # the tied head keeps its codes (the embedding reads its rows from them); the int4 layers dropped theirs
    assert layers["lm_head"].qweight is before["lm_head"] and not layers["lm_head"].packed_freed
    c_fc = layers["transformer.h.0.mlp.c_fc"]
    assert c_fc.packed_freed and c_fc.qweight is None and c_fc.gelu  # the MLP's GELU runs in the layer
    assert isinstance(model.transformer.h[0].mlp.act, nn.Identity)
    with pytest.raises(RuntimeError, match="loaded for inference only"):
        model.state_dict()
