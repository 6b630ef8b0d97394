"""Orthogonal matrices stored as quantised Householder reflectors.

An orthogonal ``Q [D, D]`` is the product ``H_0 H_1 ... H_{D-1}`` of reflectors
``H_j = I - tau_j v_j v_jᵀ`` whose vectors ``v_j`` have ``v_j[j] = 1`` and zeros above ``j``
(LAPACK's ``geqrf`` form; the signs of ``R``'s diagonal are dropped, so a column may come back
negated). Only the ``D - 1 - j`` entries of ``v_j`` below the diagonal are stored, each
quantised to ``widths[j]`` bits with one float16 scale per reflector, and ``tau_j = 2 / (v_jᵀ v_j)``
is recomputed from the quantised vector: whatever the quantisation error, the decoded matrix is
exactly orthogonal (to float64 rounding), so an encoder may use its transpose as the inverse.

Column ``j`` of the product depends on ``v_0 .. v_j`` only; a reflector of width 0 is not stored
(``tau = 0``, the identity), which is allowed only for a suffix of the reflectors: the leading
columns then match ``Q`` and the others complete them to an orthogonal basis. The entries are
roughly half of a dense matrix's (``D (D - 1) / 2``), fewer when a suffix is not stored.
"""

from __future__ import annotations

import torch

from kakeyaturbo.errors import NumericRangeError, ShapeError
from kakeyaturbo.ops.varpack import pack_varwidth, unpack_varwidth, varwidth_nbytes
from kakeyaturbo.packing import narrow

MIN_WIDTH = 2
"""Narrowest stored reflector: a signed code needs at least the levels -1, 0, +1."""
MAX_WIDTH = 8


def _entry_widths(widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check ``widths [S, D]``; return (rows, cols) of the strictly lower entries and each one's width ``[S, T]``."""
    if widths.dim() != 2 or widths.is_floating_point() or widths.dtype == torch.bool:
        raise ShapeError(f"reflector widths must be an integer tensor [S, D], got {widths.dtype} "
                         f"{tuple(widths.shape)}")
    w = widths.long()
    stored = w > 0
    if bool(((w < 0) | (w > MAX_WIDTH) | (stored & (w < MIN_WIDTH))).any()):
        raise NumericRangeError(f"reflector widths must be 0 or {MIN_WIDTH}..{MAX_WIDTH}, got "
                                f"{sorted(set(w.flatten().tolist()))}")
    if bool((stored[:, 1:] & ~stored[:, :-1]).any()):
        raise NumericRangeError("reflector widths: only a suffix of the reflectors may be left out (width 0)")
    d = w.shape[1]
    rows, cols = torch.tril_indices(d, d, -1, device=w.device)
    return rows, cols, w[:, cols]


def _half_range(widths: torch.Tensor) -> torch.Tensor:
    """float64 ``[S, D]``: the largest code magnitude ``2**(w-1) - 1`` of each reflector's width
    (1 for an unstored reflector, which holds no entries)."""
    return (2 ** (widths.long().clamp_min(MIN_WIDTH) - 1) - 1).double()


def reflectors_nbytes(widths: torch.Tensor) -> int:
    """Bytes of the packed reflector entries for ``widths [S, D]``."""
    _, _, ew = _entry_widths(widths)
    return varwidth_nbytes(ew, (ew.shape[0], 1, ew.shape[1]))


def reflector_codes(q: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantised Householder reflectors of orthogonal matrices, unpacked.

    Args:
        q: float ``[S, D, D]``, each orthogonal (columns are the basis vectors).
        widths: integer ``[S, D]``: bits of reflector ``j`` (0, or 2..8; zeros only as a suffix).

    Returns:
        ``(codes, scale)``: int64 ``[S, D (D - 1) / 2]``, the offset-binary code of each entry below
        the diagonal in :func:`torch.tril_indices` order (0 in an unstored reflector), and float16
        ``[S, D]`` per-reflector scales.
    """
    if q.dim() != 3 or q.shape[-1] != q.shape[-2] or tuple(widths.shape) != tuple(q.shape[:2]):
        raise ShapeError(f"quantize_orthogonal: q must be [S, D, D] and widths [S, D], got "
                         f"{tuple(q.shape)} and {tuple(widths.shape)}")
    widths = widths.to(q.device)
    rows, cols, ew = _entry_widths(widths)
    a, _ = torch.geqrf(q.double())
    low = a[:, rows, cols]  # [S, T]; |entries| <= 1 (LAPACK scales v so that v[j] = 1)
    levels = _half_range(widths)
    peak = torch.zeros_like(levels).scatter_reduce(1, cols.expand_as(low), low.abs(), "amax")
    scale = narrow((peak / levels).clamp_min(2.0**-24), torch.float16, "reflector scale")
    half = levels[:, cols]
    codes = torch.round(low / scale.double()[:, cols]).clamp(-half, half) + half
    return torch.where(ew > 0, codes, 0).long(), scale


def pack_reflectors(codes: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """uint8 ``[reflectors_nbytes(widths)]``: the codes ``[S, T]`` of :func:`reflector_codes` packed
    LSB-first at their reflectors' ``widths [S, D]``."""
    _, _, ew = _entry_widths(widths.to(codes.device))
    return pack_varwidth(codes.unsqueeze(1), ew)


def reflector_matrix(codes: torch.Tensor, scale: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """float64 ``[S, D, D]``, exactly orthogonal: the product of the reflectors whose entries are
    ``codes [S, T]`` (:func:`reflector_codes`) at ``scale`` float16 ``[S, D]`` and ``widths [S, D]``."""
    widths = widths.to(codes.device)
    rows, cols, ew = _entry_widths(widths)
    s, d = widths.shape
    half = _half_range(widths)[:, cols]
    entries = torch.where(ew > 0, (codes.double() - half) * scale.to(codes.device).double()[:, cols], 0.0)
    low = torch.zeros(s, d, d, dtype=torch.float64, device=codes.device)
    low[:, rows, cols] = entries
    norm2 = 1.0 + low.pow(2).sum(1)
    tau = torch.where(widths > 0, 2.0 / norm2, 0.0)
    return torch.linalg.householder_product(low, tau)


def quantize_orthogonal(q: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise orthogonal matrices to packed Householder reflectors.

    Args:
        q: float ``[S, D, D]``, each orthogonal (columns are the basis vectors).
        widths: integer ``[S, D]``: bits of reflector ``j`` (0, or 2..8; zeros only as a suffix).

    Returns:
        ``(packed, scale)``: uint8 ``[reflectors_nbytes(widths)]`` (the entries, offset-binary,
        LSB-first in :func:`torch.tril_indices` order) and float16 ``[S, D]`` per-reflector scales.
    """
    codes, scale = reflector_codes(q, widths)
    return pack_reflectors(codes, widths), scale


def dequantize_orthogonal(packed: torch.Tensor, scale: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_orthogonal`: float64 ``[S, D, D]``, exactly orthogonal.

    Args:
        packed: uint8 ``[reflectors_nbytes(widths)]``.
        scale: float16 ``[S, D]``.
        widths: integer ``[S, D]``, as given to :func:`quantize_orthogonal`.
    """
    _, _, ew = _entry_widths(widths.to(packed.device))
    codes = unpack_varwidth(packed, ew, (ew.shape[0], 1, ew.shape[1])).squeeze(1)
    return reflector_matrix(codes, scale, widths)
