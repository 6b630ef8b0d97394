"""`rotated-int`: grouped integer quantisation after an optional randomized Hadamard rotation.

Each vector is zero-padded to a power of two ``W`` and rotated (``ops.hadamard.rotate`` with
``random_signs(W, seed)``) when ``rotate`` is on, then cut into groups of ``group_size``
coordinates. Symmetric mode stores one f16 scale ``max|x| / (2**(b-1)-1)`` per group and codes
in ``-(2**(b-1)-1)..2**(b-1)-1`` (like llama.cpp q4_0/q8_0); asymmetric mode stores an f16
minimum and an f16 step per group and codes in ``0..2**b-1``. Codes are packed at ``bits``
bits each, so int4 / group 32 / symmetric costs exactly 4.5 bits per element of payload.

The group helpers here (:func:`group_last`, the symmetric and min–max quantisers,
:func:`read_codes`) are shared with the KIVI codec.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kakeyaturbo.codecs.base import Codec, CodecConfig, Field, check_choice, check_int, expect_field
from kakeyaturbo.errors import CorruptDataError, ShapeError
from kakeyaturbo.ops.hadamard import next_pow2, random_signs, rotate, unrotate
from kakeyaturbo.packing import narrow, pack_bits, packed_nbytes, unpack_bits


def group_last(x: torch.Tensor, group: int) -> torch.Tensor:
    """Split the last dim into groups: ``[..., L] -> [..., ceil(L/group), group]``.

    A partial final group is padded by repeating the last element, which leaves the group's
    min, max and max-magnitude unchanged.
    """
    pad = (-x.shape[-1]) % group
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, group)


def _safe_inverse(scale: torch.Tensor) -> torch.Tensor:
    """``1/scale`` where ``scale > 0``, else 0 (float32, shaped like ``scale``)."""
    s = scale.float()
    return torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(s))


def quantize_symmetric(xg: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantisation of groups.

    Args:
        xg: float32 ``[..., g]``.
        bits: code width; levels are ``-(2**(bits-1)-1)..2**(bits-1)-1``.

    Returns:
        ``(codes, scale)``: uint8 ``[..., g]`` offset to ``0..2**bits-2`` and float16 ``[...]``.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = narrow(xg.abs().amax(-1) / qmax, torch.float16, "rotated-int scale")
    q = torch.round(xg * _safe_inverse(scale).unsqueeze(-1)).clamp(-qmax, qmax)
    return (q + qmax).to(torch.uint8), scale


def dequantize_symmetric(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize_symmetric`: float32 ``[..., g]`` from integer codes (codes above
    ``2**bits-2`` are corrupt)."""
    qmax = 2 ** (bits - 1) - 1
    if codes.numel() and int(codes.amax()) > 2 * qmax:
        raise CorruptDataError(f"symmetric {bits}-bit code {2 * qmax + 1} is not a valid level")
    return (codes.to(torch.float32) - qmax) * scale.float().unsqueeze(-1)


def quantize_minmax(xg: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min–max quantisation of groups.

    Args:
        xg: float32 ``[..., g]``.
        bits: code width; codes ``0..2**bits-1``.

    Returns:
        ``(codes, step, low)``: uint8 ``[..., g]``, float16 ``[...]`` step and float16 ``[...]``
        minimum; ``x ≈ low + code * step``. Codes are computed against the f16-rounded values.
    """
    top = 2**bits - 1
    low = narrow(xg.amin(-1), torch.float16, "min-max zero point")
    lo = low.float().unsqueeze(-1)
    step = narrow((xg.amax(-1) - low.float()) / top, torch.float16, "min-max scale")
    q = torch.round((xg - lo) * _safe_inverse(step).unsqueeze(-1)).clamp(0, top)
    return q.to(torch.uint8), step, low


def dequantize_minmax(codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_minmax`: float32 ``[..., g]``."""
    return low.float().unsqueeze(-1) + codes.to(torch.float32) * step.float().unsqueeze(-1)


def read_codes(fields: dict[str, torch.Tensor], name: str, count: int, bits: int,
               dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Unpack ``count`` codes of ``bits`` bits from uint8 field ``name`` (size checked): ``[count]`` of
    ``dtype``."""
    packed = expect_field(fields, name, torch.uint8, (packed_nbytes(count, bits),))
    return unpack_bits(packed, bits, count, dtype)


@dataclasses.dataclass(frozen=True)
class RotatedIntConfig(CodecConfig):
    """Options of :class:`RotatedIntCodec`.

    Attributes:
        bits: code width, one of 2, 3, 4, 8.
        group_size: coordinates per scale; a vector shorter than this (after padding) is one group.
        symmetric: absmax levels around 0 (True) or min–max with an f16 zero point (False).
        rotate: apply the randomized Hadamard rotation first (pads D to a power of two).
        seed: seed of the rotation's random signs.
    """

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    rotate: bool = True
    seed: int = 0

    def validate(self) -> None:
        check_choice("bits", self.bits, (2, 3, 4, 8))
        check_int("group_size", self.group_size, 1, 1 << 16)
        check_choice("symmetric", self.symmetric, (True, False))
        check_choice("rotate", self.rotate, (True, False))
        check_int("seed", self.seed, 0, 2**63 - 1)


class RotatedIntCodec(Codec):
    """Grouped int quantisation (q4_0/q8_0 style) of Hadamard-rotated vectors.

    Payload: ``codes`` (packed, ``S*n*W`` codes), ``scale`` f16 ``[S, n, W/g]`` and, when
    asymmetric, ``zero`` f16 ``[S, n, W/g]``.
    """

    name = "rotated-int"
    config_class = RotatedIntConfig
    payload = {"codes": Field(torch.uint8, 1), "scale": Field(torch.float16, 3),
               "zero": Field(torch.float16, 3, lambda c: not c.symmetric)}

    def layout(self, d: int) -> tuple[int, int]:
        """Stored width ``W`` and effective group size for head dim ``d``."""
        w = next_pow2(d) if self.config.rotate else d
        g = min(self.config.group_size, w)
        if w % g:
            raise ShapeError(
                f"rotated-int: group_size {self.config.group_size} does not divide the stored width {w} "
                f"(head dim {d}{', padded to a power of two' if self.config.rotate else ''})"
            )
        return w, g

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        s, n, d = x.shape
        w, g = self.layout(d)
        if c.rotate:
            x = rotate(F.pad(x, (0, w - d)), random_signs(w, c.seed, x.device))
        xg = x.reshape(s, n, w // g, g)
        if c.symmetric:
            codes, scale = quantize_symmetric(xg, c.bits)
            return {"codes": pack_bits(codes, c.bits), "scale": scale}
        codes, step, low = quantize_minmax(xg, c.bits)
        return {"codes": pack_bits(codes, c.bits), "scale": step, "zero": low}

    def _decode(self, fields: dict[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        c = self.config
        w, g = self.layout(d)
        codes = read_codes(fields, "codes", s * n * w, c.bits, torch.uint8).reshape(s, n, w // g, g)
        scale = expect_field(fields, "scale", torch.float16, (s, n, w // g))
        if c.symmetric:
            y = dequantize_symmetric(codes, scale, c.bits)
        else:
            y = dequantize_minmax(codes, scale, expect_field(fields, "zero", torch.float16, (s, n, w // g)))
        y = y.reshape(s, n, w)
        if c.rotate:
            y = unrotate(y, random_signs(w, c.seed, y.device))
        return y[..., :d]
