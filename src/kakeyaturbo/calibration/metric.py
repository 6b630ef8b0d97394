"""The attention metric of keys: Σ_q, its regularisation and Cholesky factors, the lag-averaged
metric over RoPE lags, and the checks that decide whether whitening a layer is safe.

Row-vector convention throughout: a key error ``e [D]`` costs ``e Σ eᵀ``; whitening is ``k·L``
with ``L Lᵀ = Σ``, so plain MSE in the whitened space is the Σ-weighted error.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kakeyaturbo.packing import F16_MAX


def gram(q_pre: torch.Tensor) -> torch.Tensor:
    """Second moment of the queries of each KV head's group.

    Args:
        q_pre: ``[n_kv, g, T, D]`` float pre-RoPE queries (``g`` query heads per KV head).

    Returns:
        float64 ``[n_kv, D, D]``: ``Σ qᵀq / (g·T)``, symmetrised.
    """
    n_kv, g, t, d = q_pre.shape
    q = q_pre.reshape(n_kv, g * t, d).to(torch.float64)
    s = q.transpose(1, 2) @ q / (g * t)
    return (s + s.transpose(1, 2)) / 2


def regularise(sigma: torch.Tensor, ridge: float, cond_cap: float | None) -> torch.Tensor:
    """``Σ + ridge·mean(diag Σ)·I``, then (optionally) the smallest extra ``λI`` that brings the
    condition number of ``chol(Σ)`` (``sqrt`` of Σ's) under ``cond_cap``.

    Args:
        sigma: ``[..., D, D]`` symmetric positive semi-definite.
    """
    d = sigma.shape[-1]
    eye = torch.eye(d, dtype=sigma.dtype, device=sigma.device)
    mean_diag = sigma.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    out = sigma + ridge * mean_diag * eye
    if cond_cap is not None:
        ev = torch.linalg.eigvalsh(out)
        lo, hi = ev[..., :1], ev[..., -1:]
        c2 = cond_cap**2
        lam = ((hi - c2 * lo) / (c2 - 1)).clamp_min(0)
        out = out + lam[..., None] * eye
    return out


def cholesky_pair(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor ``L`` (``L Lᵀ = Σ``) and ``L⁻¹``, float32, each ``[..., D, D]``."""
    chol = torch.linalg.cholesky(sigma.to(torch.float64))
    eye = torch.eye(sigma.shape[-1], dtype=torch.float64, device=sigma.device).expand_as(chol)
    inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return chol.float(), inv.float()


def rope_matrices(rope: Any, lags: torch.Tensor, d: int) -> torch.Tensor:
    """``R_Δ`` for each lag (row-vector convention: ``rope(x, Δ) = x R_Δ``): ``[len(lags), D, D]``."""
    eye = torch.eye(d, dtype=torch.float32)
    rows = [rope.apply(eye, torch.full((d,), int(lag), dtype=torch.long)) for lag in lags.tolist()]
    return torch.stack(rows)


def lag_metric(sigma: torch.Tensor, rot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``M = Σ_Δ w_Δ R_Δᵀ Σ R_Δ`` per KV head: the expected logit-error metric over lags.

    A query at position ``p`` and a key at ``s`` meet as ``q R_p (k R_s)ᵀ = q R_Δ kᵀ`` with
    ``Δ = p − s``, so a pre-RoPE key error ``e`` costs ``E[(q R_Δ eᵀ)²] = e R_Δᵀ Σ R_Δ eᵀ``.

    Args:
        sigma: ``[n_kv, D, D]`` float64 query second moment.
        rot: ``[L, D, D]`` rotation matrices.
        weights: ``[n_kv, L]`` lag weights summing to 1 per head.
    """
    r = rot.to(sigma.dtype)
    per_lag = r.transpose(-1, -2).unsqueeze(0) @ sigma.unsqueeze(1) @ r.unsqueeze(0)  # [n_kv, L, D, D]
    return (weights.to(sigma.dtype)[..., None, None] * per_lag).sum(1)


def lag_weights(q_post: torch.Tensor, k_post: torch.Tensor, n_lags: int, scaling: float,
                window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mass per lag, measured: the mean softmax probability a query puts at lag Δ.

    Args:
        q_post: ``[n_kv, g, T, D]`` post-RoPE queries; k_post: ``[n_kv, T, D]`` post-RoPE keys.
        n_lags: number of lag bins (log-spaced representative lags are returned).
        scaling: the attention's softmax scale (``1/sqrt(D)`` usually).
        window: a sliding layer's window ``W`` (lags ``>= W`` are masked, as the model masks them),
            or None.

    Returns:
        ``(lags [L] int64, weights [n_kv, L] float64)`` with the probability mass of each
        log-spaced lag bin assigned to the bin's representative lag.
    """
    n_kv, g, t, _ = q_post.shape
    scores = torch.einsum("hgtd,hsd->hgts", q_post.double(), k_post.double()) * scaling
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    if window is not None:
        causal &= ~torch.ones(t, t, dtype=torch.bool).tril(-window)
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = scores.softmax(-1)  # [n_kv, g, T, T]
    idx = torch.arange(t)
    lag = (idx[:, None] - idx[None, :]).clamp_min(0)  # [T, T]
    edges = torch.unique(torch.cat([torch.zeros(1), torch.logspace(0, math.log10(t), n_lags)]).long())
    bins = torch.bucketize(lag, edges[1:], right=True)  # bin index per (i, j)
    nb = len(edges)
    mass = torch.zeros(n_kv, nb, dtype=torch.float64)
    flat = (probs * causal).sum(1).reshape(n_kv, -1)  # sum over group heads
    mass.scatter_add_(1, bins.reshape(1, -1).expand(n_kv, -1), flat)
    mass = mass / mass.sum(-1, keepdim=True)
    return edges, mass


def whitening_hazard(k_pre: torch.Tensor, chol: torch.Tensor, cond_limit: float) -> str | None:
    """Why whitening ``k_pre [n_kv, T, D]`` by ``chol [n_kv, D, D]`` is unsafe, or None.

    Unsafe: any whitened value (times a 4x head-room for skeleton means and norms) beyond the
    f16 range, or a Cholesky condition number above ``cond_limit``.
    """
    white = k_pre.double() @ chol.double()
    peak = float(white.abs().max())
    norm_peak = float(white.norm(dim=-1).max())
    if max(4 * peak, norm_peak) > F16_MAX:
        return f"whitened keys reach {peak:.4g} (norm {norm_peak:.4g}), too close to the f16 limit {F16_MAX:.0f}"
    sv = torch.linalg.svdvals(chol.double())
    cond = float((sv[..., 0] / sv[..., -1]).max())
    if cond > cond_limit:
        return f"condition number of L is {cond:.4g} > {cond_limit:.4g}"
    return None
