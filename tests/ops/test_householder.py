import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kakeyaturbo.errors import NumericRangeError, ShapeError
from kakeyaturbo.ops.householder import (
    dequantize_orthogonal,
    quantize_orthogonal,
    reflector_codes,
    reflector_matrix,
    reflectors_nbytes,
)


def _orthogonal(s: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(s, d, d, generator=g, dtype=torch.float64))[0]


def _widths(s: int, d: int, seed: int) -> torch.Tensor:
    """Random widths in 2..8 with a random suffix of zeros per stream."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(2, 9, (s, d), generator=g)
    stored = torch.randint(0, d + 1, (s, 1), generator=g)
    return torch.where(torch.arange(d) < stored, w, 0)


@settings(max_examples=40, deadline=None)
@given(s=st.integers(1, 3), d=st.integers(1, 24), seed=st.integers(0, 2**31))
def test_decoded_matrix_is_orthogonal_and_sized(s, d, seed):
    w = _widths(s, d, seed)
    packed, scale = quantize_orthogonal(_orthogonal(s, d, seed), w)
    assert packed.dtype == torch.uint8 and packed.numel() == reflectors_nbytes(w)
    assert scale.dtype == torch.float16 and tuple(scale.shape) == (s, d)
    lower = torch.tril(torch.ones(d, d), -1).sum(0)  # entries below the diagonal, per reflector
    assert packed.numel() == (int((w * lower).sum()) + 7) // 8
    q = dequantize_orthogonal(packed, scale, w)
    assert torch.allclose(q.transpose(1, 2) @ q, torch.eye(d, dtype=torch.float64).expand(s, d, d), atol=1e-12)
    codes, same = reflector_codes(_orthogonal(s, d, seed), w)  # the unpacked stages give the same matrix
    assert torch.equal(same, scale) and torch.equal(reflector_matrix(codes, scale, w), q)


@pytest.mark.parametrize("bits, worst", [(8, 0.99), (6, 0.95)])
def test_stored_columns_match_up_to_sign(bits, worst):
    q = _orthogonal(2, 48, 0)
    w = torch.full((2, 48), bits)
    w[1, 30:] = 0  # only the first 30 reflectors of stream 1 are stored
    r = dequantize_orthogonal(*quantize_orthogonal(q, w), w)
    cos = (r * q).sum(1).abs()  # [S, D]
    assert float(cos[0].min()) > worst and float(cos[1, :30].min()) > worst


def test_bad_widths_raise():
    q = _orthogonal(1, 8, 0)
    with pytest.raises(NumericRangeError, match="only a suffix"):
        quantize_orthogonal(q, torch.tensor([[4, 0, 4, 4, 4, 4, 4, 4]]))
    with pytest.raises(NumericRangeError, match="0 or 2..8"):
        quantize_orthogonal(q, torch.full((1, 8), 1))
    with pytest.raises(NumericRangeError, match="0 or 2..8"):
        reflectors_nbytes(torch.full((1, 8), 9))
    with pytest.raises(ShapeError, match="integer tensor"):
        reflectors_nbytes(torch.full((1, 8), 4.0))
    with pytest.raises(ShapeError, match=r"\[S, D, D\]"):
        quantize_orthogonal(q, torch.full((1, 7), 4))
