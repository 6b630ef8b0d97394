import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.calibration.metric import (
    cholesky_pair,
    gram,
    lag_metric,
    lag_weights,
    regularise,
    rope_matrices,
    whitening_hazard,
)
from kakeyaturbo.transforms.rope import Rope


def _spd(n_kv=2, d=8, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_kv, d, d, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, spread, d, dtype=torch.float64)
    return a @ torch.diag(scales) @ a.transpose(1, 2)


def test_gram_is_the_group_second_moment():
    q = torch.randn(2, 3, 50, 8)
    s = gram(q)
    ref = torch.einsum("hgtd,hgte->hde", q.double(), q.double()) / (3 * 50)
    assert torch.allclose(s, ref) and torch.allclose(s, s.transpose(1, 2))


@given(st.floats(2.0, 1e4), st.integers(0, 1000))
def test_condition_cap_is_respected(cap, seed):
    s = regularise(_spd(seed=seed, spread=6.0), 0.0, cap)
    ev = torch.linalg.eigvalsh(s)
    assert float((ev[:, -1] / ev[:, 0]).sqrt().max()) <= cap * (1 + 1e-6)


def test_cholesky_pair_whitens_the_metric():
    sigma = regularise(_spd(), 1e-3, None)
    chol, inv = cholesky_pair(sigma)
    assert torch.allclose(chol.double() @ chol.double().transpose(1, 2), sigma, rtol=1e-4, atol=1e-4)
    assert torch.allclose(chol @ inv, torch.eye(8).expand(2, 8, 8), atol=1e-4)
    e = torch.randn(2, 5, 8)  # rows: ||e L||^2 = e Σ e^T
    lhs = ((e @ chol) ** 2).sum(-1)
    rhs = torch.einsum("hti,hij,htj->ht", e.double(), sigma, e.double())
    assert torch.allclose(lhs.double(), rhs, rtol=1e-4)


class _Rotary(torch.nn.Module):
    def forward(self, x, position_ids):
        inv = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
        ang = position_ids[..., None].float() * inv
        emb = torch.cat([ang, ang], dim=-1)
        return emb.cos(), emb.sin()


def test_lag_metric_is_exact_logit_error_over_lags():
    rope = Rope(_Rotary())
    lags = torch.tensor([0, 3, 10])
    rot = rope_matrices(rope, lags, 8)
    assert torch.allclose(rot[0], torch.eye(8), atol=1e-6)
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(8).expand(3, 8, 8), atol=1e-5)
    sigma = _spd(n_kv=1)
    w = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    m = lag_metric(sigma, rot, w)
    # a query at position p+lag against a key error at p: (q R_{p+lag}) (e R_p)^T = q R_lag e^T
    q = torch.randn(4000, 8, dtype=torch.float64) @ torch.linalg.cholesky(sigma[0]).T
    e = torch.randn(8, dtype=torch.float64)
    emp = sum(float(w[0, i]) * float(((q @ rot[i].double() @ e) ** 2).mean()) for i in range(3))
    assert float(e @ m[0] @ e) == pytest.approx(emp, rel=0.1)


def test_lag_weights_sum_to_one():
    q, k = torch.randn(2, 3, 40, 8), torch.randn(2, 40, 8)
    lags, w = lag_weights(q, k, 6, 8**-0.5)
    assert lags[0] == 0 and torch.allclose(w.sum(-1), torch.ones(2, dtype=torch.float64))


def test_lag_weights_of_a_sliding_layer_stay_inside_its_window():
    q, k = torch.randn(2, 3, 40, 8), torch.randn(2, 40, 8)
    lags, full = lag_weights(q, k, 12, 8**-0.5)
    _, windowed = lag_weights(q, k, 12, 8**-0.5, window=5)
    beyond = lags >= 5  # each bin is labelled by its smallest lag
    assert bool(beyond.any()) and float(windowed[:, beyond].abs().max()) == 0.0
    assert float(full[:, beyond].min()) > 0 and torch.allclose(windowed.sum(-1), torch.ones(2, dtype=torch.float64))


def test_whitening_hazards_f16_overflow_and_condition():
    k = torch.randn(2, 30, 8)
    chol, _ = cholesky_pair(regularise(_spd(), 1e-3, None))
    assert whitening_hazard(k, chol, 1e6) is None
    assert "f16" in whitening_hazard(k * 1e4, chol, 1e6)  # the seed's sink layer: |k L| > 65504
    bad, _ = cholesky_pair(_spd(spread=12.0))
    assert "condition number" in whitening_hazard(k * 1e-3, bad, 10.0)
