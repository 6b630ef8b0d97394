import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.ops.kmeans import assign, axial_kmeans


def _lines(g: int = 2, n: int = 120, w: int = 8, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Points scattered along ``k`` lines through 0 (both signs), and the unit line directions."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(g, k, w, generator=gen), dim=-1)
    which = torch.randint(0, k, (g, n), generator=gen)
    scale = torch.randn(g, n, 1, generator=gen) * 3
    pts = dirs.gather(1, which.unsqueeze(-1).expand(-1, -1, w)) * scale
    return pts + 0.01 * torch.randn(g, n, w, generator=gen), dirs


def test_deterministic():
    c, _ = _lines()
    a = axial_kmeans(c, torch.ones(2, 120), 4, 32, 11)
    b = axial_kmeans(c, torch.ones(2, 120), 4, 32, 11)
    assert torch.equal(a.centres, b.centres) and torch.equal(a.k_eff, b.k_eff)


def test_recovers_lines():
    c, dirs = _lines(k=3)
    fit = axial_kmeans(c, torch.ones(2, 120), 3, 32, 0)
    cos = (fit.centres @ dirs.transpose(1, 2)).abs()  # [G, 3, 3]
    assert bool((cos.max(-1).values > 0.999).all())


@given(st.integers(0, 2**31))
def test_sign_invariant(seed):
    c, _ = _lines(seed=seed % 1000)
    flip = torch.where(torch.rand(2, 120, generator=torch.Generator().manual_seed(seed)) < 0.5, -1.0, 1.0)
    w = torch.ones(2, 120)
    a = axial_kmeans(c, w, 4, 32, seed)
    b = axial_kmeans(c * flip.unsqueeze(-1), w, 4, 32, seed)
    # a centre stands for a line: equal up to its sign
    assert torch.allclose((a.centres * b.centres).sum(-1).abs(), torch.ones(2, 4), atol=1e-6)
    valid = w > 0
    sa, ta = assign(c, a.centres, a.k_eff, valid)
    sb, tb = assign(c * flip.unsqueeze(-1), b.centres, b.k_eff, valid)
    assert torch.equal(sa, sb) and torch.allclose(ta.abs(), tb.abs(), atol=1e-6)
    pa = ta.unsqueeze(-1) * a.centres.gather(1, sa.unsqueeze(-1).expand(-1, -1, 8)) * flip.unsqueeze(-1)
    pb = tb.unsqueeze(-1) * b.centres.gather(1, sb.unsqueeze(-1).expand(-1, -1, 8))
    assert torch.allclose(pa, pb, atol=1e-5)


def test_t_minimises_the_residual():
    c, _ = _lines(k=4)
    fit = axial_kmeans(c, torch.ones(2, 120), 4, 32, 1)
    seg, t = assign(c, fit.centres, fit.k_eff, torch.ones(2, 120, dtype=torch.bool))
    cen = fit.centres.gather(1, seg.unsqueeze(-1).expand(-1, -1, 8))
    err = lambda tt: ((c - tt.unsqueeze(-1) * cen) ** 2).sum(-1)  # noqa: E731
    for delta in (1e-2, -1e-2, 0.3):
        assert bool((err(t) <= err(t + delta) + 1e-5).all())
    # and no other centre gives a smaller residual with its own optimal t
    dots = c @ fit.centres.transpose(1, 2)
    best = (c * c).sum(-1) - dots.pow(2).max(-1).values
    assert torch.allclose(err(t), best, atol=1e-4)


def test_k_eff_and_invalid_rows():
    c, _ = _lines(g=1, n=10)
    w = torch.zeros(1, 10)
    w[0, :3] = 1
    fit = axial_kmeans(c, w, 16, 32, 0)
    assert fit.k_eff.tolist() == [3] and fit.centres.shape == (1, 10, 8)
    assert bool((fit.centres[0, 3:] == 0).all())
    seg, t = assign(c, fit.centres, fit.k_eff, w > 0)
    assert bool((seg[0, 3:] == 0).all()) and bool((t[0, 3:] == 0).all())
    assert int(seg.max()) < 3
    none = axial_kmeans(c, torch.zeros(1, 10), 4, 32, 0)
    assert none.k_eff.tolist() == [1] and float(none.centres[0, 0].norm()) == 1.0


def test_batched_equals_single():
    c, _ = _lines(g=3)
    w = torch.ones(3, 120)
    whole = axial_kmeans(c, w, 5, 32, 2)
    for i in range(3):
        one = axial_kmeans(c[i : i + 1], w[i : i + 1], 5, 32, 2)
        assert torch.allclose(whole.centres[i], one.centres[0], atol=1e-6)
