"""`besicovitch`: a fixed direction codebook per group of g coordinates (seed spec section 3).

Each vector (minus its block mean, when ``subtract_mean``) is cut into ``G = ceil(D/g)``
groups of ``g`` coordinates (the last zero-padded). Each group is projected onto the nearest
line of a fixed codebook of ``2**direction_bits`` unit directions (``argmax |<x, d_i>|``, ties
to the first) and stores that direction's id and the signed magnitude ``α = <x, d_id>``:

* ``magnitude_mode="f16"``: α as float16;
* ``magnitude_mode="quantized"``: index of the nearest level of the N(0,1) Lloyd–Max table of
  ``magnitude_bits`` bits applied to ``α / s``, with ``s = max_k |α_k|`` stored as f16 per vector
  or, in the Riemann variant, ``s_k`` = ``magnitude_scales[k]``, a fixed per-group offline scale
  (then no per-vector scale is stored).

Bytes per vector: ``ceil(G·db/8)`` direction ids + (``2G`` f16 | ``ceil(G·m/8)`` codes +
2 B scale), plus ``2·D`` bytes of mean per block of ``block_size`` rows.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from kakeyaturbo.codecs.base import Codec, CodecConfig, Field, check_choice, check_int, expect_field, finite_number
from kakeyaturbo.codecs.rotated_int import read_codes
from kakeyaturbo.errors import ConfigError, ShapeError
from kakeyaturbo.ops.lloyd_max import dequantize, gaussian_table, quantize
from kakeyaturbo.packing import narrow, pack_bits

_GOLDEN = (1.0 + math.sqrt(5.0)) / 2.0
_MIN_SCALE = 1e-12


@lru_cache(maxsize=64)
def _codebook_cpu(g: int, bits: int) -> torch.Tensor:
    m = 2**bits
    i = torch.arange(m, dtype=torch.float64)
    if g == 2:
        theta = math.pi * i / m
        dirs = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    else:
        z = 1.0 - 2.0 * (i + 0.5) / m
        rho = (1.0 - z * z).clamp_min(0.0).sqrt()
        a = 2.0 * math.pi * i / _GOLDEN
        extra = [0.1 * torch.cos(2.0 * math.pi * i * (k + 1) / _GOLDEN) for k in range(3, g)]
        dirs = torch.stack([z.abs(), rho * torch.cos(a), rho * torch.sin(a), *extra], dim=1)
    return (dirs / dirs.norm(dim=1, keepdim=True)).to(torch.float32)


def direction_codebook(g: int, bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit directions float32 ``[2**bits, g]``: a half-circle grid for g=2, spherical Fibonacci on
    the upper hemisphere (extra coordinates ``0.1·cos(2π·i·(k+1)/φ)``, then normalised) for g>=3."""
    return _codebook_cpu(g, bits).to(device)


@dataclasses.dataclass(frozen=True)
class BesicovitchConfig(CodecConfig):
    """Options of :class:`BesicovitchCodec`.

    Attributes:
        group_size: coordinates per direction, 2..8.
        direction_bits: bits per direction id, 1..8 (``2**direction_bits`` directions).
        magnitude_mode: ``"quantized"`` or ``"f16"``.
        magnitude_bits: bits per quantized magnitude, 1..8.
        subtract_mean: subtract (and store, f16) the mean of each block of rows.
        block_size: rows per mean block (the last block may be partial).
        magnitude_scales: Riemann variant: one positive offline scale per group (length
            ``ceil(D/group_size)``), replacing the stored per-vector scale; quantized mode only.
    """

    group_size: int = 2
    direction_bits: int = 5
    magnitude_mode: str = "quantized"
    magnitude_bits: int = 4
    subtract_mean: bool = True
    block_size: int = 1024
    magnitude_scales: tuple[float, ...] | None = None

    def validate(self) -> None:
        check_int("group_size", self.group_size, 2, 8)
        check_int("direction_bits", self.direction_bits, 1, 8)
        check_choice("magnitude_mode", self.magnitude_mode, ("quantized", "f16"))
        check_int("magnitude_bits", self.magnitude_bits, 1, 8)
        check_choice("subtract_mean", self.subtract_mean, (True, False))
        check_int("block_size", self.block_size, 1, 1 << 24)
        if self.magnitude_scales is None:
            return
        if self.magnitude_mode != "quantized":
            raise ConfigError("magnitude_scales (Riemann variant) needs magnitude_mode='quantized'")
        scales = self.magnitude_scales
        ok = isinstance(scales, tuple) and len(scales) > 0 and all(
            finite_number(v) and v > 0
            for v in scales
        )
        if not ok:
            raise ConfigError(
                f"magnitude_scales must be a non-empty tuple of positive numbers within the float32 range, "
                f"got {scales!r}"
            )


class BesicovitchCodec(Codec):
    """Direction-codebook product quantiser.

    Payload, with ``G = ceil(D/g)`` and ``B = ceil(n/block_size)``: ``directions`` (packed,
    ``S*n*G`` ids); ``magnitudes`` f16 ``[S, n, G]`` or packed ``S*n*G`` codes; ``scale`` f16
    ``[S, n]`` (quantized without ``magnitude_scales``); ``mean`` f16 ``[S, B, D]`` (``subtract_mean``).
    """

    name = "besicovitch"
    config_class = BesicovitchConfig
    payload = {
        "directions": Field(torch.uint8, 1),
        "magnitudes": Field((torch.float16, torch.uint8), (3, 1)),
        "scale": Field(torch.float16, 2, lambda c: c.magnitude_mode == "quantized" and c.magnitude_scales is None),
        "mean": Field(torch.float16, 3, lambda c: c.subtract_mean),
    }

    def _groups(self, d: int) -> int:
        groups = -(-d // self.config.group_size)
        scales = self.config.magnitude_scales
        if scales is not None and len(scales) != groups:
            raise ShapeError(
                f"besicovitch: magnitude_scales has {len(scales)} entries, head dim {d} with "
                f"group_size {self.config.group_size} has {groups} groups"
            )
        return groups

    def _row_means(self, mean: torch.Tensor, n: int) -> torch.Tensor:
        """Expand block means ``[S, B, D]`` to rows ``[S, n, D]`` (float32)."""
        block = torch.arange(n, device=mean.device) // self.config.block_size
        return mean.float()[:, block]

    def _block_means(self, x: torch.Tensor) -> torch.Tensor:
        """f16 means ``[S, B, D]`` of each block of ``block_size`` rows of ``x [S, n, D]``."""
        s, n, d = x.shape
        bs = self.config.block_size
        blocks = -(-n // bs)
        sums = F.pad(x, (0, 0, 0, blocks * bs - n)).reshape(s, blocks, bs, d).sum(2)
        counts = (n - torch.arange(blocks, device=x.device) * bs).clamp(max=bs).to(torch.float32)
        return narrow(sums / counts.unsqueeze(-1), torch.float16, "besicovitch block mean")

    def _scales(self, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Divisor for the magnitudes ``[S, n, G]`` (broadcastable) and the f16 per-vector scale to store."""
        if self.config.magnitude_scales is not None:
            return torch.tensor(self.config.magnitude_scales, dtype=torch.float32, device=alpha.device), None
        peak = alpha.abs().amax(-1).clamp_min(_MIN_SCALE)
        scale = narrow(peak, torch.float16, "besicovitch magnitude scale")
        return scale.float().unsqueeze(-1), scale

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        s, n, d = x.shape
        groups = self._groups(d)
        fields: dict[str, torch.Tensor] = {}
        if c.subtract_mean:
            mean = self._block_means(x)
            x = x - self._row_means(mean, n)
        xg = F.pad(x, (0, groups * c.group_size - d)).reshape(s, n, groups, c.group_size)
        proj = xg @ direction_codebook(c.group_size, c.direction_bits, x.device).T  # [S, n, G, M]
        ids = proj.abs().argmax(-1)
        alpha = proj.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        fields["directions"] = pack_bits(ids, c.direction_bits)
        if c.magnitude_mode == "f16":
            fields["magnitudes"] = narrow(alpha, torch.float16, "besicovitch magnitude")
        else:
            div, scale = self._scales(alpha)
            tiny = torch.finfo(torch.float32).tiny
            u = torch.where(div > 0, alpha / div.clamp_min(tiny), torch.zeros_like(alpha))
            table = gaussian_table(c.magnitude_bits).to(x.device)
            fields["magnitudes"] = pack_bits(quantize(u, table), c.magnitude_bits)
            if scale is not None:
                fields["scale"] = scale
        if c.subtract_mean:
            fields["mean"] = mean
        return fields

    def _decode(self, fields: dict[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        c = self.config
        groups = self._groups(d)
        count = s * n * groups
        ids = read_codes(fields, "directions", count, c.direction_bits).reshape(s, n, groups)
        if c.magnitude_mode == "f16":
            alpha = expect_field(fields, "magnitudes", torch.float16, (s, n, groups)).float()
        else:
            idx = read_codes(fields, "magnitudes", count, c.magnitude_bits).reshape(s, n, groups)
            alpha = dequantize(idx, gaussian_table(c.magnitude_bits).to(idx.device))
            if c.magnitude_scales is None:
                alpha = alpha * expect_field(fields, "scale", torch.float16, (s, n)).float().unsqueeze(-1)
            else:
                alpha = alpha * torch.tensor(c.magnitude_scales, dtype=torch.float32, device=alpha.device)
        dirs = direction_codebook(c.group_size, c.direction_bits, ids.device)
        y = (alpha.unsqueeze(-1) * dirs[ids]).reshape(s, n, groups * c.group_size)[..., :d]
        if c.subtract_mean:
            blocks = -(-n // c.block_size)
            y = y + self._row_means(expect_field(fields, "mean", torch.float16, (s, blocks, d)), n)
        return y
