"""The whole-model choices: the fallback to plain act-order and the --target-bpw plan (quant/select.py,
quant/budget.py)."""

import copy
import json
import struct

import numpy as np
import pytest
import torch

from nanogptq.checkpoint import load_checkpoint, save_checkpoint
from nanogptq.data import prepare_data
from nanogptq.model import GPT, GPTConfig
from nanogptq.pipeline import quantize_checkpoint
from nanogptq.quant import budget
from nanogptq.quant.config import QuantConfig
from nanogptq.quant.quantize import META_EXTRAS, calibration_windows
from nanogptq.quant.select import HELD_OUT_SEED, heldout_loss, quantize_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer model trained for 40 steps on a synthetic corpus, saved as a checkpoint."""
    lines = [f"the cat {i % 7} sat on the mat {i % 5}. a dog ran to the {['park', 'sea', 'hill'][i % 3]}."
             for i in range(600)]
    root = tmp_path_factory.mktemp("budget")
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    dataset = f"file:{root / 'corpus.txt'}"
    data = prepare_data(dataset, cache_dir=root / "cache")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = torch.from_numpy(data.train.astype(np.int64))
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        win = train[torch.randint(len(train) - 65, (16,), generator=g)[:, None] + torch.arange(65)]
        _, loss = model(win[:, :-1], win[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    meta = {"model": model.config.to_dict(), "tokenizer": data.tokenizer.to_dict(), "quantization": None,
            "data": {"dataset": dataset, "tokenizer": "char", "vocab_size": 512, "val_fraction": 0.1,
                     "seed": 1337}, "metrics": {}}
    return model, data, save_checkpoint(root / "fp", model, meta)


def stored_bits_per_weight(path) -> float:
    """From the safetensors file itself: the bytes of the block linears' codes and grids and of the embedding
    (stored once: the head and the embedding share it), over their weights."""
    raw = (path / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    nbytes = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        if name.startswith("transformer.h.") and name.rsplit(".", 1)[1] in ("qweight", "scales", "qzeros", "g_idx"):
            nbytes += size
        elif name.startswith(("lm_head.", "transformer.wte.")) and not name.endswith("bias"):
            nbytes += size
    ck = load_checkpoint(path)
    weights = sum(ck.model.get_submodule(n).in_features * ck.model.get_submodule(n).out_features
                  for n in ck.meta["quantization"]["quantized_layers"])
    weights += ck.model.config.vocab_size * ck.model.config.n_embd
    return 8 * nbytes / weights


def test_fallback_keeps_the_model_with_the_lower_heldout_loss(trained):
    model, data, _ = trained
    # without the tuning after the choice, which would change the kept model's loss
    cfg = QuantConfig.preset("quality", bits=2, group_size=32, calib_samples=16, tune_steps=0)
    q = quantize_model(copy.deepcopy(model), cfg, data.train, progress=False)
    sel = q.quant_selection
    assert set(sel["heldout_loss"]) == {"quality", "act-order"}
    assert sel["heldout_loss"][sel["kept"]] == min(sel["heldout_loss"].values())
    windows = calibration_windows(data.train, 16, 65, cfg.calib_seed + HELD_OUT_SEED)
    assert heldout_loss(q, windows) == pytest.approx(sel["heldout_loss"][sel["kept"]], abs=1e-5)
    # the stored settings say what the kept model is
    assert q.quant_config.rotate == (sel["kept"] == "quality")


def test_target_bpw_plan_fits_the_saved_bytes_and_round_trips(trained, tmp_path):
    model, data, src = trained
    cfg = QuantConfig(method="gptq", act_order=True, calib_samples=8, target_bpw=3.0)
    out = quantize_checkpoint(src, tmp_path / "mix", cfg, progress=False)
    ck = load_checkpoint(out)
    q = ck.meta["quantization"]
    assert q["quantize_embeddings"] and set(q["plan"]) == set(q["quantized_layers"])
    assert len({tuple(v) for v in q["plan"].values()}) > 1  # a mix, not one setting everywhere
    on_disk = stored_bits_per_weight(out)
    assert on_disk <= 3.0 and on_disk == pytest.approx(ck.meta["bits_per_weight"], abs=1e-3)
    for name, (bits, group) in q["plan"].items():
        layer = ck.model.get_submodule(name)
        assert (layer.bits, layer.group_size) == (bits, group)
    # the plan round-trips through config.json: strict keys, and a version
    stored = QuantConfig.from_dict({k: v for k, v in q.items() if k not in META_EXTRAS})
    assert stored.plan == q["plan"] and stored.to_dict()["version"] == QuantConfig.VERSION
    with pytest.raises(ValueError, match="unknown"):
        QuantConfig.from_dict({**stored.to_dict(), "plan_bytes": 1})
    with pytest.raises(ValueError, match="plan entry"):
        QuantConfig(plan={"transformer.h.0.attn.c_attn": [5, 64]})


def test_a_higher_budget_never_gives_a_larger_summed_error(trained):
    model, data, _ = trained
    cfg = QuantConfig(method="gptq", act_order=True, calib_samples=8)
    table = budget.measure(model, cfg, data.train, progress=False)
    weights, fixed = budget.budget_weights(model, cfg), budget.embedding_bytes(model)
    lowest = budget.lowest_bpw(model, cfg)
    errors = []
    for target in np.linspace(lowest, 8, 25):
        plan, bpw, error = budget.choose(table, weights, fixed, float(target))
        assert bpw <= target + 1e-9 and set(plan) == set(table)
        errors.append(error)
    assert all(b <= a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < errors[0] / 10


@pytest.mark.parametrize("target", [1.0, 8.5])
def test_a_budget_out_of_reach_is_a_one_line_error_naming_the_range(trained, target):
    model, data, _ = trained
    cfg = QuantConfig(method="gptq", act_order=True, calib_samples=8, target_bpw=target)
    with pytest.raises(ValueError, match=r"out of reach: this model's plans span \d\.\d+ to 8 bits") as err:
        quantize_model(copy.deepcopy(model), cfg, data.train, progress=False)
    assert "\n" not in str(err.value)


def test_sensitivity_from_cached_block_inputs_equals_whole_model_forwards(trained):
    """sensitivity runs the model from the changed layer's block on: the KL divergences are those of whole
    forwards, bit for bit."""
    import torch.nn.functional as F

    model, data, _ = trained
    model = copy.deepcopy(model)
    layers = {f"transformer.h.{b}.{n}": model.get_submodule(f"transformer.h.{b}.{n}")
              for b in range(2) for n in ("attn.c_attn", "mlp.c_proj")}
    g = torch.Generator().manual_seed(0)
    errors = {name: 0.05 * torch.randn(m.weight.shape, generator=g) for name, m in layers.items()}
    windows = calibration_windows(data.train, 8, 64, 0)
    got = budget.sensitivity(model, layers, errors, windows, batch_size=3)
    base = [F.log_softmax(model(x)[0].float(), -1) for x in windows.split(3)]
    for name, dW in errors.items():
        weight = layers[name].weight
        kept = weight.detach().clone()
        weight.data.add_(dW)
        want = sum(F.kl_div(F.log_softmax(model(x)[0].float(), -1), p, log_target=True, reduction="sum").item()
                   for x, p in zip(windows.split(3), base, strict=True)) / windows.numel()
        weight.data.copy_(kept)
        assert got[name] == want and want > 0, name
