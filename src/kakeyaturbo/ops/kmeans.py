"""Batched axial spherical k-means on the directions of coefficient vectors.

A centre stands for the line ``±c``: rows are assigned by the largest ``|<u, c>|`` and the
update sums sign-aligned members, so flipping the sign of any row changes nothing but the
sign of its ``t``. Everything is batched over ``G`` independent row sets; ``k_eff`` may differ
per set (inactive centre slots are zero and never chosen). Initialisation is deterministic
farthest-first (by ``1 - max |cos|``) from a seeded first pick.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kakeyaturbo.errors import ShapeError


class KMeansFit(NamedTuple):
    """Centres of a batch of k-means runs.

    Attributes:
        centres: float32 ``[G, K, W]``, unit rows for the first ``k_eff`` slots, zeros after.
        k_eff: int64 ``[G]``, ``min(k, max(valid rows, 1))``.
    """

    centres: torch.Tensor
    k_eff: torch.Tensor


def _first_pick(valid: torch.Tensor, seed: int) -> torch.Tensor:
    """Index ``[G]`` of the valid row at the seeded relative position ``floor(u * #valid)``."""
    g = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    frac = float(torch.rand(1, generator=g))
    count = valid.sum(-1)
    pick = (frac * count).floor().to(torch.int64).clamp_max((count - 1).clamp_min(0))
    rank = valid.to(torch.int64).cumsum(-1) - 1
    return (valid & (rank == pick.unsqueeze(-1))).to(torch.int64).argmax(-1)


def _gather_rows(u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``u[g, idx[g]]`` for ``u [G, n, W]`` and ``idx [G]`` -> ``[G, W]``."""
    return u.gather(1, idx.view(-1, 1, 1).expand(-1, 1, u.shape[-1])).squeeze(1)


def farthest_first(
    u: torch.Tensor, valid: torch.Tensor, k_eff: torch.Tensor, k: int, seed: int
) -> torch.Tensor:
    """Deterministic farthest-first initial centres ``[G, k, W]`` (zeros past ``k_eff``).

    Args:
        u: float32 ``[G, n, W]`` unit directions (rows that are not valid are ignored).
        valid: bool ``[G, n]``.
        k_eff: int64 ``[G]``, at most the number of valid rows (or 1).
        k: number of centre slots.
        seed: picks the first centre.
    """
    grp, _, width = u.shape
    any_valid = valid.any(-1, keepdim=True)
    axis0 = torch.zeros(grp, width, device=u.device, dtype=u.dtype)
    axis0[:, 0] = 1.0
    first = torch.where(any_valid, _gather_rows(u, _first_pick(valid, seed)), axis0)
    centres = [first]
    best = (u @ first.unsqueeze(-1)).squeeze(-1).abs()
    for j in range(1, k):
        score = torch.where(valid, 1.0 - best, torch.full_like(best, -torch.inf))
        nxt = _gather_rows(u, score.argmax(-1)) * (k_eff > j).unsqueeze(-1)
        centres.append(nxt)
        best = torch.maximum(best, (u @ nxt.unsqueeze(-1)).squeeze(-1).abs())
    return torch.stack(centres, 1)


def _masked_abs_dots(
    c: torch.Tensor, centres: torch.Tensor, k_eff: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed dots ``[G, n, K]`` and their magnitudes with inactive slots set to -1."""
    dots = c @ centres.transpose(1, 2)
    slot = torch.arange(centres.shape[1], device=c.device)
    active = (slot.unsqueeze(0) < k_eff.unsqueeze(1)).unsqueeze(1)
    return dots, torch.where(active, dots.abs(), torch.full_like(dots, -1.0))


def axial_kmeans(c: torch.Tensor, weights: torch.Tensor, k: int, iters: int, seed: int) -> KMeansFit:
    """Axial spherical k-means on the directions of ``c``.

    Args:
        c: float32 ``[G, n, W]`` coefficient vectors.
        weights: float32 ``[G, n]``; rows with weight ``> 0`` take part (the caller zeroes
            padding rows and rows of negligible norm).
        k: requested centres; ``k_eff = min(k, max(#participating rows, 1))`` per set.
        iters: at most this many Lloyd steps (assignment ``argmax |<u,c>|``, sign-aligned
            weighted mean, re-normalised; an empty cluster keeps its centre). A set stops
            as soon as its assignment no longer changes.
        seed: initialisation seed.

    Returns:
        :class:`KMeansFit` with ``K = min(k, n)`` slots.
    """
    if c.dim() != 3 or weights.shape != c.shape[:2]:
        raise ShapeError(f"k-means expects c [G, n, W] and weights [G, n], got {tuple(c.shape)}, "
                         f"{tuple(weights.shape)}")
    grp, n, _ = c.shape
    kk = max(1, min(k, n))
    valid = weights > 0
    k_eff = valid.sum(-1).clamp_min(1).clamp_max(kk)
    norm = c.norm(dim=-1, keepdim=True)
    u = torch.where(valid.unsqueeze(-1), c / norm.clamp_min(torch.finfo(c.dtype).tiny), torch.zeros_like(c))
    centres = farthest_first(u, valid, k_eff, kk, seed)
    prev = torch.full((grp, n), -1, dtype=torch.int64, device=c.device)
    done = torch.zeros(grp, dtype=torch.bool, device=c.device)
    for _ in range(iters):
        dots, mag = _masked_abs_dots(u, centres, k_eff)
        seg = mag.argmax(-1)
        done = done | ~((seg != prev) & valid).any(-1)
        if bool(done.all()):
            break
        prev = seg
        sign = torch.where(dots.gather(-1, seg.unsqueeze(-1)).squeeze(-1) >= 0, 1.0, -1.0)
        member = torch.nn.functional.one_hot(seg, kk).to(c.dtype) * (sign * weights).unsqueeze(-1)
        sums = member.transpose(1, 2) @ u  # [G, K, W]
        size = sums.norm(dim=-1, keepdim=True)
        new = torch.where(size > 0, sums / size.clamp_min(torch.finfo(c.dtype).tiny), centres)
        centres = torch.where(done.view(-1, 1, 1), centres, new)
    return KMeansFit(centres, k_eff)


def assign(
    c: torch.Tensor, centres: torch.Tensor, k_eff: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest line and signed position along it.

    Args:
        c: float32 ``[G, n, W]``.
        centres: float32 ``[G, K, W]`` (the stored, possibly rounded, centres).
        k_eff: int64 ``[G]`` active slots.
        valid: bool ``[G, n]``; other rows get ``(seg 0, t 0)``.

    Returns:
        ``seg`` int64 ``[G, n]`` = ``argmax_j |<c, centre_j>|`` (ties to the lower index) and
        ``t`` float32 ``[G, n]`` = ``<c, centre_seg>``, which minimises ``||c - t·centre||`` for a
        unit centre.
    """
    dots, mag = _masked_abs_dots(c, centres, k_eff)
    seg = mag.argmax(-1)
    t = dots.gather(-1, seg.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, seg, torch.zeros_like(seg)), torch.where(valid, t, torch.zeros_like(t))
