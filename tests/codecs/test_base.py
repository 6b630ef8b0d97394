"""The codec base: every header is checked against its codec's schema before anything is decoded."""

from __future__ import annotations

import json
import time

import pytest
import torch

import kakeyaturbo as kt
from kakeyaturbo.codecs.base import MAX_EXPANSION, output_cast
from kakeyaturbo.fuzzing import assemble, split
from tests.codecs.test_all_codecs import ALL, make, redecode
from tests.conftest import lowrank


@pytest.fixture(scope="module", params=ALL)
def codec(request) -> kt.codecs.Codec:
    return make(request.param)


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return lowrank(2, 40, 64, rank=8, noise=0.05).to(dtype)


def _reforge(blob: bytes, edit) -> bytes:
    """``blob`` with its parsed header replaced by ``edit(header)``, CRC recomputed."""
    meta, payload = split(blob)
    return assemble(json.dumps(edit(meta)), payload)


def _decode(codec: kt.codecs.Codec, blob: bytes) -> torch.Tensor:
    return redecode(codec, kt.Encoded.from_bytes(blob))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("power", [26, 30, 40, 70])
def test_forged_stream_or_token_counts_fail_fast(codec, axis, power):
    blob = codec.encode(_x()).to_bytes()

    def edit(meta):
        meta["shape"][axis] = meta["shape"][axis] * 2**power
        return meta

    t0 = time.perf_counter()
    with pytest.raises(kt.CorruptDataError, match="shape"):
        _decode(codec, _reforge(blob, edit))
    assert time.perf_counter() - t0 < 0.5


def test_a_shape_larger_than_the_blob_can_hold_is_refused_before_decoding(codec):
    enc = codec.encode(_x())
    enc.shape = (2 * MAX_EXPANSION * enc.nbytes, 1)
    with pytest.raises(kt.CorruptDataError, match=f"more than {MAX_EXPANSION} per byte"):
        redecode(codec, enc)


def test_non_finite_float_fields_are_refused_naming_the_field(codec):
    enc = codec.encode(_x())
    floats = [k for k, t in enc.fields.items() if t.is_floating_point() and t.numel()]
    if not floats:
        pytest.skip(f"{codec.name} stores no float fields")
    for name in floats:
        forged = codec.encode(_x())
        forged.fields[name].reshape(-1)[0] = float("inf") if forged.fields[name].dtype != torch.float8_e4m3fn \
            else float("nan")
        with pytest.raises(kt.CorruptDataError, match=f"field '{name}' holds NaN/Inf"):
            _decode(codec, forged.to_bytes())


def test_fields_the_config_does_not_write_are_refused(codec):
    enc = codec.encode(_x())
    enc.fields["extra"] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(kt.CorruptDataError, match="payload holds fields"):
        redecode(codec, enc)
    enc = codec.encode(_x())
    name = next(iter(enc.fields))
    enc.fields[name] = enc.fields[name].reshape(1, *enc.fields[name].shape, 1)
    with pytest.raises(kt.CorruptDataError, match=f"field '{name}' is"):
        redecode(codec, enc)


def test_float64_inputs_round_trip_as_float64(codec):
    x = _x(torch.float64)
    enc = codec.encode(x)
    assert enc.dtype == "float64"
    y = _decode(codec, enc.to_bytes())
    assert y.dtype == torch.float64 and torch.allclose(y, codec.decode(codec.encode(x.float())).double())


def test_decode_of_something_else_is_corrupt_data(codec):
    with pytest.raises(kt.CorruptDataError, match="expected an Encoded, got NoneType"):
        codec.decode(None)
    with pytest.raises(kt.CorruptDataError, match="expected an Encoded, got str"):
        kt.codecs.decode("KKTC")


def test_header_config_errors_are_corrupt_data():
    blob = kt.codecs.get("kakeya").encode(_x()).to_bytes()
    for value, message in ((2**70, "bits must be an integer"), ([3], "bits must be an integer"),
                           (10**400, "unreadable container header|bits must be")):
        def edit(meta, value=value):
            meta["config"]["bits"] = value
            return meta

        with pytest.raises(kt.CorruptDataError, match=message):
            kt.codecs.decode(kt.Encoded.from_bytes(_reforge(blob, edit)))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: kt.codecs.get("kakeya", foo=1), r"unknown field\(s\) \['foo'\]"),
    (lambda: kt.codecs.get(["kakeya"]), "unknown codec"),
    (lambda: kt.codecs.get("fp8", bits=8), r"unknown field\(s\) \['bits'\]"),
    (lambda: kt.codecs.codec_class("fp8")(kt.codecs.get("fp8").config, scale=2), "unknown field"),
    (lambda: kt.codecs.codec_class("kakeya-v2").config_class.from_dict(["bits"]), "expected a mapping"),
    (lambda: kt.codecs.get("kakeya", variance_ratio=10**400), "variance_ratio must be a number"),
    (lambda: kt.codecs.get("kakeya", bits=1, codebook=(10**400, 1.0)), "within the float32 range"),
    (lambda: kt.codecs.get("besicovitch", magnitude_scales=(10**400,) * 32), "within the float32 range"),
])
def test_api_misuse_raises_config_error(call, message):
    with pytest.raises(kt.ConfigError, match=message):
        call()


def test_narrow_outputs_saturate_instead_of_becoming_inf():
    x = torch.tensor([70000.0, -1e39, 3.0])
    assert output_cast(x, torch.float16).tolist() == [65504.0, -65504.0, 3.0]
    assert torch.isfinite(output_cast(x, torch.bfloat16)).all()
    assert output_cast(x, torch.float64).dtype == torch.float64


def test_identity_refuses_values_beyond_bfloat16_instead_of_storing_inf():
    x = torch.ones(2, 4)
    x[1, 2] = 3.4e38
    with pytest.raises(kt.NumericRangeError, match=r"identity values: value 3.4e\+38 at index \(0, 1, 2\)"):
        kt.codecs.get("identity").encode(x)
