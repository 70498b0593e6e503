"""export-gguf, checked against the other runtimes' own readers: gguf's dequantizers (the blocks hold nanogptq's
grid), transformers' GGUF loader, and llama.cpp itself through llama-cpp-python (installed with the test
extras: it builds llama.cpp at install time, never in a test).

The models are made here: GPTs with the tanh GELU (llama.cpp's), trained a few steps on a small corpus with a
300-token byte-level BPE, then quantized to each grid GGUF holds, and a ternary QAT model packed for export.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_training import train_briefly

from nanogptq.checkpoint import load_checkpoint, save_checkpoint
from nanogptq.cli import main
from nanogptq.data import BPETokenizer, ByteTokenizer, CharTokenizer
from nanogptq.interop.gguf import GGUFExportError, export_gguf
from nanogptq.model import GPT, GPTConfig
from nanogptq.pipeline import pack_checkpoint
from nanogptq.quant.config import QuantConfig
from nanogptq.quant.linear import QuantLinear
from nanogptq.quant.qat import QATConfig, TernaryLinear, apply_qat
from nanogptq.quant.quantize import quant_meta, quantize

CORPUS = "\n".join(f"the cat {i % 7} sat on the mat {i % 5}. a dog ran to the {['park', 'sea', 'hill'][i % 3]}."
                   for i in range(400))
GRIDS = {  # GGUF type -> the quantize settings whose grid it holds
    "Q8_0": QuantConfig(method="rtn", bits=8, group_size=32, symmetric=True),
    "Q4_0": QuantConfig(method="rtn", bits=4, group_size=32, symmetric=True),
    "Q4_1": QuantConfig(method="rtn", bits=4, group_size=32, symmetric=False),
}
# llama.cpp's CPU matmuls round the activations: to 8-bit blocks (Q8_0) against quantized weights, to fp16
# against F16 ones. Largest logit differences measured on these models (|logits| up to 11): F16 0.0037,
# Q8_0 0.052, Q4_0 0.044, Q4_1 0.037, TQ2_0 0.011, ternary in Q4_0 0.0055; the tolerances leave about 2x
LLAMA_ATOL = {"F16": 0.01, "Q8_0": 0.1, "Q4_0": 0.1, "Q4_1": 0.1, "TQ2_0": 0.03, "ternary": 0.03}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints by name: float (with and without biases), one per grid, ternary 256 wide and 64 wide."""
    root = tmp_path_factory.mktemp("gguf")
    tok = BPETokenizer.train(CORPUS, 300)
    tokens = torch.tensor(tok.encode(CORPUS))
    paths = {}
    for bias in (False, True):
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64, bias=bias,
                        activation="gelu_tanh")
        meta = {"model": cfg.to_dict(), "tokenizer": tok.to_dict(), "quantization": None}
        name = "float-bias" if bias else "float"
        paths[name] = save_checkpoint(root / name, train_briefly(GPT(cfg), tokens, 40), meta)
    for qtype, qcfg in GRIDS.items():
        ckpt = load_checkpoint(paths["float-bias" if qtype == "Q4_1" else "float"])
        q = quantize(ckpt.model, qcfg, progress=False)
        paths[qtype] = save_checkpoint(root / qtype, q, {**ckpt.meta, "quantization": quant_meta(q, qcfg),
                                                         "parent": str(ckpt.path)})
    for width in (256, 64):  # TQ2_0 needs rows of 256; the narrow one goes in as Q4_0
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=width,
                        activation="gelu_tanh")
        model = train_briefly(apply_qat(GPT(cfg), QATConfig(norm="none")), tokens, 10)
        meta = {"model": cfg.to_dict(), "tokenizer": tok.to_dict(), "qat": model.qat_config, "quantization": None}
        qat = save_checkpoint(root / f"qat{width}", model, meta)
        paths[f"ternary{width}"] = pack_checkpoint(qat, root / f"ternary{width}")
    return paths


@pytest.fixture(scope="module")
def ids(models) -> list[int]:
    """A fixed sequence of 64 tokens from the corpus."""
    tok = load_checkpoint(models["float"]).tokenizer
    return tok.encode(CORPUS[1000:2000])[:64]


def _logits(path: Path, ids: list[int], fp16_floats: bool = False) -> torch.Tensor:
    """nanogptq's logits (T, V) on the stored model's exact path; fp16_floats rounds its float weights to fp16
    first (what an F16 file holds)."""
    model = load_checkpoint(path).model
    if fp16_floats:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and name != "transformer.wpe.weight":  # the position table goes in as F32
                    p.copy_(p.half().float())
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


def _tensor(path: Path, name: str):
    return next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_blocks_hold_the_grid(models, tmp_path, qtype):
    """Every block linear is written in its grid's type and dequantizes (by gguf's reference code) to
    nanogptq's weights: exactly for Q8_0 and Q4_0; for Q4_1 exactly s * q + m with m = -z * s as an fp16
    number, within half an fp16 step of z * s of nanogptq's (q - z) * s."""
    out = tmp_path / "m.gguf"
    export_gguf(models[qtype], out)
    model = load_checkpoint(models[qtype]).model
    for i, block in enumerate(model.transformer.h):
        for gguf_name, layer in (("attn_qkv", block.attn.c_attn), ("ffn_down", block.mlp.c_proj)):
            t = _tensor(out, f"blk.{i}.{gguf_name}.weight")
            assert t.tensor_type.name == qtype
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            ref = layer.dequantize()
            if qtype != "Q4_1":
                assert torch.equal(w, ref)
                continue
            s = layer.scales.float().repeat_interleave(32, dim=1)
            z = layer.zero_points().repeat_interleave(32, dim=1)
            m16 = (-z * s).half().float()
            assert torch.equal(w, s * layer.codes().float() + m16)
            half_step = (z * s).half().float().abs() * 2.0**-11
            assert ((w - ref).abs() <= half_step).all()
            assert (w - ref).abs().max() > 0  # the rounding is real on these grids, and said so


@pytest.mark.parametrize("width,qtype,requantize", [(256, "TQ2_0", None), (64, "Q4_0", None),
                                                    (256, "TQ1_0", "TQ1_0")])
def test_ternary_blocks_hold_trits_and_scale(models, tmp_path, width, qtype, requantize):
    """Trits exactly; the fp32 scale as GGUF's fp16 block scale (its only rounding). gguf's own TQ1_0 rounding
    of the ternary weights finds the same trits and scale."""
    out = tmp_path / "t.gguf"
    export_gguf(models[f"ternary{width}"], out, requantize=requantize)
    layer = load_checkpoint(models[f"ternary{width}"]).model.transformer.h[1].mlp.c_fc
    assert isinstance(layer, TernaryLinear)
    t = _tensor(out, "blk.1.ffn_up.weight")
    assert t.tensor_type.name == qtype
    w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    assert torch.equal(w, layer.trits().float() * layer.scale.half().float()[:, None])


def test_quantized_embedding_goes_in_as_q8_0(models, tmp_path):
    """The tied table at 8 bits per row (--quantize-embeddings) is a Q8_0 token_embd, read back exactly."""
    ckpt = load_checkpoint(models["float"])
    qcfg = QuantConfig(method="rtn", bits=4, group_size=-1, symmetric=True, quantize_embeddings=True)
    q = quantize(ckpt.model, qcfg, progress=False)
    path = save_checkpoint(tmp_path / "emb", q, {**ckpt.meta, "quantization": quant_meta(q, qcfg), "parent": "x"})
    export_gguf(path, tmp_path / "emb.gguf")
    t = _tensor(tmp_path / "emb.gguf", "token_embd.weight")
    assert t.tensor_type.name == "Q8_0"
    head = load_checkpoint(path).model.lm_head
    assert isinstance(head, QuantLinear)
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()), head.dequantize())
    assert _tensor(tmp_path / "emb.gguf", "blk.0.attn_qkv.weight").tensor_type.name == "Q4_0"  # per row


@pytest.mark.parametrize("name", ["F16", "Q8_0", "Q4_0", "Q4_1"])
def test_transformers_gguf_loader_gives_our_logits(models, ids, tmp_path, name):
    """transformers' GGUF loader reads the file into its GPT2LMHeadModel: nanogptq's logits within 1e-3.
    (It sizes the position table from its default n_positions, not the file's context_length: passed here.)"""
    from transformers import AutoModelForCausalLM

    src = models["float-bias" if name == "F16" else name]
    out = tmp_path / f"{name}.gguf"
    export_gguf(src, out, float_type="F16" if name == "F16" else "F32")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, n_positions=64).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].float()
    ours = _logits(src, ids, fp16_floats=name == "F16")
    assert (theirs - ours).abs().max().item() <= 1e-3


@pytest.fixture(scope="module")
def llama_files(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    files = {}
    for name, src in (("F16", "float"), ("F16-bias", "float-bias"), ("Q8_0", "Q8_0"), ("Q4_0", "Q4_0"),
                      ("Q4_1", "Q4_1"), ("TQ2_0", "ternary256"), ("ternary-Q4_0", "ternary64")):
        files[name] = Path(export_gguf(models[src], root / f"{name}.gguf")["path"])
    return files


@pytest.mark.parametrize("name,src", [("F16", "float"), ("F16-bias", "float-bias"), ("Q8_0", "Q8_0"),
                                      ("Q4_0", "Q4_0"), ("Q4_1", "Q4_1"), ("TQ2_0", "ternary256"),
                                      ("ternary-Q4_0", "ternary64")])
def test_llama_cpp_runs_the_file(models, llama_files, ids, name, src):
    """llama.cpp evaluates the exported file on a fixed sequence: logits within LLAMA_ATOL of nanogptq's
    (on the checkpoint's exact path), the same top-1 token at >= 99% of positions."""
    import llama_cpp

    llm = llama_cpp.Llama(str(llama_files[name]), logits_all=True, n_ctx=64, n_batch=64, n_threads=2,
                          verbose=False)
    try:
        llm.eval(ids)
        theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()
    ours = _logits(models[src], ids)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= LLAMA_ATOL[name.split("-")[0]]
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item() >= 0.99


def test_llama_cpp_tokenizes_like_nanogptq(models, llama_files):
    """The BPE goes in as llama.cpp's gpt2 tokenizer with its merges: the same ids, and back to the text."""
    tok = load_checkpoint(models["float"]).tokenizer
    text = CORPUS[:500] + " unseen wörds, \tand 42 spaces  here"
    assert_llama_cpp_round_trips(llama_files["Q8_0"], tok, text)


def assert_llama_cpp_round_trips(path, tok, text: str) -> None:
    """llama.cpp's tokenizer, read from the GGUF file, gives nanogptq's ids for `text` and decodes them back."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        got = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert got == tok.encode(text)
        assert llm.detokenize(got).decode() == text
    finally:
        llm.close()


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_llama_cpp_tokenizes_char_and_byte_vocabularies(tmp_path, kind):
    """llama.cpp has no char or byte tokenizer; its gpt2 BPE stands in for both (byte symbols, and merges that
    join a multi-byte character's): the same ids as nanogptq's, and back to the text."""
    text = "ROMEO: wörds ✓\n\tand  spaces 42!"
    tok = CharTokenizer.from_text(text + "xyz") if kind == "char" else ByteTokenizer()
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32,
                    activation="gelu_tanh")
    path = save_checkpoint(tmp_path / kind, GPT(cfg), {"model": cfg.to_dict(), "tokenizer": tok.to_dict(),
                                                       "quantization": None})
    export_gguf(path, tmp_path / "t.gguf")
    assert_llama_cpp_round_trips(tmp_path / "t.gguf", tok, text)


def test_requantize_lets_gguf_round_and_says_so(models, tmp_path, capsys):
    out = tmp_path / "r.gguf"
    main(["export-gguf", str(models["float"]), "--out", str(out), "--requantize", "Q4_0"])
    assert "requantized by gguf to Q4_0" in capsys.readouterr().err
    t = _tensor(out, "blk.0.ffn_up.weight")
    assert t.tensor_type.name == "Q4_0"
    w = load_checkpoint(models["float"]).model.transformer.h[0].mlp.c_fc.weight.detach().numpy()
    assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type),
                          gguf.quants.dequantize(gguf.quants.quantize(w, t.tensor_type), t.tensor_type))


def test_grid_no_type_holds_is_a_one_line_error(models, tmp_path, capsys):
    ckpt = load_checkpoint(models["float"])
    qcfg = QuantConfig(method="rtn", bits=8, group_size=32, symmetric=False)
    q = quantize(ckpt.model, qcfg, progress=False)
    path = save_checkpoint(tmp_path / "a8", q, {**ckpt.meta, "quantization": quant_meta(q, qcfg), "parent": "x"})
    out = tmp_path / "a8.gguf"
    with pytest.raises(SystemExit) as e:
        main(["export-gguf", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "8-bit asymmetric" in err and "--bits 4 --group-size 32 --symmetric" in err
    assert not out.exists() and not list(tmp_path.glob(".a8.gguf*"))
    main(["export-gguf", str(path), "--out", str(out), "--requantize", "Q8_0"])  # the way out it names
    assert _tensor(out, "blk.0.attn_qkv.weight").tensor_type.name == "Q8_0"


def test_existing_output_needs_overwrite(models, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit):
        main(["export-gguf", str(models["Q4_0"]), "--out", str(out)])
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    main(["export-gguf", str(models["Q4_0"]), "--out", str(out), "--overwrite"])
    assert gguf.GGUFReader(str(out)).tensors  # replaced whole, by a rename of the finished temp file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]


def test_refusals_name_the_problem(models, tmp_path):
    ckpt = load_checkpoint(models["float"])
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=ckpt.model.config.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=64)
    model = apply_qat(GPT(cfg), QATConfig())  # BitNet's RMSNorm before every ternary linear
    meta = {"model": cfg.to_dict(), "tokenizer": ckpt.meta["tokenizer"], "qat": model.qat_config,
            "quantization": None}
    packed = pack_checkpoint(save_checkpoint(tmp_path / "qat", model, meta), tmp_path / "packed")
    with pytest.raises(GGUFExportError, match="norm=rms"):
        export_gguf(packed, tmp_path / "p.gguf")
    with pytest.raises(GGUFExportError, match="pack it first"):
        export_gguf(tmp_path / "qat", tmp_path / "p.gguf")
    with pytest.raises(GGUFExportError, match="--type"):
        export_gguf(models["float"], tmp_path / "p.gguf", float_type="BF16")
    assert not list(tmp_path.glob("*.gguf"))


def test_exact_gelu_model_runs_close_and_is_noted(models, ids, tmp_path):
    """llama.cpp's gpt2 computes the tanh GELU: an exact-GELU model's logits move a little more (measured here:
    0.0038 largest difference, against 0.0037 for the same weights run as tanh; tolerance 0.02)."""
    import llama_cpp

    ckpt = load_checkpoint(models["float"])
    meta = {**ckpt.meta, "model": {**ckpt.meta["model"], "activation": "gelu"}}
    path = save_checkpoint(tmp_path / "erf", ckpt.model, meta)
    assert any("exact GELU" in n for n in export_gguf(path, tmp_path / "e.gguf")["notes"])
    llm = llama_cpp.Llama(str(tmp_path / "e.gguf"), logits_all=True, n_ctx=64, n_batch=64, verbose=False)
    try:
        llm.eval(ids)
        theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()
    ours = _logits(path, ids)
    assert (theirs - ours).abs().max().item() <= 0.02
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item() >= 0.99
