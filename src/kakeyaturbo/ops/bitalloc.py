"""Bit allocation, at two levels.

* :func:`water_fill`: integer bits across the components of each stream under a per-stream budget.
* :func:`allocate_budgets`: one budget per (layer, stream) from a menu, under a whole-model total,
  given each item's measured cost at every budget (an exact multiple-choice knapsack).

Reverse water-filling:

Component ``j`` of a stream with variance ``v_j`` quantised with a ``b``-bit Lloyd–Max table
costs ``v_j * gaussian_mse(b)``. The greedy allocator gives bits one at a time to the component
whose distortion drops most. Because the marginal gains ``gaussian_mse(b) - gaussian_mse(b+1)``
shrink strictly with ``b``, that greedy sequence equals "take the ``budget`` largest of all
marginal gains ``v_j * (gaussian_mse(b) - gaussian_mse(b+1))``", which is what
:func:`water_fill` computes in one sort, batched over streams.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


BUDGET_UNIT = 1 / 64
"""Granularity of :func:`allocate_budgets`: options must be multiples of this many bits (a budget
``b`` of a ``D = 64`` vector spends ``64 * b`` whole bits)."""


def allocate_budgets(costs: torch.Tensor, options: torch.Tensor, total: float,
                     weights: Sequence[int] | None = None) -> torch.Tensor:
    """Choose one option per item to minimise the summed cost under a total (exactly).

    Each item's costs are first made non-increasing in bits (a budget is never charged more than
    a smaller one: rising measurements are noise), then a dynamic programme over the total in
    units of :data:`BUDGET_UNIT` finds the optimum of this multiple-choice knapsack; among optimal
    choices, the one spending fewest bits.

    Args:
        costs: float tensor ``[N, M]``, finite and ``>= 0``: cost of item ``n`` at option ``m``.
        options: float tensor ``[M]``, strictly increasing multiples of :data:`BUDGET_UNIT`: the
            bits of each option.
        total: most bits the ``N`` chosen options, each times its item's weight, may sum to, ``>= sum(weights)
            * options[0]``.
        weights: positive integers ``[N]``: how many units of the total one bit of each item's option spends
            (the layers of a cross-layer group share one budget); None: 1 each.

    Returns:
        int64 tensor ``[N]`` (CPU): the chosen option index of each item.

    Raises:
        ShapeError: shapes or dtypes do not match.
        NonFiniteInputError: NaN/Inf costs or options.
        ConfigError: negative costs, options not increasing or off the grid, or a total below the
            cheapest choice.
    """
    if costs.dim() != 2 or options.dim() != 1 or costs.shape[1] != options.shape[0] or costs.shape[1] == 0:
        raise ShapeError(f"allocate_budgets: costs must be [N, M] and options [M], got {tuple(costs.shape)} "
                         f"and {tuple(options.shape)}")
    if not costs.is_floating_point() or not options.is_floating_point():
        raise ShapeError(f"allocate_budgets: costs and options must be float, got {costs.dtype}, {options.dtype}")
    if not bool(torch.isfinite(costs).all()) or not bool(torch.isfinite(options).all()):
        raise NonFiniteInputError("allocate_budgets: costs or options hold NaN/Inf")
    if bool((costs < 0).any()):
        raise ConfigError(f"allocate_budgets: costs must be >= 0, min is {float(costs.min()):.6g}")
    opts = options.detach().to("cpu", torch.float64)
    if bool((opts[1:] <= opts[:-1]).any()) or bool((opts < 0).any()):
        raise ConfigError(f"allocate_budgets: options must be >= 0 and strictly increasing, got {opts.tolist()}")
    units = torch.round(opts / BUDGET_UNIT).to(torch.int64)
    if not torch.allclose(units.double() * BUDGET_UNIT, opts, rtol=0, atol=1e-9):
        raise ConfigError(f"allocate_budgets: options must be multiples of {BUDGET_UNIT:g} bits, got {opts.tolist()}")
    n = costs.shape[0]
    weights = [1] * n if weights is None else list(weights)
    if len(weights) != n or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in weights):
        raise ConfigError(f"allocate_budgets: weights must be {n} positive integers, got {weights}")
    if float(total) < sum(weights) * float(opts[0]) - 1e-9:
        raise ConfigError(f"allocate_budgets: a total of {total:g} bits is below {sum(weights)} weighted items x "
                          f"{float(opts[0]):g} bits, the cheapest choice")
    capacity = int(math.floor(float(total) / BUDGET_UNIT + 1e-9))
    monotone = torch.cummin(costs.detach().to("cpu", torch.float64), dim=1).values
    best = torch.full((capacity + 1,), math.inf, dtype=torch.float64)  # best[c]: least cost spending c units
    best[0] = 0.0
    picks = torch.zeros(n, capacity + 1, dtype=torch.int64)
    for item in range(n):
        shifted = torch.full((len(units), capacity + 1), math.inf, dtype=torch.float64)
        for m, w in enumerate((units * weights[item]).tolist()):
            if w <= capacity:
                shifted[m, w:] = best[: capacity + 1 - w] + monotone[item, m]
        best, picks[item] = shifted.min(dim=0)
    spent = int(torch.argmin(best))  # first minimum: fewest units among the optimal totals
    choice = torch.zeros(n, dtype=torch.int64)
    for item in range(n - 1, -1, -1):
        choice[item] = picks[item, spent]
        spent -= int(units[choice[item]]) * weights[item]
    return choice


KL_FLOOR = 1e-9
"""Smallest cost :func:`interpolate_costs` works with (a probe can measure 0)."""


def interpolate_costs(measured: dict[float, float], grid: tuple[float, ...]) -> dict[float, float]:
    """Costs at every budget of ``grid`` from costs ``measured`` at two or more budgets: piecewise
    linear in log cost between measured budgets, extended beyond both ends along the end segments."""
    if len(measured) < 2:
        raise ConfigError(f"interpolate_costs needs costs at two or more budgets, got {measured}")
    xs = sorted(measured)
    ys = [math.log(max(measured[b], KL_FLOOR)) for b in xs]
    out = {}
    for b in grid:
        i = min(max(sum(1 for v in xs if v <= b) - 1, 0), len(xs) - 2)
        t = (b - xs[i]) / (xs[i + 1] - xs[i])
        out[b] = math.exp(ys[i] + t * (ys[i + 1] - ys[i]))
    return out
