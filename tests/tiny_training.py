"""A few optimizer steps on a token sequence: trained weights for tests that compare runtimes (random weights give
flat logits, whose top-1 token is decided by noise)."""

import torch

from nanogptq.model import GPT


def train_briefly(model: GPT, tokens: torch.Tensor, steps: int) -> GPT:
    """`steps` AdamW steps on random windows of `tokens` (seeded); returns the model in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    T = model.config.block_size
    for _ in range(steps):
        win = tokens[torch.randint(len(tokens) - T - 1, (8,), generator=g)[:, None] + torch.arange(T + 1)]
        _, loss = model(win[:, :-1], win[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
