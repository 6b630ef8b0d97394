"""`identity`: bf16 storage, the reference point for every ratio (16 bits per element)."""

from __future__ import annotations

import dataclasses

import torch

from kakeyaturbo.codecs.base import Codec, CodecConfig, Field, expect_field
from kakeyaturbo.packing import narrow


@dataclasses.dataclass(frozen=True)
class IdentityConfig(CodecConfig):
    """No options: values are stored as bfloat16."""


class IdentityCodec(Codec):
    """Stores ``x`` as bfloat16 ``[S, n, D]``; lossless for bf16 inputs."""

    name = "identity"
    config_class = IdentityConfig
    payload = {"values": Field(torch.bfloat16, 3)}

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"values": narrow(x, torch.bfloat16, "identity values")}

    def _decode(self, fields: dict[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        return expect_field(fields, "values", torch.bfloat16, (s, n, d)).float()
