"""Hugging Face transformers' GPT-2, in and out.

    import_hf("gpt2", "ckpts/gpt2")               # Hub id or local folder -> an ordinary nanogptq checkpoint
    export_hf("ckpts/gpt2-gptq4", "hf/gpt2-gptq4")  # checkpoint -> a GPT2LMHeadModel folder (dequantized)

GPT-2 is nanoGPT's shape with biases, the tanh GELU and its own LayerNorm epsilon, all GPTConfig fields.
Its Conv1D layers store weights (in, out), nn.Linear's transposed; c_attn's q, k, v sit in the same order.
Weights are read from safetensors only and tokenizers from tokenizer.json: nothing is unpickled.
huggingface_hub (a Hub id) is imported only when a Hub id is given; transformers is never needed here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from nanogptq.checkpoint import CONFIG, check_output, load_checkpoint, save_checkpoint, swap_in
from nanogptq.data import EOT, BPETokenizer, ByteTokenizer, CharTokenizer, PretrainedTokenizer, Tokenizer
from nanogptq.model import GPT, GPTConfig
from nanogptq.quant.linear import QuantEmbedding, QuantLinear
from nanogptq.quant.qat import TernaryLinear

HF_FILES = ("config.json", "model.safetensors", "tokenizer.json")
GPT2_ARCHITECTURE = "GPT2LMHeadModel"
# transformers' activation_function names -> GPTConfig.activation; "gelu" is the exact (erf) one
ACTIVATIONS_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "gelu": "gelu"}
ACTIVATIONS_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu"}  # what GPT-2 configs write for each
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # (in, out) weights in GPT-2's files


# ----------------------------------------------------------------------------- import


def _source_folder(source: str) -> tuple[Path, str]:
    """The local folder holding the model's files, and how to name the source: a folder as given, or a Hub
    id fetched (those three files only) through huggingface_hub."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{source}: a file; name the folder with config.json, model.safetensors, tokenizer.json")
        return path, str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ValueError(f"{source}: no such folder (nor a Hub id such as gpt2 or openai-community/gpt2)")
    try:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise ValueError(f"{source}: not a local folder, and a Hub id needs huggingface_hub "
                         "(pip install 'nanogptq[hf]')") from None
    try:
        folder = huggingface_hub.snapshot_download(repo_id=source, allow_patterns=list(HF_FILES))
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{source}: not a local folder, and not fetched from the Hub ({first})") from None
    return Path(folder), f"hf:{source}"


def _gpt2_config(folder: Path) -> GPTConfig:
    """The GPTConfig of a transformers GPT-2 config.json; anything GPT-2-shaped but beyond nanogptq is an error."""
    file = folder / "config.json"
    if not file.is_file():
        raise ValueError(f"{folder}: no config.json (not a transformers model folder)")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if model_type != "gpt2" or any(a not in (GPT2_ARCHITECTURE, "GPT2Model") for a in archs):
        found = ", ".join(archs) or "no architectures entry"
        raise ValueError(f"{file}: the model is {found} (model_type {model_type!r}), not GPT-2; "
                         "import-hf reads GPT2LMHeadModel models only")
    activation = cfg.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS_IN:
        raise ValueError(f"{file}: activation_function {activation!r}; nanogptq runs {', '.join(ACTIVATIONS_IN)}")
    n_embd = cfg.get("n_embd", 768)
    unsupported = {"n_inner": (None, 4 * n_embd), "scale_attn_weights": (True,), "add_cross_attention": (False,),
                   "scale_attn_by_inverse_layer_idx": (False,), "tie_word_embeddings": (True,)}
    for key, allowed in unsupported.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"{file}: {key} = {cfg[key]!r}, which nanogptq's GPT does not have")
    return GPTConfig(vocab_size=cfg.get("vocab_size", 50257), block_size=cfg.get("n_positions", 1024),
                     n_layer=cfg.get("n_layer", 12), n_head=cfg.get("n_head", 12), n_embd=n_embd, dropout=0.0,
                     bias=True, activation=ACTIVATIONS_IN[activation], ln_eps=cfg.get("layer_norm_epsilon", 1e-5))


def _gpt2_state(folder: Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT-2's weights from model.safetensors under nanogptq's names, fp32, Conv1D weights transposed."""
    file = folder / "model.safetensors"
    if not file.is_file():
        if any(folder.glob("pytorch_model*.bin")):
            raise ValueError(f"{folder}: only pytorch_model.bin, a pickle, which nanogptq never loads; "
                             "import a folder or Hub repository with model.safetensors")
        raise ValueError(f"{folder}: no model.safetensors")
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = key.removeprefix("transformer.")
                if name.endswith((".attn.bias", ".attn.masked_bias")):
                    continue  # the causal mask, a buffer older files store
                state[name] = f.get_tensor(key).float()
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: unreadable or truncated ({str(e).splitlines()[0]})") from None
    head = state.pop("lm_head.weight", None)
    if head is not None and "wte.weight" in state and not torch.equal(head, state["wte.weight"]):
        raise ValueError(f"{file}: lm_head.weight differs from wte.weight; nanogptq's GPT ties them")
    out = {}
    for name, tensor in state.items():
        if any(f".{layer}.weight" in f".{name}" for layer in CONV1D):
            tensor = tensor.t().contiguous()
        out["transformer." + name] = tensor
    with torch.device("meta"):  # the names only: no memory, no initialization
        expected = {k for k in GPT(config).state_dict() if k != "lm_head.weight"}
    if set(out) != expected:
        missing, unexpected = sorted(expected - set(out)), sorted(set(out) - expected)
        raise ValueError(f"{file}: tensors do not match config.json (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    return out


def _pretrained_tokenizer(folder: Path, config: GPTConfig) -> PretrainedTokenizer:
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"{folder}: no tokenizer.json (the tokenizers-library file nanogptq reads)")
    tok = PretrainedTokenizer.from_file(file)
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"{file}: {tok.vocab_size:,} tokens, more than the model's {config.vocab_size:,} "
                         "(a tokenizer of another model?)")
    return tok


def import_hf(source: str, out: str | Path) -> Path:
    """A transformers GPT-2 (Hub id or local folder) as a nanogptq checkpoint folder at `out`."""
    check_output(out)  # before any download
    folder, name = _source_folder(source)
    check_output(out, folder)
    config = _gpt2_config(folder)
    state = _gpt2_state(folder, config)
    tokenizer = _pretrained_tokenizer(folder, config)
    with torch.device("meta"):  # GPT-2-XL's 1.5 B parameters are not initialized only to be overwritten
        model = GPT(config)
    model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]}, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # tied, as GPT() ties them
    meta = {"model": config.to_dict(), "tokenizer": tokenizer.to_dict(), "metrics": {}, "parent": name,
            "imported": {"source": name, "format": f"transformers {GPT2_ARCHITECTURE}"}}
    return save_checkpoint(out, model, meta, files=tokenizer.files())


# ----------------------------------------------------------------------------- export


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the tokenizers library's ByteLevel uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def hf_tokenizer(tok: Tokenizer) -> HFTokenizer:
    """A tokenizers-library Tokenizer giving the same ids as `tok`. char: a BPE without merges over the
    characters, whole text as one word (no pre-tokenizer), so each character is its own token; byte: the same
    over ByteLevel's 256 byte characters, so each UTF-8 byte is its own token, id = byte value."""
    if isinstance(tok, BPETokenizer):  # bpe, and pretrained ones
        return HFTokenizer.from_str(tok.to_dict()["json"] if not isinstance(tok, PretrainedTokenizer)
                                    else tok.json_text)
    if isinstance(tok, CharTokenizer):
        out = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))
        out.decoder = decoders.Fuse()
        return out
    if isinstance(tok, ByteTokenizer):
        out = HFTokenizer(models.BPE(vocab={c: b for b, c in _bytes_to_unicode().items()}, merges=[]))
        out.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        out.decoder = decoders.ByteLevel()
        return out
    raise ValueError(f"no transformers tokenizer for nanogptq's {tok.kind!r} tokenizer")


def _float_layer(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear's effective fp32 weight (out, in) and bias: quantized layers dequantized exactly."""
    if isinstance(module, QuantLinear):
        return module.dequantize(), module.bias
    if isinstance(module, TernaryLinear):
        if module.norm != "none" or module.act_bits is not None:
            raise ValueError("a ternary layer normalizes or quantizes its input, which GPT-2 cannot express; "
                             "export-hf takes QAT runs trained without input norm and activation quantization")
        return module.trits().float() * module.scale[:, None], module.bias
    if type(module) is nn.Linear:
        return module.weight, module.bias
    raise ValueError(f"a {type(module).__name__} layer (QAT training?), which GPT-2 cannot express; "
                     "export-hf takes float, quantized (RTN, GPTQ) or packed ternary checkpoints")


def gpt2_state(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights as GPT-2's model.safetensors names and lays them out (fp32, Conv1D (in, out)),
    quantized layers dequantized; missing biases written as zeros (a bias of zeros adds nothing)."""
    for block in model.transformer.h:
        if not (isinstance(block.attn.q_quant, nn.Identity) and isinstance(block.attn.k_quant, nn.Identity)):
            raise ValueError("the attention quantizes its queries or keys (QAT), which GPT-2 cannot express")
    t = model.transformer
    wte = t.wte.head.dequantize() if isinstance(t.wte, QuantEmbedding) else t.wte.weight
    head, _ = _float_layer(model.lm_head)
    if not torch.equal(head, wte):
        raise ValueError("the output head differs from the embedding table; GPT-2 ties them")
    state = {"transformer.wte.weight": wte, "transformer.wpe.weight": t.wpe.weight}

    def norm(name: str, ln: nn.LayerNorm) -> None:
        state[f"transformer.{name}.weight"] = ln.weight
        state[f"transformer.{name}.bias"] = ln.bias if ln.bias is not None else torch.zeros_like(ln.weight)

    for i, block in enumerate(t.h):
        norm(f"h.{i}.ln_1", block.ln_1)
        norm(f"h.{i}.ln_2", block.ln_2)
        for layer in CONV1D:
            weight, bias = _float_layer(block.get_submodule(layer))
            state[f"transformer.h.{i}.{layer}.weight"] = weight.t()
            state[f"transformer.h.{i}.{layer}.bias"] = bias if bias is not None else weight.new_zeros(weight.size(0))
    norm("ln_f", t.ln_f)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def gpt2_config(config: GPTConfig, eot_id: int | None) -> dict:
    return {
        "architectures": [GPT2_ARCHITECTURE], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": ACTIVATIONS_OUT[config.activation], "layer_norm_epsilon": config.ln_eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0,
        "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32",
    }


def _check_hf_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that holds anything but an earlier export (with --overwrite), never a checkpoint."""
    if out.is_file():
        raise ValueError(f"{out}: a file; --out names a folder for the transformers model")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        config = json.loads((out / CONFIG).read_text())
        earlier = config.get("model_type") == "gpt2" and "format_version" not in config  # not a checkpoint
    except (OSError, ValueError, AttributeError):
        earlier = False
    if not earlier:
        raise ValueError(f"{out}: exists and is not a transformers GPT-2 folder; refusing to replace it")
    if not overwrite:
        raise ValueError(f"{out}: holds a transformers model already; pass --overwrite to replace it")


def export_hf(src: str | Path, out: str | Path, overwrite: bool = False) -> tuple[Path, list[str]]:
    """Write checkpoint `src` as a transformers GPT2LMHeadModel folder at `out` (config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json); returns the folder and notes on what changed on the way."""
    out = Path(out)
    _check_hf_out(out, overwrite)
    ckpt = load_checkpoint(src)
    notes = []
    if ckpt.meta.get("quantization"):
        q = ckpt.meta["quantization"]
        notes.append(f"the {q.get('method')} {q.get('bits')}-bit weights are written dequantized, in fp32 "
                     "(transformers' GPT-2 holds float weights): the same logits, not the smaller file")
    if ckpt.model.config.activation == "gelu":
        notes.append("exact (erf) GELU: written as activation_function 'gelu', which transformers runs exactly")
    if not ckpt.model.config.bias:
        notes.append("a model without biases: GPT-2's biases are written as zeros")
    if isinstance(ckpt.tokenizer, (CharTokenizer, ByteTokenizer)):
        notes.append(f"the {ckpt.tokenizer.kind} tokenizer is written as a tokenizers-library tokenizer.json "
                     "(a BPE without merges) that gives the same ids")
    state = gpt2_state(ckpt.model)
    tokenizer = hf_tokenizer(ckpt.tokenizer)
    eot_id = tokenizer.token_to_id(EOT)
    special = {} if eot_id is None else {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / CONFIG).write_text(json.dumps(gpt2_config(ckpt.model.config, eot_id), indent=2))
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": ckpt.model.config.block_size,
         "clean_up_tokenization_spaces": False, **special}, indent=2))
    return swap_in(tmp, out), notes
