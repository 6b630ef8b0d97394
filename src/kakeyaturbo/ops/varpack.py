"""Variable-width bit packing: each component of a vector has its own width (0..8 bits).

The stream is LSB-first and continuous, in C order over the codes: component ``j`` of a
vector contributes ``widths[j]`` bits (none when the width is 0), possibly straddling byte
boundaries. With equal widths ``b`` it is byte-for-byte :func:`kakeyaturbo.packing.pack_bits`.
Widths are ``[D]`` (shared by every vector) or ``[S, D]`` (one row per leading index of the
codes, i.e. per stream of a ``[S, ..., D]`` tensor).
"""

from __future__ import annotations

import torch

from kakeyaturbo.errors import NumericRangeError, ShapeError

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
    w = _expand_widths(widths.to(codes.device), shape)
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise ShapeError(f"pack_varwidth: codes must be an integer tensor, got {codes.dtype}")
    c = codes.to(torch.int64)
    bad = (c < 0) | (c >= (1 << w))
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise NumericRangeError(f"pack_varwidth: code {int(c[pos])} at index {pos} does not fit "
                                f"width {int(w[pos])}")
    shifts = torch.arange(_MAX_WIDTH, device=codes.device, dtype=torch.uint8)
    bits = (c.to(torch.uint8).unsqueeze(-1) >> shifts) & 1  # [..., D, 8]
    stream = bits[shifts < w.unsqueeze(-1)]
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return (stream.reshape(-1, 8) << shifts).sum(1, dtype=torch.uint8)


def unpack_varwidth(packed: torch.Tensor, widths: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_varwidth`.

    Args:
        packed: uint8 tensor ``[>= varwidth_nbytes(widths, shape)]``.
        widths: integer tensor ``[D]`` or ``[S, D]``, values 0..8.
        shape: shape of the codes ``[..., D]``.

    Returns:
        int64 tensor of ``shape`` on the device of ``packed`` (0 where the width is 0).
    """
    shape = tuple(int(v) for v in shape)
    w = _expand_widths(widths.to(packed.device), shape)
    shifts = torch.arange(_MAX_WIDTH, device=packed.device, dtype=torch.uint8)
    mask = shifts < w.unsqueeze(-1)  # [..., D, 8]
    total = int(mask.sum())
    need = (total + 7) // 8
    if packed.dtype != torch.uint8:
        raise ShapeError(f"unpack_varwidth: packed must be uint8, got {packed.dtype}")
    if packed.numel() < need:
        raise ShapeError(f"unpack_varwidth: need {need} bytes for {total} bits, got {packed.numel()}")
    raw = packed.reshape(-1)[:need]
    stream = ((raw.unsqueeze(1) >> shifts) & 1).reshape(-1)[:total]
    bits = torch.zeros(mask.shape, dtype=torch.uint8, device=packed.device)
    bits[mask] = stream
    return (bits << shifts).sum(-1, dtype=torch.int64)
