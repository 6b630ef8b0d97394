"""KIVI: hand-worked examples, per-channel vs per-token semantics, partial groups, bytes."""

from __future__ import annotations

import pytest
import torch

import kakeyaturbo as kt
from kakeyaturbo.codecs.kivi import KiviCodec
from kakeyaturbo.packing import unpack_bits

# two channels over four tokens: channel 0 spans [0, 3], channel 1 spans [10, 13]
X = torch.tensor([[0.0, 10.0], [0.4, 10.6], [1.0, 11.0], [3.0, 13.0]])


def test_per_channel_by_hand():
    codec = KiviCodec(bits=2, group_size=4, axis="channel")
    enc = codec.encode(X)
    assert enc.fields["scale"].tolist() == [[[1.0], [1.0]]]  # [S, D, groups]: step (max-min)/3
    assert enc.fields["zero"].tolist() == [[[0.0], [10.0]]]
    # codes are stored channel-major: channel 0 tokens 0..3, then channel 1
    assert unpack_bits(enc.fields["codes"], 2, 8).tolist() == [0, 0, 1, 3, 0, 1, 1, 3]
    assert torch.equal(codec.decode(enc), torch.tensor([[0.0, 10.0], [0.0, 11.0], [1.0, 11.0], [3.0, 13.0]]))


def test_per_token_by_hand():
    x = torch.tensor([[0.0, 0.4, 1.0, 3.0], [-6.0, 0.0, -3.0, -2.9]])
    codec = KiviCodec(bits=2, group_size=4, axis="token")
    enc = codec.encode(x)
    assert enc.fields["scale"].tolist() == [[[1.0], [2.0]]]  # [S, n, groups]
    assert enc.fields["zero"].tolist() == [[[0.0], [-6.0]]]
    assert torch.equal(codec.decode(enc), torch.tensor([[0.0, 0.0, 1.0, 3.0], [-6.0, 0.0, -2.0, -2.0]]))


def test_axis_decides_which_dimension_shares_a_scale():
    x = torch.randn(2, 64, 64)
    ch = KiviCodec(axis="channel").encode(x)
    tok = KiviCodec(axis="token").encode(x)
    assert ch.fields["scale"].shape == (2, 64, 2)  # per channel, 64 tokens / 32
    assert tok.fields["scale"].shape == (2, 64, 2)  # per token, 64 channels / 32
    x[:, :, 3] += 50  # an offset outlier channel (as in keys) is what per-channel quantisation is for
    err_ch = ((KiviCodec(axis="channel").roundtrip(x) - x) ** 2).mean()
    err_tok = ((KiviCodec(axis="token").roundtrip(x) - x) ** 2).mean()
    assert err_ch < err_tok / 10


def test_partial_final_token_group_has_its_own_range():
    x = torch.randn(1, 40, 8) * 100
    x[:, 32:] = torch.rand(1, 8, 8)  # the last 8 tokens live in [0, 1]
    codec = KiviCodec(bits=4, group_size=32, axis="channel")
    enc = codec.encode(x)
    assert enc.fields["scale"].shape == (1, 8, 2)
    tail = x[:, 32:]
    step = (tail.amax(1) - tail.amin(1)) / 15
    err = (codec.decode(enc) - x)[:, 32:].abs().amax(1)
    assert bool((err <= step * 0.51 + 1e-3).all())


def test_partial_final_channel_group():
    x = torch.randn(3, 5, 40)
    codec = KiviCodec(bits=4, group_size=32, axis="token")
    enc = codec.encode(x)
    assert enc.fields["zero"].shape == (3, 5, 2)
    assert float(((codec.decode(enc) - x) ** 2).mean()) < 0.01


@pytest.mark.parametrize(("bits", "axis", "expected"), [(4, "channel", 5.0), (2, "token", 3.0)])
def test_payload_bits_per_element(bits, axis, expected):
    x = torch.randn(2, 64, 128)
    enc = KiviCodec(bits=bits, axis=axis).encode(x)
    assert 8 * enc.payload_nbytes / x.numel() == expected
    assert 8 * enc.nbytes / x.numel() == 8 * len(enc.to_bytes()) / x.numel()


@pytest.mark.parametrize(("field", "value"), [("bits", 3), ("axis", "head"), ("group_size", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(kt.ConfigError, match=field):
        KiviCodec(**{field: value})
