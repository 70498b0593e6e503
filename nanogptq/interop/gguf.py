"""Export a nanogptq checkpoint as a GGUF file for llama.cpp (architecture `gpt2`), through llama.cpp's own
writer, the `gguf` package.

    export_gguf("runs/tiny/gptq-int4", "model.gguf")                       # the grid as it is, no requantizing
    export_gguf("runs/tiny/best", "model-q4_0.gguf", requantize="Q4_0")   # gguf's own round-to-nearest

Float weights go in as F16 or F32. A quantized linear goes in as the GGUF block type whose arithmetic holds
its grid w = (q - z) * s (quant/grid.py, fp16 s) with the same codes and scales, never quantized again:

    symmetric 8 bits            Q8_0  d * q8            d = s, q8 = q - 128 (int8)              exact
    symmetric 2-4 bits          Q4_0  d * (n - 8)       d = s, n = q - z + 8 (a nibble)         exact
    asymmetric 2-4 bits         Q4_1  d * n + m         d = s, n = q, m = -z * s in fp16        exact where
                                                        z * s is an fp16 number, else m rounds to it
    ternary QAT (trits t, s)    TQ2_0 d * t per 256     d = s in fp16 (the checkpoint keeps s in fp32)
                                Q4_0 where rows are not a multiple of 256: d = s, n = t + 8

Each GGUF block is 32 (TQ: 256) consecutive weights of a row with one d, so a grid fits when its groups are
whole blocks: per tensor, per row, or groups of a multiple of 32, over rows that are a multiple of 32, without
act-order's scattered groups (g_idx) or a rotation. Anything else is a one-line error naming the `quantize`
flags that make an exportable grid; `requantize` instead lets gguf quantize the dequantized weights.

llama.cpp's gpt2 graph needs every bias (zeros are written for a model without them), computes the tanh GELU
(an exact-GELU model's logits differ slightly) and takes the tied embedding from `token_embd` when there is no
`output` tensor, as here. Tokenizers all go in as llama.cpp's `gpt2` byte-level BPE (_tokenizer_vocab): `bpe`
with its merges, `byte` as the 256 byte symbols, `char` as each character's byte symbols joined by merges.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn as nn

from nanogptq.checkpoint import load_checkpoint
from nanogptq.data import EOT
from nanogptq.quant.linear import QuantEmbedding, QuantLinear
from nanogptq.quant.qat import TernaryLinear

FLOAT_TYPES = {"F16": gguf.GGMLQuantizationType.F16, "F32": gguf.GGMLQuantizationType.F32}
REQUANTIZE_TYPES = {name: getattr(gguf.GGMLQuantizationType, name)
                    for name in ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "TQ2_0", "TQ1_0")}
QK = 32  # weights per legacy block (Q8_0, Q4_0, Q4_1)
QK_K = 256  # weights per TQ block
EXPORTABLE_FLAGS = ("--bits 4 --group-size 32 --symmetric (Q4_0), --bits 4 --group-size 32 --asym (Q4_1) or "
                    "--bits 8 --group-size 32 --symmetric (Q8_0)")


class GGUFExportError(ValueError):
    """A checkpoint this export cannot write as it is."""


# ----------------------------------------------------------------------------- blocks from grids


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _nibbles(n: np.ndarray) -> np.ndarray:
    """(blocks, 32) values 0..15 -> (blocks, 16) bytes: weight j in the low nibble of byte j, j + 16 in the high."""
    n = n.astype(np.uint8)
    return n[:, :16] | (n[:, 16:] << np.uint8(4))


def _per_block(t: torch.Tensor, rows: int, cols: int, group_size: int) -> np.ndarray:
    """A (rows or 1, n_groups) grid tensor -> one value per 32-weight block, in block order (rows * cols/32,)."""
    t = t.float()
    if t.shape[0] == 1:
        t = t.expand(rows, t.shape[1])
    per_col = t.repeat_interleave(group_size if group_size > 0 else cols, dim=1)[:, :cols]
    return per_col[:, ::QK].reshape(-1).numpy()


def grid_type(layer: QuantLinear) -> gguf.GGMLQuantizationType:
    """The block type that holds the layer's grid, or a GGUFExportError saying why none does."""
    name = f"{layer.bits}-bit {'symmetric' if layer.symmetric else 'asymmetric'} group size {layer.group_size}"
    why = None
    if layer.rot_seed is not None:
        why = "rotated weights (--rotate) need their rotation at run time"
    elif layer.g_idx is not None:
        why = "act-order groups formed on the fly (use --static-groups) are not runs of 32 columns"
    elif layer.in_features % QK:
        why = f"rows of {layer.in_features} weights are not whole blocks of {QK}"
    elif layer.group_size > 0 and layer.group_size % QK:
        why = f"groups of {layer.group_size} are not whole blocks of {QK}"
    elif layer.bits == 8 and not layer.symmetric:
        why = "8-bit asymmetric codes do not fit Q8_0's int8"
    elif layer.bits not in (8, 4, 3, 2):
        why = f"no GGUF block holds {layer.bits}-bit codes"
    if why:
        raise GGUFExportError(f"no GGUF type holds this {name} grid exactly ({why}); quantize with {EXPORTABLE_FLAGS},"
                              f" or pass --requantize TYPE")
    if layer.bits == 8:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.Q4_0 if layer.symmetric else gguf.GGMLQuantizationType.Q4_1


def grid_blocks(layer: QuantLinear) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The layer's codes and grids as GGUF blocks (rows, bytes per row), and their type; nothing is rounded
    except Q4_1's offset m = -z * s, which is an fp16 number only for some z and s."""
    qtype = grid_type(layer)
    rows, cols = layer.out_features, layer.in_features
    q = layer.codes().numpy().astype(np.int16).reshape(-1, QK)
    d = _fp16_bytes(_per_block(layer.scales, rows, cols, layer.group_size))
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        body = (q - 2 ** (layer.bits - 1)).astype(np.int8).view(np.uint8)
        blocks = np.concatenate([d, body], axis=1)
    elif qtype == gguf.GGMLQuantizationType.Q4_0:
        blocks = np.concatenate([d, _nibbles(q - 2 ** (layer.bits - 1) + 8)], axis=1)
    else:
        z = _per_block(layer.zero_points(), rows, cols, layer.group_size)
        s = _per_block(layer.scales, rows, cols, layer.group_size)
        blocks = np.concatenate([d, _fp16_bytes(-z * s), _nibbles(q)], axis=1)
    return blocks.reshape(rows, -1), qtype


def ternary_blocks(layer: TernaryLinear) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Trits and scale as TQ2_0 blocks where rows are whole 256-blocks, else Q4_0 (d = s, nibble t + 8)."""
    rows, cols = layer.out_features, layer.in_features
    trits = layer.trits().numpy().astype(np.int8)
    s16 = layer.scale.float().numpy().astype(np.float16)  # the one rounding: GGUF block scales are fp16
    s16 = np.broadcast_to(s16.reshape(-1, 1), (rows, 1))
    if cols % QK_K == 0:
        # gguf's TQ2_0 takes d = max|block| = s and rounds t * s / s back to t: exact on these values
        values = trits.astype(np.float32) * s16.astype(np.float32)
        return gguf.quants.quantize(values, gguf.GGMLQuantizationType.TQ2_0), gguf.GGMLQuantizationType.TQ2_0
    if cols % QK:
        raise GGUFExportError(f"ternary rows of {cols} weights are not whole blocks of {QK}; no GGUF type holds them")
    d = _fp16_bytes(np.repeat(s16, cols // QK, axis=1))
    blocks = np.concatenate([d, _nibbles(trits.reshape(-1, QK) + 8)], axis=1)
    return blocks.reshape(rows, -1), gguf.GGMLQuantizationType.Q4_0


# ----------------------------------------------------------------------------- the file


def check_model(meta: dict) -> None:
    qat = (meta.get("quantization") or {}).get("qat") or meta.get("qat")
    if meta.get("qat"):
        raise GGUFExportError("a QAT training checkpoint: pack it first (`nanogptq pack CKPT --out DIR`)")
    if qat:
        extras = {k: qat.get(k) for k in ("norm", "act_bits", "attn_act", "head_act_bits")}
        wanted = {"norm": "none", "act_bits": None, "attn_act": None, "head_act_bits": None}
        bad = [f"{k}={v}" for k, v in extras.items() if v != wanted[k]]
        if bad:
            raise GGUFExportError(f"the ternary model's QAT settings {', '.join(bad)} add math llama.cpp's gpt2 graph "
                                  "does not have; train with a QAT config of norm \"none\" and no activation "
                                  "quantization")
    kind = meta["tokenizer"].get("kind")
    if kind not in ("bpe", "byte", "char"):
        raise GGUFExportError(f"a {kind!r} tokenizer: llama.cpp's gpt2 tokenizer can stand for nanogptq's bpe, byte "
                              "and char ones only")


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte 0..255 in its vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [chars[b] for b in range(256)]


def _tokenizer_vocab(tokenizer: dict) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of llama.cpp's gpt2 BPE tokenizer that encodes as the checkpoint's does.

    bpe: its own vocabulary and merges. byte: the 256 byte-level symbols in byte order, so each byte is its own
    id. char: each character as the byte-level symbols of its UTF-8 bytes, with the merges that join the symbols
    of a multi-byte character. llama.cpp refuses a gpt2 tokenizer without merges, and runs none that never
    applies: one such merge (of two unused two-symbol strings) stands in where the vocabulary needs none.
    """
    normal = int(gguf.TokenType.NORMAL)
    if tokenizer["kind"] == "bpe":
        spec = json.loads(tokenizer["json"])
        vocab: dict[str, int] = spec["model"]["vocab"]
        tokens, types = [""] * len(vocab), [normal] * len(vocab)
        for token, i in vocab.items():
            tokens[i] = token
        for added in spec.get("added_tokens", []):
            tokens[added["id"]] = added["content"]
            types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
        return tokens, types, [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    alphabet = _byte_level_alphabet()
    never = f"{alphabet[0]}{alphabet[0]} {alphabet[0]}{alphabet[0]}"  # bytes 0 0 never form one symbol here
    if tokenizer["kind"] == "byte":
        return alphabet, [normal] * 256, [never]
    merges: list[str] = []
    tokens = []
    for c in tokenizer["chars"]:
        symbols = [alphabet[b] for b in c.encode()]
        for i in range(1, len(symbols)):
            merge = f"{''.join(symbols[:i])} {symbols[i]}"
            if merge not in merges:
                merges.append(merge)
        tokens.append("".join(symbols))
    return tokens, [normal] * len(tokens), merges or [never]


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: dict, vocab_size: int) -> None:
    tokens, types, merges = _tokenizer_vocab(tokenizer)
    if vocab_size < len(tokens):
        raise GGUFExportError(f"the model's vocabulary of {vocab_size} is smaller than its tokenizer's {len(tokens)}")
    # a model whose vocabulary is padded past its tokenizer's (nanoGPT's 50304 for GPT-2's 50257) has rows no
    # text encodes to: llama.cpp needs a token for each row, written as unused ones
    pad = range(len(tokens), vocab_size)
    tokens, types = tokens + [f"[PAD{i}]" for i in pad], types + [int(gguf.TokenType.UNUSED)] * len(pad)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizing regex, which tokenizers' ByteLevel applies
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_add_bos_token(False)
    if EOT in tokens:  # GPT-2's one special token ends and begins texts
        writer.add_bos_token_id(tokens.index(EOT))
        writer.add_eos_token_id(tokens.index(EOT))


def _weight(layer: nn.Module, float_type: gguf.GGMLQuantizationType, requantize: str | None):
    """(data, raw_dtype or None, note) for a block linear's weight."""
    if requantize:
        if isinstance(layer, QuantLinear):
            w = layer.dequantize()
        elif isinstance(layer, TernaryLinear):
            w = layer.trits().float() * layer.scale[:, None]
        else:
            w = layer.weight.detach()
        qtype = REQUANTIZE_TYPES[requantize]
        if w.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            raise GGUFExportError(f"--requantize {requantize}: rows of {w.shape[1]} weights are not whole blocks of "
                                  f"{gguf.GGML_QUANT_SIZES[qtype][0]}")
        return gguf.quants.quantize(w.float().numpy(), qtype), qtype
    if isinstance(layer, QuantLinear):
        return grid_blocks(layer)
    if isinstance(layer, TernaryLinear):
        return ternary_blocks(layer)
    return _float(layer.weight, float_type)


def _float(t: torch.Tensor, float_type: gguf.GGMLQuantizationType):
    x = t.detach().float().numpy()
    return (x.astype(np.float16), None) if float_type == gguf.GGMLQuantizationType.F16 else (x, None)


def export_gguf(src: str | Path, out: str | Path, float_type: str = "F16", requantize: str | None = None,
                overwrite: bool = False) -> dict:
    """Write checkpoint `src` as a GGUF file `out` (atomically: a temp file, then a rename); returns a summary:
    the tensor types written and the notes the command prints."""
    out = Path(out)
    if float_type not in FLOAT_TYPES:
        raise GGUFExportError(f"--type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    if requantize is not None and requantize not in REQUANTIZE_TYPES:
        raise GGUFExportError(f"--requantize must be one of {', '.join(REQUANTIZE_TYPES)}, got {requantize!r}")
    if out.is_dir():
        raise GGUFExportError(f"{out}: is a folder; name the .gguf file to write")
    if out.exists() and not overwrite:
        raise GGUFExportError(f"{out}: exists; pass --overwrite to replace it")
    ckpt = load_checkpoint(src)
    meta, model, cfg = ckpt.meta, ckpt.model, ckpt.model.config
    check_model(meta)
    ftype = FLOAT_TYPES[float_type]
    notes = []
    if cfg.activation != "gelu_tanh":
        notes.append("the model uses the exact GELU, llama.cpp's gpt2 the tanh form: its logits differ slightly")
    if requantize:
        notes.append(f"block linears requantized by gguf to {requantize} (round to nearest from the dequantized "
                     "weights): not the checkpoint's own grid")

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "gpt2")
    writer.add_name(Path(src).name)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.ln_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if float_type == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    _add_tokenizer(writer, meta["tokenizer"], cfg.vocab_size)

    types: dict[str, str] = {}

    q4_1 = {"blocks": 0, "rounded": 0, "max_change": 0.0}

    def add(name: str, data: np.ndarray, raw: gguf.GGMLQuantizationType | None = None,
            layer: nn.Module | None = None) -> None:
        if raw == gguf.GGMLQuantizationType.Q4_1 and not requantize and isinstance(layer, QuantLinear):
            change = np.abs(gguf.quants.dequantize(data, raw) - layer.dequantize().numpy())
            q4_1["blocks"] += change.size // QK
            q4_1["rounded"] += int((change.reshape(-1, QK).max(axis=1) > 0).sum())
            q4_1["max_change"] = max(q4_1["max_change"], float(change.max()))
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw)
        types[name] = raw.name if raw is not None else ("F16" if data.dtype == np.float16 else "F32")

    def vec(name: str, t: torch.Tensor | None, size: int) -> None:
        # llama.cpp's gpt2 loader requires every norm bias and linear bias: zeros for a model without them
        add(name, (torch.zeros(size) if t is None else t.detach().float()).numpy().astype(np.float32))

    tr, C = model.transformer, cfg.n_embd
    wte = tr.wte
    if isinstance(wte, QuantEmbedding):
        add("token_embd.weight", *grid_blocks(wte.head))
    else:
        add("token_embd.weight", *_float(wte.weight, ftype))
    add("position_embd.weight", tr.wpe.weight.detach().float().numpy())  # F32: llama.cpp adds it in F32
    for i, block in enumerate(tr.h):
        vec(f"blk.{i}.attn_norm.weight", block.ln_1.weight, C)
        vec(f"blk.{i}.attn_norm.bias", block.ln_1.bias, C)
        vec(f"blk.{i}.ffn_norm.weight", block.ln_2.weight, C)
        vec(f"blk.{i}.ffn_norm.bias", block.ln_2.bias, C)
        for gguf_name, layer in (("attn_qkv", block.attn.c_attn), ("attn_output", block.attn.c_proj),
                                 ("ffn_up", block.mlp.c_fc), ("ffn_down", block.mlp.c_proj)):
            add(f"blk.{i}.{gguf_name}.weight", *_weight(layer, ftype, requantize), layer=layer)
            vec(f"blk.{i}.{gguf_name}.bias", layer.bias, layer.out_features)
    vec("output_norm.weight", tr.ln_f.weight, C)
    vec("output_norm.bias", tr.ln_f.bias, C)
    # no `output` tensor: the head is tied, and llama.cpp's gpt2 (and transformers) then read token_embd
    if q4_1["rounded"]:
        notes.append(f"Q4_1 holds the offset m = -z * s in fp16: rounded in {q4_1['rounded']} of {q4_1['blocks']} "
                     f"blocks, weights moved by at most {q4_1['max_change']:.3g}")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # only now: a refused export leaves nothing behind
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "types": types, "notes": notes}
