"""Σ_q whitening: exact inverse, and plain MSE after whitening equals the query-weighted error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.errors import NonFiniteInputError, ShapeError
from kakeyaturbo.transforms.whitening import Whitening


def spd_whitening(n_kv: int, d: int, seed: int = 0) -> tuple[Whitening, torch.Tensor]:
    """A whitening from random SPD covariances ``Σ [n_kv, D, D]`` (float64 Cholesky), and Σ."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_kv, d, d, generator=g, dtype=torch.float64)
    sigma = a @ a.transpose(-1, -2) / d + 0.1 * torch.eye(d, dtype=torch.float64)
    L = torch.linalg.cholesky(sigma)
    return Whitening(L, torch.linalg.inv(L)), sigma


@given(n_kv=st.integers(1, 4), d=st.sampled_from([4, 16, 64]), t=st.integers(1, 20), batch=st.integers(1, 2),
       seed=st.integers(0, 1000))
def test_inverse_undoes_forward(n_kv, d, t, batch, seed):
    w, _ = spd_whitening(n_kv, d, seed)
    k = torch.randn(batch, n_kv, t, d, generator=torch.Generator().manual_seed(seed))
    back = w.inverse(w.forward(k))
    assert back.dtype == torch.float32 and back.shape == k.shape
    assert float((back - k).norm() / k.norm()) < 1e-5


def test_whitened_mse_is_query_weighted_error():
    w, sigma = spd_whitening(2, 16)
    e = torch.randn(1, 2, 5, 16)
    lhs = (w.forward(e).double() ** 2).sum(-1)
    rhs = torch.einsum("bhtd,hde,bhte->bht", e.double(), sigma, e.double())
    assert torch.allclose(lhs, rhs, rtol=1e-4)


def test_per_head_and_leading_dims():
    w, _ = spd_whitening(3, 8)
    k = torch.randn(2, 5, 3, 4, 8)
    out = w.forward(k)
    assert out.shape == k.shape
    assert torch.allclose(out[1, 2, 1], k[1, 2, 1] @ w.L[1], atol=1e-5)


def test_bad_inputs():
    w, _ = spd_whitening(2, 8)
    with pytest.raises(ShapeError, match="n_kv=2"):
        w.forward(torch.randn(1, 3, 4, 8))
    with pytest.raises(ShapeError, match="L must be"):
        Whitening(torch.eye(8), torch.eye(8))
    with pytest.raises(ShapeError, match="differ"):
        Whitening(torch.eye(8).expand(2, 8, 8), torch.eye(8).expand(3, 8, 8))
    bad = torch.eye(8).expand(2, 8, 8).clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match="L_inv"):
        Whitening(torch.eye(8).expand(2, 8, 8), bad)
    assert w.nbytes == 2 * 2 * 8 * 8 * 4
