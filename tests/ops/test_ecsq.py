import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.ops.ecsq import (
    HALF,
    N_CLASSES,
    SlotCoder,
    class_of,
    class_spread,
    gaussian_classes,
    step_for_budget,
)
from kakeyaturbo.ops.lloyd_max import gaussian_table


def test_classes_cover_the_spreads_in_quarter_bits():
    k = torch.arange(N_CLASSES)
    assert torch.equal(class_of(class_spread(k)), k)
    assert int(class_of(torch.tensor([1e-9]))) == 0 and int(class_of(torch.tensor([1e9]))) == N_CLASSES - 1


def test_expected_bits_grow_with_the_spread_and_stay_near_the_entropy():
    t = gaussian_classes()
    assert bool((t.expected_bits[1:] >= t.expected_bits[:-1] - 1e-9).all())
    # wide classes: about log2(r) + 2.05 bits (the entropy of a unit-step N(0, r^2)), plus < 0.1
    r = class_spread(torch.arange(N_CLASSES))
    entropy = torch.log2(r) + 0.5 * math.log2(2 * math.pi * math.e)
    wide = r > 2
    gap = t.expected_bits[wide] - entropy[wide]
    assert bool((gap > 0).all()) and float(gap.max()) < 0.1


def test_centroids_are_symmetric_and_inside_their_cells():
    t = gaussian_classes()
    narrow = t.raw_bits == 0
    c = t.centroid[narrow]
    assert torch.allclose(c, -c.flip(-1), atol=1e-2)  # far tails: cdf differences near 1e-12
    mid = torch.arange(-HALF, HALF + 1).float()
    assert bool(((c - mid).abs()[:, 1:-1] <= 0.5 + 1e-5).all())


def test_step_for_budget_meets_the_budget_within_a_class():
    g = torch.Generator().manual_seed(0)
    sigma = torch.exp(torch.randn(3, 64, generator=g))
    active = torch.ones(3, 64, dtype=torch.bool)
    step = step_for_budget(sigma, active, 192)
    bits = gaussian_classes().expected_bits[class_of(sigma.double() / step.unsqueeze(1))].sum(1)
    assert bool((bits <= 192).all()) and bool((bits > 192 - 64 * 0.3).all())
    with pytest.raises(ConfigError, match="need at least 64.0 bits"):
        step_for_budget(sigma, active, 50)


def _coder(budget: int = 96, d: int = 32, seed: int = 0) -> tuple[SlotCoder, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sigma = 0.9 ** torch.arange(d).float().expand(2, d)
    active = sigma > 0.05
    log_gain = torch.tensor([[-1.0, 1.0], [-1.0, 1.0]])
    c = torch.randn(2, 300, d, generator=g) * sigma.unsqueeze(1) * torch.exp(0.3 * torch.randn(2, 300, 1, generator=g))
    return SlotCoder.build(sigma, active, log_gain, 8, budget), c


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), budget=st.integers(40, 200))
def test_slot_coder_roundtrip_fits_and_errs_by_at_most_a_step(seed, budget):
    coder, c = _coder(budget, seed=seed)
    codes, packed = coder.encode(c)
    y = coder.decode(codes, packed)
    step = coder.steps(codes).unsqueeze(-1)
    coded = (coder.classes >= 0).unsqueeze(1)
    assert bool(((y - c).abs() <= step + 1e-6)[coded.expand_as(c)].all())
    assert bool((y[~coded.expand_as(c)] == 0).all())
    again = coder.encode(c)
    assert torch.equal(again[0], codes) and torch.equal(again[1], packed)  # deterministic


def test_inputs_far_outside_the_grid_still_fit():
    coder, c = _coder(64)
    c[:, :5] *= 1e6
    codes, packed = coder.encode(c)
    y = coder.decode(codes, packed)
    assert torch.isfinite(y).all()


def test_ecsq_beats_lloyd_max_at_three_bits_per_coefficient():
    g = torch.Generator().manual_seed(1)
    d = 64
    sigma = torch.ones(1, d)
    coder = SlotCoder.build(sigma, sigma > 0, torch.tensor([[-0.1, 0.1]]), 8, 3 * d)
    c = torch.randn(1, 4000, d, generator=g)
    codes, packed = coder.encode(c)
    ecsq = float((coder.decode(codes, packed) - c).pow(2).mean())
    levels = gaussian_table(3)
    lm = levels[((c.unsqueeze(-1) - levels).abs().argmin(-1))]
    assert ecsq < 0.85 * float((lm - c).pow(2).mean())
