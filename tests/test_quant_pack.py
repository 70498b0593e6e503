"""Bit packing round trips and byte layout."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanogptq.quant.pack import (
    from_interleaved,
    pack,
    packed_len,
    rows_per_word,
    to_interleaved,
    unpack,
)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    rows=st.integers(1, 5),
    n=st.integers(1, 70),
    seed=st.integers(0, 2**31),
)
def test_pack_round_trip(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_len(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits,n,nbytes", [(8, 5, 5), (4, 5, 3), (2, 5, 2), (3, 5, 3), (3, 8, 3), (3, 9, 6)])
def test_packed_len_pads_to_whole_units(bits, n, nbytes):
    assert packed_len(n, bits) == nbytes


def test_layout_is_little_endian_first_code_lowest():
    assert pack(torch.tensor([[1, 2]]), 4).tolist() == [[0x21]]
    assert pack(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    # 3 bits: codes 0..7 -> the 24-bit word sum(j << 3j), little-endian bytes
    word = sum(j << (3 * j) for j in range(8))
    assert pack(torch.arange(8)[None], 3).tolist() == [[word & 255, (word >> 8) & 255, word >> 16]]


def test_unpack_checks_length_and_bits():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 9)
    with pytest.raises(ValueError, match="2, 3, 4 or 8"):
        pack(torch.zeros(1, 3, dtype=torch.uint8), 5)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 13), n=st.integers(1, 300), tile=st.sampled_from([16, 32, 64, 128, 256]),
       bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**31))
def test_interleaved_layout_round_trip(rows, n, tile, bits, seed):
    rpw = rows_per_word(bits)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=gen).to(torch.uint8)
    w = to_interleaved(pack(codes, bits), n, tile, bits)
    tiles, words = -(-n // tile), -(-rows // rpw)
    assert w.shape == (words, tiles * tile // 2) and w.dtype == torch.int32
    # zero codes pad the columns to whole tiles and the rows to whole words
    padded = torch.nn.functional.pad(codes, (0, tiles * tile - n, 0, words * rpw - rows)).to(torch.int64)
    w64 = w.to(torch.int64) & 0xFFFFFFFF
    for r in range(rpw):  # code (row r of the word, column 2p + c) at bits 16 c + bits r
        for c in range(2):
            assert torch.equal((w64 >> (16 * c + bits * r)) & (2**bits - 1), padded[r::rpw, c::2])
    assert torch.equal(from_interleaved(w, n, bits, rows), codes)


def test_interleaved_layout_holds_4_or_8_bits():
    with pytest.raises(ValueError, match="4 or 8 bit"):
        rows_per_word(3)
