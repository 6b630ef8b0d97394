"""Besicovitch: direction codebooks, the spec's byte formula, mean handling, Riemann scales."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kakeyaturbo as kt
from kakeyaturbo.codecs.besicovitch import BesicovitchCodec, BesicovitchConfig, direction_codebook


@pytest.mark.parametrize("g", range(2, 9))
@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_direction_codebook_is_unit_norm(g, bits):
    dirs = direction_codebook(g, bits)
    assert dirs.shape == (2**bits, g)
    assert torch.allclose(dirs.norm(dim=1), torch.ones(2**bits), atol=1e-6)
    if g >= 3:
        assert bool((dirs[:, 0] >= 0).all())  # upper hemisphere: the sign rides on the magnitude


def test_two_dim_codebook_is_the_half_circle_grid():
    theta = math.pi * torch.arange(8, dtype=torch.float64) / 8
    expected = torch.stack([theta.cos(), theta.sin()], 1).float()
    assert torch.allclose(direction_codebook(2, 3), expected, atol=1e-7)


def test_spec_byte_count_d128_g2_d5_m4():
    """74 B per vector (40 direction + 32 magnitude + 2 scale) + 256 B of f16 mean per 1024-row block."""
    codec = BesicovitchCodec()
    assert codec.encode(torch.randn(1, 1024, 128)).payload_nbytes == 1024 * 74 + 256
    assert codec.encode(torch.randn(1, 1500, 128)).payload_nbytes == 1500 * 74 + 2 * 256


@pytest.mark.parametrize(
    ("kwargs", "per_vector"),
    [
        ({"direction_bits": 3}, 24 + 32 + 2),
        ({"direction_bits": 6, "magnitude_mode": "f16"}, 48 + 128),
        ({"group_size": 4, "direction_bits": 8, "magnitude_bits": 2}, 32 + 8 + 2),
    ],
)
def test_other_spec_byte_counts(kwargs, per_vector):
    enc = BesicovitchCodec(subtract_mean=False, **kwargs).encode(torch.randn(2, 64, 128))
    assert enc.payload_nbytes == 2 * 64 * per_vector
    assert 8 * enc.nbytes / (2 * 64 * 128) == 8 * len(enc.to_bytes()) / (2 * 64 * 128)


def test_group_on_a_codebook_line_is_exact_in_f16_mode():
    dirs = direction_codebook(2, 4)
    x = torch.cat([dirs[3] * 2.5, dirs[9] * -1.25]).reshape(1, 4)
    y = BesicovitchCodec(direction_bits=4, magnitude_mode="f16", subtract_mean=False).roundtrip(x)
    assert torch.allclose(y, x, atol=2e-3)


def test_constant_rows_decode_to_the_mean_exactly():
    x = torch.tensor([0.5, -1.25, 3.0, 0.0, 7.5, 2.0]).expand(1, 10, 6).contiguous()
    assert torch.equal(BesicovitchCodec().roundtrip(x), x)


def test_odd_head_dim_pads_the_last_group():
    x = torch.randn(2, 30, 9)
    enc = BesicovitchCodec(group_size=4, direction_bits=6).encode(x)
    assert enc.fields["scale"].shape == (2, 30)
    assert BesicovitchCodec(group_size=4, direction_bits=6).decode(enc).shape == (2, 30, 9)


def test_riemann_scales_replace_the_per_vector_scale():
    x = torch.randn(2, 256, 64)
    groups = x.reshape(2, 256, 32, 2)
    scales = tuple(float(v) for v in groups.pow(2).sum(-1).mean((0, 1)).sqrt())  # sqrt_trace calibration
    riemann = BesicovitchCodec(magnitude_scales=scales)
    enc = riemann.encode(x)
    assert "scale" not in enc.fields
    assert enc.payload_nbytes == 2 * 256 * 32 * (5 + 4) // 8 + 2 * 64 * 2
    err = float(((riemann.decode(enc) - x) ** 2).mean() / (x**2).mean())
    assert err < 0.2
    assert torch.equal(kt.codecs.decode(kt.Encoded.from_bytes(enc.to_bytes())), riemann.decode(enc))


def test_riemann_scale_count_must_match_the_groups():
    with pytest.raises(kt.ShapeError, match="magnitude_scales has 3 entries"):
        BesicovitchCodec(magnitude_scales=(1.0, 1.0, 1.0)).encode(torch.randn(4, 64))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"group_size": 9}, "group_size"),
        ({"direction_bits": 0}, "direction_bits"),
        ({"magnitude_mode": "int"}, "magnitude_mode"),
        ({"magnitude_scales": (1.0, -1.0)}, "magnitude_scales"),
        ({"magnitude_scales": (1.0,), "magnitude_mode": "f16"}, "magnitude_scales"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(kt.ConfigError, match=field):
        BesicovitchCodec(**kwargs)


@given(
    st.integers(2, 8),
    st.integers(1, 8),
    st.none() | st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=8).map(tuple),
)
def test_config_survives_the_json_header(g, db, scales):
    cfg = BesicovitchConfig(group_size=g, direction_bits=db, magnitude_scales=scales)
    assert BesicovitchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
