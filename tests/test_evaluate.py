import json
import math

import numpy as np
import pytest
import torch

from nanogptq.checkpoint import CheckpointError, save_checkpoint
from nanogptq.data import prepare_data
from nanogptq.evaluate import WindowStats, bootstrap_change, compare, evaluate_checkpoint, perplexity, window_stats
from nanogptq.model import GPT, GPTConfig
from nanogptq.pipeline import pack_checkpoint
from nanogptq.quant import QuantConfig, quant_meta, quantize
from nanogptq.quant.qat import QATConfig, apply_qat


def test_uniform_model_has_perplexity_vocab_size(text_file):
    data = prepare_data(f"file:{text_file}")
    model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    torch.nn.init.zeros_(model.transformer.wte.weight)  # tied head: every logit 0, a uniform guess
    result = perplexity(model.eval(), data.val, batch_size=7, progress=False)
    assert result["val_tokens"] == len(data.val) - 1  # the whole split, every token once
    assert math.isclose(result["val_ppl"], data.tokenizer.vocab_size, rel_tol=1e-5)


def test_compare_reports_fp_ptq_and_qat_variants(tmp_path, text_file):
    data_meta = {"dataset": f"file:{text_file}", "tokenizer": "char", "vocab_size": 512, "val_fraction": 0.1,
                 "seed": 1337, "split": "chunks"}
    data = prepare_data(**{k: v for k, v in data_meta.items()})
    cfg = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=64)
    meta = {"model": cfg.to_dict(), "tokenizer": data.tokenizer.to_dict(), "data": data_meta, "metrics": {}}
    torch.manual_seed(0)
    fp = GPT(cfg)
    save_checkpoint(tmp_path / "fp32", fp, {**meta, "quantization": None})
    rtn_cfg = QuantConfig(method="rtn", bits=4, group_size=32, symmetric=True)
    q = quantize(GPT(cfg).eval(), rtn_cfg, None, progress=False)
    save_checkpoint(tmp_path / "rtn4", q, {**meta, "quantization": quant_meta(q, rtn_cfg)})
    qat = apply_qat(GPT(cfg), QATConfig())
    save_checkpoint(tmp_path / "qat", qat, {**meta, "qat": qat.qat_config, "quantization": None})
    pack_checkpoint(tmp_path / "qat", tmp_path / "ternary")

    rows = compare([tmp_path / n for n in ("fp32", "rtn4", "ternary")], tmp_path / "report", progress=False)
    assert [r["method"] for r in rows] == ["fp32", "rtn", "ternary"]
    assert rows[0]["ppl_change_pct"] == 0.0
    assert rows[1]["bits_per_weight"] > 4 and rows[2]["bits_per_weight"] < 1.7
    assert rows[2]["size_bytes"] < rows[1]["size_bytes"] < rows[0]["size_bytes"]
    assert json.loads((tmp_path / "report" / "compare.json").read_text())[2]["variant"] == "ternary"
    table = (tmp_path / "report" / "compare.md").read_text()
    assert "| ternary | ternary | 1.58 | tensor |  |" in table and "| rtn4 | rtn | 4 | 32 | symmetric |" in table
    assert "| 95% band | KL to baseline | top-1 agreement |" in table.splitlines()[0]
    assert "| +0.00% | +0.00% to +0.00% | 0.00e+00 | 100.00% |" in table  # the baseline against itself
    # each variant against the baseline: KL above 0, a band around its change, in the JSON and the table
    for r in rows[1:]:
        assert r["kl_mean"] > 0 and 0 <= r["top1_agreement"] <= 1
        lo, hi = r["ppl_change_band_pct"]
        assert lo <= r["ppl_change_pct"] <= hi and lo < hi
        assert f"{lo:+.2f}% to {hi:+.2f}%" in table and f"{100 * r['top1_agreement']:.2f}%" in table
    assert json.loads((tmp_path / "report" / "compare.json").read_text())[1]["kl_mean"] == rows[1]["kl_mean"]
    assert (tmp_path / "report" / "compare.png").stat().st_size > 10_000
    # compare records each variant's perplexity in its config.json, where the demo reads it
    saved = json.loads((tmp_path / "rtn4" / "config.json").read_text())["metrics"]["val_ppl"]
    assert saved == rows[1]["val_ppl"]
    # a fast kernel's perplexity is reported, never stored over the exact one
    fast = evaluate_checkpoint(tmp_path / "rtn4", kernel="auto", progress=False)
    assert fast["kernel"] == "auto" and fast["val_ppl"] == pytest.approx(saved, rel=1e-2)
    assert json.loads((tmp_path / "rtn4" / "config.json").read_text())["metrics"]["val_ppl"] == saved

    # two runs' best/ folders get the run's name in the table; the report goes beside the first by default
    (tmp_path / "other").mkdir()
    save_checkpoint(tmp_path / "other" / "fp32", fp, {**meta, "quantization": None})
    rows = compare([tmp_path / "fp32", tmp_path / "other" / "fp32"], progress=False)
    assert [r["variant"] for r in rows] == [f"{tmp_path.name}/fp32", "other/fp32"]
    assert (tmp_path / "report" / "compare.md").read_text().count("/fp32 |") == 2
    # another tokenizer's per-token perplexity is not comparable: refused before any evaluation
    other = prepare_data(f"file:{text_file}", "byte")
    byte_cfg = GPTConfig(vocab_size=other.tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    save_checkpoint(tmp_path / "byte", GPT(byte_cfg), {**meta, "model": byte_cfg.to_dict(),
                                                        "tokenizer": other.tokenizer.to_dict()})
    with pytest.raises(ValueError, match=r"\(another tokenizer\), so .* not comparable"):
        compare([tmp_path / "fp32", tmp_path / "byte"], tmp_path / "r2", progress=False)
    assert not (tmp_path / "r2" / "compare.md").exists()
    # the error names the setting that differs
    save_checkpoint(tmp_path / "tail", fp, {**meta, "data": {**meta["data"], "split": "tail"}})
    with pytest.raises(ValueError, match=r"\(split 'tail' against 'chunks'\)"):
        compare([tmp_path / "fp32", tmp_path / "tail"], tmp_path / "r2", progress=False)
    (tmp_path / "report.txt").write_text("")
    with pytest.raises(ValueError, match="report.txt: a file, not a folder"):
        compare([tmp_path / "fp32"], tmp_path / "report.txt", progress=False)


def test_eval_refuses_a_dataset_whose_text_changed(tmp_path, text_file):
    data = prepare_data(f"file:{text_file}")
    cfg = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    meta = {"model": cfg.to_dict(), "tokenizer": data.tokenizer.to_dict(),
            "data": {"dataset": f"file:{text_file}", "tokenizer": "char"}}
    path = save_checkpoint(tmp_path / "ck", GPT(cfg), meta)
    assert evaluate_checkpoint(path, save=False, progress=False)["val_ppl"] > 1
    text_file.write_text("# " + text_file.read_text())  # a new character: every token id after '#' shifts
    with pytest.raises(CheckpointError, match="no longer gives the tokenizer this checkpoint was trained with"):
        evaluate_checkpoint(path, save=False, progress=False)
    # a byte tokenizer takes any text: the text's hash, recorded at training, catches the change
    byte = prepare_data(f"file:{text_file}", "byte")
    spec = {"dataset": f"file:{text_file}", "tokenizer": "byte", "text_sha256": byte.text_sha256}
    cfg = GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=16)
    path = save_checkpoint(tmp_path / "byte", GPT(cfg), {"model": cfg.to_dict(), "data": spec,
                                                         "tokenizer": byte.tokenizer.to_dict()})
    assert evaluate_checkpoint(path, save=False, progress=False)["val_ppl"] > 1
    text_file.write_text(text_file.read_text()[1000:])
    with pytest.raises(CheckpointError, match="is not the one this checkpoint was trained on .*split would differ"):
        evaluate_checkpoint(path, save=False, progress=False)


def test_kl_and_top1_agreement_against_the_reference(text_file):
    data = prepare_data(f"file:{text_file}")
    cfg = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    same = window_stats(model, data.val, batch_size=5, progress=False, reference=model).summary()
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-7) and same["top1_agreement"] == 1.0
    assert same["val_tokens"] == len(data.val) - 1
    assert same["val_ppl"] == pytest.approx(perplexity(model, data.val, progress=False)["val_ppl"], rel=1e-6)
    perturbed = GPT(cfg).eval()
    perturbed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other = window_stats(perturbed, data.val, progress=False, reference=model)
    assert other.summary()["kl_mean"] > 1e-4 and np.all(other.kl >= -1e-9)
    assert other.summary()["top1_agreement"] < 1.0


def test_bootstrap_band_holds_the_change_and_narrows_with_more_windows():
    rng = np.random.default_rng(0)
    n = 400
    tokens = np.full(n, 64)
    base_nll = rng.uniform(1.0, 2.0, n) * 64
    nll = base_nll + rng.normal(0.02, 0.05, n) * 64  # about +2% perplexity, noisy from window to window

    def band(k):
        stats, base = WindowStats(nll[:k], tokens[:k]), WindowStats(base_nll[:k], tokens[:k])
        change = 100 * np.expm1((nll[:k].sum() - base_nll[:k].sum()) / tokens[:k].sum())
        return change, bootstrap_change(stats, base, samples=500, seed=1)

    few, (lo_few, hi_few) = band(25)
    many, (lo, hi) = band(n)
    assert lo_few <= few <= hi_few and lo <= many <= hi
    assert hi - lo < 0.5 * (hi_few - lo_few)  # 16x the windows: about a quarter of the width
    assert band(n)[1] == (lo, hi)  # seeded
    assert bootstrap_change(WindowStats(base_nll, tokens), WindowStats(base_nll, tokens)) == (0.0, 0.0)
