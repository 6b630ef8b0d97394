"""Batched weighted PCA: exact (eigh of the covariance) and randomized (Halko–Martinsson–Tropp).

Every function works on a batch of ``G`` independent row sets ``x [G, n, D]`` with row weights
``w [G, n]`` (0 marks padding rows). The kept rank ``d_eff`` follows the seed codec's rule:
the smallest count whose cumulative (clamped non-negative) eigenvalue mass reaches
``variance_ratio`` of the total. For the randomized path the total is the mass of the sketch,
not of the data, and ``d_eff`` is clamped to the target rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kakeyaturbo.errors import ShapeError

# XORed into the codec seed for the randomized sketch (the seed codec's RSVD seed offset)
RSVD_SEED_OFFSET = 0x9E37_79B9_7F4A_7C15
# a block whose variance is below this fraction of its mean squared row norm is "constant"
DEGENERATE_RATIO = 1e-12


class PcaFit(NamedTuple):
    """A batch of PCA skeletons.

    Attributes:
        mean: float32 ``[G, D]``, weighted row mean.
        basis: float32 ``[G, R, D]``, row ``j`` the ``j``-th principal direction (descending).
        eigvals: float32 ``[G, R]``, variance along each basis row, descending.
        d_eff: int64 ``[G]``, kept rank, ``1 <= d_eff <= R``.
    """

    mean: torch.Tensor
    basis: torch.Tensor
    eigvals: torch.Tensor
    d_eff: torch.Tensor


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.dim() != 3 or w.shape != x.shape[:2]:
        raise ShapeError(f"PCA expects x [G, n, D] and w [G, n], got {tuple(x.shape)} and {tuple(w.shape)}")
    if not bool((w.sum(-1) > 0).all()):
        raise ShapeError("PCA: every row set needs a positive total weight")


def weighted_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted row mean ``[G, D]`` of ``x [G, n, D]`` under weights ``w [G, n]`` (sum > 0)."""
    return (w.unsqueeze(-1) * x).sum(1) / w.sum(-1, keepdim=True)


def centred_rows(x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``A [G, n, D]``, ``A[g, i] = sqrt(w[g, i]) * (x[g, i] - mean[g])``; ``AᵀA/Σw`` is the covariance."""
    return w.clamp_min(0).sqrt().unsqueeze(-1) * (x - mean.unsqueeze(1))


def mean_energy(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared row norm ``[G]`` of ``x [G, n, D]`` (the scale for "negligible")."""
    return (w * (x * x).sum(-1)).sum(-1) / w.sum(-1)


def select_rank(
    eigvals: torch.Tensor, variance_ratio: float, floor: torch.Tensor, cap: int | None = None
) -> torch.Tensor:
    """The seed's d_eff rule.

    Args:
        eigvals: ``[G, R]`` descending variances (negative values count as 0).
        variance_ratio: fraction of the total to keep, in ``(0, 1]``.
        floor: ``[G]``; a set whose total is ``<= floor`` is degenerate and keeps rank 1.
        cap: optional upper bound on the rank.

    Returns:
        int64 ``[G]`` in ``[1, min(R, cap)]``: the first ``i+1`` with cumulative mass
        ``>= variance_ratio * total`` (``R`` if never reached).
    """
    lam = eigvals.clamp_min(0)
    total = lam.sum(-1)
    cum = lam.cumsum(-1)
    reached = cum >= variance_ratio * total.unsqueeze(-1)
    r = lam.shape[-1]
    first = reached.to(torch.int64).argmax(-1) + 1
    first = torch.where(reached.any(-1), first, torch.full_like(first, r))
    d = torch.where(total <= floor, torch.ones_like(first), first)
    hi = r if cap is None else min(r, max(cap, 1))
    return d.clamp(1, hi)


def exact_pca(x: torch.Tensor, w: torch.Tensor, variance_ratio: float, rank_cap: int | None = None) -> PcaFit:
    """Exact weighted PCA: eigendecomposition of the weighted covariance, eigenpairs descending.

    Args:
        x: float32 ``[G, n, D]``.
        w: float32 ``[G, n]``, non-negative, positive sum per set.
        variance_ratio: d_eff threshold in ``(0, 1]``.
        rank_cap: optional hard cap on d_eff.

    Returns:
        :class:`PcaFit` with ``R = D``.
    """
    _check(x, w)
    mean = weighted_mean(x, w)
    a = centred_rows(x, w, mean)
    cov = a.transpose(1, 2) @ a / w.sum(-1).view(-1, 1, 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals = evals.flip(-1)
    basis = evecs.flip(-1).transpose(1, 2)
    floor = DEGENERATE_RATIO * mean_energy(x, w)
    return PcaFit(mean, basis.contiguous(), evals, select_rank(evals, variance_ratio, floor, rank_cap))


def gaussian_sketch(n: int, r: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """Seed-deterministic i.i.d. N(0,1) test matrix ``[n, r]`` float32 (drawn on the host, then moved)."""
    g = torch.Generator().manual_seed((int(seed) ^ RSVD_SEED_OFFSET) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(n, r, generator=g).to(device)


def _orth(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of ``m [G, p, q]`` (thin QR)."""
    return torch.linalg.qr(m, mode="reduced").Q


def randomized_pca(
    x: torch.Tensor,
    w: torch.Tensor,
    variance_ratio: float,
    target_rank: int,
    oversample: int,
    power_iters: int,
    seed: int,
) -> PcaFit:
    """Randomized weighted PCA (HMT range finder with re-orthogonalised power iterations).

    Sketch ``Z = AᵀΩ`` with ``Ω [n, r]`` Gaussian, ``r = min(k + oversample, D)``; each power
    iteration orthonormalises after *both* products (``Q₁ = qr(A Z)``, ``Z = qr(Aᵀ Q₁)``), so
    ill-conditioned blocks stay finite; then ``Q = qr(Z)``, SVD of ``A Q`` and basis ``Q V̂``.

    Args:
        x: float32 ``[G, n, D]``.
        w: float32 ``[G, n]``.
        variance_ratio: d_eff threshold in ``(0, 1]``, measured against the sketch's variance.
        target_rank: ``k``; d_eff is clamped to ``min(k, D)``.
        oversample: extra sketch columns.
        power_iters: number of power iterations.
        seed: codec seed (XORed with :data:`RSVD_SEED_OFFSET`).

    Returns:
        :class:`PcaFit` with ``R = min(r, n, D)`` basis rows.
    """
    _check(x, w)
    _, n, d = x.shape
    k = max(1, min(target_rank, d))
    r = min(k + oversample, d)
    mean = weighted_mean(x, w)
    a = centred_rows(x, w, mean)
    at = a.transpose(1, 2)
    z = at @ gaussian_sketch(n, r, seed, x.device)  # [G, D, r]
    for _ in range(power_iters):
        q1 = _orth(a @ z)
        z = _orth(at @ q1)
    q = _orth(z)  # [G, D, r']
    _, sv, vh = torch.linalg.svd(a @ q, full_matrices=False)
    basis = (q @ vh.transpose(1, 2)).transpose(1, 2)  # [G, r', D]
    evals = sv * sv / w.sum(-1, keepdim=True)
    floor = DEGENERATE_RATIO * mean_energy(x, w)
    return PcaFit(mean, basis.contiguous(), evals, select_rank(evals, variance_ratio, floor, k))
