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
