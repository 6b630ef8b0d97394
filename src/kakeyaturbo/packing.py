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


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes into an LSB-first bit stream.

    Args:
        codes: integer tensor of any shape, values in ``[0, 2**bits)``; flattened in C order.
        bits: bits per code, 1..16.

    Returns:
        uint8 tensor ``[ceil(codes.numel()*bits/8)]`` on the device of ``codes``.
    """
    if not 1 <= bits <= 16:
        raise ShapeError(f"pack_bits: bits must be in 1..16, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    m = flat.numel()
    nbytes = packed_nbytes(m, bits)
    if m == 0:
        return torch.zeros(0, dtype=torch.uint8, device=codes.device)
    shifts = torch.arange(bits, device=flat.device)
    bitmat = (flat.unsqueeze(1) >> shifts) & 1  # [m, bits], LSB first
    stream = bitmat.reshape(-1)
    pad = nbytes * 8 - stream.numel()
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=flat.device)).to(torch.int64)
    return (stream.reshape(nbytes, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: uint8 tensor ``[>= ceil(count*bits/8)]``.
        bits: bits per code, 1..16.
        count: number of codes to read.

    Returns:
        int64 tensor ``[count]``.
    """
    if not 1 <= bits <= 16:
        raise ShapeError(f"unpack_bits: bits must be in 1..16, got {bits}")
    need = packed_nbytes(count, bits)
    if packed.numel() < need:
        raise ShapeError(f"unpack_bits: need {need} bytes for {count} codes of {bits} bits, got {packed.numel()}")
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=packed.device)
    raw = packed.reshape(-1)[:need].to(torch.int64)
    stream = ((raw.unsqueeze(1) >> torch.arange(8, device=raw.device)) & 1).reshape(-1)
    bitmat = stream[: count * bits].reshape(count, bits)
    weights = (1 << torch.arange(bits, device=raw.device)).to(torch.int64)
    return (bitmat * weights).sum(1)


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
    if x.numel():
        mag = x.detach().abs()
        worst = int(mag.reshape(-1).argmax())
        peak = float(mag.reshape(-1)[worst])
        if peak > limit:
            pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), x.shape))
            raise NumericRangeError(
                f"{what}: value {peak:.6g} at index {pos} exceeds the {str(dtype).removeprefix('torch.')} "
                f"range (max {limit:.6g}); store this field in float32 (e.g. skeleton_dtype='float32') "
                "or rescale the input"
            )
    return x.to(dtype)
