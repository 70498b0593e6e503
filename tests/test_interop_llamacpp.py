"""llama.cpp as a CPU engine (interop/llamacpp.py): its logits against the `dequant` reference, which engine
`--kernel auto` picks, the one-line refusals, the cached GGUF, and `sample` saying which engine ran.

The models are made here: small GPTs of each activation, trained a few steps on a repeating corpus with a char
tokenizer (llama.cpp has no char tokenizer; the engine is fed nanogptq's ids), then quantized to each grid a
GGUF type holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_training import train_briefly

from nanogptq.checkpoint import load_checkpoint, save_checkpoint
from nanogptq.cli import main
from nanogptq.data import CharTokenizer
from nanogptq.interop.gguf import GGUFExportError
from nanogptq.interop.llamacpp import LlamaCppModel, exact_gguf_types, gguf_cache_path, load_llamacpp
from nanogptq.model import GPT, GPTConfig
from nanogptq.quant.config import QuantConfig
from nanogptq.quant.quantize import quant_meta, quantize
from nanogptq.runtime.generate import generate
from nanogptq.sample import SampleSettings, engine_name, generate_text, load_for_generation

CORPUS = "\n".join(f"the cat {i % 7} sat on the mat {i % 5}. a dog ran to the {['park', 'sea', 'hill'][i % 3]}."
                   for i in range(300))
GRIDS = {  # GGUF type -> the quantize settings whose grid it holds
    "Q8_0": QuantConfig(method="rtn", bits=8, group_size=32, symmetric=True),
    "Q4_0": QuantConfig(method="rtn", bits=4, group_size=32, symmetric=True),
}
# Largest |logit - dequant's| measured on these models over a prompt and 16 steps: F32 tanh GELU 1.7e-4, padded
# vocabulary 5e-5 (llama.cpp's fp16 KV cache), F32 exact GELU 2.0e-4 (and llama.cpp's tanh GELU), Q8_0 0.0076,
# Q4_0 0.0090 (activations rounded to 8-bit blocks against quantized weights); the tolerances leave 10-25x, for
# other CPUs' llama.cpp kernels
ATOL = {"F32": 0.005, "Q8_0": 0.1, "Q4_0": 0.1}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints by name: float with the exact and the tanh GELU and with a padded vocabulary, one per GGUF
    grid, and a grid no GGUF type holds (8-bit asymmetric)."""
    root = tmp_path_factory.mktemp("llamacpp")
    tok = CharTokenizer.from_text(CORPUS)
    tokens = torch.tensor(tok.encode(CORPUS))
    paths = {}
    # gelu_tanh-padded: a vocabulary padded past the tokenizer's, whose extra rows GGUF gets as unused tokens
    for name, activation, pad in (("gelu", "gelu", 0), ("gelu_tanh", "gelu_tanh", 0), ("padded", "gelu_tanh", 7)):
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=tok.vocab_size + pad, block_size=64, n_layer=2, n_head=2, n_embd=64, bias=True,
                        activation=activation)
        meta = {"model": cfg.to_dict(), "tokenizer": tok.to_dict(), "quantization": None}
        paths[f"F32-{name}"] = save_checkpoint(root / name, train_briefly(GPT(cfg), tokens, 20), meta)
    grids = {**GRIDS, "int8-asym": QuantConfig(method="rtn", bits=8, group_size=32, symmetric=False)}
    for name, qcfg in grids.items():
        ckpt = load_checkpoint(paths["F32-gelu"])
        q = quantize(ckpt.model, qcfg, progress=False)
        paths[name] = save_checkpoint(root / name, q, {**ckpt.meta, "quantization": quant_meta(q, qcfg)})
    return paths


def _max_logit_error(path: Path, ids: list[int], steps: int = 16) -> tuple[float, float]:
    """(largest |logits - dequant's|, share of equal argmaxes) over a prompt and `steps` one-token steps."""
    ref = load_for_generation(path, "cpu", kernel="dequant").model
    engine = load_for_generation(path, "cpu", kernel="llamacpp").model
    assert isinstance(engine, LlamaCppModel)
    worst, same = 0.0, 0
    with torch.inference_mode():
        ref.setup_kv_cache(1)
        for i in range(steps + 1):
            idx = torch.tensor([ids[: len(ids) - steps]]) if i == 0 else torch.tensor([[ids[len(ids) - steps + i - 1]]])
            pos = torch.arange(idx.size(1)) if i == 0 else torch.tensor([len(ids) - steps + i - 1])
            a, _ = ref(idx, input_pos=pos)
            b, _ = engine(idx, input_pos=pos)
            worst = max(worst, float((a - b).abs().max()))
            same += int(a.argmax() == b.argmax())
    return worst, same / (steps + 1)


@pytest.mark.parametrize("name", ["F32-gelu_tanh", "F32-gelu", "F32-padded", "Q8_0", "Q4_0"])
def test_engine_logits_match_dequant(models, name):
    ids = CharTokenizer.from_text(CORPUS).encode(CORPUS[500:548])
    worst, same = _max_logit_error(models[name], ids)
    assert worst < ATOL[name.split("-")[0]], worst
    assert same == 1.0


def test_auto_picks_llamacpp_where_a_gguf_type_holds_the_grid(models, tmp_path):
    for name in ("F32-gelu", "Q8_0", "Q4_0"):
        ckpt = load_for_generation(models[name], "cpu")
        assert isinstance(ckpt.model, LlamaCppModel), name
        assert engine_name(ckpt).startswith("llama.cpp (")
    own = load_for_generation(models["int8-asym"], "cpu")  # Q8_0's int8 cannot hold an 8-bit zero point
    assert not isinstance(own.model, LlamaCppModel)
    assert engine_name(own).startswith("nanogptq (")
    bf16 = load_for_generation(models["Q4_0"], "cpu", dtype="bf16")  # llama.cpp runs fp32 activations
    assert not isinstance(bf16.model, LlamaCppModel)


def test_refusals_are_one_line(models, capsys):
    with pytest.raises(GGUFExportError, match="8-bit asymmetric codes do not fit Q8_0"):
        exact_gguf_types(load_checkpoint(models["int8-asym"]).model, load_checkpoint(models["int8-asym"]).meta)
    for args, why in (([str(models["int8-asym"])], "8-bit asymmetric codes do not fit Q8_0"),
                      ([str(models["Q4_0"]), "--dtype", "bf16"], "runs on fp32 activations")):
        with pytest.raises(SystemExit):
            main(["sample", *args, "--kernel", "llamacpp", "--max-new-tokens", "2"])
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1, err
    with pytest.raises(ValueError, match="--kernel llamacpp runs on the CPU, not cuda"):
        load_for_generation(models["Q4_0"], "cuda", kernel="llamacpp")


def test_gguf_cached_outside_the_checkpoint(models):
    before = sorted(p.name for p in models["Q4_0"].iterdir())
    cached = gguf_cache_path(models["Q4_0"])
    load_llamacpp(load_checkpoint(models["Q4_0"]))
    stamp = cached.stat().st_mtime_ns
    load_llamacpp(load_checkpoint(models["Q4_0"]))
    assert cached.stat().st_mtime_ns == stamp  # exported once
    assert sorted(p.name for p in models["Q4_0"].iterdir()) == before


def test_sample_says_which_engine_ran(models, capsys):
    main(["sample", str(models["Q4_0"]), "--prompt", "the cat", "--max-new-tokens", "8", "--seed", "1"])
    assert "tokens by llama.cpp (F32/Q4_0 GGUF" in capsys.readouterr().err
    main(["sample", str(models["Q4_0"]), "--prompt", "the cat", "--max-new-tokens", "8", "--kernel", "dequant"])
    assert "tokens by nanogptq (dequant kernels, float32 activations)" in capsys.readouterr().err


def test_engine_samples_with_nanogptqs_sampler_and_window(models):
    """Greedy generation past the context (the window slides and refills) gives the same tokens on both
    engines of the trained tanh-GELU model, and seeded sampling runs the same Sampler."""
    path = models["F32-gelu_tanh"]
    ref = load_for_generation(path, "cpu", kernel="dequant")
    engine = load_for_generation(path, "cpu", kernel="llamacpp")
    prompt = torch.tensor([ref.tokenizer.encode("the cat 3 sat")])
    a = generate(ref.model, prompt, 60, temperature=0.0)  # 13 + 60 tokens: past the 64-token context
    b = generate(engine.model, prompt, 60, temperature=0.0)
    assert torch.equal(a, b)
    settings = SampleSettings(max_new_tokens=20, temperature=0.8, top_k=10, seed=3)
    assert generate_text(ref, "the dog", settings).text == generate_text(engine, "the dog", settings).text


def test_engine_rewinds_to_an_earlier_position(models):
    """A step at an earlier position drops the cache past it: the logits equal a fresh prefill of the same
    tokens; a step past the filled cache is an error."""
    engine = load_for_generation(models["Q4_0"], "cpu", kernel="llamacpp").model
    ids = CharTokenizer.from_text(CORPUS).encode(CORPUS[100:130])
    with torch.inference_mode():
        engine.setup_kv_cache(1)
        engine(torch.tensor([ids]), input_pos=torch.arange(len(ids)))
        rewound, _ = engine(torch.tensor([[ids[0]]]), input_pos=torch.tensor([10]))
        fresh, _ = engine(torch.tensor([ids[:10] + [ids[0]]]), input_pos=torch.arange(11))
        assert torch.allclose(rewound, fresh, atol=1e-5)
        with pytest.raises(ValueError, match="step at position 20, but the context holds 11 tokens"):
            engine(torch.tensor([[ids[0]]]), input_pos=torch.tensor([20]))
