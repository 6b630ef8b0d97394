"""TurboQuant_mse distortion, TurboQuant_prod unbiasedness, rotations and byte accounting."""

from __future__ import annotations

import math

import pytest
import torch

import kakeyaturbo as kt
from kakeyaturbo.codecs.turboquant import TurboQuantCodec, TurboQuantProdCodec, haar_rotation, qjl_scale

# D_mse = E||x - x_hat||^2 for unit x at b = 1..4 (paper, Table/Theorem 1 numbers)
PAPER_D_MSE = {1: 0.36, 2: 0.117, 3: 0.034, 4: 0.009}


def _unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(1, n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("variant", ["paper", "shipped"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_distortion_matches_the_paper_at_d128(variant, bits):
    x = _unit(2000, 128)
    y = TurboQuantCodec(bits=bits, variant=variant).roundtrip(x)
    d_mse = float(((y - x) ** 2).sum(-1).mean())
    assert d_mse == pytest.approx(PAPER_D_MSE[bits], rel=0.10)


def test_norm_is_carried_so_scale_does_not_matter():
    x = _unit(300, 64)
    codec = TurboQuantCodec(bits=3)
    y1, y2 = codec.roundtrip(x), codec.roundtrip(x * 37.0)
    assert torch.allclose(y2, y1 * 37.0, rtol=2e-3, atol=1e-4)
    assert torch.equal(codec.roundtrip(torch.zeros(2, 64)), torch.zeros(2, 64))


def test_haar_rotation_is_orthogonal_and_seeded():
    q = haar_rotation(96, 5)
    assert torch.allclose(q @ q.T, torch.eye(96), atol=1e-5)
    assert torch.equal(q, haar_rotation(96, 5)) and not torch.equal(q, haar_rotation(96, 6))


@pytest.mark.parametrize(
    ("kwargs", "d", "expected"),
    [
        ({"bits": 3}, 128, 3 + 16 / 128),
        ({"bits": 2}, 64, 2 + 16 / 64),
        ({"bits": 3, "variant": "shipped", "block": 128}, 128, 3.125),
        ({"bits": 3, "variant": "shipped", "block": 32}, 128, 3.5),
        ({"bits": 4, "variant": "shipped", "block": 32}, 128, 4.5),
    ],
)
def test_payload_bits_per_element(kwargs, d, expected):
    x = torch.randn(2, 64, d)
    enc = TurboQuantCodec(**kwargs).encode(x)
    assert 8 * enc.payload_nbytes / x.numel() == pytest.approx(expected, abs=1e-12)
    assert 8 * enc.nbytes / x.numel() == 8 * len(enc.to_bytes()) / x.numel()


def test_shipped_variant_pads_to_a_power_of_two():
    x = torch.randn(3, 10, 80)
    enc = TurboQuantCodec(variant="shipped", block=32).encode(x)
    assert enc.fields["norm"].shape == (3, 10, 128 // 32)
    assert float(((TurboQuantCodec(variant="shipped", block=32).decode(enc) - x) ** 2).mean()) < 0.05


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prod_payload_bits(bits):
    x = torch.randn(2, 64, 128)
    enc = TurboQuantProdCodec(bits=bits).encode(x)
    assert 8 * enc.payload_nbytes / x.numel() == pytest.approx(bits + 32 / 128, abs=1e-12)


def test_qjl_scales():
    assert qjl_scale(128, "reference") == pytest.approx(math.sqrt(math.pi / 2) / 128)
    assert qjl_scale(128, "orthogonal") == pytest.approx(math.sqrt(math.pi / 2) / math.sqrt(128), rel=0.01)


def _t_stat(err: torch.Tensor) -> float:
    """Mean over standard error of a flat sample."""
    err = err.flatten().double()
    return float(err.mean() / (err.std() / math.sqrt(err.numel())))


@pytest.mark.parametrize("qjl", ["orthogonal", "reference"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prod_inner_products_unbiased_over_random_pairs(qjl, bits):
    g = torch.Generator().manual_seed(bits)
    k, q = torch.randn(1, 8000, 64, generator=g), torch.randn(1, 8000, 64, generator=g)
    k_hat = TurboQuantProdCodec(bits=bits, qjl=qjl).roundtrip(k)
    assert abs(_t_stat(((k_hat - k) * q).sum(-1))) < 3


def _correlated_errors(codec_for_seed, seeds: int = 40, pairs: int = 100) -> torch.Tensor:
    """Mean of qᵀk̂ − qᵀk per codec seed (rotation and S), for queries aligned with their keys.

    Unbiasedness is over the random S: for one fixed S the estimate may be slightly biased, so the
    pairs sharing a seed are averaged and the test statistic is taken over seeds.
    """
    g = torch.Generator().manual_seed(123)
    errs = []
    for seed in range(seeds):
        k = torch.randn(1, pairs, 64, generator=g)
        q = k + 0.5 * torch.randn(1, pairs, 64, generator=g)
        errs.append(((codec_for_seed(seed).roundtrip(k) - k) * q).sum(-1).mean())
    return torch.stack(errs)


@pytest.mark.parametrize(("qjl", "seeds"), [("orthogonal", 40), ("reference", 160)])
def test_prod_unbiased_for_aligned_queries_over_seeds(qjl, seeds):
    """The Gaussian S varies more from seed to seed, so it gets more seeds."""
    errs = _correlated_errors(lambda s: TurboQuantProdCodec(bits=2, qjl=qjl, seed=s), seeds=seeds)
    assert abs(_t_stat(errs)) < 3


def test_mse_only_is_biased_for_aligned_queries():
    """Control: the same check has the power to see TurboQuant_mse's shrinkage bias."""
    errs = _correlated_errors(lambda s: TurboQuantCodec(bits=1, seed=s), seeds=10)
    assert _t_stat(errs) < -10


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (TurboQuantCodec, "bits", 5),
        (TurboQuantCodec, "variant", "turbo"),
        (TurboQuantCodec, "block", 64),
        (TurboQuantProdCodec, "bits", 1),
        (TurboQuantProdCodec, "qjl", "gaussian"),
    ],
)
def test_bad_config_names_the_field(cls, field, value):
    with pytest.raises(kt.ConfigError, match=field):
        cls(**{field: value})
