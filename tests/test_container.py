import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.container import Encoded
from kakeyaturbo.errors import CorruptDataError


def _sample() -> Encoded:
    return Encoded(
        "identity", {"a": 1, "t": [0.5, 1.5]}, (2, 3, 4), "float32",
        {"codes": torch.arange(10, dtype=torch.uint8), "scale": torch.ones(3, dtype=torch.float16),
         "empty": torch.zeros(0, dtype=torch.float16)},
    )


def test_roundtrip_and_nbytes():
    enc = _sample()
    blob = enc.to_bytes()
    assert enc.nbytes == len(blob)
    back = Encoded.from_bytes(blob)
    assert back.codec == enc.codec and back.config == enc.config and back.shape == enc.shape
    for k in enc.fields:
        assert torch.equal(back.fields[k], enc.fields[k])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:4] + b"\x09\x00" + b[6:], "version 9"),
        (lambda b: b[:-7], "CRC32|shorter"),
        (lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:], "CRC32"),
        (lambda b: b[:5], "shorter"),
    ],
)
def test_corruption_is_named(mutate, message):
    with pytest.raises(CorruptDataError, match=message):
        Encoded.from_bytes(mutate(_sample().to_bytes()))


@given(st.data())
def test_fuzz_never_crashes(data):
    blob = bytearray(_sample().to_bytes())
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    try:
        out = Encoded.from_bytes(bytes(blob))
    except CorruptDataError:
        return
    assert out.to_bytes() == bytes(blob)


def _forged(edit) -> bytes:
    """The sample container with its header JSON text replaced by ``edit(text)``, CRC recomputed."""
    from kakeyaturbo.fuzzing import assemble, split

    meta, payload = split(_sample().to_bytes())
    return assemble(edit(json.dumps(meta, separators=(",", ":"), sort_keys=True)), payload)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda h: h.replace('"shape":[2,3,4]', '"shape":[2,Infinity,4]'), "Infinity: numbers must be finite"),
    (lambda h: h.replace('"shape":[2,3,4]', '"shape":[2,1e999,4]'), "not finite"),
    (lambda h: h.replace('["empty","float16",[0]]', f'["empty","float16",[{2**64},0]]'), "field 'empty'"),
    (lambda h: h.replace('"a":1', '"a":' + "[" * 100_000 + "]" * 100_000), "nests deeper than 6"),
    (lambda h: h.replace('"shape":[2,3,4]', f'"shape":[2,{2**70},4]'), "shape must be"),
    (lambda h: h.replace('"dtype":"float32"', '"dtype":"int8"'), "input dtype 'int8'"),
    (lambda h: h.replace('"float16",[3]', '"complex64",[3]'), "field 'scale' dtype 'complex64'"),
    (lambda h: h.replace('"codec":"identity"', '"codec":["identity"]'), "codec must be a string"),
    (lambda h: h.replace('"config":{', '"extra":1,"config":{'), "must be an object with keys"),
    (lambda h: "[1, 2]", "must be an object with keys"),
    (lambda h: h.replace('["codes","uint8",[10]]', '["scale","uint8",[10]]'), "names a field twice"),
])
def test_forged_headers_are_corrupt_data_naming_the_entry(edit, message):
    with pytest.raises(CorruptDataError, match=message):
        Encoded.from_bytes(_forged(edit))


@pytest.mark.parametrize("blob", [None, "KKTC", 3, [1, 2]])
def test_from_bytes_of_something_else_is_corrupt_data(blob):
    with pytest.raises(CorruptDataError, match="expected bytes"):
        Encoded.from_bytes(blob)
