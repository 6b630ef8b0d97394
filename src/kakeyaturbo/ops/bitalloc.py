"""Reverse water-filling: integer bit allocation across components under a per-stream budget.

Component ``j`` of a stream with variance ``v_j`` quantised with a ``b``-bit Lloyd–Max table
costs ``v_j * gaussian_mse(b)``. The greedy allocator gives bits one at a time to the component
whose distortion drops most. Because the marginal gains ``gaussian_mse(b) - gaussian_mse(b+1)``
shrink strictly with ``b``, that greedy sequence equals "take the ``budget`` largest of all
marginal gains ``v_j * (gaussian_mse(b) - gaussian_mse(b+1))``", which is what
:func:`water_fill` computes in one sort, batched over streams.
"""

from __future__ import annotations

import torch

from kakeyaturbo.errors import ConfigError, NonFiniteInputError, ShapeError
from kakeyaturbo.ops.lloyd_max import gaussian_mse


def marginal_gains(max_bits: int) -> torch.Tensor:
    """float64 ``[max_bits]``: distortion drop of the ``b+1``-th bit of an N(0,1) component."""
    mse = torch.tensor([gaussian_mse(b) for b in range(max_bits + 1)], dtype=torch.float64)
    return mse[:-1] - mse[1:]


def water_fill(variances: torch.Tensor, total_bits: torch.Tensor | int, max_bits: int = 8) -> torch.Tensor:
    """Greedy reverse water-filling, one budget per stream.

    Args:
        variances: float tensor ``[S, D]``, finite and ``>= 0``: per-component variances.
        total_bits: int or integer tensor ``[S]``: bits to spend per stream, ``>= 0``.
        max_bits: most bits one component may get, 1..8.

    Returns:
        int64 tensor ``[S, D]`` on the device of ``variances``. Each stream spends exactly
        ``min(total_bits, max_bits * #(variances > 0))`` bits; zero-variance components get 0;
        a strictly larger variance never gets fewer bits (ties go to the lower index).
    """
    if not 1 <= max_bits <= 8:
        raise ConfigError(f"water_fill: max_bits must be in 1..8, got {max_bits}")
    if variances.dim() != 2:
        raise ShapeError(f"water_fill: variances must be [S, D], got shape {tuple(variances.shape)}")
    if not variances.is_floating_point():
        raise ShapeError(f"water_fill: variances must be a float tensor, got {variances.dtype}")
    if not bool(torch.isfinite(variances).all()):
        raise NonFiniteInputError("water_fill: variances hold NaN/Inf")
    if bool((variances < 0).any()):
        raise ConfigError(f"water_fill: variances must be >= 0, min is {float(variances.min()):.6g}")
    s, d = variances.shape
    dev = variances.device
    budget = torch.as_tensor(total_bits, device=dev)
    if budget.is_floating_point() or budget.dtype == torch.bool:
        raise ConfigError(f"water_fill: total_bits must be integers, got {budget.dtype}")
    budget = budget.to(torch.int64).expand(s) if budget.dim() == 0 else budget.to(torch.int64)
    if tuple(budget.shape) != (s,):
        raise ShapeError(f"water_fill: total_bits must be an int or [S={s}], got shape {tuple(budget.shape)}")
    if bool((budget < 0).any()):
        raise ConfigError(f"water_fill: total_bits must be >= 0, got {budget.tolist()}")
    gains = variances.to(torch.float64).unsqueeze(-1) * marginal_gains(max_bits).to(dev)  # [S, D, B]
    flat = gains.reshape(s, d * max_bits)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(d * max_bits, device=dev).expand(s, -1))
    chosen = (rank < budget.unsqueeze(1)) & (flat > 0)
    return chosen.reshape(s, d, max_bits).sum(-1)
