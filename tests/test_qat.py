"""Ternary QAT (BitNet b1.58): quantizers, STE, configs, training, packing and export."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_model

from nanogptq.checkpoint import load_checkpoint
from nanogptq.model import GPT, GPTConfig
from nanogptq.pipeline import pack_checkpoint
from nanogptq.quant.qat import (
    ActQuant,
    BitLinear,
    QATConfig,
    TernaryLinear,
    absmax_quant,
    apply_qat,
    export_ternary,
    load_qat_config,
    prepare_input,
    prepare_ternary_model,
    qat_strength,
    set_qat_strength,
    ternary_dequant,
    ternary_pack,
    ternary_unpack,
    ternary_weight,
)
from nanogptq.runtime.linear import RuntimeTernaryLinear
from nanogptq.runtime.load import prepare_for_inference
from nanogptq.train import TrainConfig, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "qat"
SHIPPED = ["weights_only", "weights_attn_act", "all_act8", "extreme", "extreme_absmean", "weights_only_channel"]


def small_model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32, block_size=32, n_layer=2, n_head=2, n_embd=32, **kw))


def test_absmean_ternary_values_and_scale():
    w = torch.randn(64, 48) * 0.05
    trits, scale = ternary_weight(w, 1e-5)
    assert set(trits.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert scale.item() == pytest.approx(w.abs().mean().item() + 1e-5, rel=1e-5)
    # round-to-nearest: |w / s| < 0.5 -> 0, otherwise sign(w)
    expected = torch.where((w / scale).abs() < 0.5, 0.0, torch.sign(w))
    assert torch.equal(trits, expected)
    dq = ternary_dequant(w, 1e-5)
    assert set((dq / scale).round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.allclose(dq, trits * scale)


def test_per_channel_absmean_scale_per_output_row():
    w = torch.randn(6, 40) * torch.logspace(-2, 0, 6)[:, None]  # rows of very different magnitudes
    trits, scale = ternary_weight(w, 1e-5, per_channel=True)
    assert scale.shape == (6, 1)
    assert torch.allclose(scale[:, 0], w.abs().mean(dim=1) + 1e-5, rtol=1e-5)
    assert torch.equal(trits, torch.where((w / scale).abs() < 0.5, 0.0, torch.sign(w)))
    # one scale for the whole matrix zeroes the small rows entirely; per row they keep their signs
    per_tensor, _ = ternary_weight(w, 1e-5)
    assert (per_tensor[0] == 0).all() and (trits[0] != 0).sum() > 10
    layer = BitLinear(40, 6, weight_scale="channel")
    with torch.no_grad():
        layer.weight.copy_(w)
        t = TernaryLinear.from_bitlinear(layer)
        assert t.scale.shape == (6,)
        x = torch.randn(3, 40)
        assert torch.equal(t(x), layer(x))


def test_scheduled_quantizer_under_bf16_autocast():
    layer = BitLinear(16, 8, act_bits=8)
    set_qat_strength(layer, 0.5)
    x = torch.randn(2, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the GPU training's eval passes
        y = layer(x.bfloat16())
    assert torch.isfinite(y).all()


def test_ste_gradient_equals_gradient_wrt_quantized_weight():
    torch.manual_seed(0)
    layer = BitLinear(16, 8, act_bits=8)
    x = torch.randn(4, 5, 16)
    g = torch.randn(4, 5, 8)
    (layer(x) * g).sum().backward()
    wq = ternary_dequant(layer.weight.detach(), layer.eps).requires_grad_()
    xq = prepare_input(x, "rms", 8, layer.eps)
    (F.linear(xq, wq) * g).sum().backward()
    assert layer.weight.grad.abs().sum() > 0
    assert torch.allclose(layer.weight.grad, wq.grad, atol=1e-6)
    # and the input gradient flows through the activation quantizer as if it were the identity
    x.requires_grad_()
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_per_token_absmax_8bit_error_bound():
    torch.manual_seed(0)
    x = torch.randn(6, 10, 64) * torch.logspace(-3, 3, 10).view(1, 10, 1)  # rows of very different range
    q = absmax_quant(x, 8, 1e-5)
    amax = x.abs().amax(-1, keepdim=True)
    assert ((q - x).abs() <= amax / 127 / 2 * (1 + 1e-4)).all()  # half a step of each row's own grid
    # integer multiples of the row's step max|x| / 127, at most 127 of them, and the row maximum exact
    levels = q / (amax.clamp(min=1e-5) / 127)
    assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.abs().max() <= 127 + 1e-3
    assert torch.allclose(q.abs().amax(-1), amax.squeeze(-1))
    # per token: a huge outlier in one token leaves the other tokens' values untouched
    x2 = x.clone()
    x2[0, 0, 0] = 1e6
    assert torch.equal(absmax_quant(x2, 8, 1e-5)[0, 1:], q[0, 1:])


def test_absmean_4bit_clips_outliers_and_refines_the_bulk():
    torch.manual_seed(0)
    x = torch.randn(200, 256)
    x[:, 0] = 40.0  # one outlier channel, as in LLM activations
    step = x.abs().mean(-1, keepdim=True) / math.sqrt(7)
    q = absmax_quant(x, 4, 1e-5, "absmean")
    assert torch.allclose(q / step, (q / step).round(), atol=1e-4) and (q / step).abs().max() <= 7 + 1e-4
    assert torch.allclose(q[:, 0], 7 * step.squeeze(-1))  # the outlier clips to the top of the grid
    bulk = (slice(None), slice(1, None))
    assert ((q - x)[bulk] ** 2).mean() < 0.2 * ((absmax_quant(x, 4, 1e-5) - x)[bulk] ** 2).mean()


def test_ternary_activation_values_per_row():
    x = torch.randn(3, 4, 16)
    y = ActQuant("ternary")(x)
    scale = x.abs().mean(-1, keepdim=True) + 1e-5
    assert set((y / scale).round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.allclose(y, (y / scale).round() * scale, atol=1e-6)


@pytest.mark.parametrize(
    "content, needle",
    [
        ({"act_bits": 8, "foo": 1}, "unknown key 'foo'"),
        ({"act_bits": 9}, "act_bits"),
        ({"act_bits": 8.0}, "act_bits"),
        ({"attn_act": "int2"}, "attn_act"),
        ({"norm": "batch"}, "norm"),
        ({"layers": []}, "layers"),
        ({"eps": 0}, "eps"),
        ({"act_scale": "minmax"}, "act_scale"),
    ],
)
def test_config_errors_name_the_key(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=needle) as e:
        load_qat_config(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_config_missing_file_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_qat_config(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: invalid JSON"):
        load_qat_config(tmp_path / "broken.json")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_apply_and_round_trip(name):
    cfg = load_qat_config(CONFIGS / f"{name}.json")
    assert QATConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = apply_qat(small_model(), cfg)
    assert model.qat_config == cfg.to_dict()
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == 2 * 4
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    x = torch.randint(0, 32, (2, 16))
    _, loss = model(x, x)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="already applied"):
        apply_qat(model, cfg)


def test_apply_qat_keeps_float_weights_and_rejects_unknown_layers():
    model = small_model()
    w = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    apply_qat(model, QATConfig())
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, w)  # fine-tuning starts from the float weights
    with pytest.raises(ValueError, match="'mlp.c_gate'"):
        apply_qat(small_model(), QATConfig(layers=("mlp.c_gate",)))


def test_kv_cache_path_matches_full_forward_with_qk_quantization():
    model = apply_qat(small_model(), load_qat_config(CONFIGS / "extreme.json")).eval()
    x = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        full, _ = model(x)
        model.setup_kv_cache(2)
        first, _ = model(x[:, :8], input_pos=torch.arange(8))
        steps = [model(x[:, i : i + 1], input_pos=torch.tensor([i]))[0] for i in range(8, 12)]
        model.clear_kv_cache()
    cached = torch.cat([first, *steps], dim=1)  # decoding steps give the last position's logits
    assert torch.allclose(cached, full[:, 7:], atol=1e-4)


def test_qat_training_lowers_loss():
    model = apply_qat(small_model(), load_qat_config(CONFIGS / "all_act8.json"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(1)
    pattern = torch.arange(32) % 7  # a periodic sequence a model learns quickly
    x = torch.stack([pattern.roll(int(s)) for s in torch.randint(0, 7, (8,))])
    losses = []
    for _ in range(40):
        _, loss = model(x[:, :-1], x[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_qat_strength_schedule():
    # 16-to-1.58-bit: float for the first 40% of 100 steps, then phased in over 20 steps
    values = [qat_strength(step, 100, 0.4, 0.2) for step in range(100)]
    assert values[:40] == [0.0] * 40 and values[60:] == [1.0] * 40
    ramp = values[40:60]
    assert all(0 < a < b < 1 for a, b in zip(ramp, ramp[1:], strict=False))
    assert [qat_strength(s, 100, 0.5, 0.0) for s in (49, 50)] == [0.0, 1.0]  # a hard switch
    assert qat_strength(0, 100, 0.0, 0.0) == 1.0  # from scratch


def test_strength_interpolates_between_float_and_ternary_with_identity_gradient():
    torch.manual_seed(0)
    layer = BitLinear(16, 8, act_bits=8)
    x = torch.randn(4, 16)
    with torch.no_grad():
        full = layer(x)  # no strength set: fully quantized
        set_qat_strength(layer, 1.0)
        assert torch.equal(layer(x), full)
        set_qat_strength(layer, 0.0)  # float weights and inputs, after the parameter-free norm
        assert torch.allclose(layer(x), F.linear(F.rms_norm(x, (16,), eps=1e-5), layer.weight), atol=1e-6)
        set_qat_strength(layer, 0.5)
        w_half = 0.5 * (layer.weight + ternary_dequant(layer.weight, 1e-5))
        x_half = prepare_input(x, "rms", None, 1e-5)
        x_half = 0.5 * (x_half + absmax_quant(x_half, 8, 1e-5))
        assert torch.allclose(layer(x), F.linear(x_half, w_half), atol=1e-5)
    # straight-through at any strength: the gradient wrt the latent weight is that wrt the used weight
    for value in (0.0, 0.5):
        set_qat_strength(layer, value)
        layer.weight.grad = None
        layer(x).square().sum().backward()
        w_used = torch.lerp(layer.weight.detach(), ternary_dequant(layer.weight.detach(), 1e-5), value)
        w_used.requires_grad_(True)
        xq = prepare_input(x, "rms", None, 1e-5)
        xq = torch.lerp(xq, absmax_quant(xq, 8, 1e-5), value)
        F.linear(xq, w_used).square().sum().backward()
        assert torch.allclose(layer.weight.grad, w_used.grad, atol=1e-5)


def test_float_then_ternary_training_keeps_only_quantized_checkpoints_as_best(tmp_path, text_file):
    cfg = TrainConfig(dataset=f"file:{text_file}", out_dir=str(tmp_path / "run"), preset="tiny", max_steps=12,
                      batch_size=4, eval_interval=2, eval_batches=1, warmup_steps=1, progress=False, lr=3e-3,
                      qat_config=str(CONFIGS / "weights_only.json"), qat_start=0.5, qat_ramp=0.25)
    run = train(cfg)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["qat_strength"] for r in records][:2] == [0.0, 0.0] and records[-1]["qat_strength"] == 1.0
    assert 0 < records[3]["qat_strength"] < 1  # step 8: inside the ramp (steps 6 to 8)
    full = [r for r in records if r["qat_strength"] == 1.0]
    best = load_checkpoint(run / "best").meta["metrics"]
    assert best["step"] in [r["step"] for r in full]
    assert best["val_loss"] == pytest.approx(min(r["val_loss"] for r in full))
    # the exported ternary model is the one that was evaluated (a float-phase one would differ)
    from nanogptq.evaluate import evaluate_checkpoint

    out = pack_checkpoint(run / "best", tmp_path / "ternary")
    assert evaluate_checkpoint(out, None, "cpu", progress=False)["val_loss"] == pytest.approx(
        evaluate_checkpoint(run / "best", None, "cpu", progress=False)["val_loss"], abs=1e-4)
    # a QAT checkpoint is exported, not quantized again; and an export never lands on the run's own folders
    from nanogptq.checkpoint import CheckpointError
    from nanogptq.pipeline import quantize_checkpoint
    from nanogptq.quant import QuantConfig

    with pytest.raises(ValueError, match="trained with ternary QAT; pack it with `nanogptq pack"):
        quantize_checkpoint(run / "best", tmp_path / "q", QuantConfig(method="rtn"), progress=False)
    with pytest.raises(CheckpointError, match="holds a trained checkpoint"):
        pack_checkpoint(run / "best", run / "last")
    assert (run / "last" / "resume.pt").exists()


def test_qat_restart_runs_two_schedules():
    from nanogptq.train import lr_at

    cfg = TrainConfig(max_steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=5, qat_config="x.json", qat_start=0.4,
                      qat_restart=True)
    cfg.validate()
    one = TrainConfig(max_steps=40, lr=1e-3, min_lr=1e-4, warmup_steps=5)  # the float phase alone
    two = TrainConfig(max_steps=60, lr=1e-3, min_lr=1e-4, warmup_steps=5)  # the quantized phase alone
    assert [lr_at(s, cfg) for s in range(40)] == [lr_at(s, one) for s in range(40)]
    assert [lr_at(s, cfg) for s in range(40, 100)] == [lr_at(s, two) for s in range(60)]
    assert lr_at(39, cfg) == pytest.approx(1e-4, rel=0.05) and lr_at(44, cfg) == pytest.approx(1e-3, rel=0.2)


def test_qat_schedule_flags_are_checked():
    with pytest.raises(ValueError, match="needs --qat-start"):
        TrainConfig(qat_config="x.json", qat_restart=True).validate()
    with pytest.raises(ValueError, match="need --qat-config"):
        TrainConfig(qat_start=0.5).validate()
    with pytest.raises(ValueError, match=r"qat-start \+ qat-ramp < 1"):
        TrainConfig(qat_config="x.json", qat_start=0.6, qat_ramp=0.4).validate()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([-1, 0, 1]), min_size=0, max_size=200))
def test_pack_unpack_round_trip(values):
    trits = torch.tensor(values, dtype=torch.int8)
    packed = ternary_pack(trits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(len(values) / 5)
    assert torch.equal(ternary_unpack(packed, len(values)), trits)


def test_pack_rejects_non_ternary():
    with pytest.raises(ValueError):
        ternary_pack(torch.tensor([0, 2, -1]))
    with pytest.raises(ValueError):
        ternary_pack(torch.tensor([0.5, 1.0]))


def test_export_module_matches_bitlinear():
    torch.manual_seed(0)
    for act_scale in ("absmax", "absmean"):
        layer = BitLinear(40, 24, bias=True, act_bits=4, act_scale=act_scale)
        nn.init.normal_(layer.bias)
        t = TernaryLinear.from_bitlinear(layer)
        x = torch.randn(3, 7, 40)
        with torch.no_grad():
            assert torch.equal(t(x), layer(x))
    assert t.qweight.numel() == math.ceil(40 * 24 / 5)


def test_pack_checkpoint_round_trip(tmp_path, text_file):
    cfg = TrainConfig(dataset=f"file:{text_file}", out_dir=str(tmp_path / "run"), preset="tiny", max_steps=4,
                      batch_size=4, eval_interval=4, eval_batches=1, warmup_steps=1, progress=False,
                      qat_config=str(CONFIGS / "all_act8.json"))
    run = train(cfg)
    src = load_checkpoint(run / "last")
    assert src.meta["qat"] == load_qat_config(CONFIGS / "all_act8.json").to_dict()
    out = pack_checkpoint(run / "last", tmp_path / "ternary")
    meta = json.loads((out / "config.json").read_text())
    q = meta["quantization"]
    assert q["method"] == "ternary" and q["bits"] == 1.58 and q["group_size"] == 0 and meta["qat"] is None
    assert q["qat"] == src.meta["qat"] and len(q["quantized_layers"]) == 4 * src.model.config.n_layer

    model = prepare_ternary_model(GPT(GPTConfig.from_dict(meta["model"])), q)
    missing, unexpected = load_model(model, str(out / "model.safetensors"), strict=False)
    assert not missing and not unexpected
    model.eval()
    x = torch.randint(0, src.model.config.vocab_size, (2, 64))
    with torch.no_grad():
        before, _ = src.model(x)
        after, _ = model(x)
    assert torch.allclose(before, after, atol=1e-5)

    packed = n = 0
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            n_weights = m.in_features * m.out_features
            assert m.qweight.dtype == torch.uint8 and m.qweight.numel() == math.ceil(n_weights / 5)
            assert set(m.trits().unique().tolist()) <= {-1, 0, 1}
            packed += m.qweight.numel()
            n += m.in_features * m.out_features
    assert 8 * packed / n == pytest.approx(1.6, abs=0.01)
    size = (out / "model.safetensors").stat().st_size
    assert size < (run / "last" / "model.safetensors").stat().st_size / 4


@pytest.mark.parametrize("weight_scale", ["tensor", "channel"])
@pytest.mark.parametrize("rows", [1, 40])  # the decode (int8pack GEMV) and prefill (bf16 GEMM) paths
def test_ternary_int8_kernel_matches_the_reference(weight_scale, rows):
    torch.manual_seed(0)
    layer = BitLinear(96, 64, bias=True, act_bits=8, weight_scale=weight_scale)
    nn.init.normal_(layer.bias)
    t = TernaryLinear.from_bitlinear(layer)
    x = torch.randn(rows, 3, 96)
    with torch.no_grad():
        ref = t(x)  # the stored layer's exact forward: what export and eval use
        r = RuntimeTernaryLinear.from_stored(t, "auto")
        r.prepare()
        assert r.backend == "int8pack" and r.w_int8.dtype == torch.int8
        assert set(r.w_int8.unique().tolist()) <= {-1, 0, 1}
        y = r(x)
    assert y.shape == ref.shape and ((y - ref).norm() / ref.norm()).item() < 1e-2  # bf16 activations


def test_ternary_kernel_names():
    with pytest.raises(ValueError, match="unknown kernel 'int2pack'"):
        RuntimeTernaryLinear(8, 8, backend="int2pack")
    # a whole model's kernel that ternary layers lack (int4pack, ...) leaves them on the exact reference
    assert RuntimeTernaryLinear(8, 8, backend="int4pack").backend == "dequant"
    with pytest.raises(RuntimeError, match="before prepare"):
        RuntimeTernaryLinear(8, 8, backend="int8pack")(torch.randn(1, 8))


def test_export_ternary_needs_bitlinears():
    with pytest.raises(ValueError, match="no BitLinear"):
        export_ternary(small_model())


def test_exported_checkpoint_loads_like_any_other(tmp_path):
    """load_checkpoint (as eval, sample and the demo use it) reads an exported ternary checkpoint."""
    import json

    from nanogptq.checkpoint import load_checkpoint, save_checkpoint
    from nanogptq.data import CharTokenizer
    from nanogptq.model import GPT, GPTConfig
    from nanogptq.pipeline import pack_checkpoint
    from nanogptq.quant import bits_per_weight
    from nanogptq.quant.qat import QATConfig, apply_qat

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=12, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = apply_qat(GPT(cfg), QATConfig(act_bits=8))
    meta = {"model": cfg.to_dict(), "tokenizer": CharTokenizer.from_text("abcdefghijkl").to_dict(),
            "qat": model.qat_config, "quantization": None, "metrics": {}}
    save_checkpoint(tmp_path / "qat", model, meta)
    out = pack_checkpoint(tmp_path / "qat", tmp_path / "ternary")
    assert json.loads((out / "config.json").read_text())["quantization"]["method"] == "ternary"
    x = torch.randint(0, 12, (2, 16))
    ref = load_checkpoint(tmp_path / "qat").model(x)[0]
    exported = load_checkpoint(out)  # as eval loads it: the exact reference path
    prepare_for_inference(exported.model, kernel="dequant")
    torch.testing.assert_close(exported.model(x)[0], ref, atol=1e-5, rtol=1e-5)
    assert 1.6 <= bits_per_weight(exported.model) < 1.62
    fast = prepare_for_inference(load_checkpoint(out).model)  # as sample and the demo run it: the int8 kernel
    assert {m.backend for m in fast.modules() if isinstance(m, TernaryLinear)} == {"int8pack"}
    assert ((fast(x)[0] - ref).norm() / ref.norm()).item() < 2e-2
