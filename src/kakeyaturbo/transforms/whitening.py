"""Σ_q whitening of keys: ``k̃ = k · L`` per KV head, so plain MSE on ``k̃`` is the query-weighted error.

With ``L Lᵀ = Σ_q`` (the covariance of the queries that read a KV head), ``‖e L‖² = e Σ_q eᵀ``,
the expected squared error of ``qᵀk``. Keys are row vectors; the inverse multiplies by ``L⁻¹``.
"""

from __future__ import annotations

import torch

from kakeyaturbo.errors import NonFiniteInputError, ShapeError


class Whitening:
    """Per-KV-head linear whitening of keys.

    Args:
        L: float tensor ``[n_kv, D, D]``, the whitening matrices (e.g. lower Cholesky factors of Σ_q).
        L_inv: float tensor ``[n_kv, D, D]``, their inverses.

    Both are kept as float32; the math runs in float32.
    """

    def __init__(self, L: torch.Tensor, L_inv: torch.Tensor) -> None:  # noqa: N803 (matrix names)
        for name, t in (("L", L), ("L_inv", L_inv)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != t.shape[-2]:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ShapeError(f"whitening {name} must be [n_kv, D, D], got {shape}")
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteInputError(f"whitening {name} holds NaN/Inf")
        if L.shape != L_inv.shape:
            raise ShapeError(f"whitening L {tuple(L.shape)} and L_inv {tuple(L_inv.shape)} differ in shape")
        self.L = L.float()
        self.L_inv = L_inv.float()

    @property
    def n_kv(self) -> int:
        """Number of KV heads."""
        return self.L.shape[0]

    @property
    def head_dim(self) -> int:
        """Head dimension ``D``."""
        return self.L.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes of ``L`` and ``L_inv`` as held (float32): a per-model cost, not a per-token one."""
        return 2 * self.L.numel() * self.L.element_size()

    def _apply(self, k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if k.dim() < 3 or k.shape[-3] != self.n_kv or k.shape[-1] != self.head_dim:
            raise ShapeError(
                f"whitening expects keys [..., n_kv={self.n_kv}, T, D={self.head_dim}], got {tuple(k.shape)}"
            )
        return torch.einsum("...htd,hde->...hte", k.float(), m.to(k.device))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        """Whiten ``k [..., n_kv, T, D]`` -> float32 ``k · L_h`` per head ``h``."""
        return self._apply(k, self.L)

    def inverse(self, k: torch.Tensor) -> torch.Tensor:
        """Unwhiten ``k [..., n_kv, T, D]`` -> float32 ``k · L_h⁻¹`` per head ``h``."""
        return self._apply(k, self.L_inv)
