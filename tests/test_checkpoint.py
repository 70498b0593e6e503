import json

import pytest
import torch

from nanogptq.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_output,
    is_quantized,
    load_checkpoint,
    load_resume_state,
    save_checkpoint,
)
from nanogptq.cli import main
from nanogptq.data import CharTokenizer
from nanogptq.model import GPT, GPTConfig
from nanogptq.quant import QuantConfig, QuantEmbedding, QuantLinear, quant_meta, quantize
from nanogptq.runtime.generate import generate_stream
from nanogptq.runtime.load import prepare_for_inference, resolve_dtype


def make(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=10, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg)
    meta = {"model": cfg.to_dict(), "tokenizer": CharTokenizer.from_text("abcdefghij").to_dict(),
            "metrics": {"val_loss": 1.0}}
    path = save_checkpoint(tmp_path / "ck", model, meta, resume_state={"step": 3, "t": torch.ones(2)})
    return model, path


def test_round_trip(tmp_path):
    model, path = make(tmp_path)
    assert (path / "model.safetensors").stat().st_mode & 0o777 == (path / "config.json").stat().st_mode & 0o777
    ck = load_checkpoint(path)
    x = torch.randint(0, 10, (2, 8))
    torch.testing.assert_close(ck.model(x)[0], model.eval()(x)[0])
    assert ck.model.lm_head.weight is ck.model.transformer.wte.weight  # still tied after loading
    assert ck.tokenizer.decode(ck.tokenizer.encode("cab")) == "cab"
    assert load_resume_state(path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp folders left behind


def test_overwrite_is_atomic_swap(tmp_path):
    _, path = make(tmp_path)
    _, path = make(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_recovers_previous_after_kill_between_renames(tmp_path):
    _, path = make(tmp_path)
    path.rename(path.with_name("ck.old"))  # as if killed after the first rename of a swap
    assert load_checkpoint(path).meta["metrics"]["val_loss"] == 1.0


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nope")


def test_truncated_weights(tmp_path):
    _, path = make(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable or truncated"):
        load_checkpoint(path)


def test_wrong_version(tmp_path):
    _, path = make(tmp_path)
    meta = json.loads((path / "config.json").read_text())
    meta["format_version"] = 99
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


def test_truncated_config(tmp_path):
    _, path = make(tmp_path)
    text = (path / "config.json").read_text()
    (path / "config.json").write_text(text[:40])
    with pytest.raises(CheckpointError, match="config.json: corrupt or truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize("edit,message", [
    (lambda meta: [meta], "a JSON object is expected"),
    (lambda meta: {**meta, "model": None}, "'model' entry is missing or not a JSON object"),
    (lambda meta: {**meta, "model": {**meta["model"], "n_layer": "1"}}, "invalid model or tokenizer entry"),
    (lambda meta: {**meta, "tokenizer": {"kind": "char"}}, "invalid model or tokenizer entry"),
    (lambda meta: {**meta, "model": {**meta["model"], "n_embd": 32}}, "tensor shapes do not match config.json"),
])
def test_hand_edited_config_is_a_checkpoint_error(tmp_path, edit, message):
    _, path = make(tmp_path)
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(edit(meta)))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_a_checkpoint_never_replaces_what_is_not_one(tmp_path):
    model, path = make(tmp_path)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    for target in (notes, notes / "todo.txt"):
        with pytest.raises(CheckpointError, match="is not a nanogptq checkpoint; refusing to replace it"):
            save_checkpoint(target, model, {})
    assert (notes / "todo.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="would replace its own source"):
        check_output(path, source=path)
    check_output(path)  # a checkpoint is replaced (atomically)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty")
    # a quantized or exported checkpoint (it names its parent) replaces one made the same way, never one
    # that training wrote (a run's best/ or last/, which --resume and every later variant need)
    meta = json.loads((path / "config.json").read_text())
    derived = save_checkpoint(tmp_path / "derived", model, {**meta, "parent": str(path)})
    check_output(derived, source=path)
    trained = save_checkpoint(tmp_path / "trained", model, meta)
    for target in (path, trained):
        with pytest.raises(CheckpointError, match="holds a trained checkpoint, not one made by quantize, pack or"):
            check_output(target, source=derived)


def test_a_weights_file_is_not_a_checkpoint_folder(tmp_path):
    _, path = make(tmp_path)
    with pytest.raises(CheckpointError, match=r"model.safetensors: a file; name the checkpoint folder that holds it"):
        load_checkpoint(path / "model.safetensors")


def test_resume_state_is_not_unpickled(tmp_path):
    _, path = make(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path / "resume.pt")
    with pytest.raises(CheckpointError, match="resume.pt: unreadable"):
        load_resume_state(path)


# ---- activation dtypes: prepare_for_inference(dtype=...), resolve_dtype, `sample --dtype` ----

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CORPUS = "\n".join(f"the cat {i % 7} sat on the mat {i % 5}." for i in range(200)) + "\n"


@pytest.mark.parametrize("name,device,quantized,expected", [
    ("auto", "cpu", True, F32),  # the CPU kernels take fp32 and convert where bf16 is their fast path
    ("auto", "cpu", False, F32),
    ("auto", "cuda", True, F16),  # the Triton GEMV's fast path
    ("auto", "cuda:1", False, BF16),  # float weights: bf16's range
    ("auto", torch.device("cuda", 0), True, F16),
    ("fp32", "cuda", True, F32),
    ("bf16", "cpu", True, BF16),
    ("fp16", "cpu", False, F16),  # explicit fp16 on the CPU: every CPU path runs in it (torch 2.13)
    ("fp16", "cuda", False, F16),
])
def test_resolve_dtype(name, device, quantized, expected):
    assert resolve_dtype(name, device, quantized) is expected


@pytest.mark.parametrize("name", ["fp8", "float16", "", "AUTO"])
def test_resolve_dtype_rejects_unknown_names(name):
    with pytest.raises(ValueError, match=rf"unknown dtype '{name}'; choose from auto, fp32, bf16, fp16$"):
        resolve_dtype(name, "cpu", False)


def test_is_quantized():
    assert is_quantized({"quantization": {"method": "rtn", "bits": 4}, "qat": None})
    assert is_quantized({"quantization": {"method": "ternary"}, "qat": None})  # an exported QAT model
    assert not is_quantized({"quantization": None, "qat": {"act_bits": 8}})  # QAT before export: float weights
    assert not is_quantized({"quantization": None, "qat": None})
    assert not is_quantized({})


@pytest.fixture(scope="module")
def int4_ckpt(tmp_path_factory):
    """A small char model trained for a second, then RTN int4 (g32, with biases) and its tied embedding
    at 8 bits: the int4pack, int8pack and QuantEmbedding paths on the CPU."""
    tok = CharTokenizer.from_text(CORPUS)
    data = torch.tensor(tok.encode(CORPUS))
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=64, bias=True)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        win = data[torch.randint(len(data) - 33, (16,), generator=g)[:, None] + torch.arange(33)]
        _, loss = model(win[:, :-1], win[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 2.0  # it learned something: the logits compared below are not noise
    qcfg = QuantConfig(method="rtn", bits=4, group_size=32, quantize_embeddings=True)
    q = quantize(model.eval(), qcfg, progress=False)
    meta = {"model": cfg.to_dict(), "tokenizer": tok.to_dict(), "quantization": quant_meta(q, qcfg)}
    return save_checkpoint(tmp_path_factory.mktemp("int4") / "int4", q, meta)


def load_to_run(path, **prepare) -> Checkpoint:
    """A checkpoint loaded, then prepared to run (prepare_for_inference's kernel, dtype, keep_packed)."""
    ckpt = load_checkpoint(path)
    prepare_for_inference(ckpt.model, **prepare)
    return ckpt


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def test_quantized_checkpoint_on_bf16_activations(int4_ckpt):
    ref, half = load_to_run(int4_ckpt), load_to_run(int4_ckpt, dtype=BF16)
    m = half.model
    # the float parameters follow the dtype: LayerNorms (with biases) and the position embedding
    norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert len(norms) == 5 and all(n.weight.dtype == n.bias.dtype == BF16 for n in norms)
    assert m.transformer.wpe.weight.dtype == BF16
    assert {p.dtype for p in m.parameters()} == {BF16}
    # the quantized layers keep every buffer as stored: uint8 codes, fp16 scales, fp32 bias, kernel layouts
    assert isinstance(m.transformer.wte, QuantEmbedding)
    layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
    assert len(layers) == 2 * 4 + 1 and m.lm_head is m.transformer.wte.head  # the block linears, the 8-bit head
    ref_modules = dict(ref.model.named_modules())
    for name, layer in layers.items():
        stored = {b: t.dtype for b, t in ref_modules[name].named_buffers()}
        assert {b: t.dtype for b, t in layer.named_buffers()} == stored, name
        assert layer.qweight.dtype == torch.uint8 and layer.scales.dtype == F16
    c_attn = layers["transformer.h.0.attn.c_attn"]
    assert c_attn.backend == "int4pack" and c_attn.bias.dtype == F32 and m.lm_head.backend == "int8pack"

    # last-position logits: bf16 activations (8-bit mantissa) stay within 2e-2 of fp32's, relative L2
    idx = torch.tensor([half.tokenizer.encode("the mat 1.\nthe cat 3 sat on")])
    with torch.no_grad():
        a, b = ref.model(idx)[0][:, -1], m(idx)[0][:, -1]
    assert b.dtype == BF16 and a.dtype == F32
    assert rel_err(b, a) < 2e-2

    # generation end to end, past the context (the KV cache is refilled from the last half-window)
    stream = generate_stream(m, idx, 2 * m.config.block_size, temperature=0.8, top_k=10, seed=0)
    tokens = [next(stream)]
    assert m.transformer.h[0].attn.kv_cache.kv.dtype == BF16  # setup_kv_cache took wpe's dtype
    tokens += list(stream)
    assert len(tokens) == 64 and all(0 <= int(t) < m.config.vocab_size for t in tokens)
    assert m.transformer.h[0].attn.kv_cache is None


def test_float_checkpoint_on_fp16_activations(tmp_path):
    model, path = make(tmp_path)
    ck = load_to_run(path, dtype=F16)
    assert {p.dtype for p in ck.model.parameters()} == {F16}  # float linears too
    assert ck.model.lm_head.weight is ck.model.transformer.wte.weight  # still tied after the cast
    x = torch.randint(0, 10, (2, 8))
    with torch.no_grad():
        assert rel_err(ck.model(x)[0], model.eval()(x)[0]) < 2e-3  # fp16: an 11-bit mantissa


def test_sample_cli_dtype(int4_ckpt, capsys, monkeypatch):
    monkeypatch.delenv("NANOGPTQ_DEBUG", raising=False)
    args = ["sample", str(int4_ckpt), "--device", "cpu", "--prompt", "the cat", "--max-new-tokens", "24"]
    for dtype, name in (("bf16", "bfloat16"), ("auto", "float32")):
        main([*args, "--dtype", dtype])
        out, err = capsys.readouterr()
        assert out.startswith("the cat") and len(out) == len("the cat") + 24 + 1  # char tokens, a newline
        # an asymmetric 4-bit grid (Q4_1 rounds its offsets): nanogptq's own kernels, not llama.cpp
        assert "--- 24 tokens by nanogptq (" in err and f"{name} activations)" in err

    main([*args[:4], "--prompt", "the Ωcat€", "--max-new-tokens", "4"])  # printed as the model saw it
    out, err = capsys.readouterr()
    assert out.startswith("the cat") and len(out) == len("the cat") + 4 + 1
    assert "note: dropped characters the model never saw: 'Ω' '€'" in err

    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--dtype", "fp8"])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["nanogptq sample: error: unknown dtype 'fp8'; choose from auto, fp32, bf16, fp16"]


@pytest.mark.parametrize("kernel", ["dequant", "auto"])  # auto: the int8 weight-only kernel
def test_exported_ternary_checkpoint_on_bf16_activations(tmp_path, kernel):
    from nanogptq.pipeline import pack_checkpoint
    from nanogptq.quant.qat import QATConfig, TernaryLinear, apply_qat

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=12, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)
    model = apply_qat(GPT(cfg), QATConfig(act_bits=8))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)  # nonzero biases: a dtype mismatch would not hide behind zeros
    meta = {"model": cfg.to_dict(), "tokenizer": CharTokenizer.from_text("abcdefghijkl").to_dict(),
            "qat": model.qat_config, "quantization": None, "metrics": {}}
    save_checkpoint(tmp_path / "qat", model, meta)
    out = pack_checkpoint(tmp_path / "qat", tmp_path / "ternary")
    ref, half = load_to_run(out, kernel=kernel), load_to_run(out, kernel=kernel, dtype=BF16)
    layers = [m for m in half.model.modules() if isinstance(m, TernaryLinear)]
    assert len(layers) == 8 and all(t.bias.dtype == BF16 and t.scale.dtype == F32 for t in layers)
    assert all(t.qweight.dtype == torch.uint8 for t in layers)
    x = torch.randint(0, 12, (1, 16))
    with torch.no_grad():
        a, b = ref.model(x)[0][:, -1], half.model(x)[0][:, -1]
    assert b.dtype == BF16
    assert rel_err(b, a) < 3e-2  # a little looser: in bf16 the 8-bit activation grid rounds a few values apart


def test_load_for_generation_resolves_auto_per_checkpoint(int4_ckpt, tmp_path, monkeypatch):
    """What sample and the demo load: "auto" asks resolve_dtype with each checkpoint's own kind (on CUDA
    fp16 for the quantized one, bf16 for the float one), and the codes a kernel layout replaced are freed."""
    import nanogptq.sample as G

    asked = []
    real = G.resolve_dtype
    monkeypatch.setattr(G, "resolve_dtype", lambda *a: asked.append(a) or real(*a))
    _, float_path = make(tmp_path)
    quantized = G.load_for_generation(int4_ckpt, "cpu")
    G.load_for_generation(float_path, "cpu", dtype="bf16")
    G.load_for_generation(float_path, "cpu")
    assert asked == [("auto", "cpu", True), ("bf16", "cpu", False), ("auto", "cpu", False)]
    assert quantized.model.transformer.h[0].attn.c_attn.packed_freed
