"""The contract every registered codec honours (parametrized over all of them)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kakeyaturbo as kt
from tests.conftest import lowrank

# small, fast settings per codec, and the bit ladder along which error must fall
SETTINGS: dict[str, dict] = {
    "identity": {},
    "fp8": {},
    "rotated-int": {"bits": 4},
    "kivi": {"bits": 4},
    "turboquant": {"bits": 3},
    "turboquant-prod": {"bits": 3},
    "besicovitch": {},
    "kakeya": {"bits": 3, "block_size": 64},
    "kakeya-v2": {"bits": 3.0, "stream": "k"},
    "kakeya-v2/entropy": {"bits": 3.0, "stream": "k", "coding": "entropy"},
}
LADDERS: dict[str, tuple[str, list[int]]] = {
    "rotated-int": ("bits", [2, 3, 4, 8]),
    "kivi": ("bits", [2, 4]),
    "turboquant": ("bits", [1, 2, 3, 4]),
    "turboquant-prod": ("bits", [2, 3, 4]),
    "besicovitch": ("magnitude_bits", [2, 3, 4]),
    "kakeya": ("bits", [1, 2, 3, 4]),
    "kakeya-v2": ("bits", [2.0, 3.0, 4.0]),
    "kakeya-v2/entropy": ("bits", [2.0, 3.0, 4.0]),
}
VARIANTS = ("kakeya-v2/entropy",)
"""Codec variants (``name/variant``) that take their own code path and get the whole contract too."""
ALL = kt.codecs.names() + list(VARIANTS)


def make(name: str, **overrides) -> kt.codecs.Codec:
    """A codec with the test settings; calibrated codecs get transforms fitted on low-rank data
    (one stream, D = 64: every stream of every test input uses them)."""
    cls = kt.codecs.codec_class(name.split("/")[0])
    cfg = {**SETTINGS.get(name, {}), **overrides}
    if cls.needs_calibration:
        return cls.calibrate(lowrank(1, 2048, 64, rank=8, noise=0.05, seed=5), **cfg)
    return cls(**cfg)


def redecode(codec: kt.codecs.Codec, enc: kt.Encoded) -> torch.Tensor:
    """Decode with the payload's own config: the registry for self-contained codecs, the codec's
    own calibrated data otherwise."""
    return codec.decode(enc) if codec.needs_calibration else kt.codecs.decode(enc)


def test_registry_has_the_contract_names():
    assert set(SETTINGS) <= set(ALL) and {v.split("/")[0] for v in VARIANTS} <= set(kt.codecs.names())


@pytest.fixture(params=ALL, scope="module")
def codec(request):
    return make(request.param)


def _x(device, dtype=torch.float32, shape=(2, 3, 100, 64)):
    s = 1
    for v in shape[:-2]:
        s *= v
    return lowrank(s, shape[-2], shape[-1], rank=8, noise=0.05).reshape(shape).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_shape_dtype_device(codec, device, dtype):
    x = _x(device, dtype)
    enc = codec.encode(x)
    y = codec.decode(enc)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y).all()
    rel = float(((y.float() - x.float()) ** 2).sum() / (x.float() ** 2).sum())
    # calibrated codecs see data from another distribution here: only sanity-check them (their
    # quality tests use matching calibration data)
    assert rel < (2.0 if codec.needs_calibration else 0.5), f"{codec.name}: relative error {rel}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_own_equals_decode(codec, device, dtype):
    enc = codec.encode(_x(device, dtype))
    own, checked = codec.decode_own(enc), codec.decode(enc)
    assert own.dtype == checked.dtype and own.device == checked.device and torch.equal(own, checked)


def test_decode_many_equals_decode_and_joins_byte_exactly(codec, device):
    xs = [_x(device, shape=(s, 64, 64)) for s in (1, 3, 2)] + [_x(device, shape=(2, 40, 64))]
    encs = [codec.encode(x) for x in xs]
    assert all(torch.equal(a, codec.decode(e)) for a, e in zip(codec.decode_many(encs), encs))
    joined = codec.join_fields(encs[:3])
    assert (joined is not None) == (codec.name == "kakeya-v2")  # one transform: its streams join
    if joined is not None:
        whole = codec.encode(torch.cat(xs[:3])).fields
        assert joined.keys() == whole.keys() and all(torch.equal(joined[f], whole[f]) for f in whole)
    mixed = [encs[0], codec.encode(_x(device, shape=(1, 37, 64))), encs[1], encs[3]]  # a partial payload amid
    calls = []
    inner = codec._decode
    codec._decode = lambda *a: calls.append(a[1:]) or inner(*a)
    try:
        many = codec.decode_many(mixed, own=True)
    finally:
        del codec._decode
    assert all(torch.equal(a, codec.decode(e)) for a, e in zip(many, mixed))
    if joined is not None:  # one call over every vector, the partial payload last
        assert calls == [(1, 64 + 37 + 3 * 64 + 2 * 40, 64)]
    broken = kt.Encoded(encs[1].codec, encs[1].config, encs[1].shape, encs[1].dtype,
                        {f: t[: t.shape[0] // 2] for f, t in encs[1].fields.items()})
    with pytest.raises(kt.errors.CorruptDataError):
        codec.decode_many([encs[0], broken, encs[2]])


def test_odd_sizes(codec, device):
    x = _x(device, shape=(3, 37, 64))
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_nbytes_is_serialized_size_and_roundtrips(codec, device):
    x = _x(device)
    enc = codec.encode(x)
    blob = enc.to_bytes()
    assert enc.nbytes == len(blob)
    enc2 = kt.Encoded.from_bytes(blob, device=device)
    assert torch.equal(codec.decode(enc2), codec.decode(enc))
    assert torch.equal(redecode(codec, enc2), codec.decode(enc))


def test_deterministic(codec, device):
    x = _x(device)
    assert codec.encode(x).to_bytes() == codec.encode(x).to_bytes()


def test_batched_equals_per_stream(codec, device):
    x = _x(device, shape=(3, 96, 64))
    whole = codec.decode(codec.encode(x))
    parts = torch.stack([codec.decode(codec.encode(x[i])) for i in range(3)])
    assert torch.allclose(whole, parts, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_non_finite(codec, bad):
    x = _x("cpu")
    x[1, 2, 5, 7] = bad
    with pytest.raises(kt.NonFiniteInputError, match=r"NaN/Inf \(first at index \(1, 2, 5, 7\)"):
        codec.encode(x)


def test_rejects_bad_shapes_and_dtypes(codec):
    with pytest.raises(kt.ShapeError, match="at least 2 dims"):
        codec.encode(torch.zeros(8))
    with pytest.raises(kt.ShapeError, match="float tensor"):
        codec.encode(torch.zeros(4, 8, dtype=torch.int32))
    with pytest.raises(kt.ShapeError, match="empty"):
        codec.encode(torch.zeros(0, 8))


def test_unknown_config_field_is_named(codec):
    with pytest.raises(kt.ConfigError, match="no_such_field"):
        type(codec).config_class.from_dict({**codec.config.to_dict(), "no_such_field": 1})


def test_reported_bits_per_element(codec):
    x = _x("cpu")
    enc = codec.encode(x)
    assert 8 * enc.nbytes / x.numel() == pytest.approx(8 * len(enc.to_bytes()) / x.numel())


@pytest.mark.parametrize("name", sorted(LADDERS))
def test_error_falls_with_bits(name):
    knob, ladder = LADDERS[name]
    x = _x("cpu", shape=(4, 256, 64))
    errs = []
    for b in ladder:
        c = make(name, **{knob: b})
        errs.append(float(((c.roundtrip(x) - x) ** 2).mean()))
    assert all(a > b for a, b in zip(errs, errs[1:])), f"{name}: errors {errs} along {knob}={ladder}"


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=25)
@given(data=st.data())
def test_fuzzed_blobs_raise_corrupt_data(codec, data):
    blob = bytearray(codec.encode(_x("cpu", shape=(2, 40, 64))).to_bytes())
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(kt.CorruptDataError):
        redecode(codec, kt.Encoded.from_bytes(bytes(blob)))


def test_decoding_with_wrong_codec_or_config_is_refused(codec):
    enc = codec.encode(_x("cpu"))
    other = "identity" if codec.name != "identity" else "fp8"
    with pytest.raises(kt.CorruptDataError, match=codec.name):
        kt.codecs.get(other).decode(enc)
    enc.config = {**enc.config, "_tampered": True}
    with pytest.raises(kt.CorruptDataError, match="config"):
        codec.decode(enc)
