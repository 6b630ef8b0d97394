"""How ``kakeya-v2`` codes the coefficients ``c [S, n, D]`` of its basis: the two quantisers.

Both code one gain per vector on a log grid (``scale_bits``, the ``"scale"`` field) and the
components with a non-zero bit width (the ``"codes"`` field), in exactly ``sum(bits_s)`` code bits
per vector:

* :class:`TableQuantiser` (``coding="fixed"``): ``z_j = c_j / (g_hat * sigma_j)``, each coded as the
  nearest level of its ``bits_j``-bit Lloyd–Max table (N(0,1), or fitted per (stream, width) by
  :func:`fit_tables`), the codes packed at their widths;
* :class:`SlotQuantiser` (``coding="entropy"``): :class:`kakeyaturbo.ops.ecsq.SlotCoder`, uniform steps
  prefix-coded into a fixed slot per vector, the gain code being the step.

Here ``S`` is the codec input's leading (stream) axis; each stream has its own ``sigma``, widths,
gain grid and tables.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Protocol

import torch

from kakeyaturbo.codecs.base import expect_field
from kakeyaturbo.ops import lloyd_max
from kakeyaturbo.ops.ecsq import SlotCoder
from kakeyaturbo.ops.lloyd_max import Buckets, gaussian_table
from kakeyaturbo.ops.varpack import Columns, VarwidthLayout, varwidth_nbytes
from kakeyaturbo.packing import pack_bits, packed_nbytes, unpack_bits

MAX_BITS = 8
TABLE_SLOTS = sum(2**b for b in range(1, MAX_BITS + 1))  # 510: every width's levels, concatenated
TABLE_FIT_TOKENS = 2048
"""Tokens per stream (evenly spaced) the fitted tables are estimated from; bounds calibration time."""


def table_slice(bits: int) -> slice:
    """Where the ``2**bits`` levels of width ``bits`` sit in a ``[..., TABLE_SLOTS]`` tensor."""
    return slice(2**bits - 2, 2 ** (bits + 1) - 2)


def gaussian_levels(streams: int, device: torch.device | str) -> torch.Tensor:
    """float32 ``[streams, TABLE_SLOTS]``: the N(0,1) Lloyd–Max levels of widths 1..8, concatenated."""
    gauss = torch.cat([gaussian_table(b) for b in range(1, MAX_BITS + 1)]).to(device)
    return gauss.expand(streams, TABLE_SLOTS)


def rms(x: torch.Tensor, groups: int | None = None) -> torch.Tensor:
    """Root mean square over the last dim, ``[S, n, D] -> [S, n]``, or of each of ``groups`` equal
    slices of it, ``-> [S, n, groups]``."""
    s, n, d = x.shape
    if groups is None:
        return x.norm(dim=-1) / math.sqrt(d)
    return x.reshape(s, n, groups, d // groups).norm(dim=-1) / math.sqrt(d // groups)


def log_grid(r: torch.Tensor) -> torch.Tensor:
    """float32 log-gain grid ``[S, ..., 2]`` spanning the calibration rms ``r [S, N, ...]`` with a margin."""
    lg = torch.log(r.clamp_min(1e-30))
    lo, hi = lg.amin(1), lg.amax(1)
    margin = 0.05 * (hi - lo) + 0.01
    return torch.stack([lo - margin, hi + margin], dim=-1).float()


def gain_codes(r: torch.Tensor, log_gain: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Log-gain codes, int64 of the shape of ``r``, of the rms ``r [S, n]`` (grid ``log_gain [S, 2]``)
    or ``r [S, n, G]`` (grid ``[S, G, 2]``); zeros without a grid."""
    if log_gain is None:
        return torch.zeros(r.shape, dtype=torch.int64, device=r.device)
    lo, hi = log_gain[..., 0].unsqueeze(1), log_gain[..., 1].unsqueeze(1)
    levels = 2**bits - 1
    return torch.round((torch.clamp(torch.log(r), lo, hi) - lo) * (levels / (hi - lo))).to(torch.int64)


def gain_values(q: torch.Tensor, log_gain: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Dequantised gains, float32 of the shape of ``q``, from codes ``q [S, n]`` (``log_gain [S, 2]``)
    or ``q [S, n, G]`` (``log_gain [S, G, 2]``); ones without a grid."""
    if log_gain is None:
        return torch.ones(q.shape, device=q.device)
    lo, hi = log_gain[..., 0].unsqueeze(1), log_gain[..., 1].unsqueeze(1)
    return torch.exp(lo + q.float() * ((hi - lo) / (2**bits - 1)))


def read_gain_codes(fields: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...], bits: int,
                    device: torch.device) -> torch.Tensor:
    """int64 ``shape``: the ``bits``-bit gain codes packed in ``fields[name]`` (zeros when ``bits`` is 0)."""
    if not bits:
        return torch.zeros(shape, dtype=torch.int64, device=device)
    count = math.prod(shape)
    packed = expect_field(fields, name, torch.uint8, (packed_nbytes(count, bits),))
    return unpack_bits(packed, bits, count).reshape(shape)


def fit_tables(z: torch.Tensor, widths: torch.Tensor, max_iter: int = 100, tol: float = 1e-5,
               fits: int = 1) -> torch.Tensor:
    """Lloyd–Max levels float32 ``[S, 510]`` fitted per (stream, width) to ``z [S, N, D]``.

    Each width's samples, pooled per stream, go through :func:`kakeyaturbo.ops.lloyd_max.fit_batch`
    from the N(0,1) table; a stream without that width keeps N(0,1). The streams may be ``fits``
    independent fits' streams, equally many each, one after the other: each fit's levels converge
    on their own (exactly those of the fit alone).
    """
    s, n, d = z.shape
    out = torch.zeros(s, TABLE_SLOTS, dtype=torch.float32, device=z.device)
    for b in range(1, MAX_BITS + 1):
        member = (widths == b).unsqueeze(1).expand(s, n, d).reshape(s, n * d)
        table = gaussian_table(b).to(device=z.device, dtype=torch.float64).repeat(s, 1)
        if bool(member.any()):
            table = lloyd_max.fit_batch(z.reshape(s, n * d).double(), member, table, max_iter=max_iter, tol=tol,
                                          groups=fits)
        out[:, table_slice(b)] = table.float()
    return out


class Quantiser(Protocol):
    """Codes coefficients ``c [S, n, D]`` into payload fields and back."""

    def encode(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fields (``"codes"``, and ``"scale"`` with a gain code) of float32 ``c [S, n, D]``."""

    def columns(self, device: torch.device) -> Columns:
        """The ``K`` components some stream codes; every other coefficient decodes as 0."""

    def decode(self, fields: Mapping[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        """float32 ``[s, n, K]``, the coefficients of :meth:`columns`, from the fields of :meth:`encode`;
        corrupt fields raise CorruptDataError."""


@dataclasses.dataclass(frozen=True, eq=False)
class _FixedPlan:
    """What :class:`TableQuantiser` precomputes on one device.

    Attributes:
        columns: the components some stream codes (``K``).
        sigma: float32 ``[S, K]``.
        layout: the packed layout of their codes.
        buckets: the nearest-level quantisers, one per (stream, width in use), and one of one level (width 0).
        table: int64 ``[S, 1, K]``: each component's quantiser in ``buckets``.
        values: float32 ``[S * K * 256]``: ``level * sigma`` of every code of every (stream, component).
        offsets: int32 ``[S, 1, K]``: where each component's values start.
    """

    columns: Columns
    sigma: torch.Tensor
    layout: VarwidthLayout
    buckets: Buckets
    table: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor


class TableQuantiser:
    """Fixed widths: each component's nearest Lloyd–Max level at its width (module docstring).

    Only the components some stream codes are touched; the quantisers of every (stream, width) run
    at once (:class:`~kakeyaturbo.ops.lloyd_max.Buckets`), and decoding looks up ``level * sigma``.

    Args:
        sigma: float32 ``[S, D]``, rms of each gain-normalised coefficient.
        widths: int64 ``[S, D]``, 0..8.
        log_gain: float32 ``[S, 2]`` gain grid, or None (``scale_bits`` 0).
        scale_bits: bits of the gain code.
        tables: ``{width: float32 [S, 2**width]}`` for every width in use, in units of sigma.
    """

    def __init__(self, sigma: torch.Tensor, widths: torch.Tensor, log_gain: torch.Tensor | None, scale_bits: int,
                 tables: Mapping[int, torch.Tensor]) -> None:
        self.sigma, self.widths, self.log_gain, self.scale_bits = sigma, widths, log_gain, scale_bits
        self.tables = dict(tables)
        self._plans: dict[torch.device, _FixedPlan] = {}

    def _plan(self, device: torch.device) -> _FixedPlan:
        """The precomputed plan on ``device`` (built on first use)."""
        if device not in self._plans:
            widths = self.widths.to(device)
            s = widths.shape[0]
            columns = Columns.of(widths > 0)
            w = columns.take(widths)
            sigma = columns.take(self.sigma.to(device))
            used = sorted(self.tables)
            levels = torch.zeros(s, TABLE_SLOTS, device=device)
            for b in used:
                levels[:, table_slice(b)] = self.tables[b].to(device)
            code = torch.arange(2**MAX_BITS, device=device)
            at = (2**w - 2).clamp_min(0).unsqueeze(-1) + code.clamp(max=2**w.unsqueeze(-1) - 1)  # [S, K, 256]
            level = torch.where(w.unsqueeze(-1) > 0, levels.unsqueeze(1).expand(-1, w.shape[1], -1).gather(2, at), 0.0)
            rank = torch.zeros(MAX_BITS + 1, dtype=torch.int64, device=device)
            rank[torch.tensor(used, dtype=torch.int64, device=device)] = torch.arange(len(used), device=device) + 1
            stream = torch.arange(s, device=device).unsqueeze(1)
            table = torch.where(w > 0, stream * len(used) + rank[w], 0).unsqueeze(1)
            quantisers = [torch.zeros(1, device=device)]
            quantisers += [self.tables[b][i].to(device) for i in range(s) for b in used]
            self._plans[device] = _FixedPlan(
                columns, sigma, VarwidthLayout.of(w), Buckets.of_tables(quantisers), table,
                (level * sigma.unsqueeze(-1)).reshape(-1),
                (torch.arange(w.numel(), device=device, dtype=torch.int32).reshape(s, 1, -1) * 2**MAX_BITS))
        return self._plans[device]

    def encode(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """As :meth:`Quantiser.encode`."""
        plan = self._plan(c.device)
        log_gain = self.log_gain.to(c.device) if self.log_gain is not None else None
        q = gain_codes(rms(c), log_gain, self.scale_bits)
        g_hat = gain_values(q, log_gain, self.scale_bits)
        z = plan.columns.take(c) / (g_hat.unsqueeze(-1) * plan.sigma.unsqueeze(1))
        fields = {"codes": plan.layout.pack(plan.buckets.codes(z, plan.table, torch.uint8))}
        if self.scale_bits:
            fields["scale"] = pack_bits(q, self.scale_bits)
        return fields

    def decode(self, fields: Mapping[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        """As :meth:`Quantiser.decode`."""
        packed = expect_field(fields, "codes", torch.uint8, (varwidth_nbytes(self.widths, (s, n, d)),))
        plan = self._plan(packed.device)
        q = read_gain_codes(fields, "scale", (s, n), self.scale_bits, packed.device)
        log_gain = self.log_gain.to(packed.device) if self.log_gain is not None else None
        codes = plan.layout.unpack(packed, n, torch.int32)
        scaled = plan.values.index_select(0, (codes + plan.offsets).reshape(-1)).reshape(codes.shape)
        return scaled * gain_values(q, log_gain, self.scale_bits).unsqueeze(-1)

    def columns(self, device: torch.device) -> Columns:
        """As :meth:`Quantiser.columns`."""
        return self._plan(device).columns


class SlotQuantiser:
    """Entropy coding: :class:`~kakeyaturbo.ops.ecsq.SlotCoder` (module docstring).

    Args:
        sigma: float32 ``[S, D]``; active: bool ``[S, D]``, the components with a non-zero width;
        log_gain: float32 ``[S, 2]``, the step grid; scale_bits: bits of the step code (>= 1);
        budget: code bits per vector.
    """

    def __init__(self, sigma: torch.Tensor, active: torch.Tensor, log_gain: torch.Tensor, scale_bits: int,
                 budget: int) -> None:
        self.scale_bits = scale_bits
        self.slots = SlotCoder.build(sigma, active, log_gain, scale_bits, budget)

    def encode(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """As :meth:`Quantiser.encode`."""
        q, packed = self.slots.encode(c)
        return {"codes": packed, "scale": pack_bits(q, self.scale_bits)}

    def decode(self, fields: Mapping[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        """As :meth:`Quantiser.decode`."""
        packed = expect_field(fields, "codes", torch.uint8, (packed_nbytes(s * n * self.slots.slot_bits, 1),))
        q = read_gain_codes(fields, "scale", (s, n), self.scale_bits, packed.device)
        return self.slots.decode_columns(q, packed)

    def columns(self, device: torch.device) -> Columns:
        """As :meth:`Quantiser.columns`."""
        return self.slots.columns(device)
