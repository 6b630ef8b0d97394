import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.errors import ShapeError
from kakeyaturbo.ops.hadamard import next_pow2, random_signs, rotate, unrotate, wht


@given(st.integers(0, 8), st.integers(0, 2**31))
def test_wht_twice_is_w_identity(log_w, seed):
    w = 2**log_w
    x = torch.randn(3, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.allclose(wht(wht(x)), w * x, atol=1e-9)
    assert torch.allclose((wht(x) ** 2).sum(-1), w * (x**2).sum(-1))


@given(st.integers(0, 8), st.integers(0, 2**31))
def test_rotation_is_orthonormal_and_invertible(log_w, seed):
    w = 2**log_w
    s = random_signs(w, seed)
    x = torch.randn(5, w, dtype=torch.float64)
    y = rotate(x, s.double())
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    assert torch.allclose(unrotate(y, s.double()), x, atol=1e-12)


def test_signs_deterministic_and_pm1():
    a, b = random_signs(64, 7), random_signs(64, 7)
    assert torch.equal(a, b) and set(a.tolist()) == {-1.0, 1.0}
    assert not torch.equal(a, random_signs(64, 8))


def test_next_pow2_and_bad_length():
    assert [next_pow2(n) for n in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 4, 64, 128]
    with pytest.raises(ShapeError, match="power of two"):
        wht(torch.zeros(2, 6))
