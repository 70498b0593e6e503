"""StrictConfig (nanogptq/config.py) through every config it is the base of: unknown keys and newer versions
refused with a message naming them, a to_dict/from_dict round trip, and older versions upgraded."""

import json
from dataclasses import fields

import pytest

from nanogptq.config import StrictConfig
from nanogptq.model import GPTConfig
from nanogptq.quant.config import QuantConfig
from nanogptq.quant.qat import QATConfig
from nanogptq.sample import SampleSettings

# each config with values other than its defaults, so that a round trip that fell back to a default shows
CONFIGS = [
    GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1, bias=True),
    QuantConfig(method="gptq", bits=3, group_size=24, act_order=True, damp=0.05, lazy_batch=32, calib_samples=8,
                rotate=True, rotate_seed=5, tune_steps=50, layers=("attn.c_attn", "mlp.c_fc")),
    QATConfig(layers=("mlp.c_fc",), act_bits=4, norm="layer", attn_act="int8", head_act_bits=8,
              act_scale="absmean", weight_scale="channel", eps=1e-4),
    SampleSettings(max_new_tokens=17, temperature=0.0, top_k=None, top_p=0.9, seed=None),
]
IDS = [type(c).__name__ for c in CONFIGS]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_round_trip_through_json_with_a_version(cfg):
    assert isinstance(cfg, StrictConfig)
    d = cfg.to_dict()
    assert d["version"] == type(cfg).VERSION
    assert {k for k in d if k != "version"} == {f.name for f in fields(cfg)}
    back = type(cfg).from_dict(json.loads(json.dumps(d)))
    assert back == cfg and back.to_dict() == d
    assert type(cfg).from_dict({}) == type(cfg)()  # every field has a default; no version means version 1


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_unknown_key_is_refused_naming_it_and_the_source(cfg):
    d = {**cfg.to_dict(), "n_layerz": 3}
    with pytest.raises(ValueError, match=r"^my config\.json: unknown key 'n_layerz' \(known: ") as e:
        type(cfg).from_dict(d, source="my config.json")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=rf"^{type(cfg).__name__} entry: unknown key 'n_layerz'"):
        type(cfg).from_dict(d)  # without a source, the class names it


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_a_newer_version_is_refused(cfg):
    cls = type(cfg)
    newer = cls.VERSION + 1
    with pytest.raises(ValueError, match=rf"^src: version {newer}; this nanogptq reads {cls.__name__} version "
                                         rf"{cls.VERSION} or older$"):
        cls.from_dict({**cfg.to_dict(), "version": newer}, source="src")
    for bad in (0, "2", True, None):  # not a version at all
        with pytest.raises(ValueError, match=r"^src: version "):
            cls.from_dict({"version": bad}, source="src")


@pytest.mark.parametrize("cls", [type(c) for c in CONFIGS], ids=IDS)
def test_not_an_object_is_refused(cls):
    with pytest.raises(ValueError, match=r"^src: expected a JSON object, got list$"):
        cls.from_dict([1, 2], source="src")


def test_a_rejected_value_names_the_source_and_the_field():
    with pytest.raises(ValueError, match=r"^checkpoint quantization entry: quantization bits must be one of"):
        QuantConfig.from_dict({"bits": 5}, source="checkpoint quantization entry")
    with pytest.raises(ValueError, match=r"^src: tune_steps must be 0 \(off\) or a number of steps, got -1$"):
        QuantConfig.from_dict({"tune_steps": -1}, source="src")
    with pytest.raises(ValueError, match=r"^SampleSettings entry: temperature must be between 0 and 5, got 9"):
        SampleSettings.from_dict({"temperature": 9})
    with pytest.raises(ValueError, match="temperature must be between 0 and 5"):  # validated on construction too
        SampleSettings(temperature=9)


def test_quant_config_version_1_block_size_is_the_lazy_batch():
    """QuantConfig version 1 named the GPTQ lazy batch `block_size` (the name GPTConfig gives the context)."""
    assert QuantConfig.VERSION == 2
    for d in ({"block_size": 32, "version": 1}, {"block_size": 32}):  # files from before the version key too
        cfg = QuantConfig.from_dict({**d, "bits": 3})
        assert cfg.lazy_batch == 32 and cfg.bits == 3
        assert "block_size" not in cfg.to_dict() and cfg.to_dict()["lazy_batch"] == 32
    assert QuantConfig.from_dict({"lazy_batch": 16, "version": 1}).lazy_batch == 16
    with pytest.raises(ValueError, match="unknown key 'block_size'"):  # version 2 has no such key
        QuantConfig.from_dict({"block_size": 32, "version": 2})
