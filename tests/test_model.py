import pytest
import torch

from nanogptq.model import GPT, GPTConfig, Sampler, preset_config


def small_model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, **kw)).eval()


@pytest.mark.parametrize("name,millions", [("tiny", 0.8), ("small", 2.7), ("shakespeare", 10.7)])
def test_preset_sizes(name, millions):
    n = GPT(preset_config(name, 65)).num_params(non_embedding=False)
    assert abs(n / 1e6 - millions) / millions < 0.05


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset_config("huge", 65)


def test_tied_embeddings():
    m = small_model()
    assert m.lm_head.weight is m.transformer.wte.weight


def test_kv_cache_matches_full_forward():
    m = small_model()
    idx = torch.randint(0, 50, (2, 20))
    full, _ = m(idx)
    m.setup_kv_cache(2)
    parts = [m(idx[:, :7], input_pos=torch.arange(7))[0]]  # a decoding step: the last position's logits
    parts += [m(idx[:, t : t + 1], input_pos=torch.tensor([t]))[0] for t in range(7, 20)]
    m.clear_kv_cache()
    torch.testing.assert_close(torch.cat(parts, 1), full[:, 6:], atol=1e-5, rtol=1e-5)


def test_greedy_generate_equals_recomputing_the_prefix():
    m = small_model()
    idx = torch.randint(0, 50, (1, 5))
    out = m.generate(idx, 60, temperature=0)  # 65 tokens: the window slides past the 32 context
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
    a = m.generate(idx, 10, top_k=5, top_p=0.9, seed=3)
    b = m.generate(idx, 10, top_k=5, top_p=0.9, seed=3)
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


def test_context_overflow_is_an_error():
    m = small_model()
    with pytest.raises(ValueError, match="exceeds the context"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_compiled_blocks_generate_the_same_tokens():
    """`sample --compile` / `demo --compile`: regional compilation changes speed, not the tokens."""
    from nanogptq.model import compile_blocks

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    prompt = torch.randint(0, 32, (1, 5))
    eager = [model.generate(prompt[:, :n], 30, temperature=0.0) for n in (5, 3)]
    compile_blocks(model)
    # compiled at load: other prompt lengths and the full-context refill (30 tokens > 16) reuse those graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert all(torch.equal(model.generate(prompt[:, :n], 30, temperature=0.0), e)
                   for n, e in zip((5, 3), eager, strict=True))
