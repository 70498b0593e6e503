"""Tests for nanogptq.data. Real-data tests run only when NANOGPTQ_DATA_DIR is set."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from nanogptq import data
from nanogptq.data import (
    CHUNK_CHARS,
    EOT,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    DataError,
    DatasetSource,
    build_tokenizer,
    download,
    get_batch,
    load_text,
    prepare_data,
    resolve_text_path,
    split_text,
    tokenizer_from_dict,
    val_windows,
)

SAMPLE = "First Citizen:\nBefore we proceed, hear me speak.\n\nAll: Speak! héllo 世界 🙂\n" + EOT + "\n"
DATA_DIR = os.environ.get("NANOGPTQ_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="NANOGPTQ_DATA_DIR is not set")


def synthetic_text(n_chars: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "\n", "Once", "upon", "time"]
    out = " ".join(rng.choice(words, size=n_chars // 3))
    return out[:n_chars]


# ----------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_tokenizer_round_trip_and_serialisation(kind):
    train = SAMPLE * 20 + synthetic_text(5000)
    tok = build_tokenizer(kind, train, vocab_size=300)
    ids = tok.encode(SAMPLE)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == SAMPLE
    d = json.loads(json.dumps(tok.to_dict()))  # must survive a config.json
    tok2 = tokenizer_from_dict(d)
    assert type(tok2) is type(tok)
    assert tok2.vocab_size == tok.vocab_size
    assert tok2.encode(SAMPLE) == ids
    assert tok2.decode(ids) == SAMPLE


def test_char_tokenizer_vocab_and_unknown_chars():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw"
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.unknown_chars("hello, Zoë") == [",", "Z", "ë"]
    with pytest.raises(DataError, match="'Z'") as e:
        tok.encode("hello Zed")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError):
        tok.decode([tok.vocab_size])


def test_byte_tokenizer_decodes_broken_utf8_with_replacement():
    tok = ByteTokenizer()
    ids = tok.encode("é")
    assert ids == [0xC3, 0xA9]
    assert tok.decode(ids[:1]) == "\ufffd"


def test_bpe_is_deterministic_and_uses_vocab_size():
    text = synthetic_text(20_000, seed=1) + EOT + synthetic_text(20_000, seed=2)
    a, b = BPETokenizer.train(text, 300), BPETokenizer.train(text, 300)
    assert a.to_dict() == b.to_dict()
    assert a.vocab_size == 300
    assert len(a.encode(text)) < len(text.encode()) / 2  # merges were learned
    eot_ids = a.encode(EOT)
    assert len(eot_ids) == 1  # the special token stays one token


def test_bpe_piecewise_encoding_matches_whole_text():
    text = "x  \nHello\n\n  world\t\nfoo's bar\n" * 5000
    tok = BPETokenizer.train(text, 280)
    assert len(data._bpe_pieces(text, target=100)) > 10
    assert tok.encode(text) == tok._tok.encode(text).ids


def test_build_tokenizer_errors():
    with pytest.raises(DataError, match="unknown tokenizer kind 'wordpiece'"):
        build_tokenizer("wordpiece", "abc")
    with pytest.raises(DataError, match="at least 257"):
        build_tokenizer("bpe", "abc", vocab_size=100)
    with pytest.raises(DataError):
        tokenizer_from_dict({"kind": "nope"})


# ----------------------------------------------------------------------------- split


def reassemble(text: str, train: str, val: str) -> list[bool]:
    """Walk the text chunk by chunk, taking each from train or val in order; return is_val per chunk."""
    is_val, ti, vi = [], 0, 0
    for start in range(0, len(text), CHUNK_CHARS):
        chunk = text[start : start + CHUNK_CHARS]
        if train[ti : ti + len(chunk)] == chunk:
            is_val.append(False)
            ti += len(chunk)
        else:
            assert val[vi : vi + len(chunk)] == chunk
            is_val.append(True)
            vi += len(chunk)
    assert (ti, vi) == (len(train), len(val))
    return is_val


def test_split_is_seeded_disjoint_and_covering():
    text = "".join(chr(ord("a") + i % 26) * CHUNK_CHARS for i in range(40))  # chunks distinguishable
    train, val = split_text(text, 0.1, seed=1337)
    assert (train, val) == split_text(text, 0.1, seed=1337)
    assert len(train) + len(val) == len(text)
    is_val = reassemble(text, train, val)
    assert sum(is_val) == 4
    assert is_val != [False] * 36 + [True] * 4  # not simply the tail
    other = reassemble(text, *split_text(text, 0.1, seed=7))
    assert other != is_val


def test_split_small_text_uses_tail_and_validates():
    text = "abcdefghij" * 10
    train, val = split_text(text, 0.1)
    assert (train, val) == (text[:90], text[90:])
    assert split_text("ab", 0.1) == ("a", "b")
    with pytest.raises(DataError):
        split_text(text, 0.0)
    with pytest.raises(DataError):
        split_text("a", 0.1)


@pytest.mark.parametrize("seed", range(5))
def test_split_val_size_is_near_the_fraction(seed):
    text = "y" * (17 * CHUNK_CHARS + 1282)  # Tiny Shakespeare's shape: a short last chunk
    train, val = split_text(text, 0.1, seed)
    assert abs(len(val) - 0.1 * len(text)) <= CHUNK_CHARS / 2
    assert len(train) + len(val) == len(text)


def test_split_keeps_at_least_one_chunk_each_side():
    text = "x" * (CHUNK_CHARS * 2 + 5)
    for seed in range(10):
        train, val = split_text(text, 0.01, seed)
        assert len(val) >= 5 and len(train) >= CHUNK_CHARS
        train, val = split_text(text, 0.99, seed)
        assert len(train) >= 5 and len(val) >= CHUNK_CHARS


# ----------------------------------------------------------------------------- prepare_data


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_prepare_data_from_file_and_cache_reuse(tmp_path, monkeypatch, kind):
    text = synthetic_text(3 * CHUNK_CHARS, seed=3)
    src = tmp_path / "corpus.txt"
    src.write_text(text, encoding="utf-8")
    cache = tmp_path / "cache"
    td = prepare_data(f"file:{src}", tokenizer=kind, vocab_size=300, cache_dir=cache)
    assert td.train.dtype == np.uint16 and td.val.dtype == np.uint16
    train_text, val_text = split_text(text)
    assert td.tokenizer.decode(td.train.tolist()) == train_text
    assert td.tokenizer.decode(td.val.tolist()) == val_text
    folder = next((cache / "tokens").iterdir())
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["train_len"] == len(td.train) and meta["tokenizer"]["kind"] == kind
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_rebuild(*a, **k):
        raise AssertionError("cache was not reused")

    monkeypatch.setattr(data, "build_tokenizer", no_rebuild)
    td2 = prepare_data(f"file:{src}", tokenizer=kind, vocab_size=300, cache_dir=cache)
    assert np.array_equal(td2.train, td.train) and np.array_equal(td2.val, td.val)
    assert td2.tokenizer.to_dict() == td.tokenizer.to_dict()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    with pytest.raises(AssertionError, match="not reused"):  # another seed is another cache entry
        prepare_data(f"file:{src}", tokenizer=kind, vocab_size=300, cache_dir=cache, seed=1)


def test_prepare_data_rebuilds_truncated_cache(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(synthetic_text(2000), encoding="utf-8")
    expected = np.array(prepare_data(f"file:{src}", cache_dir=tmp_path).train)  # a copy, not the memmap
    folder = next((tmp_path / "tokens").iterdir())
    (folder / "train.bin").unlink()
    (folder / "train.bin").write_bytes(b"\x00\x00")
    assert np.array_equal(prepare_data(f"file:{src}", cache_dir=tmp_path).train, expected)


def test_prepare_data_char_rejects_val_only_characters(tmp_path):
    text = "ab" * 60 + "Z" * 10  # the tail is validation for a text shorter than two chunks
    src = tmp_path / "corpus.txt"
    src.write_text(text)
    with pytest.raises(DataError, match="never seen in training.*'Z'"):
        prepare_data(f"file:{src}", cache_dir=tmp_path)
    assert prepare_data(f"file:{src}", tokenizer="byte", cache_dir=tmp_path).val.tolist() == list(
        b"babZZZZZZZZZZ"
    )


# ----------------------------------------------------------------------------- batching


def test_get_batch_shapes_and_shift():
    arr = np.arange(1000, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(arr, batch_size=8, block_size=16, generator=g)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # arange data: the target is the next token
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # windows are contiguous
    x2, _ = get_batch(arr, 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    x_last, y_last = get_batch(np.arange(17, dtype=np.uint16), 4, 16, g)  # only one window fits
    assert x_last[0, 0] == 0 and y_last[0, -1] == 16
    with pytest.raises(DataError):
        get_batch(np.arange(16, dtype=np.uint16), 4, 16, g)


@pytest.mark.parametrize("n", [2, 17, 33, 100])
def test_val_windows_cover_all_targets(n):
    arr = np.arange(n, dtype=np.uint16)
    windows = list(val_windows(arr, block_size=16))
    targets = torch.cat([y[0] for _, y in windows])
    assert torch.equal(targets, torch.arange(1, n))
    assert all(x.shape[0] == 1 and x.shape == y.shape and x.shape[1] <= 16 for x, y in windows)
    assert all(torch.equal(y, x + 1) for x, y in windows)


# ----------------------------------------------------------------------------- errors


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match="unknown dataset 'wiki'.*shakespeare, tinystories, file:PATH"):
        load_text("wiki")


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="missing file"):
        load_text(f"file:{tmp_path / 'nope.txt'}")
    for folder in (f"file:{tmp_path}", "file:"):
        with pytest.raises(DataError, match="names a folder, not a text file"):
            load_text(folder)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty text file"):
        load_text(f"file:{tmp_path / 'empty.txt'}")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 ok")
    with pytest.raises(DataError, match="not UTF-8.*offset 3"):
        load_text(f"file:{tmp_path / 'latin1.txt'}")


def test_data_dir_missing_or_wrong_file(tmp_path):
    with pytest.raises(DataError, match="missing file.*tinyshakespeare/input.txt"):
        load_text("shakespeare", data_dir=tmp_path)
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("not shakespeare")
    with pytest.raises(DataError, match="expected 1,115,394"):
        load_text("shakespeare", data_dir=tmp_path)


# ----------------------------------------------------------------------------- download


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_sha256(server, tmp_path):
    root, base = server
    good = b"good text\n" * 1000
    sha = hashlib.sha256(good).hexdigest()
    (root / "good.txt").write_bytes(good)
    (root / "bad.txt").write_bytes(good[:-1] + b"X")
    out = tmp_path / "dl"
    assert download(f"{base}/good.txt", out / "good.txt", sha256=sha, size=len(good)).read_bytes() == good
    with pytest.raises(DataError, match=f"expected {sha}") as e:
        download(f"{base}/bad.txt", out / "bad.txt", sha256=sha, size=len(good))
    assert hashlib.sha256(good[:-1] + b"X").hexdigest() in str(e.value)
    with pytest.raises(DataError, match="failed"):
        download(f"{base}/missing.txt", out / "missing.txt")
    assert sorted(p.name for p in out.iterdir()) == ["good.txt"]  # no partial or corrupt files left


def test_resolve_falls_back_to_cache_then_download(server, tmp_path, monkeypatch):
    root, base = server
    text = b"To be, or not to be\n" * 50
    sha = hashlib.sha256(text).hexdigest()
    fake = DatasetSource("shakespeare", "tinyshakespeare/input.txt", "http://unused", sha, len(text))
    monkeypatch.setitem(data.DATASETS, "shakespeare", (fake,))
    monkeypatch.delenv("NANOGPTQ_DATA_DIR", raising=False)
    (root / "input.txt").write_bytes(text)
    urls = {"shakespeare": f"{base}/input.txt"}
    cache = tmp_path / "cache"
    path = resolve_text_path("shakespeare", cache_dir=cache, urls=urls)
    assert path == cache / "tinyshakespeare" / "input.txt" and path.read_bytes() == text
    (root / "input.txt").unlink()  # now only the cache can answer
    assert load_text("shakespeare", cache_dir=cache, urls=urls) == text.decode()
    path.write_bytes(b"corrupted")  # a bad cached copy is replaced by a fresh download
    (root / "input.txt").write_bytes(text)
    assert resolve_text_path("shakespeare", cache_dir=cache, urls=urls).read_bytes() == text
    (root / "input.txt").write_bytes(b"wrong")
    path.unlink()
    with pytest.raises(DataError, match="corrupt"):
        resolve_text_path("shakespeare", cache_dir=cache, urls=urls)
    assert not path.exists()


# ----------------------------------------------------------------------------- real data


@needs_data
def test_real_shakespeare():
    path = resolve_text_path("shakespeare")
    raw = path.read_bytes()
    assert len(raw) == 1_115_394
    assert hashlib.sha256(raw).hexdigest() == data.DATASETS["shakespeare"][0].sha256
    text = load_text("shakespeare")
    assert len(set(text)) == 65
    assert CharTokenizer.from_text(text).vocab_size == 65


@needs_data
def test_real_shakespeare_download_from_local_server(server, tmp_path, monkeypatch):
    root, base = server
    (root / "input.txt").write_bytes((Path(DATA_DIR) / "tinyshakespeare" / "input.txt").read_bytes())
    monkeypatch.delenv("NANOGPTQ_DATA_DIR")
    text = load_text("shakespeare", cache_dir=tmp_path, urls={"shakespeare": f"{base}/input.txt"})
    assert len(text) == 1_115_394


@needs_data
def test_real_tinystories(tmp_path):
    text = load_text("tinystories")
    assert len(text.encode()) == 6_484_689
    assert text.count(EOT) == 7705
    td = prepare_data("tinystories", tokenizer="char", cache_dir=tmp_path)
    assert len(td.train) + len(td.val) == len(text)
    assert td.tokenizer.decode(td.val[:200].tolist()) in text
