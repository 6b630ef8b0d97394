"""Compiled CPU walk of prefix-code slots (numba): the one sequential step of reading them.

:func:`kakeyaturbo.ops.prefix_code.read_slot_columns` must find where each codeword of a row starts,
and each start is the previous one plus the previous codeword's length: a chain of ``J`` dependent
lookups per row. Vectorised over rows in torch, that is ``J`` rounds of a few small tensor ops
(~5 µs of dispatch each, whatever the row count), which bounded the kakeya-v2 decoders at ~10-30
MB/s on a 2-core CPU. Here the same walk is one compiled loop per row, reading the stream's bytes
directly (no per-bit window table), and returns what the torch walk does: each codeword's LUT entry,
the raw bits after it, and where each row ended. The torch walk stays the path for other devices.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from kakeyaturbo.errors import ShapeError
from kakeyaturbo.packing import packed_nbytes

BLOCK = 256
"""Rows walked together by one thread: their chains are independent, so the CPU overlaps them."""


@numba.njit(cache=True, nogil=True, parallel=True)
def _walk(msb: np.ndarray, entry: np.ndarray, extra: np.ndarray, lut_length: np.ndarray, rows: int,
          slot_bits: int, width: int, peek: int, found: np.ndarray, raw: np.ndarray, end: np.ndarray) -> None:
    """Fill ``found [J, rows]``, ``raw [J, rows]`` and ``end [rows]`` (bits each row used); ``entry``
    and ``extra`` are ``[1 or rows, J]``; ``msb`` the stream's bytes bit-reversed, zero-padded. Blocks
    of :data:`BLOCK` rows run on numba's threads, each walking its rows position by position."""
    per_row = entry.shape[0] != 1
    mask = (1 << width) - 1
    for b in numba.prange((rows + BLOCK - 1) // BLOCK):
        first, last = b * BLOCK, min(rows, (b + 1) * BLOCK)
        at = np.arange(first, last) * np.int64(slot_bits)
        for j in range(entry.shape[1]):
            for r in range(first, last):
                e_row = r if per_row else 0
                p = at[r - first]
                q = p >> 3
                window = (((np.int64(msb[q]) << 16) | (np.int64(msb[q + 1]) << 8) | np.int64(msb[q + 2]))
                          >> (24 - width - (p & 7))) & mask
                index = (window >> peek) + entry[e_row, j]
                found[j, r] = index
                p += lut_length[index]
                more = extra[e_row, j]
                if more:
                    q = p >> 3
                    window = (((np.int64(msb[q]) << 16) | (np.int64(msb[q + 1]) << 8) | np.int64(msb[q + 2]))
                              >> (24 - width - (p & 7))) & mask
                    raw[j, r] = window >> (width - more)
                    p += more
                at[r - first] = p
        for r in range(first, last):
            end[r] = at[r - first] - r * np.int64(slot_bits)


def walk_slots(msb: torch.Tensor, entry: torch.Tensor, extra: torch.Tensor, lut_length: torch.Tensor, rows: int,
               slot_bits: int, width: int, peek: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chained walk over ``rows`` slots of ``slot_bits`` bits (CPU tensors).

    Args:
        msb: uint8 stream bytes, each bit-reversed (most significant bit first), zero-padded to cover
            every position a walk can reach (``rows * slot_bits + J * (2 * width) + 24`` bits).
        entry: int32 ``[1 or rows, J]``: each position's class row offset into the padded LUTs.
        extra: int32 ``[1 or rows, J]``: raw bits after each position's codeword.
        lut_length: int32 padded LUT of codeword lengths.
        width: bits read per lookup (``max(max_len, max raw bits)``, at most 16); ``peek = width - max_len``.

    Returns:
        ``(found, raw, end)``: int32 ``[J, rows]`` LUT entries and raw values, int64 ``[rows]`` bits used.
    """
    j = entry.shape[1]
    need = packed_nbytes(rows * slot_bits + j * 2 * width, 1) + 3
    if msb.numel() < need:
        raise ShapeError(f"walk_slots: the stream needs {need} padded bytes, got {msb.numel()}")
    found = torch.empty(j, rows, dtype=torch.int32)
    raw = torch.zeros(j, rows, dtype=torch.int32)
    end = torch.empty(rows, dtype=torch.int64)
    _walk(msb.numpy(), entry.contiguous().numpy(), extra.contiguous().numpy(), lut_length.numpy(), rows,
          slot_bits, width, peek, found.numpy(), raw.numpy(), end.numpy())
    return found, raw, end
