"""A GPT-2 style decoder (nanoGPT's shape) with a KV-cache `generate()`.

The linear layers keep nanoGPT's names (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`) so
that quantizers can find and replace them; the model itself knows nothing of how weights are stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


def check_keys(cls: type, d: dict, source: str) -> None:
    """Config files are read strictly: a key that is not a field of the dataclass `cls` is an error that
    names it (a typo must not silently fall back to a default)."""
    known = {f.name for f in fields(cls)}
    for key in d:
        if key not in known:
            raise ValueError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(known))})")


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 128  # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        check_keys(cls, d, "model config")
        return cls(**d)


PRESETS: dict[str, dict] = {
    # the CPU demo model, about 0.8 M parameters with a char vocabulary
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0),
    # the seed study's size, about 2.7 M
    "small": dict(n_layer=6, n_head=6, n_embd=192, block_size=256, dropout=0.1),
    # nanoGPT's shakespeare-char config, about 10.7 M
    "shakespeare": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
}


def preset_config(name: str, vocab_size: int, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return GPTConfig(vocab_size=vocab_size, **{**PRESETS[name], **overrides})


class KVCache(nn.Module):
    """Preallocated keys/values for one attention layer, written in place at the given positions.

    Shapes never change while decoding (the whole cache is attended, later slots masked out), so a
    decode step can be captured in a CUDA graph. Keys and values share one buffer `kv` (2, B, H, L, D),
    so a step writes both with one kernel (on CUDA a one-token step writes them inside the attention kernel).
    """

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (2, batch, n_head, max_len, head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # the split-cache attention's per-head counters (zero between calls: its programs take tickets)
        self.register_buffer("counts", torch.zeros(batch * n_head, dtype=torch.int32, device=device), persistent=False)
        # one-token steps on CUDA use the split-cache Triton kernel (attention_triton.py) where it can run
        self.split_decode = (torch.device(device).type == "cuda" and head_dim >= 16 and head_dim & (head_dim - 1) == 0
                             and _has_triton())

    @property
    def k(self) -> torch.Tensor:
        return self.kv[0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[1]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.kv.index_copy_(3, input_pos, torch.stack((k, v)).to(self.kv.dtype))
        return self.kv[0], self.kv[1]


def _has_triton() -> bool:
    """Whether the Triton decode attention can be used (importing it registers the op)."""
    try:
        import nanogptq.attention_triton  # noqa: F401
    except ImportError:
        return False
    return True


def compile_blocks(model: GPT, warm_up: bool = True, pdl: bool = True) -> None:
    """torch.compile each transformer block's one-token decoding step (regional compilation: the identical
    blocks share one compiled graph, so it compiles once, not once per layer). On the GPU this fuses the
    small elementwise kernels around the matmuls, which at batch 1 cost a small model as much as its
    matmuls. Steps of several tokens (the prompt, a full context window's refill) stay eager: their length
    varies, and the kernels branch on the row count, so compiled they would recompile in mid-generation.

    With `pdl`, on sm_90 and later (a no-op elsewhere), the fused kernels use programmatic dependent launch
    (inductor's `triton.enable_pdl`): each may start while the kernel before it ends, and waits where it
    reads what that kernel writes, as the tensor-core GEMV (quant/cuda_gemv.py) does. The decode benchmark's
    "nopdl-" variant measures the difference (README, section 4).

    `warm_up` compiles now, in a two-token generation, rather than inside the first timed one."""
    options = {"triton.enable_pdl": pdl}
    for block in model.transformer.h:
        block.decode_step = torch.compile(block.forward, dynamic=False, options=options)
    if warm_up:
        device = model.transformer.wpe.weight.device
        model.generate(torch.zeros(1, 1, dtype=torch.long, device=device), 2, temperature=0.0)


class CUDAGraphStep:
    """The one-token decode step of a model with a KV cache, recorded once into a CUDA graph and replayed.

    A small model's step is a hundred tiny kernels; launched one by one from Python they take longer than
    they run, a replayed graph launches them all at once. Call it like the model, `step(tok, input_pos)` with
    tok (B, 1): the inputs are copied into the graph's own tensors, and the returned logits (B, 1, V) are
    the graph's output buffer, overwritten by the next call. Record it after `setup_kv_cache` (the graph
    holds the cache's memory); the warm-up and recording steps write only the cache's last slot, which a
    real step at that position writes before it reads.
    """

    def __init__(self, model: GPT, batch: int, sampler: Sampler | None = None):
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.kv_cache: KVCache | None = None
        # hook points for activation quantization (QAT swaps in per-token quantizers); identity by default
        self.q_quant: nn.Module = nn.Identity()
        self.k_quant: nn.Module = nn.Identity()

    @property
    def plain_qk(self) -> bool:
        """No activation quantizers between c_attn and the cache (QAT's `a8` sets them)."""
        return isinstance(self.q_quant, nn.Identity) and isinstance(self.k_quant, nn.Identity)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                residual: torch.Tensor | None = None):
        """With `residual` (Block.fused): x is the residual stream itself, ln_1 runs inside c_attn and c_proj
        adds the residual."""
        T = x.shape[1]
        qkv = self.c_attn(x) if residual is None else self.c_attn(x, fused=True)
        cache = self.kv_cache
        if T == 1 and input_pos is not None and cache is not None and cache.split_decode and self.plain_qk \
                and qkv.dtype == cache.kv.dtype:
            # the Triton kernel writes the token's k, v into the cache as it attends (attention_triton.py)
            y = torch.ops.nanogptq.decode_attention(qkv, cache.kv, input_pos, cache.counts)
        else:
            y = self.attend(qkv, input_pos, mask)
        return self.resid_dropout(self.c_proj(y) if residual is None else self.c_proj(y, residual, fused=True))

    def attend(self, qkv: torch.Tensor, input_pos: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """PyTorch's attention over (B, T, 3C) c_attn outputs, writing the cache first if there is one."""
        B, T, C3 = qkv.shape
        C = C3 // 3
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
        q, k = self.q_quant(q), self.k_quant(k)  # before caching: cached keys are the quantized ones
        if input_pos is None or self.kv_cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            k, v = self.kv_cache.update(input_pos, k, v)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return y.transpose(1, 2).contiguous().view(B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.act = nn.GELU()  # a module, so that a quantized c_fc can take it over (fuse_mlp_gelu)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """With `residual` (Block.fused), as CausalSelfAttention's: ln_2 inside c_fc, the add inside c_proj."""
        if residual is None:
            return self.dropout(self.c_proj(self.act(self.c_fc(x))))
        return self.dropout(self.c_proj(self.act(self.c_fc(x, fused=True)), residual, fused=True))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.decode_step: Callable | None = None  # compile_blocks: the compiled forward for one-token steps

    @property
    def fused(self) -> bool:
        """quant.fuse_blocks: one-token steps run ln_1 / ln_2 inside c_attn / c_fc and the residual adds inside
        the c_projs (their kernels' epilogues), so the step launches only the linears and the attention."""
        return all(getattr(m, "fused", False) for m in (self.attn.c_attn, self.attn.c_proj, self.mlp.c_fc,
                                                       self.mlp.c_proj))

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        if self.fused and x.shape[0] * x.shape[1] == 1:
            x = self.attn(x, input_pos, mask, residual=x)
            return self.mlp(x, residual=x)
        x = x + self.attn(self.ln_1(x), input_pos, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled down by depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def embed(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        if input_pos is None:
            input_pos = torch.arange(idx.size(1), dtype=torch.long, device=idx.device)
        pos_emb = self.transformer.wpe(input_pos)
        # a quantized embedding table dequantizes to fp32: follow the model's own dtype
        return self.transformer.drop(self.transformer.wte(idx).to(pos_emb.dtype) + pos_emb)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, input_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position (training/eval), or, with `input_pos` (T,) and a KV cache set up, a
        decoding step: the tokens idx (B, T) sit at those positions and see every cached earlier one, and
        only the last position's logits (B, 1, V) are computed, as sampling needs no others."""
        mask = None
        if input_pos is None:
            if idx.size(1) > self.config.block_size:
                raise ValueError(f"sequence of {idx.size(1)} tokens exceeds the context of {self.config.block_size}")
        elif self.transformer.h[0].attn.kv_cache is not None:
            max_len = self.transformer.h[0].attn.kv_cache.k.size(2)
            mask = torch.arange(max_len, device=idx.device)[None, :] <= input_pos[:, None]
        x = self.embed(idx, input_pos)
        one_token = idx.size(1) == 1
        for block in self.transformer.h:
            x = (block.decode_step if one_token and block.decode_step else block)(x, input_pos, mask)
        if mask is not None:
            x = x[:, -1:]
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        return logits, loss

    def setup_kv_cache(self, batch: int, max_len: int | None = None) -> None:
        max_len = max_len or self.config.block_size
        head_dim = self.config.n_embd // self.config.n_head
        ref = self.transformer.wpe.weight  # always a float parameter, even with a quantized embedding
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch, self.config.n_head, max_len, head_dim, ref.dtype, ref.device)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    @torch.inference_mode()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        cuda_graph: bool = True,
    ) -> torch.Tensor:
        """The prompt `idx` (B, T), cropped to the context, followed by `max_new_tokens` sampled tokens."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, seed, cuda_graph))
        return torch.cat([idx[:, -self.config.block_size :], *new], dim=1)

    @torch.inference_mode()
    def generate_stream(
        self,
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
        sampler = Sampler(idx.size(0), self.config.vocab_size, idx.device, temperature, top_k, top_p, seed)
        block = self.config.block_size
        recent = idx[:, -block:]
        self.setup_kv_cache(idx.size(0))
        try:
            logits, _ = self(recent, input_pos=torch.arange(recent.size(1), device=idx.device))
            next_tok = sampler(logits[:, -1, :])
            pos = recent.size(1)
            use_graph = cuda_graph and idx.is_cuda and max_new_tokens > 1
            step = CUDAGraphStep(self, idx.size(0), sampler) if use_graph else None
            for i in range(max_new_tokens):
                yield next_tok
                if i == max_new_tokens - 1:
                    break
                recent = torch.cat([recent, next_tok], dim=1)[:, -block:]
                if pos >= block:  # context full: refill the cache from the recent half-window
                    window = recent[:, -(block // 2) :]
                    logits, _ = self(window, input_pos=torch.arange(window.size(1), device=idx.device))
                    pos = window.size(1)
                    next_tok = sampler(logits[:, -1, :])
                elif step is not None:
                    next_tok = step.next_token(next_tok, pos)
                    pos += 1
                else:
                    logits, _ = self(next_tok, input_pos=torch.tensor([pos], device=idx.device))
                    pos += 1
                    next_tok = sampler(logits[:, -1, :])
        finally:
            self.clear_kv_cache()


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
