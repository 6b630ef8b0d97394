"""`fp8`: float8 e4m3 with one f16 scale per vector (8 + 16/D bits per element).

Each row is scaled so that its largest magnitude maps to 448 (the e4m3 maximum), cast to
e4m3, and the scale ``max|x| / 448`` is stored as float16.
"""

from __future__ import annotations

import dataclasses

import torch

from kakeyaturbo.codecs.base import Codec, CodecConfig, Field, expect_field
from kakeyaturbo.packing import narrow

E4M3_MAX = 448.0
E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
"""float32 ``[256]``: the value of every e4m3 bit pattern (a lookup is faster than the cast on CPU)."""


@dataclasses.dataclass(frozen=True)
class Fp8Config(CodecConfig):
    """No options: e4m3 with a per-vector float16 scale."""


class Fp8Codec(Codec):
    """Per-vector-scaled float8 e4m3."""

    name = "fp8"
    config_class = Fp8Config
    payload = {"values": Field(torch.float8_e4m3fn, 3), "scale": Field(torch.float16, 2)}

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        amax = x.abs().amax(-1, keepdim=True)  # [S, n, 1]
        scale = narrow(amax / E4M3_MAX, torch.float16, "fp8 scale")
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(amax))
        q = (x / safe).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return {"values": q, "scale": scale.squeeze(-1)}

    def _decode(self, fields: dict[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        q = expect_field(fields, "values", torch.float8_e4m3fn, (s, n, d))
        scale = expect_field(fields, "scale", torch.float16, (s, n))
        values = E4M3_VALUES.to(q.device).index_select(0, q.view(torch.uint8).reshape(-1).int())
        return values.reshape(s, n, d) * scale.float().unsqueeze(-1)
