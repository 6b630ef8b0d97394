"""Variable-width bit packing: each component of a vector has its own width (0..8 bits).

The stream is LSB-first and continuous, in C order over the codes: component ``j`` of a
vector contributes ``widths[j]`` bits (none when the width is 0), possibly straddling byte
boundaries. With equal widths ``b`` it is byte-for-byte :func:`kakeyaturbo.packing.pack_bits`.
Widths are ``[D]`` (shared by every vector) or ``[S, D]`` (one row per leading index of the
codes, i.e. per stream of a ``[S, ..., D]`` tensor).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from kakeyaturbo.errors import NumericRangeError, ShapeError
from kakeyaturbo.packing import pack_bits

_MAX_WIDTH = 8


def _expand_widths(widths: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Check ``widths`` and broadcast it to ``shape`` (``[..., D]``) as int64."""
    if len(shape) < 1:
        raise ShapeError("varwidth: codes need at least one dim [..., D]")
    if widths.is_floating_point() or widths.dtype == torch.bool:
        raise ShapeError(f"varwidth: widths must be an integer tensor, got {widths.dtype}")
    w = widths.to(torch.int64)
    if w.dim() == 1 and w.shape[0] == shape[-1]:
        view = w
    elif w.dim() == 2 and len(shape) >= 2 and tuple(w.shape) == (shape[0], shape[-1]):
        view = w.reshape(shape[0], *([1] * (len(shape) - 2)), shape[-1])
    else:
        raise ShapeError(f"varwidth: widths of shape {tuple(w.shape)} do not fit codes of shape {shape}; "
                         "expected [D] or [S, D] with S the leading dim of the codes")
    if w.numel() and (int(w.min()) < 0 or int(w.max()) > _MAX_WIDTH):
        raise NumericRangeError(f"varwidth: widths must be in 0..{_MAX_WIDTH}, got range "
                                f"{int(w.min())}..{int(w.max())}")
    return view.expand(shape)


def varwidth_nbytes(widths: torch.Tensor, shape: tuple[int, ...]) -> int:
    """Bytes :func:`pack_varwidth` produces for codes of ``shape`` with ``widths``."""
    return (int(_expand_widths(widths, tuple(shape)).sum()) + 7) // 8


def _index_dtype(count: int) -> torch.dtype:
    """int32 for indices below ``count`` when they fit (faster gathers), else int64."""
    return torch.int32 if count < 2**31 else torch.int64


@dataclasses.dataclass(frozen=True, eq=False)
class VarwidthLayout:
    """Where every code of ``n`` vectors per stream sits in the stream, for widths ``[S, D]``: built once,
    reused for every pack and unpack with those widths.

    Packing gathers each bit of the stream from its code (the pattern repeats every vector of a
    stream) and packs the bits with :func:`kakeyaturbo.packing.pack_bits`; unpacking reads each code
    from the 16 bits starting at the byte its first bit is in (a code spans at most two bytes).

    Attributes:
        widths: int64 ``[S, D]``, 0..8.
        per_vector: int64 ``[S]``: bits of one vector of each stream.
        offsets: int64 ``[S, D]``: bit offset of each component within a vector.
        source: int64 ``[S, W]``, ``W = max(per_vector)``: the component holding bit ``b`` of a vector.
        shift: uint8 ``[S, W]``: that bit's place in its code.
        padded: bool ``[S, W]`` or None: the bits that exist (``b < per_vector[s]``), when the streams'
            vectors differ in size.
    """

    widths: torch.Tensor
    per_vector: torch.Tensor
    offsets: torch.Tensor
    source: torch.Tensor
    shift: torch.Tensor
    padded: torch.Tensor | None

    @classmethod
    def of(cls, widths: torch.Tensor) -> VarwidthLayout:
        """The layout of integer ``widths [S, D]`` (checked: 0..8)."""
        w = _expand_widths(widths, tuple(widths.shape)).to(torch.int64)
        s, d = w.shape
        dev = w.device
        flat = w.reshape(-1)
        per_vector = w.sum(1)
        owner = torch.repeat_interleave(torch.arange(s * d, device=dev), flat)  # stream * D + component, per bit
        start = torch.repeat_interleave(flat.cumsum(0) - flat, flat)  # first bit of the owner's code
        bit = torch.arange(owner.numel(), device=dev)
        place = bit - torch.repeat_interleave(per_vector.cumsum(0) - per_vector, per_vector)  # bit within a vector
        size = int(per_vector.max()) if s else 0
        source = torch.zeros(s, size, dtype=torch.int64, device=dev)
        shift = torch.zeros(s, size, dtype=torch.uint8, device=dev)
        valid = torch.zeros(s, size, dtype=torch.bool, device=dev)
        where = (owner // d, place)
        source[where] = owner % d
        shift[where] = (bit - start).to(torch.uint8)
        valid[where] = True
        return cls(w, per_vector, w.cumsum(1) - w, source, shift, None if bool(valid.all()) else valid)

    def bits(self, n: int) -> int:
        """Bits of ``n`` vectors per stream."""
        return n * int(self.per_vector.sum())

    def nbytes(self, n: int) -> int:
        """Bytes of ``n`` vectors per stream."""
        return (self.bits(n) + 7) // 8

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 ``[nbytes(n)]`` of integer ``codes [S, n, D]`` (unchecked: each fits its width)."""
        s, n, d = codes.shape
        idx = _index_dtype(codes.numel())
        rows = torch.arange(s * n, device=codes.device, dtype=idx).reshape(s, n, 1) * d
        src = (rows + self.source.to(idx).unsqueeze(1)).reshape(-1)
        bits = codes.reshape(-1).to(torch.uint8).index_select(0, src).reshape(s, n, self.source.shape[1])
        bits = (bits >> self.shift.unsqueeze(1)) & 1
        if self.padded is not None:
            bits = bits[self.padded.unsqueeze(1).expand(bits.shape)]
        return pack_bits(bits, 1)

    def unpack(self, packed: torch.Tensor, n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Codes ``[S, n, D]`` of ``dtype`` from ``packed`` (uint8, at least :meth:`nbytes` bytes; unchecked)."""
        need = self.nbytes(n)
        dev = packed.device
        idx = _index_dtype(8 * need + 1)
        base = n * (self.per_vector.cumsum(0) - self.per_vector)  # first bit of each stream
        first = (base.unsqueeze(1) + self.offsets).to(idx).unsqueeze(1)  # [S, 1, D]
        step = self.per_vector.to(idx).reshape(-1, 1, 1) * torch.arange(n, device=dev, dtype=idx).reshape(1, n, 1)
        pos = first + step  # [S, n, D]: the first bit of every code
        raw = torch.cat([packed.reshape(-1)[:need], packed.new_zeros(2)]).to(torch.int32)
        pairs = raw[:-1] | (raw[1:] << 8)  # bits from each byte on; a width-0 code may sit at the very end
        mask = ((1 << self.widths) - 1).to(torch.int32).unsqueeze(1)
        codes = (pairs.index_select(0, (pos >> 3).reshape(-1)).reshape(pos.shape) >> (pos & 7)) & mask
        return codes.to(dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class Columns:
    """The components that some stream codes (every other one is 0 in every stream), ``K`` of ``D``.

    Attributes:
        index: int64 ``[K]``, ascending.
        dim: ``D``.
    """

    index: torch.Tensor
    dim: int

    @classmethod
    def of(cls, coded: torch.Tensor) -> Columns:
        """The columns of bool ``coded [S, D]`` that are true in some stream."""
        return cls(coded.any(0).nonzero().squeeze(1), coded.shape[1])

    @functools.cached_property
    def leading(self) -> bool:
        """Whether the columns are the first ``K`` (then taking them is a view)."""
        return bool((self.index == torch.arange(self.index.numel(), device=self.index.device)).all())

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D] -> [..., K]``."""
        return x[..., : self.index.numel()] if self.leading else x.index_select(-1, self.index)

    def put(self, y: torch.Tensor) -> torch.Tensor:
        """``[..., K] -> [..., D]``, contiguous (products with it then run as they always did), zeros in the
        other columns."""
        if self.index.numel() == self.dim:
            return y.contiguous()
        out = y.new_zeros(*y.shape[:-1], self.dim)
        if self.leading:
            out[..., : self.index.numel()] = y
            return out
        return out.index_copy_(-1, self.index, y)


def _layout(widths: torch.Tensor, shape: tuple[int, ...]) -> tuple[VarwidthLayout, tuple[int, int, int]]:
    """The layout of ``widths`` (``[D]`` or ``[S, D]``, checked against ``shape``) and the ``[S', n, D]`` the
    codes reshape to (``S' = 1`` for widths ``[D]``, shared by every vector)."""
    _expand_widths(widths, shape)
    w = widths if widths.dim() == 2 else widths.unsqueeze(0)
    return VarwidthLayout.of(w), (w.shape[0], math.prod(shape) // (shape[-1] * w.shape[0]) if shape[-1] else 0,
                                  shape[-1])


def pack_varwidth(codes: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Pack integer codes with per-component widths into one LSB-first bit stream.

    Args:
        codes: integer tensor ``[..., D]``; each code fits its width (``0 <= code < 2**width``,
            so code 0 where the width is 0).
        widths: integer tensor ``[D]`` or ``[S, D]`` (``S = codes.shape[0]``), values 0..8.

    Returns:
        uint8 tensor ``[ceil(total_bits / 8)]`` on the device of ``codes``.
    """
    shape = tuple(codes.shape)
    layout, flat = _layout(widths.to(codes.device), shape)
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise ShapeError(f"pack_varwidth: codes must be an integer tensor, got {codes.dtype}")
    c = codes.reshape(flat)
    if c.numel() and (int(c.amin()) < 0 or bool((c.amax(1) >= (1 << layout.widths)).any())):
        full = _expand_widths(widths.to(codes.device), shape)
        bad = (codes < 0) | (codes >= (1 << full))
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise NumericRangeError(f"pack_varwidth: code {int(codes[pos])} at index {pos} does not fit "
                                f"width {int(full[pos])}")
    return layout.pack(c)


def unpack_varwidth(packed: torch.Tensor, widths: torch.Tensor, shape: tuple[int, ...],
                    dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_varwidth`.

    Args:
        packed: uint8 tensor ``[>= varwidth_nbytes(widths, shape)]``.
        widths: integer tensor ``[D]`` or ``[S, D]``, values 0..8.
        shape: shape of the codes ``[..., D]``.
        dtype: integer dtype of the result.

    Returns:
        tensor of ``shape`` and ``dtype`` on the device of ``packed`` (0 where the width is 0).
    """
    shape = tuple(int(v) for v in shape)
    layout, flat = _layout(widths.to(packed.device), shape)
    need = layout.nbytes(flat[1])
    if packed.dtype != torch.uint8:
        raise ShapeError(f"unpack_varwidth: packed must be uint8, got {packed.dtype}")
    if packed.numel() < need:
        raise ShapeError(f"unpack_varwidth: need {need} bytes for {layout.bits(flat[1])} bits, got {packed.numel()}")
    return layout.unpack(packed, flat[1], dtype).reshape(shape)
