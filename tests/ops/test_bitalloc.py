import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.errors import ConfigError, NonFiniteInputError, ShapeError
from kakeyaturbo.ops.bitalloc import allocate_budgets, marginal_gains, water_fill


def _greedy_reference(var: list[float], budget: int, max_bits: int) -> list[int]:
    """One bit at a time to the largest marginal gain (first index on ties)."""
    gains = marginal_gains(max_bits).tolist()
    bits = [0] * len(var)
    for _ in range(budget):
        best, arg = 0.0, -1
        for j, v in enumerate(var):
            if bits[j] < max_bits and v * gains[bits[j]] > best:
                best, arg = v * gains[bits[j]], j
        if arg < 0:
            break
        bits[arg] += 1
    return bits


variances = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-6, 1e4, allow_nan=False)), min_size=1, max_size=12
)


@given(rows=st.lists(variances, min_size=1, max_size=4).filter(lambda r: len({len(x) for x in r}) == 1),
       budgets=st.lists(st.integers(0, 120), min_size=4, max_size=4), max_bits=st.integers(1, 8))
def test_budget_monotone_and_zero_variance(rows, budgets, max_bits):
    var = torch.tensor(rows, dtype=torch.float64)
    budget = torch.tensor(budgets[: len(rows)])
    bits = water_fill(var, budget, max_bits)
    assert bits.dtype == torch.int64 and bits.shape == var.shape
    usable = max_bits * (var > 0).sum(1)
    assert torch.equal(bits.sum(1), torch.minimum(budget, usable))
    assert bool((bits[var == 0] == 0).all())
    assert bool((bits >= 0).all()) and bool((bits <= max_bits).all())
    bigger = var.unsqueeze(2) > var.unsqueeze(1)  # [S, i, j]: var_i > var_j
    assert bool((bits.unsqueeze(2) >= bits.unsqueeze(1))[bigger].all())
    for r, b, out in zip(rows, budgets, bits.tolist()):
        assert out == _greedy_reference(r, b, max_bits)


def test_scalar_budget_and_decaying_spectrum():
    var = (0.7 ** torch.arange(16.0)).expand(3, 16)
    bits = water_fill(var, 40)
    assert bits.sum(1).tolist() == [40, 40, 40]
    assert bits[0].tolist() == sorted(bits[0].tolist(), reverse=True)
    assert bits[0, 0] > bits[0, -1]


def test_bad_inputs_are_named():
    with pytest.raises(ConfigError, match=">= 0"):
        water_fill(torch.tensor([[1.0, -1.0]]), 3)
    with pytest.raises(NonFiniteInputError):
        water_fill(torch.tensor([[1.0, float("nan")]]), 3)
    with pytest.raises(ShapeError, match=r"\[S, D\]"):
        water_fill(torch.ones(4), 3)
    with pytest.raises(ShapeError, match="total_bits"):
        water_fill(torch.ones(2, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ConfigError, match="max_bits"):
        water_fill(torch.ones(2, 4), 3, max_bits=9)
    with pytest.raises(ConfigError, match="total_bits must be >= 0"):
        water_fill(torch.ones(2, 4), -1)


def _cost(costs: list[list[float]], pick: list[int]) -> float:
    return sum(row[i] for row, i in zip(costs, pick))


@given(costs=st.lists(st.lists(st.floats(0, 10, allow_nan=False), min_size=4, max_size=4), min_size=1, max_size=4),
       spare=st.integers(0, 12), weighted=st.booleans())
def test_allocate_budgets_is_the_optimum(costs, spare, weighted):
    options = [1.0, 1.5, 2.0, 3.0]
    weights = [1 + i % 3 if weighted else 1 for i in range(len(costs))]
    total = sum(weights) * 1.0 + spare * 0.5
    pick = allocate_budgets(torch.tensor(costs, dtype=torch.float64), torch.tensor(options), total,
                            weights=weights if weighted else None).tolist()
    assert sum(w * options[i] for w, i in zip(weights, pick)) <= total + 1e-9
    monotone = [[min(row[: j + 1]) for j in range(4)] for row in costs]
    feasible = [p for p in itertools.product(range(4), repeat=len(costs))
                if sum(w * options[i] for w, i in zip(weights, p)) <= total]
    assert _cost(monotone, pick) == pytest.approx(min(_cost(monotone, p) for p in feasible), abs=1e-9)


def test_allocate_budgets_gives_bits_where_they_pay():
    options = torch.tensor([1.0, 2.0, 3.0, 4.0])
    sensitive = torch.tensor([8.0, 2.0, 0.5, 0.125])
    costs = torch.stack([sensitive, sensitive / 100, sensitive / 100])
    pick = allocate_budgets(costs, options, 3 * 2.0)
    assert pick.tolist() == [3, 0, 0]  # 4 + 1 + 1 bits: the sensitive item takes them all
    rising = torch.tensor([[1.0, 2.0, 0.5, 0.6]])  # noise: costs made non-increasing first
    assert allocate_budgets(rising, options, 4.0).tolist() == [2]


@pytest.mark.parametrize(
    ("costs", "options", "total", "error", "match"),
    [
        (torch.ones(2, 3), torch.tensor([1.0, 2.0]), 4.0, ShapeError, "options"),
        (torch.ones(2, 2, dtype=torch.int64), torch.tensor([1.0, 2.0]), 4.0, ShapeError, "float"),
        (torch.tensor([[1.0, float("nan")]]), torch.tensor([1.0, 2.0]), 4.0, NonFiniteInputError, "NaN"),
        (torch.tensor([[1.0, -1.0]]), torch.tensor([1.0, 2.0]), 4.0, ConfigError, ">= 0"),
        (torch.ones(1, 2), torch.tensor([2.0, 1.0]), 4.0, ConfigError, "increasing"),
        (torch.ones(1, 2), torch.tensor([1.0, 1.3]), 4.0, ConfigError, "multiples of 0.015625"),
        (torch.ones(3, 2), torch.tensor([1.0, 2.0]), 2.0, ConfigError, "below 3 weighted items"),
    ],
)
def test_allocate_budgets_errors(costs, options, total, error, match):
    with pytest.raises(error, match=match):
        allocate_budgets(costs, options, total)


@pytest.mark.parametrize("weights", [[1], [1, 0], [1, True], [1, 2.0]])
def test_allocate_budgets_refuses_bad_weights(weights):
    with pytest.raises(ConfigError, match="weights must be 2 positive integers"):
        allocate_budgets(torch.ones(2, 2), torch.tensor([1.0, 2.0]), 8.0, weights=weights)
