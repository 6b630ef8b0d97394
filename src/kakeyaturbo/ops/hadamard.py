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


def wht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform along the last dim.

    Args:
        x: float tensor ``[..., W]`` with ``W`` a power of two.

    Returns:
        ``[..., W]``, ``H x`` with ``H`` the Sylvester Hadamard matrix (entries ±1).
    """
    w = x.shape[-1]
    if w & (w - 1) or w == 0:
        raise ShapeError(f"WHT length must be a power of two, got {w}")
    lead = x.shape[:-1]
    y = x.reshape(-1, w)
    h = 1
    while h < w:
        y = y.reshape(-1, w // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, w)


def random_signs(w: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Deterministic ±1 float32 vector ``[w]`` from ``seed`` (same on every device)."""
    g = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    bits = torch.randint(0, 2, (w,), generator=g)
    return (bits * 2 - 1).to(torch.float32).to(device)


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Randomized orthonormal Hadamard rotation ``H (s ⊙ x) / sqrt(W)`` along the last dim."""
    w = x.shape[-1]
    return wht(x * signs) / (w**0.5)


def unrotate(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotate`: ``s ⊙ H y / sqrt(W)``."""
    w = y.shape[-1]
    return wht(y) * signs / (w**0.5)
