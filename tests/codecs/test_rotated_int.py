"""rotated-int: exact byte accounting, level sets, rotation padding, error bounds, corruption."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kakeyaturbo as kt
from kakeyaturbo.codecs.rotated_int import RotatedIntCodec, group_last, quantize_symmetric


def _bits(enc: kt.Encoded, numel: int) -> tuple[float, float]:
    """(payload bits per element, whole-container bits per element)."""
    return 8 * enc.payload_nbytes / numel, 8 * enc.nbytes / numel


def test_int4_group32_f16_scale_is_exactly_4p5_bits_per_element():
    x = torch.randn(2, 4, 256, 128)
    enc = RotatedIntCodec(bits=4, group_size=32).encode(x)
    payload, whole = _bits(enc, x.numel())
    assert payload == 4.5
    header_share = 8 * (enc.nbytes - enc.payload_nbytes) / x.numel()
    assert whole == pytest.approx(payload + header_share, abs=1e-12)
    assert enc.nbytes == len(enc.to_bytes())


@pytest.mark.parametrize(("bits", "symmetric", "expected"), [(8, True, 8.5), (2, False, 3.0), (3, True, 3.5)])
def test_payload_bits_per_element(bits, symmetric, expected):
    x = torch.randn(3, 64, 64)
    enc = RotatedIntCodec(bits=bits, symmetric=symmetric).encode(x)
    assert _bits(enc, x.numel())[0] == expected


def test_symmetric_levels_are_q4_0_style_by_hand():
    x = torch.tensor([[1.0, -2.0, 3.4, 7.0], [0.0, 0.0, 0.0, 0.0]])
    y = RotatedIntCodec(bits=4, group_size=4, rotate=False).roundtrip(x)
    assert torch.equal(y, torch.tensor([[1.0, -2.0, 3.0, 7.0], [0.0, 0.0, 0.0, 0.0]]))
    codes, scale = quantize_symmetric(torch.tensor([[-7.0, 7.0, 0.0, 1.0]]), 4)
    assert codes.tolist() == [[0, 14, 7, 8]] and scale.tolist() == [1.0]


def test_asymmetric_min_max_by_hand():
    x = torch.tensor([[10.0, 10.5, 11.2, 13.0]])
    y = RotatedIntCodec(bits=2, group_size=4, rotate=False, symmetric=False).roundtrip(x)
    assert torch.equal(y, torch.tensor([[10.0, 10.0, 11.0, 13.0]]))


@given(st.integers(0, 2**31), st.sampled_from([2, 3, 4, 8]), st.booleans())
def test_error_within_half_a_step(seed, bits, symmetric):
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(seed)) * 3
    y = RotatedIntCodec(bits=bits, group_size=8, rotate=False, symmetric=symmetric).roundtrip(x)
    g = group_last(x, 8)
    step = g.abs().amax(-1) / (2 ** (bits - 1) - 1) if symmetric else (g.amax(-1) - g.amin(-1)) / (2 ** bits - 1)
    err = group_last(y - x, 8).abs().amax(-1)
    assert bool((err <= step * 0.5 * 1.01 + 1e-2 * step + 1e-6).all())


def test_rotation_pads_to_power_of_two_and_helps_outliers():
    x = torch.randn(4, 64, 96)
    x[..., 5] *= 40  # one outlier channel
    plain = RotatedIntCodec(bits=4, rotate=False).roundtrip(x)
    rotated_codec = RotatedIntCodec(bits=4)
    enc = rotated_codec.encode(x)
    assert enc.fields["scale"].shape == (4, 64, 128 // 32)
    rot = rotated_codec.decode(enc)
    assert ((rot - x) ** 2).mean() < ((plain - x) ** 2).mean()


def test_small_head_dim_uses_one_group():
    x = torch.randn(2, 8, 16)
    enc = RotatedIntCodec(bits=8).encode(x)
    assert enc.fields["scale"].shape == (2, 8, 1)


def test_group_must_divide_width_without_rotation():
    with pytest.raises(kt.ShapeError, match="group_size 32 does not divide the stored width 48"):
        RotatedIntCodec(bits=4, rotate=False).encode(torch.randn(3, 48))


@pytest.mark.parametrize(
    ("field", "value"), [("bits", 5), ("group_size", 0), ("symmetric", "yes"), ("seed", -1)]
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(kt.ConfigError, match=field):
        RotatedIntCodec(**{field: value})


def test_invalid_symmetric_code_is_corrupt():
    codec = RotatedIntCodec(bits=4, group_size=4, rotate=False)
    enc = codec.encode(torch.ones(1, 4))
    enc.fields["codes"] = torch.full_like(enc.fields["codes"], 0xFF)  # code 15 is not a level
    with pytest.raises(kt.CorruptDataError, match="not a valid level"):
        codec.decode(enc)
