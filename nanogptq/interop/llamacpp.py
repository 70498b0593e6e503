"""llama.cpp as a CPU engine: a checkpoint whose stored grid a GGUF type holds exactly, run by llama-cpp-python
from the GGUF file that export_gguf writes of it, behind the model interface the decode loop uses.

    model = load_llamacpp(ckpt, threads=2)           # GGUFExportError where no GGUF type holds the grid
    logits, _ = model(idx, input_pos=torch.arange(T))  # (1, 1, V): the last position's, as GPT's decode step

Tokens go in as nanogptq's own ids (llm.eval), logits come back as a tensor, and runtime.generate's loop and
Sampler run on them: tokenizer, sampling settings, seed and the sliding context window stay nanogptq's, so
`sample` and the demo only swap the model. The exported file is cached under the user cache
(`$NANOGPTQ_CACHE_DIR` or `~/.cache/nanogptq`, in `gguf/`), named by a hash of the checkpoint's config.json
and its weights file's size and modification time; the checkpoint folder is never written.

What "exactly" means here: every linear's codes and scales are the checkpoint's, float weights go in as F32.
The logits still differ slightly from the `dequant` reference, within the tolerance the tests state: llama.cpp
rounds activations to 8-bit blocks against Q8_0/Q4_0/Q4_1 weights, keeps its KV cache in fp16 and computes
the tanh GELU (a model with the exact one differs by that too).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from nanogptq.checkpoint import CONFIG, WEIGHTS, Checkpoint
from nanogptq.data import default_cache_dir
from nanogptq.interop.gguf import GGUFExportError, check_model, export_gguf, grid_type
from nanogptq.quant.linear import QuantLinear
from nanogptq.quant.qat import TernaryLinear

ENGINE = "llamacpp"
CACHE_FORMAT = 1  # in the cache key: bump when what export_gguf writes for the engine changes


def llamacpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401  (optional: the `cpu` extra)
    except ImportError:
        return False
    return True


def _q4_1_offsets_exact(layer: QuantLinear) -> bool:
    """Q4_1 stores the offset m = -z * s in fp16: exact only where that product is an fp16 number."""
    m = -layer.zero_points().double() * layer.scales.double()
    return bool(torch.equal(m.half().double(), m))


def exact_gguf_types(model: nn.Module, meta: dict) -> set[str]:
    """The GGUF types that hold the checkpoint's weights exactly (F32 for float ones), or a GGUFExportError
    naming what no GGUF type holds."""
    check_model(meta)
    types = {"F32"}
    for name, m in model.named_modules():
        if isinstance(m, TernaryLinear):
            raise GGUFExportError(f"{name}: ternary scales are fp32 and GGUF's blocks hold them in fp16")
        if isinstance(m, QuantLinear):
            qtype = grid_type(m)
            if qtype.name == "Q4_1" and not _q4_1_offsets_exact(m):
                raise GGUFExportError(f"{name}: Q4_1 holds the offset -z * s in fp16, which rounds this grid's")
            types.add(qtype.name)
    return types


def gguf_cache_path(ckpt_path: Path) -> Path:
    """Where the engine's GGUF of a checkpoint is kept: the user cache, named by what the file is made from."""
    weights = (ckpt_path / WEIGHTS).stat()
    key = hashlib.sha256()
    key.update((ckpt_path / CONFIG).read_bytes())
    key.update(json.dumps([CACHE_FORMAT, str(ckpt_path.resolve()), weights.st_size, weights.st_mtime_ns]).encode())
    return default_cache_dir() / "gguf" / f"{ckpt_path.name}-{key.hexdigest()[:16]}.f32.gguf"


def export_for_engine(ckpt: Checkpoint, cache: Path | None = None) -> Path:
    """The checkpoint's GGUF (float weights as F32), exported once into the cache and reused after."""
    exact_gguf_types(ckpt.model, ckpt.meta)
    path = cache or gguf_cache_path(ckpt.path)
    if not path.exists():
        export_gguf(ckpt.path, path, float_type="F32", overwrite=True)  # atomic: a temp file, then a rename
    return path


class LlamaCppModel(nn.Module):
    """A llama.cpp context over a GGUF file, called as GPT is in decoding: `model(idx, input_pos=...)` with
    idx (1, T) gives the last position's logits (1, 1, V). Positions continue the context (a step at the
    next position) or restart it at 0 (a prompt or a refilled window); batch 1 only."""

    engine = ENGINE

    def __init__(self, gguf_path: Path, stored: nn.Module, threads: int, gguf_types: set[str]):
        super().__init__()
        import llama_cpp  # optional: the `cpu` extra

        # the stored model stays, unprepared, for what reads a checkpoint's layers (bits per weight)
        self.stored, self.config, self.path, self.threads = stored, stored.config, gguf_path, threads
        self.gguf_types = sorted(gguf_types)
        n_ctx = self.config.block_size
        self.llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        # Steps go to llama.cpp's C API, not Llama.eval: a one-token step is then two field writes and one
        # llama_decode call, where eval also trims the cache, refills its batch slot by slot and records the
        # tokens. At the tiny and small presets a step's compute is ~100-300 us, so those microseconds are
        # what decides the speed against llama.cpp's own loop (benchmarks/cpu_llamacpp.py).
        self._api = llama_cpp
        self._ctx = self.llm.ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        for i in range(n_ctx):  # every slot belongs to the one sequence, id 0
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
        self._n_past = 0  # tokens in llama.cpp's KV cache
        self.device = torch.device("cpu")

    def __del__(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._api.llama_batch_free(self._batch)
            self._batch = None

    def describe(self) -> str:
        return f"llama.cpp ({'/'.join(self.gguf_types)} GGUF, {self.threads} threads)"

    def setup_kv_cache(self, batch: int, max_len: int | None = None) -> None:
        if batch != 1:
            raise ValueError(f"the llama.cpp engine decodes one sequence at a time, not {batch}")
        self.clear_kv_cache()

    def clear_kv_cache(self) -> None:
        self._api.llama_memory_clear(self._memory, True)
        self._n_past = 0

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if input_pos is None or targets is not None or idx.size(0) != 1:
            raise ValueError("the llama.cpp engine runs decoding steps only: idx (1, T) with input_pos")
        tokens = idx[0].tolist()
        start = input_pos.item() if len(tokens) == 1 else int(input_pos[0])
        if start == 0:
            self.clear_kv_cache()
        elif start < self._n_past:  # a rewind: drop what lies past the new position
            self._api.llama_memory_seq_rm(self._memory, 0, start, -1)
        elif start > self._n_past:
            raise ValueError(f"step at position {start}, but the context holds {self._n_past} tokens")
        n = len(tokens)
        if start + n > self.config.block_size:
            raise ValueError(f"{start + n} positions, past the context of {self.config.block_size}")
        b = self._batch
        b.n_tokens = n
        for i, tok in enumerate(tokens):  # logits of the last position only
            b.token[i], b.pos[i], b.logits[i] = tok, start + i, i == n - 1
        if self._api.llama_decode(self._ctx, b) != 0:
            raise RuntimeError(f"llama_decode failed on {n} tokens at position {start}")
        self._n_past = start + n
        # one copy of the last row out of llama.cpp's buffer (valid until the next decode), into a new tensor
        logits = torch.empty(1, 1, self.config.vocab_size)
        ctypes.memmove(logits.data_ptr(), self._api.llama_get_logits_ith(self._ctx, -1), logits.numel() * 4)
        return logits, None


def load_llamacpp(ckpt: Checkpoint, threads: int | None = None, cache: Path | None = None) -> LlamaCppModel:
    """The checkpoint on the llama.cpp engine with `threads` threads (default: torch's intra-op count)."""
    types = exact_gguf_types(ckpt.model, ckpt.meta)
    path = export_for_engine(ckpt, cache)
    threads = threads or torch.get_num_threads()
    try:
        return LlamaCppModel(path, ckpt.model, threads, types)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise GGUFExportError(f"llama.cpp could not load {path} ({e})") from None

