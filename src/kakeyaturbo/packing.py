"""Bit packing and range-checked narrowing casts.

Codes are packed LSB-first into a continuous bit stream: element ``i`` of a ``b``-bit stream
occupies bits ``[i*b, (i+1)*b)``, possibly straddling a byte boundary, so ``m`` codes take
``ceil(m*b/8)`` bytes. Everything here is vectorised and device-agnostic.
"""

from __future__ import annotations

import math

import torch

from kakeyaturbo.errors import NumericRangeError, ShapeError

F16_MAX = 65504.0


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits each."""
    return (count * bits + 7) // 8


def _lanes(width: int, span: int) -> int:
    """The int64 mask of the low ``width`` bits of every ``2 * span``-bit lane."""
    return sum(((1 << width) - 1) << (2 * span * i) for i in range(32 // span))


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes into an LSB-first bit stream.

    Codes of up to 8 bits are merged in place, eight to an int64 (one per byte), by three rounds
    of shifts and masks that close the gaps between them; wider codes are split into bit planes.

    Args:
        codes: integer tensor of any shape, values in ``[0, 2**bits)`` (only the low ``bits`` bits
            of each are stored); flattened in C order.
        bits: bits per code, 1..16.

    Returns:
        uint8 tensor ``[ceil(codes.numel()*bits/8)]`` on the device of ``codes``.
    """
    if not 1 <= bits <= 16:
        raise ShapeError(f"pack_bits: bits must be in 1..16, got {bits}")
    flat = codes.reshape(-1)
    if flat.is_floating_point():
        flat = flat.to(torch.int64)
    if bits > 8:
        planes = (flat.to(torch.int32).unsqueeze(1) >> torch.arange(bits, device=flat.device, dtype=torch.int32)) & 1
        return pack_bits(planes, 1)
    m = flat.numel()
    lanes = flat.to(torch.uint8) & ((1 << bits) - 1)
    if bits == 8:
        return lanes
    lanes = torch.cat([lanes, lanes.new_zeros((-m) % 8)]) if m % 8 else lanes
    x = lanes.view(torch.int64)  # eight codes per word, one per byte; the top byte's high bit is 0
    width = bits
    for span in (8, 16, 32):  # each pair of span-bit lanes becomes one lane holding both values, gapless
        low = _lanes(width, span)
        x = (x & low) | ((x >> (span - width)) & (low << width))
        width *= 2
    return x.view(torch.uint8).reshape(-1, 8)[:, :bits].contiguous().view(-1)[: packed_nbytes(m, bits)]


def unpack_bits(packed: torch.Tensor, bits: int, count: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_bits` (the same rounds of shifts, reversed).

    Args:
        packed: uint8 tensor ``[>= ceil(count*bits/8)]``.
        bits: bits per code, 1..16.
        count: number of codes to read.
        dtype: integer dtype of the result (one that holds ``bits``-bit values).

    Returns:
        tensor ``[count]`` of ``dtype``.
    """
    if not 1 <= bits <= 16:
        raise ShapeError(f"unpack_bits: bits must be in 1..16, got {bits}")
    need = packed_nbytes(count, bits)
    if packed.numel() < need:
        raise ShapeError(f"unpack_bits: need {need} bytes for {count} codes of {bits} bits, got {packed.numel()}")
    raw = packed.reshape(-1)[:need]
    if bits > 8:
        planes = unpack_bits(raw, 1, count * bits, torch.int32).reshape(count, bits)
        weights = 1 << torch.arange(bits, device=raw.device, dtype=torch.int32)
        return (planes * weights).sum(1, dtype=torch.int32).to(dtype)
    if bits == 8:
        return raw.to(dtype, copy=True)
    words = -(-count // 8)
    grouped = torch.zeros(words * bits, dtype=torch.uint8, device=raw.device)
    grouped[:need] = raw
    x = torch.zeros(words, 8, dtype=torch.uint8, device=raw.device)
    x[:, :bits] = grouped.reshape(words, bits)
    x = x.view(torch.int64).reshape(-1)  # eight codes per word, gapless from bit 0
    width = 4 * bits
    for span in (32, 16, 8):  # each 2*span-bit lane splits into two, its high half moved up by span - width
        low = _lanes(width, span)
        x = (x & low) | ((x << (span - width)) & (low << span))
        width //= 2
    return x.view(torch.uint8)[:count].to(dtype)


def index_bits(k: int) -> int:
    """Bits needed to store an index into ``k`` items (at least 1)."""
    return max(1, math.ceil(math.log2(k))) if k > 1 else 1


def narrow(x: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Cast ``x`` to a storage dtype, raising instead of producing inf.

    Args:
        x: float tensor of any shape.
        dtype: ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``.
        what: name of the field, used in the error message.

    Raises:
        NumericRangeError: a value lies outside the range of ``dtype``; the message gives the
            flat position and value of the largest one and suggests a wider storage type.
    """
    if dtype == torch.float32:
        return x.to(torch.float32)
    limit = F16_MAX if dtype == torch.float16 else float(torch.finfo(dtype).max)
    if x.numel() and float(x.detach().abs().amax()) > limit:
        mag = x.detach().abs().reshape(-1)
        worst = int(mag.argmax())
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), x.shape))
        raise NumericRangeError(
            f"{what}: value {float(mag[worst]):.6g} at index {pos} exceeds the {str(dtype).removeprefix('torch.')} "
            f"range (max {limit:.6g}); store this field in float32 (e.g. skeleton_dtype='float32') "
            "or rescale the input"
        )
    return x.to(dtype)
