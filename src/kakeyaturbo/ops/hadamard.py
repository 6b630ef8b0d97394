"""Walsh–Hadamard transforms, batched over leading dims.

``wht`` is the *unnormalised* natural-order Sylvester transform (``wht(wht(x)) = W·x``,
``||wht(x)||² = W·||x||²``), as in the seed codec; ``random_signs`` draws the ±1 pattern of
the randomized rotation from a seed.
"""

from __future__ import annotations

import torch

from kakeyaturbo.errors import ShapeError


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _check_width(w: int) -> None:
    if w & (w - 1) or w == 0:
        raise ShapeError(f"WHT length must be a power of two, got {w}")


def _stages(y: torch.Tensor) -> torch.Tensor:
    """The butterfly stages of :func:`wht` on a coordinate-major ``y [W, N]`` (contiguous, overwritten).

    Stage ``h = 1, 2, 4, ...`` maps each pair ``(a, b) = (y[i], y[i + h])`` to ``(a + b, a - b)``;
    coordinate-major, each operand is a run of ``h·N`` contiguous elements.
    """
    w = y.shape[0]
    out = torch.empty_like(y)
    h = 1
    while h < w:
        a, o = y.view(w // (2 * h), 2, -1), out.view(w // (2 * h), 2, -1)
        torch.add(a[:, 0], a[:, 1], out=o[:, 0])
        torch.sub(a[:, 0], a[:, 1], out=o[:, 1])
        y, out = out, y
        h *= 2
    return y


def _rows(y: torch.Tensor, shape: torch.Size, divisor: float | None = None) -> torch.Tensor:
    """Coordinate-major ``y [W, N]`` back to ``shape [..., W]`` (divided by ``divisor`` on the way)."""
    if divisor is None:
        return y.t().reshape(shape)
    out = torch.empty(y.shape[::-1], dtype=y.dtype, device=y.device)
    return torch.div(y.t(), divisor, out=out).reshape(shape)


def wht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform along the last dim.

    Args:
        x: float tensor ``[..., W]`` with ``W`` a power of two.

    Returns:
        ``[..., W]``, ``H x`` with ``H`` the Sylvester Hadamard matrix (entries ±1).
    """
    w = x.shape[-1]
    _check_width(w)
    return _rows(_stages(x.reshape(-1, w).t().clone(memory_format=torch.contiguous_format)), x.shape)


def random_signs(w: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Deterministic ±1 float32 vector ``[w]`` from ``seed`` (same on every device)."""
    g = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    bits = torch.randint(0, 2, (w,), generator=g)
    return (bits * 2 - 1).to(torch.float32).to(device)


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Randomized orthonormal Hadamard rotation ``H (s ⊙ x) / sqrt(W)`` along the last dim."""
    w = x.shape[-1]
    _check_width(w)
    y = torch.empty(w, x.numel() // w, dtype=torch.result_type(x, signs), device=x.device)
    torch.mul(x.reshape(-1, w).t(), signs.unsqueeze(1), out=y)
    return _rows(_stages(y), x.shape, w**0.5)


def unrotate(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotate`: ``s ⊙ H y / sqrt(W)``."""
    w = y.shape[-1]
    _check_width(w)
    z = _stages(y.reshape(-1, w).t().clone(memory_format=torch.contiguous_format))
    return _rows(z * signs.unsqueeze(1), y.shape, w**0.5)
