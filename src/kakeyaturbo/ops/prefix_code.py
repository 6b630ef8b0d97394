"""Canonical prefix (Huffman) codes and fixed-size slots of variable-length codewords.

A :class:`PrefixCode` holds one length-limited canonical Huffman code per *class* (a row of a
probability table), over a shared alphabet of ``A`` symbols, and a lookup table that decodes any
codeword from its next ``max_len`` bits. Codewords are written most-significant bit first.

Slots: each row ``r`` of a ``[R, J]`` matrix of symbols is written as its ``J`` codewords one
after another (each optionally followed by ``raw`` plain bits, most-significant first) into a slot
of exactly ``slot_bits`` bits, zero-padded; the ``R`` slots are concatenated and packed
LSB-first (:func:`kakeyaturbo.packing.pack_bits` with 1-bit codes). Every slot has the same size,
so rows decode in parallel: :func:`read_slots` walks the ``J`` positions (a loop over positions,
vectorised over rows) with two lookups a step, the next ``max_len`` bits at each row's position
(precomputed for every bit of the payload) and the length of the codeword they begin with; symbols
and raw bits are then read at all the positions at once.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import importlib.util

import torch

from kakeyaturbo.errors import ConfigError, CorruptDataError, NumericRangeError, ShapeError
from kakeyaturbo.packing import packed_nbytes

FIELD_BITS = 16
"""Longest codeword, and most raw bits after one, the slot functions handle."""
_REVERSED = torch.tensor([int(f"{i:08b}"[::-1], 2) for i in range(256)], dtype=torch.uint8)
"""Each byte with its bits in reverse order (LSB-first bytes to MSB-first ones and back)."""


def huffman_lengths(weights: list[float], max_len: int) -> list[int]:
    """Code lengths of a Huffman code for ``weights`` (all ``> 0``), none longer than ``max_len``.

    When plain Huffman exceeds ``max_len``, the weights are flattened (a growing share of the
    largest weight added to every weight) until it does not; the result is still a complete code.
    """
    n = len(weights)
    if n < 2 or (1 << max_len) < n:
        raise ConfigError(f"prefix code: need 2..2**max_len symbols, got {n} with max_len={max_len}")
    if min(weights) <= 0:
        raise ConfigError("prefix code: every symbol weight must be > 0")
    w = list(weights)
    bump = max(w) * 1e-6
    while True:
        heap = [(x, i, [i]) for i, x in enumerate(w)]
        heapq.heapify(heap)
        lengths = [0] * n
        tie = n
        while len(heap) > 1:
            a, _, sa = heapq.heappop(heap)
            b, _, sb = heapq.heappop(heap)
            for i in sa + sb:
                lengths[i] += 1
            heapq.heappush(heap, (a + b, tie, sa + sb))
            tie += 1
        if max(lengths) <= max_len:
            return lengths
        w = [x + bump for x in w]
        bump *= 4


@dataclasses.dataclass(frozen=True, eq=False)
class PrefixCode:
    """Canonical prefix codes, one per class, over ``A`` symbols.

    Attributes:
        lengths: int64 ``[C, A]``: codeword length of each (class, symbol), 1..max_len.
        codes: int64 ``[C, A]``: codeword value (its ``lengths`` low bits, MSB first).
        lut_symbol: int64 ``[C, 2**max_len]``: symbol whose codeword prefixes each ``max_len``-bit word.
        lut_length: int64 ``[C, 2**max_len]``: that codeword's length.
        max_len: longest codeword.
    """

    lengths: torch.Tensor
    codes: torch.Tensor
    lut_symbol: torch.Tensor
    lut_length: torch.Tensor
    max_len: int

    @classmethod
    def from_weights(cls, weights: torch.Tensor, max_len: int) -> PrefixCode:
        """Build from positive symbol weights ``[C, A]`` (any scale per row)."""
        if weights.dim() != 2:
            raise ShapeError(f"prefix code: weights must be [C, A], got {tuple(weights.shape)}")
        lengths = torch.tensor([huffman_lengths(row, max_len) for row in weights.double().tolist()],
                               dtype=torch.int64)
        c, a = lengths.shape
        order = torch.argsort(lengths * a + torch.arange(a), dim=1)  # canonical order: by length, then symbol
        ordered = lengths.gather(1, order)
        codes_sorted = torch.zeros(c, a, dtype=torch.int64)
        for i in range(1, a):  # canonical assignment: next code, shifted to the next length
            codes_sorted[:, i] = (codes_sorted[:, i - 1] + 1) << (ordered[:, i] - ordered[:, i - 1])
        codes = torch.zeros_like(codes_sorted).scatter(1, order, codes_sorted)
        span = 1 << (max_len - lengths)  # LUT entries per codeword
        lut_symbol = torch.repeat_interleave(order.reshape(-1), span.gather(1, order).reshape(-1)).reshape(c, -1)
        lut_length = lengths.gather(1, lut_symbol)
        if lut_symbol.shape[1] != 1 << max_len:
            raise ConfigError("prefix code: lengths do not form a complete code")  # Huffman always does
        return cls(lengths, codes, lut_symbol, lut_length, max_len)

    def to(self, device: torch.device | str) -> PrefixCode:
        """A copy with every table on ``device``."""
        return PrefixCode(self.lengths.to(device), self.codes.to(device), self.lut_symbol.to(device),
                          self.lut_length.to(device), self.max_len)

    @functools.cached_property
    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat int32 tables with one more class, ``C``, of empty codewords (a position that is not
        coded): ``lengths``, ``codes`` (``[(C + 1) * A]``), ``lut_symbol``, ``lut_length``
        (``[(C + 1) * 2**max_len]``)."""
        def grow(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(1, t.shape[1])]).reshape(-1).to(torch.int32)

        return grow(self.lengths), grow(self.codes), grow(self.lut_symbol), grow(self.lut_length)

    @functools.cached_property
    def canonical(self) -> CanonicalTables:
        """The small tables a decoder that must stay in cache reads (see :class:`CanonicalTables`)."""
        c, a = self.lengths.shape
        m = self.max_len
        p = min(SHORT_BITS, m)
        dev = self.lengths.device
        count = torch.stack([(self.lengths == n).sum(1) for n in range(m + 1)], 1)  # [C, m + 1]
        first = torch.zeros_like(count)
        for n in range(2, m + 1):  # canonical codes: each length starts after the shorter ones, shifted
            first[:, n] = (first[:, n - 1] + count[:, n - 1]) << 1
        limit = (first + count) << (m - torch.arange(m + 1, device=dev))
        offset = count.cumsum(1) - count
        order = torch.argsort(self.lengths * a + torch.arange(a, device=dev), dim=1)
        at = torch.arange(1 << p, device=dev) << (m - p)
        length, symbol = self.lut_length[:, at], self.lut_symbol[:, at]
        short = torch.where(length <= p, symbol << 5 | length, LONG)

        def grow(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(1, t.shape[1])]).reshape(-1).to(dtype)

        return CanonicalTables(p, grow(short, torch.int32), grow(limit, torch.int64), grow(first, torch.int64),
                               grow(offset, torch.int32), grow(order, torch.int32))


SHORT_BITS = 8
"""Codeword bits :attr:`CanonicalTables.short` resolves in one lookup."""
LONG = 31
"""The length field of a :attr:`CanonicalTables.short` entry whose codeword is longer."""


@dataclasses.dataclass(frozen=True)
class CanonicalTables:
    """Tables of a :class:`PrefixCode` small enough to stay in a CPU cache while a decoder walks many
    slots (the ``2**max_len`` LUTs of every class do not: 4 MB for the ECSQ family), flat over the
    ``C + 1`` classes of :attr:`PrefixCode.padded` (the last one empty: a position not coded).

    A codeword starting with the ``max_len``-bit word ``w`` is looked up by its first ``bits`` bits in
    ``short`` (``symbol << 5 | length``); where that length field is :data:`LONG` the codeword is
    longer, and canonical decoding finds it: its length ``n`` is the first past ``bits`` with
    ``w < limit[n]``, and its symbol ``order[offset[n] + (w >> (max_len - n)) - first[n]]``.

    Attributes:
        bits: the bits ``short`` is indexed by (``min(SHORT_BITS, max_len)``).
        short: int32 ``[(C + 1) * 2**bits]``.
        limit: int64 ``[(C + 1) * (max_len + 1)]``: one past the last codeword of each length, as a
            ``max_len``-bit word.
        first: int64 ``[(C + 1) * (max_len + 1)]``: the first codeword of each length.
        offset: int32 ``[(C + 1) * (max_len + 1)]``: codewords shorter than each length.
        order: int32 ``[(C + 1) * A]``: the symbols in canonical order (by length, then symbol).
    """

    bits: int
    short: torch.Tensor
    limit: torch.Tensor
    first: torch.Tensor
    offset: torch.Tensor
    order: torch.Tensor


def slot_lengths(code: PrefixCode, symbols: torch.Tensor, classes: torch.Tensor,
                 raw_bits: torch.Tensor) -> torch.Tensor:
    """Bits each position takes: int32 ``[R, J]`` (codeword plus raw bits; 0 where ``classes < 0``).

    Args:
        symbols: integer ``[R, J]`` in ``0..A-1``.
        classes: int64 ``[R, J]`` (broadcastable); ``-1`` marks a position that is not coded.
        raw_bits: int64 ``[R, J]`` (broadcastable): plain bits after each codeword.
    """
    cls, rb = _positions(code, classes, raw_bits, symbols.shape[0])
    at = (cls * code.lengths.shape[1] + symbols.to(torch.int32)).reshape(-1)
    return code.padded[0].index_select(0, at).view(symbols.shape) + rb


def _positions(code: PrefixCode, classes: torch.Tensor, raw_bits: torch.Tensor, rows: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class index into :attr:`PrefixCode.padded` (``C`` where not coded) and raw bits (0 where not
    coded) of each position: int32, shaped like the broadcast of ``classes`` and ``raw_bits``."""
    cls = torch.broadcast_tensors(classes, raw_bits)[0]
    rb = torch.broadcast_tensors(raw_bits, classes)[0]
    coded = cls >= 0
    none = code.lengths.shape[0]
    if cls.shape[0] not in (1, rows):
        raise ShapeError(f"prefix slots: classes and raw bits must have 1 or {rows} rows, got {cls.shape[0]}")
    return torch.where(coded, cls, none).to(torch.int32), torch.where(coded, rb, 0).to(torch.int32)


def write_slots(code: PrefixCode, symbols: torch.Tensor, classes: torch.Tensor, raw: torch.Tensor,
                raw_bits: torch.Tensor, slot_bits: int) -> torch.Tensor:
    """Write each row's codewords (and raw bits) into a ``slot_bits``-bit slot; see the module docstring.

    Args:
        symbols: integer ``[R, J]`` in ``0..A-1``.
        classes: int64 ``[R, J]`` (broadcastable), ``-1`` = position not coded.
        raw: integer ``[R, J]``: raw values, ``0 <= raw < 2**raw_bits``.
        raw_bits: int64 ``[R, J]`` (broadcastable), ``0..FIELD_BITS`` per position.
        slot_bits: bits per row.

    Returns:
        uint8 ``[packed_nbytes(R * slot_bits, 1)]``.

    Raises:
        NumericRangeError: a row's codewords do not fit its slot.
    """
    r, j = symbols.shape
    cls, rb = _positions(code, classes, raw_bits, r)
    if code.max_len > FIELD_BITS or (rb.numel() and int(rb.max()) > FIELD_BITS):
        raise ShapeError(f"prefix slots: codewords and raw fields must be at most {FIELD_BITS} bits")
    lengths = slot_lengths(code, symbols, classes, raw_bits)
    total = lengths.sum(1)
    if r and int(total.max()) > slot_bits:
        row = int(total.argmax())
        raise NumericRangeError(f"prefix slots: row {row} needs {int(total[row])} bits, the slot holds {slot_bits}")
    codeword = code.padded[1].index_select(0, (cls * code.lengths.shape[1] + symbols.to(torch.int32)).reshape(-1))
    word = (codeword.view(r, j) << rb) | (raw.to(torch.int32) & ((1 << rb) - 1))
    return pack_slots(word, lengths, slot_bits)


def pack_slots(words: torch.Tensor, lengths: torch.Tensor, slot_bits: int) -> torch.Tensor:
    """The slots of :func:`write_slots` from each position's word (its codeword and raw bits, MSB first)
    and length, int32 ``[R, J]`` each (lengths at most 31 - 7, rows at most ``slot_bits`` long; not
    checked here). Every word lands in the 64-bit frame of the two 32-bit words its first bit falls in
    (the stream is written MSB-first and bit-reversed per byte at the end), by two scatter-adds."""
    r, _ = words.shape
    dev = words.device
    index = torch.int32 if r * slot_bits < 2**31 else torch.int64
    start = lengths.cumsum(1, dtype=index) - lengths + torch.arange(r, dtype=index, device=dev).unsqueeze(1) * slot_bits
    frame = words.to(torch.int64) << (63 - (start & 31) - lengths)  # bits 62..31: the first word, 30..0: the next
    nbytes = packed_nbytes(r * slot_bits, 1)
    out = torch.zeros(nbytes // 4 + 2, dtype=torch.int64, device=dev)
    at = (start >> 5).reshape(-1).to(torch.int64)
    out.scatter_add_(0, at, (frame >> 31).reshape(-1))
    out.scatter_add_(0, at + 1, ((frame & 0x7FFF_FFFF) << 1).reshape(-1))
    msb_first = out.view(torch.uint8).reshape(-1, 8)[:, :4].flip(1).reshape(-1)[:nbytes]  # big-endian bytes
    return _REVERSED.to(dev).index_select(0, msb_first.to(torch.int32))


def _windows(packed: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """int32 ``[bits]``: the ``width`` bits (MSB first, ``width <= FIELD_BITS``) from every bit offset of
    the LSB-first stream ``packed`` (zeros past its end)."""
    nbytes = -(-bits // 8)
    msb = torch.zeros(nbytes + 2, dtype=torch.int32, device=packed.device)
    msb[: packed.numel()] = _REVERSED.to(packed.device).index_select(0, packed.to(torch.int32)).to(torch.int32)
    word = (msb[:-2] << 16) | (msb[1:-1] << 8) | msb[2:]  # the 24 bits from each byte on
    shifts = 24 - width - torch.arange(8, dtype=torch.int32, device=packed.device)
    return ((word.unsqueeze(1) >> shifts) & ((1 << width) - 1)).reshape(-1)[:bits]


def read_slots(code: PrefixCode, packed: torch.Tensor, classes: torch.Tensor, raw_bits: torch.Tensor,
               rows: int, slot_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`write_slots`.

    Args:
        packed: uint8 ``[packed_nbytes(rows * slot_bits, 1)]``.
        classes: int64 ``[rows, J]`` or ``[1, J]`` (broadcastable), ``-1`` = not coded.
        raw_bits: int64 ``[rows, J]`` or ``[1, J]`` (broadcastable).

    Returns:
        ``(symbols, raw)``, int64 ``[rows, J]`` each (0 where not coded).

    Raises:
        CorruptDataError: wrong byte count, or a row's codewords run past its slot.
    """
    found = read_slot_columns(code, packed, classes, raw_bits, rows, slot_bits)
    raw = torch.zeros(found.entry.shape, dtype=torch.int64, device=packed.device)
    raw[found.raw_columns] = found.raw.to(torch.int64)
    return (found.entry % code.lengths.shape[1]).t().to(torch.int64), raw.t()


@dataclasses.dataclass(frozen=True)
class SlotColumns:
    """The codewords :func:`read_slot_columns` found, position-major.

    Attributes:
        entry: int32 ``[J, rows]``: ``class * A + symbol`` of each codeword (class ``C`` where a position
            is not coded): an index into any per-(class, symbol) table padded as :attr:`PrefixCode.padded`.
        raw_columns: int64 ``[J']``: the positions that have raw bits in some row.
        raw: int32 ``[J', rows]``: their raw values (0 in rows without raw bits there).
    """

    entry: torch.Tensor
    raw_columns: torch.Tensor
    raw: torch.Tensor


def read_slot_columns(code: PrefixCode, packed: torch.Tensor, classes: torch.Tensor, raw_bits: torch.Tensor,
                      rows: int, slot_bits: int) -> SlotColumns:
    """:func:`read_slots`, position-major and stopping at the LUT entries (a decoder can look up what it
    needs in one step); arguments and errors as there. The chained walk is compiled where
    :func:`compiled_walk` says so, else :func:`_walk_torch`."""
    need = packed_nbytes(rows * slot_bits, 1)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise CorruptDataError(f"prefix slots: expected {need} uint8 bytes, got {packed.dtype} "
                               f"{tuple(packed.shape)}")
    cls, rb = _positions(code, classes, raw_bits, rows)
    raw_max = int(rb.max()) if rb.numel() else 0
    width = max(code.max_len, raw_max)
    if width > FIELD_BITS:
        raise ShapeError(f"prefix slots: codewords and raw fields must be at most {FIELD_BITS} bits")
    wide = (rb > 0).any(0).nonzero().squeeze(1)
    walk = _walk_compiled if compiled_walk(packed.device) else _walk_torch
    found, raw, end = walk(code, packed, cls, rb, rows, slot_bits, width, wide)
    if rows and int(end.max()) > slot_bits:
        raise CorruptDataError(f"prefix slots: row {int(end.argmax())} runs to bit {int(end.max())}, past its "
                               f"{slot_bits}-bit slot (corrupt or mismatched payload)")
    return SlotColumns(found, wide, raw)


Walk = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""What a walk over the slots returns: ``class * A + symbol`` int32 ``[J, rows]``, raw values int32 ``[J', rows]``
of the positions ``wide`` (those with raw bits in some row), bits each row used ``[rows]``."""


def compiled_walk(device: torch.device) -> bool:
    """Whether slots on ``device`` are walked by a compiled kernel: numba on the CPU, Triton on CUDA
    (when it is installed); elsewhere :func:`_walk_torch`."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def stream_reach(rows: int, slot_bits: int, positions: int, width: int) -> int:
    """Bits a walk of ``rows`` slots of ``positions`` codewords may read: the slots, plus what a corrupt
    last row can run past them (each position at most a codeword and raw bits, ``2 * width``)."""
    return rows * slot_bits + positions * 2 * width


def reversed_stream_nbytes(rows: int, slot_bits: int, positions: int, width: int) -> int:
    """Bytes of :func:`reversed_stream`: :func:`stream_reach` and the 3 a 24-bit read past it touches."""
    return packed_nbytes(stream_reach(rows, slot_bits, positions, width), 1) + 3


def reversed_stream(packed: torch.Tensor, rows: int, slot_bits: int, positions: int, width: int) -> torch.Tensor:
    """The compiled walks' input: ``packed`` with each byte bit-reversed (most significant bit first),
    zero-padded to :func:`reversed_stream_nbytes`."""
    dev = packed.device
    msb = torch.zeros(reversed_stream_nbytes(rows, slot_bits, positions, width), dtype=torch.uint8, device=dev)
    msb[: packed.numel()] = _REVERSED.to(dev).index_select(0, packed.to(torch.int32))
    return msb


def check_reversed_stream(msb: torch.Tensor, rows: int, slot_bits: int, positions: int, width: int) -> None:
    """Raise :class:`ShapeError` unless ``msb`` holds every byte a walk may read."""
    need = reversed_stream_nbytes(rows, slot_bits, positions, width)
    if msb.numel() < need:
        raise ShapeError(f"walk_slots: the stream needs {need} padded bytes, got {msb.numel()}")


def _walk_compiled(code: PrefixCode, packed: torch.Tensor, cls: torch.Tensor, extra: torch.Tensor, rows: int,
                   slot_bits: int, width: int, wide: torch.Tensor) -> Walk:
    """The walk as one compiled kernel over the bit-reversed bytes and the code's
    :attr:`~PrefixCode.canonical` tables (:mod:`kakeyaturbo.kernels.prefix_slots` on the CPU,
    :mod:`kakeyaturbo.kernels.triton_slots` on CUDA); ``cls`` and ``extra`` int32 ``[rows or 1, J]``."""
    if packed.device.type == "cpu":
        from kakeyaturbo.kernels.prefix_slots import walk_slots
    else:
        from kakeyaturbo.kernels.triton_slots import walk_slots_triton as walk_slots

    msb = reversed_stream(packed, rows, slot_bits, cls.shape[1], width)
    found, raw, end = walk_slots(msb, cls, extra, code.canonical, code.lengths.shape[1], code.max_len, rows,
                                 slot_bits, width)
    return found, raw.index_select(0, wide), end


def _walk_torch(code: PrefixCode, packed: torch.Tensor, cls: torch.Tensor, extra: torch.Tensor, rows: int,
                slot_bits: int, width: int, wide: torch.Tensor) -> Walk:
    """The walk in torch, one round of lookups per position vectorised over rows, from a table of the
    ``width`` bits at every bit offset and the ``2**max_len`` LUTs (any device)."""
    j = cls.shape[1]
    dev = packed.device
    lut_symbol, lut_length = code.padded[2:]
    lut = 1 << code.max_len
    window = _windows(packed, stream_reach(rows, slot_bits, j, width) + 1, width)
    peek = width - code.max_len  # window bits beyond a LUT index
    cls, extra = cls.t(), extra.t()  # [J, rows or 1]
    entry = cls * lut
    if entry.shape[1] == 1:  # one class per position for every row: each step reads that LUT row
        rows_of = lut_length.view(-1, lut)
        steps = [(rows_of[c], None, m or None) for c, m in zip(cls[:, 0].tolist(), extra[:, 0].tolist())]
    else:
        steps = [(lut_length, e, x if wide.numel() else None) for e, x in zip(entry, extra)]
    positions = [torch.arange(rows, dtype=torch.int32, device=dev) * slot_bits]
    for table, offset, more in steps:  # the codeword lengths chain the positions: the one loop
        at = positions[-1]
        ahead = window.index_select(0, at)
        ahead = ahead >> peek if peek else ahead
        at = at + table.index_select(0, ahead if offset is None else ahead + offset)
        positions.append(at if more is None else at + more)
    at = torch.stack(positions[:-1])
    ahead = window.index_select(0, at.reshape(-1)).view(j, rows)
    index = ((ahead >> peek if peek else ahead) + entry).reshape(-1)
    found = lut_symbol.index_select(0, index).view(j, rows) + cls * code.lengths.shape[1]
    end = positions[-1] - positions[0]
    if not wide.numel():
        return found, found.new_zeros(0, rows), end
    index = index.view(j, rows).index_select(0, wide).reshape(-1)
    after = at.index_select(0, wide).reshape(-1) + lut_length.index_select(0, index)
    raw = window.index_select(0, after).view(wide.numel(), rows) >> (width - extra.index_select(0, wide))
    return found, raw, end
