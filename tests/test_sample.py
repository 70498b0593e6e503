"""Streaming text: TextStream against the tokenizers' own decode."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanogptq.data import EOT, BPETokenizer, ByteTokenizer, CharTokenizer
from nanogptq.sample import TextStream

CHARS = CharTokenizer("\n !,.abcdeé€")
BPE = BPETokenizer.train(("naïve café — ünïcödé 日本語 text, " * 40 + EOT + "\n") * 5, 300)


@pytest.mark.parametrize("tokenizer", [CHARS, ByteTokenizer(), BPE], ids=["char", "byte", "bpe"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_text_stream_equals_decoding_everything(tokenizer, data):
    """At every step, including ids that end inside a multi-byte character or are invalid UTF-8."""
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=40))
    stream = TextStream(tokenizer)
    for n, i in enumerate(ids, 1):
        assert stream.add(i) == tokenizer.decode(ids[:n])


def test_text_stream_keeps_whole_characters_only():
    stream = TextStream(ByteTokenizer())
    euro = list("€".encode())  # 3 bytes
    assert [stream.add(b) for b in euro] == ["\ufffd", "\ufffd", "€"]
    assert stream.start == 3 and stream.kept == "€"  # decoded once; later tokens decode alone
