"""Canonical prefix (Huffman) codes and fixed-size slots of variable-length codewords.

A :class:`PrefixCode` holds one length-limited canonical Huffman code per *class* (a row of a
probability table), over a shared alphabet of ``A`` symbols, and a lookup table that decodes any
codeword from its next ``max_len`` bits. Codewords are written most-significant bit first.

Slots: each row ``r`` of a ``[R, J]`` matrix of symbols is written as its ``J`` codewords one
after another (each optionally followed by ``raw`` plain bits, most-significant first) into a slot
of exactly ``slot_bits`` bits, zero-padded; the ``R`` slots are concatenated and packed
LSB-first (:func:`kakeyaturbo.packing.pack_bits` with 1-bit codes). Every slot has the same size,
so rows decode in parallel: :func:`read_slots` walks the ``J`` positions (a loop over positions,
vectorised over rows), peeking ``max_len`` bits per row and decoding them by table lookup.
"""

from __future__ import annotations

import dataclasses
import heapq

import torch

from kakeyaturbo.errors import ConfigError, CorruptDataError, NumericRangeError, ShapeError
from kakeyaturbo.packing import pack_bits, packed_nbytes, unpack_bits


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


def slot_lengths(code: PrefixCode, symbols: torch.Tensor, classes: torch.Tensor,
                 raw_bits: torch.Tensor) -> torch.Tensor:
    """Bits each position takes: int64 ``[R, J]`` (codeword plus raw bits; 0 where ``classes < 0``).

    Args:
        symbols: int64 ``[R, J]`` in ``0..A-1``.
        classes: int64 ``[R, J]`` (broadcastable); ``-1`` marks a position that is not coded.
        raw_bits: int64 ``[R, J]`` (broadcastable): plain bits after each codeword.
    """
    cls = classes.clamp_min(0).expand(symbols.shape)
    a = code.lengths.shape[1]
    length = code.lengths.reshape(-1)[cls * a + symbols] + raw_bits
    return torch.where(classes >= 0, length, 0)


def write_slots(code: PrefixCode, symbols: torch.Tensor, classes: torch.Tensor, raw: torch.Tensor,
                raw_bits: torch.Tensor, slot_bits: int) -> torch.Tensor:
    """Write each row's codewords (and raw bits) into a ``slot_bits``-bit slot; see the module docstring.

    Args:
        symbols: int64 ``[R, J]`` in ``0..A-1``.
        classes: int64 ``[R, J]`` (broadcastable), ``-1`` = position not coded.
        raw: int64 ``[R, J]``: raw values, ``0 <= raw < 2**raw_bits``.
        raw_bits: int64 ``[R, J]`` (broadcastable), ``0..`` per position.
        slot_bits: bits per row.

    Returns:
        uint8 ``[packed_nbytes(R * slot_bits, 1)]``.

    Raises:
        NumericRangeError: a row's codewords do not fit its slot.
    """
    r, j = symbols.shape
    dev = symbols.device
    cls = classes.expand(r, j)
    rb = raw_bits.expand(r, j)
    lengths = slot_lengths(code, symbols, cls, rb)
    total = lengths.sum(1)
    if r and int(total.max()) > slot_bits:
        row = int(total.argmax())
        raise NumericRangeError(f"prefix slots: row {row} needs {int(total[row])} bits, the slot holds {slot_bits}")
    a = code.lengths.shape[1]
    flat = cls.clamp_min(0) * a + symbols
    word = (code.codes.reshape(-1)[flat] << rb) | raw
    start = lengths.cumsum(1) - lengths
    width = int(lengths.max()) if lengths.numel() else 0
    k = torch.arange(width, device=dev)
    live = k < lengths.unsqueeze(-1)  # [R, J, W]
    bit = (word.unsqueeze(-1) >> (lengths.unsqueeze(-1) - 1 - k).clamp_min(0)) & 1
    where = torch.arange(r, device=dev).reshape(r, 1, 1) * slot_bits + start.unsqueeze(-1) + k
    stream = torch.zeros(r * slot_bits, dtype=torch.int64, device=dev)
    stream[where[live]] = bit[live]
    return pack_bits(stream, 1)


def read_slots(code: PrefixCode, packed: torch.Tensor, classes: torch.Tensor, raw_bits: torch.Tensor,
               rows: int, slot_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`write_slots`.

    Args:
        packed: uint8 ``[packed_nbytes(rows * slot_bits, 1)]``.
        classes: int64 ``[rows, J]`` (broadcastable), ``-1`` = not coded.
        raw_bits: int64 ``[rows, J]`` (broadcastable).

    Returns:
        ``(symbols, raw)``, int64 ``[rows, J]`` each (0 where not coded).

    Raises:
        CorruptDataError: wrong byte count, or a row's codewords run past its slot.
    """
    need = packed_nbytes(rows * slot_bits, 1)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise CorruptDataError(f"prefix slots: expected {need} uint8 bytes, got {packed.dtype} "
                               f"{tuple(packed.shape)}")
    j = classes.shape[-1]
    dev = packed.device
    cls = classes.expand(rows, j)
    rb = raw_bits.expand(rows, j)
    raw_max = int(rb.max()) if rb.numel() else 0
    peek = code.max_len + raw_max
    bits = unpack_bits(packed, 1, rows * slot_bits).reshape(rows, slot_bits)
    bits = torch.cat([bits, bits.new_zeros(rows, peek)], 1)  # in memory only: reads near a slot's end
    weights = 1 << torch.arange(peek - 1, -1, -1, device=dev)
    ahead = torch.arange(peek, device=dev)
    pos = torch.zeros(rows, dtype=torch.int64, device=dev)
    symbols = torch.zeros(rows, j, dtype=torch.int64, device=dev)
    raw = torch.zeros(rows, j, dtype=torch.int64, device=dev)
    lut_width = code.lut_symbol.shape[1]
    for col in range(j):
        c = cls[:, col]
        at = pos.clamp(max=slot_bits).unsqueeze(1)  # a corrupt row may run past its slot: checked below
        window = (bits.gather(1, at + ahead) * weights).sum(1)  # next `peek` bits, MSB first
        entry = c.clamp_min(0) * lut_width + (window >> raw_max)
        sym = code.lut_symbol.reshape(-1)[entry]
        length = code.lut_length.reshape(-1)[entry]
        m = rb[:, col]
        value = (window >> (peek - length - m).clamp_min(0)) & ((1 << m) - 1)
        coded = c >= 0
        symbols[:, col] = torch.where(coded, sym, 0)
        raw[:, col] = torch.where(coded, value, 0)
        pos = pos + torch.where(coded, length + m, 0)
    if rows and int(pos.max()) > slot_bits:
        raise CorruptDataError(f"prefix slots: row {int(pos.argmax())} runs to bit {int(pos.max())}, past its "
                               f"{slot_bits}-bit slot (corrupt or mismatched payload)")
    return symbols, raw
