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

import math
from collections.abc import Mapping
from typing import Protocol

import torch

from kakeyaturbo.codecs.base import expect_field
from kakeyaturbo.ops import lloyd_max
from kakeyaturbo.ops.ecsq import SlotCoder
from kakeyaturbo.ops.lloyd_max import gaussian_table
from kakeyaturbo.ops.varpack import pack_varwidth, unpack_varwidth, varwidth_nbytes
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


def _quantize(z: torch.Tensor, widths: torch.Tensor, tables: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Codes int64 ``[S, n, D]`` of ``z [S, n, D]``; component ``(s, j)`` uses ``tables[widths[s, j]]``."""
    s, n, d = z.shape
    codes = torch.zeros(z.shape, dtype=torch.int64, device=z.device)
    flat = z.reshape(s, n * d).contiguous()
    for b, table in tables.items():
        bnd = ((table[:, 1:] + table[:, :-1]) / 2).contiguous()
        idx = torch.searchsorted(bnd, flat, right=False).reshape(s, n, d)
        codes = torch.where((widths == b).unsqueeze(1), idx, codes)
    return codes


def _dequantize(codes: torch.Tensor, widths: torch.Tensor, tables: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`_quantize`: float32 ``[S, n, D]`` (0 where the width is 0)."""
    s, n, d = codes.shape
    z = torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    for b, table in tables.items():
        idx = codes.reshape(s, n * d).clamp(max=table.shape[1] - 1)
        z = torch.where((widths == b).unsqueeze(1), table.gather(1, idx).reshape(s, n, d), z)
    return z


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

    def decode(self, fields: Mapping[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        """float32 ``[s, n, d]`` from the fields of :meth:`encode`; corrupt fields raise CorruptDataError."""


class TableQuantiser:
    """Fixed widths: each component's nearest Lloyd–Max level at its width (module docstring).

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

    def _on(self, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[int, torch.Tensor]]:
        """sigma, widths, gain grid and tables on ``device``."""
        log_gain = self.log_gain.to(device) if self.log_gain is not None else None
        tables = {b: table.to(device) for b, table in self.tables.items()}
        return self.sigma.to(device), self.widths.to(device), log_gain, tables

    def encode(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """As :meth:`Quantiser.encode`."""
        sigma, widths, log_gain, tables = self._on(c.device)
        q = gain_codes(rms(c), log_gain, self.scale_bits)
        g_hat = gain_values(q, log_gain, self.scale_bits)
        z = c / (g_hat.unsqueeze(-1) * sigma.unsqueeze(1))
        fields = {"codes": pack_varwidth(_quantize(z, widths, tables), widths)}
        if self.scale_bits:
            fields["scale"] = pack_bits(q, self.scale_bits)
        return fields

    def decode(self, fields: Mapping[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        """As :meth:`Quantiser.decode`."""
        packed = expect_field(fields, "codes", torch.uint8, (varwidth_nbytes(self.widths, (s, n, d)),))
        q = read_gain_codes(fields, "scale", (s, n), self.scale_bits, packed.device)
        sigma, widths, log_gain, tables = self._on(packed.device)
        z = _dequantize(unpack_varwidth(packed, widths, (s, n, d)), widths, tables)
        return z * sigma.unsqueeze(1) * gain_values(q, log_gain, self.scale_bits).unsqueeze(-1)


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
        return self.slots.decode(q, packed)
