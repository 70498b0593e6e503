"""A GPT-2 style decoder (nanoGPT's shape): the math of the transformer, and a static KV cache.

The linear layers keep nanoGPT's names (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`) so that
quantizers can find and replace them (quant/), and the runtime can swap in modules that run the same math
on its kernels (runtime/); the model itself knows nothing of how weights are stored or run, nor of sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogptq.config import StrictConfig


@dataclass
class GPTConfig(StrictConfig):
    vocab_size: int = 65
    block_size: int = 128  # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in every linear and LayerNorm (GPT-2 has them; nanoGPT trains without)
    activation: str = "gelu"  # the MLP's: "gelu" (exact, erf) or "gelu_tanh" (GPT-2's tanh approximation)
    ln_eps: float = 1e-5  # every LayerNorm's epsilon

    def validate(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if not self.ln_eps > 0:
            raise ValueError(f"ln_eps must be positive, got {self.ln_eps}")


ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # name -> nn.GELU's `approximate`


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
    so a step writes both with one copy (and a fused decode attention can write them as it attends).
    """

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (2, batch, n_head, max_len, head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def k(self) -> torch.Tensor:
        return self.kv[0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[1]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.kv.index_copy_(3, input_pos, torch.stack((k, v)).to(self.kv.dtype))
        return self.kv[0], self.kv[1]


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

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.resid_dropout(self.c_proj(self.attend(self.c_attn(x), input_pos, mask)))

    def attend(self, qkv: torch.Tensor, input_pos: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention over c_attn's outputs (B, T, 3C) -> (B, T, C), writing the cache first if there is one:
        y = softmax(q k^T / sqrt(D) + causal mask) v per head, by PyTorch's fused kernel."""
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
        # a module, so that a kernel with a GELU epilogue can take it over (runtime.fusion)
        self.act = nn.GELU(approximate=ACTIVATIONS[config.activation])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None):
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
                ln_f=nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias),
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

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of the last block's output."""
        return self.lm_head(self.transformer.ln_f(x))

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
        for block in self.transformer.h:
            x = block(x, input_pos, mask)
        if mask is not None:
            x = x[:, -1:]
        logits = self.head(x)
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
