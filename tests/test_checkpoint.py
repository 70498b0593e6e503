import json

import pytest
import torch

from nanogptq.checkpoint import CheckpointError, load_checkpoint, load_resume_state, save_checkpoint
from nanogptq.data import CharTokenizer
from nanogptq.model import GPT, GPTConfig


def make(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=10, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg)
    meta = {"model": cfg.to_dict(), "tokenizer": CharTokenizer.from_text("abcdefghij").to_dict(),
            "metrics": {"val_loss": 1.0}}
    path = save_checkpoint(tmp_path / "ck", model, meta, resume_state={"step": 3, "t": torch.ones(2)})
    return model, path


def test_round_trip(tmp_path):
    model, path = make(tmp_path)
    ck = load_checkpoint(path)
    x = torch.randint(0, 10, (2, 8))
    torch.testing.assert_close(ck.model(x)[0], model.eval()(x)[0])
    assert ck.model.lm_head.weight is ck.model.transformer.wte.weight  # still tied after loading
    assert ck.tokenizer.decode(ck.tokenizer.encode("cab")) == "cab"
    assert load_resume_state(path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp folders left behind


def test_overwrite_is_atomic_swap(tmp_path):
    _, path = make(tmp_path)
    _, path = make(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_recovers_previous_after_kill_between_renames(tmp_path):
    _, path = make(tmp_path)
    path.rename(path.with_name("ck.old"))  # as if killed after the first rename of a swap
    assert load_checkpoint(path).meta["metrics"]["val_loss"] == 1.0


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nope")


def test_truncated_weights(tmp_path):
    _, path = make(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable or truncated"):
        load_checkpoint(path)


def test_wrong_version(tmp_path):
    _, path = make(tmp_path)
    meta = json.loads((path / "config.json").read_text())
    meta["format_version"] = 99
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


def test_truncated_config(tmp_path):
    _, path = make(tmp_path)
    text = (path / "config.json").read_text()
    (path / "config.json").write_text(text[:40])
    with pytest.raises(CheckpointError, match="config.json: corrupt or truncated"):
        load_checkpoint(path)


def test_resume_state_is_not_unpickled(tmp_path):
    _, path = make(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path / "resume.pt")
    with pytest.raises(CheckpointError, match="resume.pt: unreadable"):
        load_resume_state(path)
