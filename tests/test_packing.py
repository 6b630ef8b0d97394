import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.errors import NumericRangeError, ShapeError
from kakeyaturbo.packing import index_bits, narrow, pack_bits, packed_nbytes, unpack_bits


def test_lsb_first_known_value():
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [0b00111001]


@given(st.integers(1, 16).flatmap(lambda b: st.tuples(st.just(b), st.lists(st.integers(0, 2**b - 1), max_size=200))))
def test_pack_unpack_roundtrip(case):
    bits, values = case
    codes = torch.tensor(values, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(len(values), bits)
    assert unpack_bits(packed, bits, len(values)).tolist() == values


def test_unpack_too_short_raises():
    with pytest.raises(ShapeError, match="need 2 bytes"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 5)


def test_index_bits():
    assert [index_bits(k) for k in (1, 2, 3, 4, 16, 17)] == [1, 1, 2, 2, 4, 5]


def test_narrow_raises_with_position():
    x = torch.tensor([[1.0, 2.0], [7e4, 3.0]])
    with pytest.raises(NumericRangeError, match=r"mean: value 70000 at index \(1, 0\).*float32"):
        narrow(x, torch.float16, "mean")
    assert narrow(x, torch.float32, "mean").dtype == torch.float32
    assert torch.isfinite(narrow(x.clamp(max=6e4), torch.float16, "mean")).all()
