"""Random prefix-slot streams (valid or not) for the walk tests of every kernel."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

from kakeyaturbo.ops.prefix_code import PrefixCode, _positions, reversed_stream
from kakeyaturbo.packing import packed_nbytes


def random_code(seed: int, max_len: int) -> PrefixCode:
    g = torch.Generator().manual_seed(seed)
    return PrefixCode.from_weights(torch.rand(4, 11, generator=g) ** 3 + 1e-3, max_len)


@dataclasses.dataclass
class WalkCase:
    """A code, ``rows`` slots of ``slot`` random bytes' bits, and each position's class and raw bits."""

    code: PrefixCode
    packed: torch.Tensor
    cls: torch.Tensor
    raw_bits: torch.Tensor
    rows: int
    slot: int

    @property
    def width(self) -> int:
        return max(self.code.max_len, int(self.raw_bits.max()))

    @property
    def wide(self) -> torch.Tensor:
        return (self.raw_bits > 0).any(0).nonzero().squeeze(1)

    def msb(self) -> torch.Tensor:
        """The bit-reversed, padded bytes the kernels read."""
        return reversed_stream(self.packed, self.rows, self.slot, self.cls.shape[1], self.width)


@st.composite
def walk_cases(draw: st.DrawFn) -> WalkCase:
    seed, rows, cols = draw(st.integers(0, 2**31)), draw(st.integers(1, 9)), draw(st.integers(1, 12))
    slot, per_row = draw(st.integers(1, 70)), draw(st.booleans())
    max_len, raw_max = draw(st.integers(4, 14)), draw(st.integers(0, 16))
    g = torch.Generator().manual_seed(seed)
    code = random_code(seed, max_len)
    lead = rows if per_row else 1
    classes = torch.randint(-1, 4, (lead, cols), generator=g)
    raw_bits = torch.randint(0, raw_max + 1, (lead, cols), generator=g)
    packed = torch.randint(0, 256, (packed_nbytes(rows * slot, 1),), generator=g, dtype=torch.uint8)
    cls, rb = _positions(code, classes, raw_bits, rows)
    return WalkCase(code, packed, cls, rb, rows, slot)
