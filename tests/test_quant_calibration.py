"""GPTQ's calibration passes: each stops at its layer, runs in batches of windows, optionally under autocast or
on another device than the model's, and gives the Hessians and codes of one full forward over all windows."""

import copy

import pytest
import torch

from nanogptq.model import GPT, GPTConfig
from nanogptq.quant import QuantConfig, QuantLinear, quantize
from nanogptq.quant.gptq import HessianAccumulator
from nanogptq.quant.quantize import calibration_windows, layer_hessian
from nanogptq.quant.walk import find_layers

CFG = QuantConfig(bits=4, group_size=32, act_order=True, static_groups=True, calib_samples=12)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=101, n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.0)).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 101, (4000,), generator=torch.Generator().manual_seed(1))


def full_forward_hessian(block, layer, x):
    """The layer's Hessian from one forward over every window at once, the whole block run (a forward hook)."""
    acc = HessianAccumulator(layer.in_features)
    handle = layer.register_forward_hook(acc.hook)
    with torch.no_grad():
        block(x)
    handle.remove()
    return acc.H


@pytest.mark.parametrize("name", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
def test_batched_stopped_passes_give_the_one_shot_hessian(model, tokens, name):
    windows = calibration_windows(tokens, 12, 32, seed=0)
    with torch.no_grad():
        x = model.embed(windows)
    block = model.transformer.h[0]
    layer = block.get_submodule(name)
    order = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    calls = {n: [] for n in order}
    handles = [block.get_submodule(n).register_forward_hook(lambda *a, n=n: calls[n].append(1)) for n in order]
    H = layer_hessian(block, layer, list(x.split(5)))  # batches of 5, 5 and 2 windows
    for h in handles:
        h.remove()
    # the linears before it ran once per batch; it and those after it never did: each pass stopped there
    assert [len(calls[n]) for n in order] == [3 if order.index(n) < order.index(name) else 0 for n in order]
    assert not block._forward_pre_hooks and not layer._forward_pre_hooks  # the hook is gone
    torch.testing.assert_close(H, full_forward_hessian(block, layer, x), rtol=1e-5, atol=1e-6)


def codes(model):
    return {n: m.codes() for n, m in find_layers(model, lambda n, m: isinstance(m, QuantLinear)).items()}


def test_batch_size_does_not_change_the_codes(model, tokens):
    """Batches of 3 windows against all 12 in one: the same Hessians up to summation order, so the same codes
    but for the rare weight on a rounding boundary."""
    a = codes(quantize(copy.deepcopy(model), CFG, tokens, progress=False, batch_size=3))
    b = codes(quantize(copy.deepcopy(model), CFG, tokens, progress=False, batch_size=12))
    assert a.keys() == b.keys() and len(a) == 8
    same = sum((a[n] == b[n]).sum().item() for n in a) / sum(a[n].numel() for n in a)
    assert same >= 0.999


def test_bf16_calibration_keeps_close_to_fp32(model, tokens):
    """Autocast forwards (the GPU's fp16/bf16; bf16 here, on the CPU) move the Hessians a little: most codes
    stay, every layer's output error stays near fp32 calibration's, and the model stays in fp32."""
    ref = quantize(copy.deepcopy(model), CFG, tokens, progress=False)
    low = quantize(copy.deepcopy(model), CFG, tokens, progress=False, calib_dtype=torch.bfloat16)
    a, b = codes(ref), codes(low)
    same = sum((a[n] == b[n]).sum().item() for n in a) / sum(a[n].numel() for n in a)
    assert 0.8 <= same < 1.0  # bf16 forwards did run
    for r, q in zip(ref.quant_log, low.quant_log, strict=True):
        assert q["rel_error"] <= 1.5 * r["rel_error"] + 1e-4
    assert all(p.dtype == torch.float32 for p in low.parameters())


def test_work_on_the_models_device_when_asked(model, tokens):
    """device= names where the blocks run; the model stays where it was. On the CPU that is the same place,
    and the result is the default's exactly."""
    a = quantize(copy.deepcopy(model), CFG, tokens, progress=False)
    b = quantize(copy.deepcopy(model), CFG, tokens, progress=False, device="cpu")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cpu_model_quantizes_block_by_block_on_the_gpu(model, tokens):
    """The model stays on the CPU, each block visits the GPU for its turn: codes as on the CPU (but for rare
    rounding-boundary weights), and the model back on the CPU."""
    cpu = codes(quantize(copy.deepcopy(model), CFG, tokens, progress=False))
    m = quantize(copy.deepcopy(model), CFG, tokens, progress=False, device="cuda")
    assert all(t.device.type == "cpu" for t in m.state_dict().values())
    gpu = codes(m)
    same = sum((cpu[n] == gpu[n]).sum().item() for n in cpu) / sum(cpu[n].numel() for n in cpu)
    assert same >= 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cfg", [CFG, QuantConfig(bits=3, group_size=-1, act_order=True),
                                 QuantConfig(bits=4, group_size=0, symmetric=True)])
def test_gptq_cuda_graph_gives_the_eager_loops_codes(cfg):
    """Full lazy batches replay a CUDA graph of the column loop: the same kernels, so the same codes and loss."""
    from nanogptq.quant.gptq import gptq_quantize_weight

    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(96, 320, device="cuda", generator=g)  # 2 full batches of 128 columns, then 64
    X = torch.randn(2048, 320, device="cuda", generator=g) @ torch.randn(320, 320, device="cuda", generator=g)
    H = 2 * X.T @ X / X.shape[0]
    eager = gptq_quantize_weight(W, H, cfg, graphs=False)
    graphed = gptq_quantize_weight(W, H, cfg)
    assert torch.equal(eager.codes, graphed.codes) and torch.equal(eager.scales, graphed.scales)
    assert graphed.stats["gptq_loss"] == pytest.approx(eager.stats["gptq_loss"], rel=1e-6)
