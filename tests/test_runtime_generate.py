"""Decoding (runtime/generate.py): the cached loop against recomputing the prefix, the sampler, compilation."""

import torch

from nanogptq.model import GPT, GPTConfig
from nanogptq.runtime.generate import Sampler, compile_blocks, generate


def small_model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, **kw)).eval()


def test_greedy_generate_equals_recomputing_the_prefix():
    m = small_model()
    idx = torch.randint(0, 50, (1, 5))
    out = generate(m, idx, 60, temperature=0)  # 65 tokens: the window slides past the 32 context
    ref = idx
    for _ in range(60):
        logits, _ = m(ref[:, -32:])
        ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], 1)
    # up to the first slide the cached decoding is exact; after it both see a cropped context, the
    # cache a half-window refill, so compare the exact part
    assert torch.equal(out[:, : 32 + 1], ref[:, : 32 + 1])
    assert out.shape == (1, 65)


def test_generate_crops_long_prompts_and_is_seeded():
    m = small_model()
    idx = torch.randint(0, 50, (1, 100))
    a = generate(m, idx, 10, top_k=5, top_p=0.9, seed=3)
    b = generate(m, idx, 10, top_k=5, top_p=0.9, seed=3)
    assert a.shape == (1, 32 + 10)
    assert torch.equal(a, b)


def test_sampler_top_k_top_p_and_greedy():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    sampler = Sampler(1, 5, "cpu", 1.0, top_k=2, seed=0)
    picks = [int(sampler(logits)) for _ in range(200)]  # more than NOISE_STEPS: the noise is drawn anew
    assert set(picks) == {0, 1} and set(picks[Sampler.NOISE_STEPS:]) == {0, 1}
    # top token alone holds ~73% of the mass: top_p=0.5 keeps only it
    sampler = Sampler(1, 5, "cpu", 1.0, top_p=0.5, seed=0)
    assert {int(sampler(logits)) for _ in range(50)} == {0}
    assert int(Sampler(1, 5, "cpu", 0.0)(logits)) == 0


def test_sampler_draws_from_the_softmax():
    """The exponential race picks token i with probability softmax(logits / T)_i: 20,000 rows of the same
    logits, each step's frequencies within 4 standard deviations of it."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).repeat(20_000, 1)
    expected = (logits[0] / 0.7).softmax(-1)
    sampler = Sampler(20_000, 5, "cpu", temperature=0.7, seed=1)
    steps = [sampler(logits)[:, 0] for _ in range(3)]
    for tokens in steps:
        freq = torch.bincount(tokens, minlength=5).float() / 20_000
        assert (freq - expected).abs().max() < 0.015
    assert not torch.equal(steps[0], steps[1])  # each step reads its own noise
    again = Sampler(20_000, 5, "cpu", temperature=0.7, seed=1)
    assert torch.equal(again(logits)[:, 0], steps[0])  # seeded


def test_compiled_blocks_generate_the_same_tokens():
    """`sample --compile` / `demo --compile`: regional compilation changes speed, not the tokens."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    prompt = torch.randint(0, 32, (1, 5))
    eager = [generate(model, prompt[:, :n], 30, temperature=0.0) for n in (5, 3)]
    compile_blocks(model)
    # compiled at load: other prompt lengths and the full-context refill (30 tokens > 16) reuse those graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert all(torch.equal(generate(model, prompt[:, :n], 30, temperature=0.0), e)
                   for n, e in zip((5, 3), eager, strict=True))
