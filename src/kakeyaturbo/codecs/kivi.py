"""`kivi`: KIVI's asymmetric min–max quantisation (Liu et al., ICML'24).

``axis="channel"`` (for keys) quantises each channel over groups of ``group_size`` consecutive
tokens; ``axis="token"`` (for values) quantises each token over groups of ``group_size``
consecutive channels. Every group stores an f16 step and an f16 minimum; codes take ``bits``
bits. A partial final group (``n`` or ``D`` not a multiple of ``group_size``) gets its own
min/max over the elements it holds. KIVI's full-precision window of recent tokens is a cache
policy, not part of this codec.
"""

from __future__ import annotations

import dataclasses

import torch

from kakeyaturbo.codecs.base import Codec, CodecConfig, Field, check_choice, check_int, expect_field
from kakeyaturbo.codecs.rotated_int import dequantize_minmax, group_last, quantize_minmax, read_codes
from kakeyaturbo.packing import pack_bits


@dataclasses.dataclass(frozen=True)
class KiviConfig(CodecConfig):
    """Options of :class:`KiviCodec`.

    Attributes:
        bits: code width, 2 or 4.
        group_size: elements per (step, minimum) pair along the grouped axis.
        axis: ``"channel"`` (groups of tokens, per channel) or ``"token"`` (groups of channels, per token).
    """

    bits: int = 4
    group_size: int = 32
    axis: str = "channel"

    def validate(self) -> None:
        check_choice("bits", self.bits, (2, 4))
        check_int("group_size", self.group_size, 1, 1 << 16)
        check_choice("axis", self.axis, ("channel", "token"))


class KiviCodec(Codec):
    """Per-channel or per-token grouped min–max quantisation.

    Payload, with ``A`` the kept axis and ``L`` the grouped one (``A, L = D, n`` for
    ``channel``, ``n, D`` for ``token``) and ``G = ceil(L / group_size)``: ``codes`` (packed,
    ``S*A*L`` codes), ``scale`` and ``zero`` f16 ``[S, A, G]``.
    """

    name = "kivi"
    config_class = KiviConfig
    payload = {"codes": Field(torch.uint8, 1), "scale": Field(torch.float16, 3), "zero": Field(torch.float16, 3)}

    def _axes(self, n: int, d: int) -> tuple[int, int, int, int]:
        """``(A, L, G, g)`` for an ``[S, n, d]`` input, ``g`` the group length (a group never spans more
        than ``L``: one longer than the axis holds the same values, so it is not padded out)."""
        a, length = (d, n) if self.config.axis == "channel" else (n, d)
        group = min(self.config.group_size, length)
        return a, length, -(-length // group), group

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        s, n, d = x.shape
        a, length, _, group = self._axes(n, d)
        t = x.transpose(1, 2) if c.axis == "channel" else x  # [S, A, L]
        codes, step, low = quantize_minmax(group_last(t, group), c.bits)
        codes = codes.reshape(s, a, -1)[..., :length]
        return {"codes": pack_bits(codes, c.bits), "scale": step, "zero": low}

    def _decode(self, fields: dict[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        c = self.config
        a, length, groups, group = self._axes(n, d)
        codes = read_codes(fields, "codes", s * a * length, c.bits, torch.uint8).reshape(s, a, length)
        step = expect_field(fields, "scale", torch.float16, (s, a, groups))
        low = expect_field(fields, "zero", torch.float16, (s, a, groups))
        y = dequantize_minmax(group_last(codes, group), step, low).reshape(s, a, -1)[..., :length]
        return y.transpose(1, 2) if c.axis == "channel" else y
