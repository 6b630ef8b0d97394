from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.errors import ConfigError, NonFiniteInputError, ShapeError
from kakeyaturbo.evaluation.metrics import THRESHOLDS, TokenMetrics, summarize, token_metrics, verdict


def _logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_identical_logits_give_zero_kl_and_full_agreement():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g) * 3
    labels = torch.randint(0, 50, (16,), generator=g)
    m = token_metrics(logits, logits.clone(), labels)
    assert torch.equal(m.kl, torch.zeros(16))
    assert bool(m.top1.all()) and m.top1.dtype == torch.bool
    assert torch.equal(m.nll_ref, m.nll_alt)
    s = summarize([m], n_boot=50)
    assert s.kl == 0.0 and s.top1_pct == 100.0 and s.delta_ppl_pct == 0.0


def test_per_token_values_by_hand():
    ref = _logits([[0.6, 0.4], [0.6, 0.4]])
    alt = _logits([[0.3, 0.7], [0.6, 0.4]])
    m = token_metrics(ref, alt.to(torch.bfloat16), torch.tensor([0, 1]))
    assert m.nll_ref.tolist() == pytest.approx([-math.log(0.6), -math.log(0.4)], rel=1e-6)
    assert m.nll_alt[0].item() == pytest.approx(-math.log(0.3), rel=1e-2)
    kl0 = 0.6 * math.log(0.6 / 0.3) + 0.4 * math.log(0.4 / 0.7)
    assert m.kl[0].item() == pytest.approx(kl0, rel=2e-2)
    assert m.top1.tolist() == [False, True]


def test_pooled_delta_ppl_by_hand():
    # window A: 1 token, NLL ref ln2, alt ln(4/3); window B: 3 tokens, NLL ref ln2, alt ln4
    ref = _logits([[0.5, 0.5]])
    alt = _logits([[0.75, 0.25]])
    a = token_metrics(ref, alt, torch.tensor([0]))
    b = token_metrics(ref.expand(3, 2), alt.expand(3, 2), torch.tensor([1, 1, 1]))
    s = summarize([a, b], n_boot=100)
    mean_ref, mean_alt = math.log(2), (math.log(4 / 3) + 3 * math.log(4)) / 4
    assert s.tokens_scored == 4 and s.windows == 2
    assert s.ppl_ref == pytest.approx(2.0, rel=1e-6)
    assert s.ppl == pytest.approx(math.exp(mean_alt), rel=1e-6)
    assert s.delta_ppl_pct == pytest.approx(100 * (math.exp(mean_alt - mean_ref) - 1), rel=1e-6)
    # pooled, not the mean of per-window Δppl
    assert s.per_window_delta_ppl_pct == pytest.approx((100 * (2 / 3 - 1), 100.0), rel=1e-6)
    assert s.delta_ppl_pct != pytest.approx(sum(s.per_window_delta_ppl_pct) / 2)
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert s.kl == pytest.approx(kl, rel=1e-5)
    assert s.top1_pct == 100.0


def _synthetic_windows(n: int, seed: int, tokens: int = 32) -> list[TokenMetrics]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        base = 3.0 + torch.rand(tokens, generator=g)
        shift = 0.02 + 0.05 * (-1) ** i  # window-level spread of fixed size
        out.append(TokenMetrics(nll_ref=base, nll_alt=base + shift, kl=torch.rand(tokens, generator=g) * 0.1,
                                top1=torch.rand(tokens, generator=g) > 0.1))
    return out


def test_bootstrap_is_deterministic_for_a_seed():
    w = _synthetic_windows(8, seed=1)
    assert summarize(w, n_boot=300, seed=7) == summarize(w, n_boot=300, seed=7)
    assert summarize(w, n_boot=300, seed=7).delta_ppl_ci95 != summarize(w, n_boot=300, seed=8).delta_ppl_ci95


def test_intervals_contain_the_estimate_and_shrink_with_more_windows():
    def width(n: int) -> float:
        s = summarize(_synthetic_windows(n, seed=2), n_boot=1000)
        lo, hi = s.delta_ppl_ci95
        assert lo <= s.delta_ppl_pct <= hi and s.kl_ci95[0] <= s.kl <= s.kl_ci95[1]
        return hi - lo

    assert width(64) < 0.5 * width(4)


def test_single_window_interval_is_degenerate():
    s = summarize(_synthetic_windows(1, seed=3), n_boot=20)
    assert s.delta_ppl_ci95 == pytest.approx((s.delta_ppl_pct, s.delta_ppl_pct))


@given(st.integers(1, 6), st.integers(2, 9), st.integers(0, 2**16))
def test_properties_against_torch_reference(t, v, seed):
    g = torch.Generator().manual_seed(seed)
    ref, alt = torch.randn(t, v, generator=g) * 4, torch.randn(t, v, generator=g) * 4
    labels = torch.randint(0, v, (t,), generator=g)
    m = token_metrics(ref, alt, labels)
    assert (m.kl >= 0).all()
    ce = torch.nn.functional.cross_entropy(alt, labels, reduction="none")
    assert torch.allclose(m.nll_alt, ce, atol=1e-5)
    kl = torch.nn.functional.kl_div(alt.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none")
    assert torch.allclose(m.kl, kl.sum(-1).clamp_min(0), atol=1e-5)


@pytest.mark.parametrize(
    ("d", "top1", "expected"),
    [
        (1.0, 95.0, "ACCEPT"), (-1.0, 100.0, "ACCEPT"), (0.0, 95.0, "ACCEPT"),
        (1.0001, 99.0, "MARGINAL"), (0.5, 94.99, "MARGINAL"), (-3.0, 85.0, "MARGINAL"),
        (3.0, 85.0, "MARGINAL"), (3.0001, 99.0, "REJECT"), (0.0, 84.99, "REJECT"),
        (math.inf, 100.0, "REJECT"), (-50.0, 100.0, "REJECT"),
    ],
)
def test_verdict_boundaries(d, top1, expected):
    assert verdict(d, top1) == expected


def test_thresholds_match_the_contract():
    assert THRESHOLDS == {"ACCEPT": {"abs_delta_ppl_pct": 1.0, "top1_pct": 95.0},
                          "MARGINAL": {"abs_delta_ppl_pct": 3.0, "top1_pct": 85.0}}


def test_bad_inputs_raise_named_errors():
    x = torch.zeros(3, 5)
    with pytest.raises(NonFiniteInputError, match="verdict: delta_ppl_pct"):
        verdict(float("nan"), 99.0)
    with pytest.raises(ShapeError, match="same shape"):
        token_metrics(x, torch.zeros(3, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ShapeError, match="logits_ref must be a float tensor"):
        token_metrics(torch.zeros(5), x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ShapeError, match="labels must lie in"):
        token_metrics(x, x, torch.tensor([0, 5, 1]))
    with pytest.raises(ShapeError, match="labels must be an integer tensor"):
        token_metrics(x, x, torch.zeros(3))
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"logits_alt .*\(1, 2\)"):
        token_metrics(x, bad, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="at least one window"):
        summarize([])
    with pytest.raises(ConfigError, match="n_boot"):
        summarize(_synthetic_windows(2, 0), n_boot=0)
