import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.errors import ShapeError
from kakeyaturbo.ops.pca import exact_pca, gaussian_sketch, randomized_pca, select_rank, weighted_mean
from tests.conftest import lowrank


def _proj(basis: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the row space of ``basis [G, r, D]``."""
    return basis.transpose(1, 2) @ basis


def test_full_rank_exact_pca_reconstructs_to_f16_precision():
    x = lowrank(3, 200, 24, rank=24, noise=0.1)
    w = torch.ones(3, 200)
    fit = exact_pca(x, w, 1.0)
    assert fit.d_eff.tolist() == [24, 24, 24]
    mean, basis = fit.mean.half().float(), fit.basis.half().float()
    x_hat = mean.unsqueeze(1) + ((x - mean.unsqueeze(1)) @ basis.transpose(1, 2)) @ basis
    rel = (x_hat - x).norm() / x.norm()
    assert rel < 2e-3
    assert torch.allclose(basis @ basis.transpose(1, 2), torch.eye(24).expand(3, 24, 24), atol=2e-3)
    assert bool((fit.eigvals[:, :-1] >= fit.eigvals[:, 1:]).all())


def test_weighted_mean_and_pca_ignore_zero_weight_rows():
    x = lowrank(1, 50, 8, rank=3)
    junk = torch.cat([x, 1e3 * torch.randn(1, 10, 8)], 1)
    w = torch.cat([torch.ones(1, 50), torch.zeros(1, 10)], 1)
    assert torch.allclose(weighted_mean(junk, w), x.mean(1), atol=1e-5)
    a, b = exact_pca(x, torch.ones(1, 50), 0.9), exact_pca(junk, w, 0.9)
    assert a.d_eff.tolist() == b.d_eff.tolist()
    assert torch.allclose(_proj(a.basis[:, :3]), _proj(b.basis[:, :3]), atol=1e-4)


def test_rank_cap_and_degenerate_block():
    x = lowrank(2, 64, 16, rank=16, noise=0.5)
    assert exact_pca(x, torch.ones(2, 64), 1.0, rank_cap=5).d_eff.tolist() == [5, 5]
    const = torch.full((1, 20, 16), 3.0)
    assert exact_pca(const, torch.ones(1, 20), 0.95).d_eff.tolist() == [1]


@given(st.lists(st.floats(0, 100), min_size=1, max_size=12), st.floats(0.01, 1.0))
def test_select_rank_is_first_prefix_reaching_the_ratio(vals, ratio):
    lam = torch.tensor(sorted(vals, reverse=True), dtype=torch.float32).unsqueeze(0)
    d = int(select_rank(lam, ratio, torch.zeros(1)))
    total = float(lam.sum())
    if total == 0:
        assert d == 1
        return
    cum = lam.cumsum(-1)[0]
    assert 1 <= d <= lam.shape[1]
    reached = [i + 1 for i in range(lam.shape[1]) if float(cum[i]) >= ratio * float(lam.sum())]
    assert d == (reached[0] if reached else lam.shape[1])


def test_randomized_matches_exact_subspace_on_low_rank_data():
    x = lowrank(4, 300, 64, rank=6, noise=1e-3)
    w = torch.ones(4, 300)
    ex = exact_pca(x, w, 0.999)
    rs = randomized_pca(x, w, 0.999, target_rank=16, oversample=8, power_iters=2, seed=7)
    assert rs.d_eff.tolist() == ex.d_eff.tolist()
    diff = (_proj(ex.basis[:, :6]) - _proj(rs.basis[:, :6])).norm(dim=(1, 2))
    assert float(diff.max()) < 1e-3
    assert torch.allclose(rs.eigvals[:, :6], ex.eigvals[:, :6], rtol=1e-3)


def test_randomized_full_ratio_keeps_exactly_the_target_rank():
    x = lowrank(2, 128, 32, rank=32, noise=0.1)
    rs = randomized_pca(x, torch.ones(2, 128), 1.0, target_rank=12, oversample=8, power_iters=2, seed=1)
    assert rs.d_eff.tolist() == [12, 12]
    assert rs.basis.shape == (2, 20, 32)


def test_qr_reorthogonalisation_keeps_an_ill_conditioned_block_finite():
    g = torch.Generator().manual_seed(3)
    d, n = 32, 256
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    sv = torch.logspace(4, 0, d)  # singular-value ratio 1e4
    x = (u * sv @ v.T).unsqueeze(0)
    rs = randomized_pca(x, torch.ones(1, n), 0.95, target_rank=16, oversample=8, power_iters=12, seed=5)
    assert torch.isfinite(rs.basis).all() and torch.isfinite(rs.eigvals).all()
    gram = rs.basis[0] @ rs.basis[0].T
    assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-4)
    assert float((rs.basis[0, 0] @ v[:, 0]).abs()) > 0.999


def test_sketch_is_seed_deterministic():
    assert torch.equal(gaussian_sketch(10, 4, 99, "cpu"), gaussian_sketch(10, 4, 99, "cpu"))
    assert not torch.equal(gaussian_sketch(10, 4, 99, "cpu"), gaussian_sketch(10, 4, 98, "cpu"))


def test_bad_shapes_raise():
    with pytest.raises(ShapeError, match="x \\[G, n, D\\]"):
        exact_pca(torch.zeros(4, 8), torch.ones(4), 0.9)
    with pytest.raises(ShapeError, match="positive total weight"):
        exact_pca(torch.zeros(1, 4, 8), torch.zeros(1, 4), 0.9)
