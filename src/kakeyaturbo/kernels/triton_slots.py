"""Triton walk of prefix-code slots: :mod:`kakeyaturbo.kernels.prefix_slots` for GPUs.

The same walk as the compiled CPU one (the code's canonical tables, the stream's bit-reversed
bytes), written for Triton: one program per :data:`BLOCK` rows, the rows of a program in lanes, the
``J`` positions a loop; the canonical search past the first lookup counts the lengths whose limit a
word reaches (branch-free, as lanes need). :func:`kakeyaturbo.ops.prefix_code.read_slot_columns` uses
it on CUDA tensors when Triton is installed. It is tested on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``) against the other walks; no GPU figure of it has been measured yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kakeyaturbo.ops.prefix_code import LONG, CanonicalTables, check_reversed_stream

BLOCK = 128
"""Rows per Triton program."""


@triton.jit
def _bits(msb, at, width, mask):
    """The ``width`` bits from bit ``at`` of the bit-reversed stream (every lane), MSB first."""
    q = at >> 3
    word = (tl.load(msb + q).to(tl.int64) << 16) | (tl.load(msb + q + 1).to(tl.int64) << 8) | \
        tl.load(msb + q + 2).to(tl.int64)
    return (word >> (24 - width - (at & 7))) & mask


@triton.jit
def _walk_kernel(msb, cls, extra, short, limit, first, offset, order, found, raw, end, rows, positions, row_stride,
                 slot_bits, width, max_len, short_bits, symbols, long_marker, BLOCK_ROWS: tl.constexpr):
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    live = r < rows
    row = tl.where(live, r, 0).to(tl.int64)
    at = row * slot_bits
    mask = (1 << width) - 1
    lengths = max_len + 1
    for j in range(positions):
        c = tl.load(cls + row * row_stride + j).to(tl.int64)
        w = _bits(msb, at, width, mask) >> (width - max_len)
        entry = tl.load(short + (c << short_bits) + (w >> (max_len - short_bits)))
        n = (entry & 31).to(tl.int64)
        longer = n == long_marker
        n_long = (short_bits + 1).to(tl.int64) + tl.zeros_like(n)
        for k in range(short_bits + 1, max_len + 1):
            n_long += tl.where(longer & (w >= tl.load(limit + c * lengths + k, mask=longer, other=0)), 1, 0)
        at_n = c * lengths + tl.where(longer, n_long, 0)
        rank = tl.load(offset + at_n, mask=longer, other=0) + (w >> (max_len - tl.where(longer, n_long, max_len))) \
            - tl.load(first + at_n, mask=longer, other=0)
        symbol = tl.where(longer, tl.load(order + c * symbols + tl.where(longer, rank, 0), mask=longer, other=0),
                          entry >> 5)
        tl.store(found + j * rows + row, (c * symbols + symbol).to(tl.int32), mask=live)
        at += tl.where(longer, n_long, n)
        more = tl.load(extra + row * row_stride + j).to(tl.int64)
        value = _bits(msb, at, width, mask) >> (width - more)
        tl.store(raw + j * rows + row, tl.where(more > 0, value, 0).to(tl.int32), mask=live)
        at += more
    tl.store(end + row, at - row * slot_bits, mask=live)


def walk_slots_triton(msb: torch.Tensor, cls: torch.Tensor, extra: torch.Tensor, tables: CanonicalTables,
                      symbols: int, max_len: int, rows: int, slot_bits: int, width: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`kakeyaturbo.kernels.prefix_slots.walk_slots` in Triton (tensors on one device: a GPU, or
    the CPU under ``TRITON_INTERPRET=1``); same arguments and results."""
    j = cls.shape[1]
    check_reversed_stream(msb, rows, slot_bits, j, width)
    dev = msb.device
    found = torch.empty(j, rows, dtype=torch.int32, device=dev)
    raw = torch.empty(j, rows, dtype=torch.int32, device=dev)
    end = torch.empty(rows, dtype=torch.int64, device=dev)
    if rows and j:
        stride = j if cls.shape[0] != 1 else 0
        _walk_kernel[(triton.cdiv(rows, BLOCK),)](
            msb, cls.contiguous(), extra.contiguous(), *(t.to(dev) for t in (tables.short, tables.limit, tables.first,
                                                                              tables.offset, tables.order)),
            found, raw, end, rows, j, stride, slot_bits, width, max_len, tables.bits, symbols, LONG,
            BLOCK_ROWS=BLOCK)
    elif rows:
        end.zero_()
    return found, raw, end
