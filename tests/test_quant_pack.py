"""Bit packing round trips and byte layout."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanogptq.quant.pack import pack, packed_len, unpack


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

