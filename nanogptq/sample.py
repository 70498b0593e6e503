"""Text in, text out: loading a checkpoint to generate with, prompt checks, streaming generation and its
timings (time to first token, tokens/s)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanogptq.checkpoint import Checkpoint, is_quantized, load_checkpoint, read_meta
from nanogptq.config import StrictConfig
from nanogptq.data import CharTokenizer, Tokenizer
from nanogptq.interop.gguf import GGUFExportError
from nanogptq.interop.llamacpp import ENGINE, LlamaCppModel, exact_gguf_types, llamacpp_available, load_llamacpp
from nanogptq.runtime.backends import BACKENDS
from nanogptq.runtime.generate import compile_blocks, generate_stream
from nanogptq.runtime.linear import RuntimeLinear
from nanogptq.runtime.load import prepare_for_inference, resolve_dtype

KERNEL_CHOICES = ("auto", *BACKENDS, ENGINE)  # what `sample` and the demo run: a backend, or llama.cpp


@dataclass
class SampleSettings(StrictConfig):
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float | None = None
    seed: int | None = 1337

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= 10_000:
            raise ValueError(f"max new tokens must be between 1 and 10000, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 5:
            raise ValueError(f"temperature must be between 0 and 5, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top-k must be 0 (off) or positive, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    prompt: str = ""  # the prompt as the model saw it: unknown characters dropped, cropped to the context
    text: str = ""  # the generated continuation only
    new_tokens: int = 0
    ttft_s: float = 0.0  # prompt prefill + first token
    total_s: float = 0.0
    engine: str = ""  # what ran it: nanogptq's kernels or llama.cpp (engine_name)
    notes: list[str] = field(default_factory=list)  # what was changed in the prompt, and why

    @property
    def tokens_per_s(self) -> float:
        """Decode speed after the first token (the prefill is in ttft)."""
        decode = self.total_s - self.ttft_s
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else 0.0


def load_for_generation(path: str | Path, device: str, dtype: str = "auto", kernel: str = "auto",
                        compile: bool = False) -> Checkpoint:
    """A checkpoint as `sample` and the demo run it: on activations of `dtype` (a resolve_dtype name),
    without the stored codes a kernel's layout replaced (half the memory at 4 bits), blocks compiled with
    `compile` (torch.compile: faster decoding after a one-off compilation).

    `kernel` names a backend, or the llama.cpp engine ("llamacpp": the model becomes a LlamaCppModel running
    the checkpoint's GGUF). "auto" on the CPU picks llama.cpp where a GGUF type holds the stored grid exactly,
    llama-cpp-python is installed, the activations are fp32 and no torch.compile was asked for: it decodes
    faster than nanogptq's own kernels there (docs/results.md, "CPU decoding against llama.cpp")."""
    if kernel not in KERNEL_CHOICES:  # a bad flag is the flag's error, also for a float checkpoint
        raise ValueError(f"unknown kernel {kernel!r}; choose from {', '.join(KERNEL_CHOICES)}")
    quantized = dtype == "auto" and is_quantized(read_meta(path))  # only "auto" asks (a bad name fails first)
    act_dtype = resolve_dtype(dtype, device, quantized)
    if kernel == ENGINE:
        if torch.device(device).type != "cpu":
            raise ValueError(f"--kernel {ENGINE} runs on the CPU, not {device}")
        if act_dtype != torch.float32:
            raise ValueError(f"--kernel {ENGINE} runs on fp32 activations: pass --dtype auto or fp32")
        if not llamacpp_available():
            raise ValueError(f"--kernel {ENGINE} needs llama-cpp-python: pip install 'nanogptq[cpu]'")
    ckpt = load_checkpoint(path, device=device)
    if kernel == ENGINE or (kernel == "auto" and _llamacpp_fits(ckpt, device, act_dtype, compile)):
        try:
            ckpt.model = load_llamacpp(ckpt)
        except GGUFExportError as e:
            raise ValueError(f"--kernel {ENGINE}: {e}") from None
        return ckpt
    prepare_for_inference(ckpt.model, kernel=kernel, dtype=act_dtype, keep_packed=False)
    if compile:
        compile_blocks(ckpt.model)
    return ckpt


def _llamacpp_fits(ckpt: Checkpoint, device: str, act_dtype: torch.dtype, compile: bool) -> bool:
    """Whether "auto" runs the checkpoint on llama.cpp (see load_for_generation)."""
    if torch.device(device).type != "cpu" or act_dtype != torch.float32 or compile or not llamacpp_available():
        return False
    try:
        exact_gguf_types(ckpt.model, ckpt.meta)
    except GGUFExportError:
        return False
    return True


def engine_name(ckpt: Checkpoint) -> str:
    """What runs the checkpoint, as `sample` and the demo print it: llama.cpp and its GGUF types, or nanogptq,
    its kernels and its activation dtype."""
    model = ckpt.model
    if isinstance(model, LlamaCppModel):
        return model.describe()
    kernels = sorted({m.backend for m in model.modules() if isinstance(m, RuntimeLinear)})
    act = str(model.transformer.wpe.weight.dtype).removeprefix("torch.")
    return f"nanogptq ({'+'.join(kernels) + ' kernels, ' if kernels else ''}{act} activations)"


def encode_prompt(ckpt: Checkpoint, prompt: str) -> tuple[list[int], list[str]]:
    """Prompt tokens plus notes: unknown characters dropped, long prompts cropped to the context."""
    notes = []
    tok = ckpt.tokenizer
    if isinstance(tok, CharTokenizer):
        unknown = tok.unknown_chars(prompt)
        if unknown:
            notes.append(f"dropped characters the model never saw: {' '.join(repr(c) for c in unknown)}")
            prompt = "".join(c for c in prompt if c not in set(unknown))
    ids = tok.encode(prompt)
    if not ids:
        # an empty prompt starts from a newline where the vocabulary has one, else from token 0
        try:
            ids = tok.encode("\n")
        except ValueError:  # a vocabulary without newline
            ids = [0]
        notes.append("empty prompt: starting from a newline")
    block = ckpt.model.config.block_size
    if len(ids) > block:
        notes.append(f"prompt cropped to its last {block} tokens (the model's context)")
        ids = ids[-block:]
    return ids, notes


class TextStream:
    """The text of a growing list of token ids, equal at every step to the tokenizer's decode of all of
    them, in linear time: the ids up to the last whole character are decoded once and kept, only the ones
    after it again (a byte or BPE token can end inside a multi-byte character, which decodes to U+FFFD
    until the rest of it arrives)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.kept = ""  # the text of ids[: self.start]
        self.start = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        tail = self.tokenizer.decode(self.ids[self.start :])
        if not tail.endswith("\ufffd"):  # a clean boundary: UTF-8 decoding restarts here
            self.kept, self.start, tail = self.kept + tail, len(self.ids), ""
        return self.kept + tail


def stream_text(ckpt: Checkpoint, prompt: str, settings: SampleSettings) -> Iterator[Generation]:
    """Yield the growing Generation after each new token (text decoded from all tokens so far)."""
    settings.validate()
    ids, notes = encode_prompt(ckpt, prompt)
    model = ckpt.model
    device = model.device if isinstance(model, LlamaCppModel) else model.transformer.wpe.weight.device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = Generation(prompt=ckpt.tokenizer.decode(ids), notes=notes, engine=engine_name(ckpt))
    text = TextStream(ckpt.tokenizer)
    start = time.perf_counter()
    for tok in generate_stream(ckpt.model, idx, settings.max_new_tokens, settings.temperature,
                               settings.top_k or None, settings.top_p, settings.seed):
        gen.text = text.add(int(tok[0, 0]))  # int() synchronises with the device: the timing is real
        now = time.perf_counter() - start
        if gen.new_tokens == 0:
            gen.ttft_s = now
        gen.total_s = now
        gen.new_tokens += 1
        yield gen


def generate_text(ckpt: Checkpoint, prompt: str, settings: SampleSettings) -> Generation:
    gen = Generation()
    for gen in stream_text(ckpt, prompt, settings):  # noqa: B007 (the last one is the whole generation)
        pass
    return gen
