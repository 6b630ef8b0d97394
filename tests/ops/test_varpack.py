import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.errors import NumericRangeError, ShapeError
from kakeyaturbo.ops.varpack import pack_varwidth, unpack_varwidth, varwidth_nbytes
from kakeyaturbo.packing import pack_bits


def _codes(widths: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = widths if widths.dim() == 1 else widths.reshape(shape[0], *([1] * (len(shape) - 2)), shape[-1])
    return (torch.rand(shape, generator=g) * (1 << w.expand(shape)).double()).long()


@given(s=st.integers(1, 3), mid=st.lists(st.integers(1, 5), max_size=2), d=st.integers(1, 9),
       per_stream=st.booleans(), seed=st.integers(0, 2**31))
def test_roundtrip(s, mid, d, per_stream, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (s, *mid, d)
    widths = torch.randint(0, 9, (s, d) if per_stream else (d,), generator=g)
    codes = _codes(widths, shape, seed)
    packed = pack_varwidth(codes, widths)
    assert packed.dtype == torch.uint8 and packed.numel() == varwidth_nbytes(widths, shape)
    n_vec = codes.numel() // d
    total = int(widths.sum()) * (n_vec // s if per_stream else n_vec)
    assert packed.numel() == (total + 7) // 8
    assert torch.equal(unpack_varwidth(packed, widths, shape), codes)


@given(bits=st.integers(1, 8), n=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_equal_widths_match_pack_bits(bits, n, seed):
    widths = torch.full((5,), bits)
    codes = _codes(widths, (n, 5), seed)
    assert torch.equal(pack_varwidth(codes, widths), pack_bits(codes, bits))


def test_lsb_first_layout():
    # widths 3, 0, 5: code 0b101 then 0b10011 -> bits 1,0,1, 1,1,0,0,1 -> byte 0b10011101
    packed = pack_varwidth(torch.tensor([[5, 0, 19]]), torch.tensor([3, 0, 5]))
    assert packed.tolist() == [0b10011101]


def test_errors_are_named():
    with pytest.raises(NumericRangeError, match="does not fit width"):
        pack_varwidth(torch.tensor([[4, 0]]), torch.tensor([2, 1]))
    with pytest.raises(NumericRangeError, match="does not fit width 0"):
        pack_varwidth(torch.tensor([[1, 1]]), torch.tensor([0, 1]))
    with pytest.raises(NumericRangeError, match="0..8"):
        pack_varwidth(torch.tensor([[1]]), torch.tensor([9]))
    with pytest.raises(ShapeError, match="do not fit"):
        pack_varwidth(torch.zeros(2, 3, dtype=torch.long), torch.tensor([1, 2]))
    with pytest.raises(ShapeError, match="need 1 bytes"):
        unpack_varwidth(torch.zeros(0, dtype=torch.uint8), torch.tensor([3]), (1, 1))
