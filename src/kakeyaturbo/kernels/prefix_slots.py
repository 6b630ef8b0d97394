"""Compiled CPU walk of prefix-code slots (numba): the one sequential step of reading them.

:func:`kakeyaturbo.ops.prefix_code.read_slot_columns` must find where each codeword of a row starts,
and each start is the previous one plus the previous codeword's length: a chain of ``J`` dependent
lookups per row. Vectorised over rows in torch, that is ``J`` rounds of a few small tensor ops
(~5 µs of dispatch each, whatever the row count), which bounded the kakeya-v2 decoders at ~10-30
MB/s on a 2-core CPU. Here the same walk is one compiled loop per row, reading the stream's bytes
directly (no per-bit window table) and the code's small canonical tables (an 8-bit first lookup,
canonical decoding past it: the full ``2**max_len`` LUTs of the ECSQ family are 4 MB, which the
model's weights evict from the cache between steps). It returns what the torch walk does: each
codeword's ``class * A + symbol``, the raw bits after it, and where each row ended. CUDA tensors take
the Triton walk (:mod:`kakeyaturbo.kernels.triton_slots`), other devices the torch one.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from kakeyaturbo.ops.prefix_code import LONG, CanonicalTables, check_reversed_stream


@numba.njit(cache=True, nogil=True, inline="always")
def _bits(msb: np.ndarray, at: int, width: int, mask: int) -> int:
    """The ``width`` bits (at most 16) from bit ``at`` of the bit-reversed stream, MSB first."""
    q = at >> 3
    word = (np.int64(msb[q]) << 16) | (np.int64(msb[q + 1]) << 8) | np.int64(msb[q + 2])
    return (word >> (24 - width - (at & 7))) & mask


@numba.njit(cache=True, nogil=True)
def _walk(msb: np.ndarray, cls: np.ndarray, extra: np.ndarray, short: np.ndarray, limit: np.ndarray,
          first: np.ndarray, offset: np.ndarray, order: np.ndarray, symbols: int, max_len: int, short_bits: int,
          rows: int, slot_bits: int, width: int, found: np.ndarray, raw: np.ndarray, end: np.ndarray) -> None:
    """Fill ``found [J, rows]`` (``class * A + symbol``), ``raw [J, rows]`` and ``end [rows]`` (bits
    each row used); ``cls`` and ``extra`` are ``[1 or rows, J]``; the tables those of
    :class:`~kakeyaturbo.ops.prefix_code.CanonicalTables`. Rows are the inner loop: their chains are
    independent, so the CPU overlaps them. Single-threaded on purpose: numba's threading layers either
    touch the OpenMP state torch and vLLM's CPU attention rely on, or abort the process when two
    threads launch kernels at once."""
    per_row = cls.shape[0] != 1
    mask = (1 << width) - 1
    peek = width - max_len
    lengths = max_len + 1
    at = np.arange(rows) * np.int64(slot_bits)
    for j in range(cls.shape[1]):
        for r in range(rows):
            c = np.int64(cls[r if per_row else 0, j])
            p = at[r]
            w = _bits(msb, p, width, mask) >> peek
            entry = short[(c << short_bits) + (w >> (max_len - short_bits))]
            n = entry & 31
            if n == LONG:
                n = short_bits + 1
                while w >= limit[c * lengths + n]:
                    n += 1
                at_n = c * lengths + n
                symbol = order[c * symbols + offset[at_n] + (w >> (max_len - n)) - first[at_n]]
            else:
                symbol = entry >> 5
            found[j, r] = c * symbols + symbol
            p += n
            more = extra[r if per_row else 0, j]
            if more:
                raw[j, r] = _bits(msb, p, width, mask) >> (width - more)
                p += more
            at[r] = p
    for r in range(rows):
        end[r] = at[r] - r * np.int64(slot_bits)


def walk_slots(msb: torch.Tensor, cls: torch.Tensor, extra: torch.Tensor, tables: CanonicalTables, symbols: int,
               max_len: int, rows: int, slot_bits: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chained walk over ``rows`` slots of ``slot_bits`` bits (CPU tensors).

    Args:
        msb: :func:`~kakeyaturbo.ops.prefix_code.reversed_stream` of the slots (checked to be long enough).
        cls: int32 ``[1 or rows, J]``: each position's class (``C``, the last of ``tables``: not coded).
        extra: int32 ``[1 or rows, J]``: raw bits after each position's codeword.
        tables: the code's :attr:`~kakeyaturbo.ops.prefix_code.PrefixCode.canonical` tables.
        symbols: the code's alphabet size ``A``; ``max_len`` its longest codeword.
        width: bits read per lookup (``max(max_len, max raw bits)``, at most 16).

    Returns:
        ``(found, raw, end)``: int32 ``[J, rows]`` ``class * A + symbol`` and raw values, int64
        ``[rows]`` bits each row used.
    """
    j = cls.shape[1]
    check_reversed_stream(msb, rows, slot_bits, j, width)
    found = torch.empty(j, rows, dtype=torch.int32)
    raw = torch.zeros(j, rows, dtype=torch.int32)
    end = torch.empty(rows, dtype=torch.int64)
    _walk(msb.numpy(), cls.contiguous().numpy(), extra.contiguous().numpy(), tables.short.numpy(),
          tables.limit.numpy(), tables.first.numpy(), tables.offset.numpy(), tables.order.numpy(), symbols, max_len,
          tables.bits, rows, slot_bits, width, found.numpy(), raw.numpy(), end.numpy())
    return found, raw, end
