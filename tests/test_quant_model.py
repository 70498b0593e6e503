"""Whole-model quantization: logits, checkpoints, file sizes and loss on a small trained model."""

import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogptq.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanogptq.data import CharTokenizer, prepare_data
from nanogptq.model import GPT, GPTConfig
from nanogptq.pipeline import quantize_checkpoint
from nanogptq.quant import QuantConfig, QuantEmbedding, QuantLinear, bits_per_weight, quant_meta, quantize, tune
from nanogptq.quant.quantize import theoretical_size_bytes
from nanogptq.quant.select import quantize_model
from nanogptq.runtime.load import prepare_for_inference


def corpus_text() -> str:
    lines = [
        f"the cat {i % 7} sat on the mat {i % 5}. a dog ran to the {['park', 'sea', 'hill'][i % 3]}."
        for i in range(600)
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer model trained for 150 steps: on Tiny Shakespeare if NANOGPTQ_DATA_DIR is set."""
    if os.environ.get("NANOGPTQ_DATA_DIR"):
        dataset = "shakespeare"
    else:
        path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
        path.write_text(corpus_text())
        dataset = f"file:{path}"
    data = prepare_data(dataset, cache_dir=tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = torch.from_numpy(data.train.astype(np.int64))
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(len(train) - 65, (16,), generator=g)
        win = train[starts[:, None] + torch.arange(65)]
        _, loss = model(win[:, :-1], win[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model, data, dataset


def held_out_loss(model, tokens, max_windows=48):
    n_windows = min(max_windows, (len(tokens) - 1) // 64)
    val = torch.from_numpy(np.asarray(tokens[: n_windows * 64 + 1]).astype(np.int64))
    x, y = val[:-1].view(n_windows, 64), val[1:].view(n_windows, 64)
    with torch.no_grad():
        return model(x, y)[1].item()


def dequantized_copy(model):
    """The same network with plain nn.Linear / nn.Embedding holding the dequantized weights."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, QuantLinear) and name.startswith("transformer.h."):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantize()
            ref.set_submodule(name, lin)
    if isinstance(ref.transformer.wte, QuantEmbedding):
        W = ref.lm_head.dequantize()
        ref.transformer.wte = nn.Embedding.from_pretrained(W)
        ref.lm_head = nn.Linear(W.shape[1], W.shape[0], bias=False)
        ref.lm_head.weight.data = W
    return ref


@pytest.mark.parametrize(
    "cfg",
    [
        QuantConfig(
            method="gptq", bits=4, group_size=32, rotate=True, quantize_embeddings=True, calib_samples=16
        ),
        QuantConfig(method="gptq", bits=3, group_size=24, act_order=True, calib_samples=16),
        QuantConfig(method="rtn", bits=2, group_size=0, symmetric=True),
    ],
    ids=["gptq4-rotate-emb", "gptq3-actorder", "rtn2-tensor"],
)
def test_quantized_logits_match_dequantized_float_copy(trained, cfg):
    model, data, _ = trained
    calib = data.train if cfg.method == "gptq" else None
    q = quantize(copy.deepcopy(model), cfg, calib, progress=False)  # stored layers: the exact fp32 path
    assert len(q.quant_log) == 8 + cfg.quantize_embeddings
    assert all(math.isfinite(r["rel_error"]) and r["time_s"] >= 0 for r in q.quant_log)
    ref = dequantized_copy(q)
    # and prepared to run on the exact backend (the MLPs' GELUs moved into their c_fc layers)
    run = prepare_for_inference(copy.deepcopy(q), kernel="dequant")
    idx = torch.from_numpy(data.val[:128].astype(np.int64)).view(2, 64)
    with torch.no_grad():
        a, b, c = q(idx)[0], ref(idx)[0], run(idx)[0]
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert torch.allclose(c, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_checkpoint_round_trip_and_size(tmp_path, bits):
    torch.manual_seed(bits)
    model = GPT(GPTConfig(vocab_size=16, block_size=32, n_layer=4, n_head=4, n_embd=128))
    method = "gptq" if bits == 3 else "rtn"
    cfg = QuantConfig(
        method=method,
        bits=bits,
        group_size=64,
        act_order=bits == 3,
        quantize_embeddings=bits == 4,
        calib_samples=8,
    )
    tokens = np.random.default_rng(0).integers(0, 16, 5000)
    q = quantize(model, cfg, tokens if method == "gptq" else None, progress=False)
    meta = {
        "model": q.config.to_dict(),
        "tokenizer": CharTokenizer("abcdefghijklmnop").to_dict(),
        "quantization": quant_meta(q, cfg),
    }
    path = save_checkpoint(tmp_path / "q", q, meta)
    ckpt = load_checkpoint(path)
    idx = torch.randint(0, 16, (2, 32))
    with torch.no_grad():
        assert torch.equal(q(idx)[0], ckpt.model(idx)[0])
    assert theoretical_size_bytes(ckpt.model) == theoretical_size_bytes(q)
    size, theory = ckpt.size_bytes(), theoretical_size_bytes(q)
    assert abs(size - theory) / theory < 0.05, (size, theory)
    assert bits < bits_per_weight(q) < bits + 1


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_8bit_per_channel_barely_changes_held_out_loss(trained, method):
    model, data, _ = trained
    base = held_out_loss(model, data.val)
    assert base < 0.8 * math.log(data.tokenizer.vocab_size)  # the model did learn something
    cfg = QuantConfig(method=method, bits=8, group_size=-1, calib_samples=32)
    q = quantize(copy.deepcopy(model), cfg, data.train if method == "gptq" else None, progress=False)
    assert abs(held_out_loss(q, data.val) - base) / base < 1e-3


def test_quantize_checkpoint(trained, tmp_path):
    model, data, dataset = trained
    meta = {
        "model": model.config.to_dict(),
        "tokenizer": data.tokenizer.to_dict(),
        "data": {
            "dataset": dataset,
            "tokenizer": "char",
            "vocab_size": 512,
            "val_fraction": 0.1,
            "seed": 1337,
        },
        "quantization": None,
        "metrics": {"val_loss": 1.0},
    }
    src = save_checkpoint(tmp_path / "fp", model, meta)
    # RTN needs no data: a dataset that cannot be found must not matter
    rtn_meta = {**meta, "data": {**meta["data"], "dataset": "file:/nonexistent"}}
    save_checkpoint(tmp_path / "fp-nodata", model, rtn_meta)
    out = quantize_checkpoint(
        tmp_path / "fp-nodata", tmp_path / "rtn", QuantConfig(method="rtn", bits=4), progress=False
    )
    ck = load_checkpoint(out)
    assert ck.meta["quantization"]["method"] == "rtn" and ck.meta["metrics"] == {}
    assert ck.meta["source_metrics"] == {"val_loss": 1.0} and ck.meta["parent"] == str(tmp_path / "fp-nodata")
    assert len(ck.meta["quant_log"]) == 8 and ck.meta["quant_time_s"] > 0
    # --out never destroys its source or a folder that is not a checkpoint, and says so before any work
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep")
    for bad, message in ((tmp_path / "notes", "is not a nanogptq checkpoint"), (src, "its own source")):
        with pytest.raises(CheckpointError, match=message):
            quantize_checkpoint(src, bad, QuantConfig(method="rtn", bits=4), progress=False)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep" and load_checkpoint(src).meta["quantization"] is None
    out = quantize_checkpoint(
        src, tmp_path / "gptq", QuantConfig(method="gptq", bits=4, calib_samples=8), progress=False
    )
    ck = load_checkpoint(out)
    x = torch.from_numpy(data.val[:64].astype(np.int64))[None]
    with torch.no_grad():
        assert F.cross_entropy(ck.model(x)[0][0], torch.roll(x, -1)[0]).isfinite()
    assert ck.meta["quantization"]["quantized_layers"][0] == "transformer.h.0.attn.c_attn"


def test_gptq_3bit_loses_less_than_rtn_3bit(trained):
    model, data, _ = trained
    loss = {}
    for method in ("rtn", "gptq"):
        cfg = QuantConfig(method=method, bits=3, group_size=32, calib_samples=32)
        q = quantize(copy.deepcopy(model), cfg, data.train, progress=False)
        loss[method] = held_out_loss(q, data.val)
    assert loss["gptq"] < loss["rtn"]


def summed_output_error(model, cfg, tokens) -> float:
    q = quantize(copy.deepcopy(model), cfg, tokens, progress=False)
    assert all(r["error_kind"] == "output" for r in q.quant_log)
    return sum(r["rel_error"] for r in q.quant_log), q


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quality_preset_is_never_worse_than_plain_act_order(trained, bits, tmp_path):
    model, data, _ = trained
    common = dict(bits=bits, group_size=32, calib_samples=16)
    plain, _ = summed_output_error(model, QuantConfig(method="gptq", act_order=True, **common), data.train)
    best, q = summed_output_error(model, QuantConfig.preset("quality", **common), data.train)
    assert best <= plain, (best, plain)
    # each layer's rotation is kept only where it helped, as its log row and the checkpoint say; a checkpoint
    # with some layers rotated and some not loads back to the same logits
    cfg = QuantConfig.preset("quality", **common)
    meta = quant_meta(q, cfg)
    logged = [r["layer"] for r in q.quant_log if r["rotated"]]
    assert meta["rotated_layers"] == logged
    assert logged == [name for name, m in q.named_modules() if isinstance(m, QuantLinear) and m.rot_seed is not None]
    path = save_checkpoint(tmp_path / "q", q, {"model": q.config.to_dict(), "tokenizer": data.tokenizer.to_dict(),
                                               "quantization": meta})
    idx = torch.from_numpy(data.val[:128].astype(np.int64)).view(2, 64)
    with torch.no_grad():
        assert torch.equal(q(idx)[0], load_checkpoint(path).model(idx)[0])


def test_block_tuning_moves_each_code_one_step_at_most_and_lowers_the_loss(trained, tmp_path):
    """quant/tune.py, after GPTQ: the tuned model keeps GPTQ's grid layout (bits, groups, zero points), each code
    within one step of GPTQ's and each scale within exp(SCALE_RANGE) of it; a block's tuning is kept only where
    its held-out loss fell, and moved something there; at 2 bits the tuned model's validation loss is below
    GPTQ's; the checkpoint loads to the same logits."""
    model, data, _ = trained
    common = dict(method="gptq", bits=2, group_size=32, act_order=True, calib_samples=32)
    gptq = quantize_model(copy.deepcopy(model), QuantConfig(**common), data.train, progress=False)
    cfg = QuantConfig(**common, tune_steps=100)
    tuned = quantize_model(copy.deepcopy(model), cfg, data.train, progress=False)
    rows = [r for r in tuned.quant_log if "kept" in r]
    assert [r["layer"] for r in rows] == ["transformer.h.0", "transformer.h.1"]
    for r in rows:
        assert r["kept"] == (r["heldout_loss_tuned"] < r["heldout_loss_gptq"]) == (r["best_step"] > 0)
    assert any(r["kept"] for r in rows)
    for b, row in enumerate(rows):
        moved = 0
        for name, g in gptq.transformer.h[b].named_modules():
            if not isinstance(g, QuantLinear):
                continue
            t = tuned.transformer.h[b].get_submodule(name)
            assert (t.bits, t.group_size, t.symmetric) == (g.bits, g.group_size, g.symmetric)
            assert torch.equal(t.qzeros, g.qzeros) and torch.equal(t.g_idx, g.g_idx)
            step = t.codes().int() - g.codes().int()
            assert step.abs().max() <= 1
            ratio = t.scales.float() / g.scales.float()
            bound = math.exp(tune.SCALE_RANGE) * (1 + 2**-10)  # and the fp16 rounding of the stored scale
            assert ratio.max() <= bound and ratio.min() >= 1 / bound
            moved += int(step.ne(0).sum()) + int(ratio.ne(1).sum())
        assert (moved > 0) == row["kept"]
    assert held_out_loss(tuned, data.val) < held_out_loss(gptq, data.val)
    meta = {"model": tuned.config.to_dict(), "tokenizer": data.tokenizer.to_dict(),
            "quantization": quant_meta(tuned, cfg)}
    path = save_checkpoint(tmp_path / "q", tuned, meta)
    idx = torch.from_numpy(data.val[:128].astype(np.int64)).view(2, 64)
    with torch.no_grad():
        assert torch.equal(tuned(idx)[0], load_checkpoint(path).model(idx)[0])
