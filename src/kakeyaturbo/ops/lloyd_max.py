"""Lloyd–Max scalar quantisers: optimal N(0,1) tables, quantise/dequantise, and 1-D fitting.

``gaussian_table(b)`` is the MSE-optimal ``2**b``-level quantiser for a standard normal,
computed from the exact density (it reproduces the seed's published tables, e.g. ±0.7979 at
1 bit and MSE 0.3634 / 0.1175 / 0.03454 / 0.009497 for b = 1..4). :func:`fit_batch` runs the
iteration on samples, batched over independent sets (the ``kakeya-v2`` tables per stream and
width); :func:`fit` is one set, for the ``kakeya`` codec's calibrated tables.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import cache
from typing import ClassVar

import torch

from kakeyaturbo.errors import ConfigError, ShapeError

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / _SQRT2))


def _cells(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper cell edges of a sorted table (±inf at the ends)."""
    mid = (table[1:] + table[:-1]) / 2
    inf = torch.tensor([math.inf], dtype=table.dtype)
    return torch.cat([-inf, mid]), torch.cat([mid, inf])


@cache
def _gaussian_table64(bits: int) -> torch.Tensor:
    levels = 2**bits
    # start from the quantile midpoints, then iterate centroid conditions on the exact density
    u = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    table = _SQRT2 * torch.erfinv(2 * u - 1)
    for _ in range(5000):
        lo, hi = _cells(table)
        mass = _cdf(hi) - _cdf(lo)
        new = (_phi(lo) - _phi(hi)) / mass
        if float((new - table).abs().max()) < 1e-13:
            table = new
            break
        table = new
    return table


def gaussian_table(bits: int) -> torch.Tensor:
    """MSE-optimal ``2**bits``-level quantiser for N(0,1): float32 ``[2**bits]``, ascending.

    Args:
        bits: 1..8.
    """
    if not 1 <= bits <= 8:
        raise ConfigError(f"bits must be in 1..8 for a Lloyd–Max table, got {bits}")
    return _gaussian_table64(bits).to(torch.float32)


@cache
def gaussian_mse(bits: int) -> float:
    """Expected squared error per coordinate of :func:`gaussian_table` on N(0,1) (1.0 at 0 bits)."""
    if bits == 0:
        return 1.0
    t = _gaussian_table64(bits)
    lo, hi = _cells(t)
    # E[(z-c)^2 | cell] * P(cell) summed; with centroid c = E[z|cell]: E[z^2] - sum c^2 P
    mass = _cdf(hi) - _cdf(lo)
    return float(1.0 - (t * t * mass).sum())


def boundaries(table: torch.Tensor) -> torch.Tensor:
    """Decision thresholds (midpoints) of a sorted table ``[L] -> [L-1]``."""
    return (table[1:] + table[:-1]) / 2


@dataclasses.dataclass(frozen=True, eq=False)
class Buckets:
    """Nearest-level codes for several tables at once, without a binary search per value.

    For a value ``z`` and its table ``t``, the code is the number of table ``t``'s decision
    boundaries below ``z``: for ascending boundaries exactly ``torch.searchsorted(bounds_t, z)``
    (ties go to the lower level). Each table's boundary range is cut into :attr:`cells` equal
    cells, and one monotone float expression, ``int(clamp(z * inv + off, 0, cells - 1) + base)``,
    gives the cell of a value and of every boundary alike. Boundaries in earlier cells are then
    below ``z`` and those in later cells are not, so the code is the count of boundaries in earlier
    cells (a lookup) plus at most :attr:`depth` comparisons with the boundaries sharing ``z``'s cell.

    Attributes:
        inv, off, base: ``[T]`` float: the cell expression of each table (``base = t * cells``).
        below: float ``[T * cells]``: per (table, cell), that table's boundaries in earlier cells.
        within: float ``[depth, T * cells]``: the boundaries in each cell, ascending, +inf after them.
        cells: cells per table (:data:`CELLS_PER_LEVEL` times the most levels of a table).
    """

    inv: torch.Tensor
    off: torch.Tensor
    base: torch.Tensor
    below: torch.Tensor
    within: torch.Tensor
    cells: int
    CELLS_PER_LEVEL: ClassVar[int] = 4

    @property
    def depth(self) -> int:
        """The most boundaries one cell holds."""
        return self.within.shape[0]

    @classmethod
    def of_tables(cls, tables: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> Buckets:
        """The buckets of the nearest-level quantisers of ``tables`` (each an ascending ``[L_t]`` table,
        ``L_t >= 1``; a one-level table codes everything as 0), computed in ``dtype``."""
        bounds = [boundaries(t.to(dtype)).sort().values for t in tables]
        dev = tables[0].device if tables else torch.device("cpu")
        cells = cls.CELLS_PER_LEVEL * max([b.numel() + 1 for b in bounds] or [1])
        spans = [float(b[-1] - b[0]) if b.numel() else 0.0 for b in bounds]
        inv = [cells / span if span > 0 else 1.0 for span in spans]
        off = [-float(b[0]) * scale if b.numel() else 0.0 for b, scale in zip(bounds, inv)]
        params = [torch.tensor(v, dtype=dtype, device=dev) for v in (inv, off, [t * cells for t in range(len(bounds))])]
        below = torch.zeros(len(bounds) * cells, dtype=dtype, device=dev)
        placed = []
        for t, b in enumerate(bounds):  # every boundary's cell, by the expression values go through
            cell = cls._cell(b, cells, *(p[t] for p in params)).to(torch.int64)
            before = torch.searchsorted(cell, torch.arange(t * cells, (t + 1) * cells, device=dev))  # cell ascends
            below[t * cells:(t + 1) * cells] = before.to(dtype)
            placed.append((cell, torch.arange(b.numel(), device=dev) - before[cell - t * cells]))
        depth = max([int(rank.max()) + 1 for _, rank in placed if rank.numel()] or [0])
        within = torch.full((depth, len(bounds) * cells), math.inf, dtype=dtype, device=dev)
        for b, (cell, rank) in zip(bounds, placed):
            within[rank, cell] = b
        return cls(*params, below, within, cells)

    @staticmethod
    def _cell(z: torch.Tensor, cells: int, inv: torch.Tensor, off: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """int32 cell of each value of ``z`` (monotone in ``z``)."""
        return (torch.clamp(z * inv + off, 0, cells - 1) + base).to(torch.int32)

    def codes(self, z: torch.Tensor, table: torch.Tensor | int = 0, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """Codes of ``z`` (float, any shape) in ``dtype``, value ``z[i]`` in table ``table[i]`` (an int, or an
        integer tensor broadcastable to ``z``)."""
        which = table if isinstance(table, int) else table.long()
        cell = self._cell(z, self.cells, self.inv[which], self.off[which], self.base[which]).reshape(-1)
        code = self.below.index_select(0, cell)
        flat = z.reshape(-1)
        above = torch.empty_like(code)
        for row in self.within:
            code += torch.gt(flat, row.index_select(0, cell), out=above)
        return code.reshape(z.shape).to(dtype)


def quantize(z: torch.Tensor, table: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Nearest-level indices (ties go to the lower index).

    Args:
        z: float tensor of any shape.
        table: ascending float tensor ``[L]`` on the device of ``z``.
        dtype: integer dtype of the result (one that holds ``L - 1``).

    Returns:
        tensor of ``dtype`` shaped like ``z`` with values in ``[0, L)``.
    """
    return Buckets.of_tables([table], z.dtype).codes(z, dtype=dtype)


def dequantize(idx: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Look up ``table[idx]`` (float32, shaped like ``idx``)."""
    return table.to(torch.float32).index_select(0, idx.reshape(-1)).reshape(idx.shape)


def fit_batch(samples: torch.Tensor, member: torch.Tensor, table: torch.Tensor, *, max_iter: int,
              tol: float, groups: int = 1) -> torch.Tensor:
    """Lloyd–Max iteration on ``B`` independent sample sets at once.

    Each row's member samples are sorted once; every step then finds the cell edges by binary
    search and the centroids from prefix sums (a sample on an edge goes to the lower cell, as in
    :func:`quantize`); an empty cell keeps its level. The rows form ``groups`` equal runs of
    consecutive rows (independent fits batched together): a run stops when none of its levels
    moved by ``tol`` or more, or after ``max_iter`` steps, so each run's levels are exactly those
    of the run fitted alone.

    Args:
        samples: float64 ``[B, M]``.
        member: bool ``[B, M]``: which samples belong to each row's set.
        table: float64 ``[B, L]``, ascending: the starting levels.
        max_iter: most steps.
        tol: convergence threshold on the largest level move of a run.
        groups: runs, dividing ``B``.

    Returns:
        float64 ``[B, L]``, ascending.
    """
    b = samples.shape[0]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or b % groups:
        raise ShapeError(f"fit_batch: groups must be a positive divisor of the {b} rows, got {groups!r}")
    ordered = torch.sort(torch.where(member, samples, math.inf), dim=1).values
    count = member.sum(1, keepdim=True)
    finite = torch.where(torch.isfinite(ordered), ordered, 0.0)  # members first, +inf padding after
    prefix = torch.cat([ordered.new_zeros(b, 1), finite.cumsum(1)], 1)
    running = torch.ones(groups, dtype=torch.bool, device=table.device)
    for _ in range(max_iter):
        bnd = ((table[:, 1:] + table[:, :-1]) / 2).contiguous()
        inner = torch.searchsorted(ordered, bnd, right=True)  # samples in cells up to each edge
        edges = torch.cat([torch.zeros_like(count), inner, count], 1)
        mass = (edges[:, 1:] - edges[:, :-1]).double()
        sums = prefix.gather(1, edges[:, 1:]) - prefix.gather(1, edges[:, :-1])
        new = torch.sort(torch.where(mass > 0, sums / mass.clamp_min(1), table), dim=1).values
        moved = (new - table).abs().reshape(groups, -1).amax(1)
        table = torch.where(running.repeat_interleave(b // groups).unsqueeze(1), new, table)
        running &= ~(moved < tol)
        if not bool(running.any()):
            break
    return table


def fit(samples: torch.Tensor, bits: int, *, max_iter: int = 200, tol: float = 1e-6) -> torch.Tensor:
    """Fit a ``2**bits``-level Lloyd–Max quantiser to 1-D samples.

    Starts from the N(0,1) table scaled to the samples' mean and std, then runs :func:`fit_batch`
    (a batch of one) until the largest level moves less than ``tol * std`` or ``max_iter`` iterations.

    Args:
        samples: float tensor of any shape (flattened), finite, at least ``2**bits`` values.
        bits: 1..8.

    Returns:
        float32 ``[2**bits]``, strictly increasing, on the samples' device.
    """
    x = samples.reshape(-1).to(torch.float64)
    levels = 2**bits
    if x.numel() < levels:
        raise ShapeError(f"fit needs at least {levels} samples for {bits} bits, got {x.numel()}")
    if not bool(torch.isfinite(x).all()):
        raise ShapeError("fit: samples hold NaN/Inf")
    std = float(x.std()) or 1.0
    start = _gaussian_table64(bits).to(x.device) * std + float(x.mean())
    table = fit_batch(x.unsqueeze(0), torch.ones_like(x, dtype=torch.bool).unsqueeze(0), start.unsqueeze(0),
                      max_iter=max_iter, tol=tol * std).squeeze(0)
    # keep strictly increasing even when cells collapse
    eps = 1e-9 * std
    table = table + torch.arange(levels, dtype=x.dtype, device=x.device) * eps
    return table.to(torch.float32)
