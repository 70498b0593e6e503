"""Decoding: the prefill, the one-token step, sampling, CUDA graphs and compilation (gpt-fast's generate.py).

    tokens = generate(model, idx, max_new_tokens=200, temperature=0.8, top_k=40, seed=1337)
    for tok in generate_stream(model, idx, 200): ...

The model (model.py) computes logits for tokens at positions with a static KV cache; this module owns the
loop around it: the cache and the decode attention's counters (`setup_kv_cache`), the sampler, the
one-token step replayed from a CUDA graph, and torch.compile of the blocks' one-token step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from nanogptq.runtime.fusion import DecodeAttention


def setup_kv_cache(model: nn.Module, batch: int, max_len: int | None = None) -> None:
    """The model's static KV cache for `batch` rows, and the split-cache attention's per-head counters (zero
    between calls), so that a decode step allocates nothing."""
    model.setup_kv_cache(batch, max_len)
    for attn in model.modules():
        if isinstance(attn, DecodeAttention):
            attn.counts = torch.zeros(batch * model.config.n_head, dtype=torch.int32, device=attn.kv_cache.kv.device)


class OneTokenCompiled:
    """A block's forward that runs `compiled` on one-token steps and `eager` on longer ones."""

    def __init__(self, eager: Callable, compiled: Callable):
        self.eager, self.compiled = eager, compiled

    def __call__(self, x: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        return (self.compiled if x.shape[1] == 1 else self.eager)(x, input_pos, mask)


def compile_blocks(model: nn.Module, warm_up: bool = True, pdl: bool = True) -> None:
    """torch.compile each transformer block's one-token decoding step (regional compilation: the identical
    blocks share one compiled graph, so it compiles once, not once per layer). On the GPU this fuses the
    small elementwise kernels around the matmuls, which at batch 1 cost a small model as much as its
    matmuls. Steps of several tokens (the prompt, a full context window's refill) stay eager: their length
    varies, and the kernels branch on the row count, so compiled they would recompile in mid-generation.

    With `pdl`, on sm_90 and later (a no-op elsewhere), the fused kernels use programmatic dependent launch
    (inductor's `triton.enable_pdl`): each may start while the kernel before it ends, and waits where it
    reads what that kernel writes, as the tensor-core GEMV (kernels/mma.py) does. The decode benchmark's
    "nopdl-" variant measures the difference (docs/results.md).

    `warm_up` compiles now, in a two-token generation, rather than inside the first timed one."""
    options = {"triton.enable_pdl": pdl}
    for block in model.transformer.h:
        block.forward = OneTokenCompiled(block.forward, torch.compile(block.forward, dynamic=False, options=options))
    if warm_up:
        device = model.transformer.wpe.weight.device
        generate(model, torch.zeros(1, 1, dtype=torch.long, device=device), 2, temperature=0.0)


class CUDAGraphStep:
    """The one-token decode step of a model with a KV cache, recorded once into a CUDA graph and replayed.

    A small model's step is a hundred tiny kernels; launched one by one from Python they take longer than
    they run, a replayed graph launches them all at once. Call it like the model, `step(tok, input_pos)` with
    tok (B, 1): the inputs are copied into the graph's own tensors, and the returned logits (B, 1, V) are
    the graph's output buffer, overwritten by the next call. Record it after `setup_kv_cache` (the graph
    holds the cache's memory); the warm-up and recording steps write only the cache's last slot, which a
    real step at that position writes before it reads.
    """

    def __init__(self, model: nn.Module, batch: int, sampler: Sampler | None = None):
        cache = model.transformer.h[0].attn.kv_cache
        if cache is None:
            raise RuntimeError("CUDAGraphStep needs setup_kv_cache() first")
        device = cache.k.device
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.full((1,), cache.k.size(2) - 1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the main stream (lazy init, Triton autotuning)
            for _ in range(2):
                model(self.tok, input_pos=self.pos)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.sampler = sampler
        with torch.cuda.graph(self.graph):
            self.logits, _ = model(self.tok, input_pos=self.pos)
            # the sampling kernels too (a draw is device arithmetic only): no launches between steps
            self.next_tok = None if sampler is None else sampler.draw(self.logits[:, -1, :])

    def __call__(self, tok: torch.Tensor, input_pos: torch.Tensor) -> tuple[torch.Tensor, None]:
        self.tok.copy_(tok)
        self.pos.copy_(input_pos)
        self.graph.replay()
        return self.logits, None

    def next_token(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        """One step at position `pos` and the token the sampler draws from it, (B, 1), a copy."""
        self.tok.copy_(tok)
        self.pos.fill_(pos)  # a fill, not a host-to-device copy
        self.sampler.advance()
        self.graph.replay()
        return self.next_tok.clone()


@torch.inference_mode()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    cuda_graph: bool = True,
) -> torch.Tensor:
    """The prompt `idx` (B, T), cropped to the context, followed by `max_new_tokens` sampled tokens."""
    new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, seed, cuda_graph))
    return torch.cat([idx[:, -model.config.block_size :], *new], dim=1)


@torch.inference_mode()
def generate_stream(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    cuda_graph: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield each new (B, 1) token as soon as it is sampled, decoding with a KV cache.

    Prompts longer than the context are cropped to their last tokens. When the context is full
    the window slides: the cache is refilled from the last half-context of tokens, so long
    generations cost one prefill per half-context instead of one per token. On CUDA the one-token
    step, sampling included, is replayed from a CUDA graph (`cuda_graph`) once more than one token is
    asked for. Sampling is `Sampler`'s: the same tokens for a seed with or without the graph.
    """
    sampler = Sampler(idx.size(0), model.config.vocab_size, idx.device, temperature, top_k, top_p, seed)
    block = model.config.block_size
    recent = idx[:, -block:]
    setup_kv_cache(model, idx.size(0))
    try:
        logits, _ = model(recent, input_pos=torch.arange(recent.size(1), device=idx.device))
        next_tok = sampler(logits[:, -1, :])
        pos = recent.size(1)
        use_graph = cuda_graph and idx.is_cuda and max_new_tokens > 1
        step = CUDAGraphStep(model, idx.size(0), sampler) if use_graph else None
        for i in range(max_new_tokens):
            yield next_tok
            if i == max_new_tokens - 1:
                break
            recent = torch.cat([recent, next_tok], dim=1)[:, -block:]
            if pos >= block:  # context full: refill the cache from the recent half-window
                window = recent[:, -(block // 2) :]
                logits, _ = model(window, input_pos=torch.arange(window.size(1), device=idx.device))
                pos = window.size(1)
                next_tok = sampler(logits[:, -1, :])
            elif step is not None:
                next_tok = step.next_token(next_tok, pos)
                pos += 1
            else:
                logits, _ = model(next_tok, input_pos=torch.tensor([pos], device=idx.device))
                pos += 1
                next_tok = sampler(logits[:, -1, :])
    finally:
        model.clear_kv_cache()




class Sampler:
    """The next token of each row from logits (B, V): greedy at temperature 0, else top-k / nucleus
    sampling by the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) independent picks i with
    probability p_i, as multinomial sampling does. The noise E is drawn ahead, NOISE_STEPS steps at a
    time, from the seeded generator, so a draw is device arithmetic only (no generator call, no host
    sync): the CUDA-graph decode step samples inside its graph, and reads the same noise an eager step
    would, so both give the same tokens for a seed. Call it (`advance` on the host, then `draw`) once per
    step, in order."""

    NOISE_STEPS = 64

    def __init__(self, batch: int, vocab_size: int, device: torch.device | str, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        sampling = temperature > 0
        self.noise = torch.empty(self.NOISE_STEPS if sampling else 0, batch, vocab_size, device=device)
        self.row = torch.zeros(1, dtype=torch.long, device=device)  # the noise row of the next draw
        self.draws = 0  # host side

    def advance(self) -> None:
        """Host side, before each draw: the next NOISE_STEPS rows of noise when the last ones are used."""
        if self.temperature > 0 and self.draws % self.NOISE_STEPS == 0:
            self.noise.exponential_(generator=self.generator)
            self.row.zero_()
        self.draws += 1

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) -> (B, 1), with device operations only (graph-safe)."""
        logits = logits.float()
        if self.temperature <= 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and 0 < self.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            # drop a token once the mass before it already reaches top_p (the top token always stays)
            drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= self.top_p
            drop = drop_sorted.scatter(1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        noise = self.noise.index_select(0, self.row)[0]
        self.row.add_(1)
        return (logits.softmax(dim=-1) / noise).argmax(dim=-1, keepdim=True)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self.advance()
        return self.draw(logits)
