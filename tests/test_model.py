import pytest
import torch

from nanogptq.model import GPT, GPTConfig, preset_config


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


def test_context_overflow_is_an_error():
    m = small_model()
    with pytest.raises(ValueError, match="exceeds the context"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_activation_and_layernorm_epsilon_are_config_fields():
    import torch.nn as nn

    model = GPT(GPTConfig(activation="gelu_tanh", ln_eps=1e-3, bias=True))
    assert model.transformer.h[0].mlp.act.approximate == "tanh"
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert GPT(GPTConfig()).transformer.h[0].mlp.act.approximate == "none"
    assert GPTConfig.from_dict({"n_layer": 2}).activation == "gelu"  # checkpoints written without the fields
    with pytest.raises(ValueError, match="activation"):
        GPTConfig(activation="relu")
