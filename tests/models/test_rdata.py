"""R serialization / lazy-load reader: round trips through a tiny XDR encoder, and the real Austen data."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.errors import ConfigError, CorruptDataError
from kakeyaturbo.models.rdata import LazyLoadDB, RVector, to_python, unserialize

HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
UTF8 = 1 << 3 << 12


def _int(v: int) -> bytes:
    return struct.pack(">i", v)


def _charsxp(s: str | None) -> bytes:
    if s is None:
        return _int(9) + _int(-1)
    raw = s.encode("utf-8")
    return _int(9 | UTF8) + _int(len(raw)) + raw


def _symbol(name: str) -> bytes:
    return _int(1) + _charsxp(name)


def _attrs(attrs: dict[str, bytes]) -> bytes:
    """A tagged pairlist of already-encoded values, NULL-terminated."""
    out = b""
    for tag, value in attrs.items():
        out += _int(2 | HAS_TAG) + _symbol(tag) + value
    return out + _int(254)


def _vector(kind: int, body: bytes, n: int, attrs: dict[str, bytes] | None = None) -> bytes:
    flags = kind | (HAS_ATTR if attrs else 0)
    return _int(flags) + _int(n) + body + (_attrs(attrs) if attrs else b"")


def strsxp(values: list[str | None], attrs: dict[str, bytes] | None = None) -> bytes:
    return _vector(16, b"".join(_charsxp(v) for v in values), len(values), attrs)


def intsxp(values: list[int], attrs: dict[str, bytes] | None = None) -> bytes:
    return _vector(13, b"".join(_int(v) for v in values), len(values), attrs)


def vecsxp(items: list[bytes], attrs: dict[str, bytes] | None = None) -> bytes:
    return _vector(19, b"".join(items), len(items), attrs)


def serialized(item: bytes, version: int = 3) -> bytes:
    head = b"X\n" + _int(version) + _int(0x040201) + _int(0x030500)
    if version == 3:
        head += _int(5) + b"UTF-8"
    return head + item


texts = st.lists(st.one_of(st.none(), st.text(max_size=12)), max_size=8)


@given(values=texts, version=st.sampled_from([2, 3]), named=st.booleans())
def test_character_vector_round_trip(values: list[str | None], version: int, named: bool) -> None:
    attrs = {"names": strsxp([f"n{i}" for i in range(len(values))])} if named else None
    obj = unserialize(serialized(strsxp(values, attrs), version))
    assert isinstance(obj, RVector) and obj.kind == "character"
    assert obj.values == values
    assert to_python(obj) == values


@given(columns=st.lists(texts.filter(lambda v: len(v) == 3), min_size=1, max_size=3), levels=st.booleans())
def test_list_and_data_frame(columns: list[list[str | None]], levels: bool) -> None:
    names = [f"c{i}" for i in range(len(columns))]
    items = [strsxp(c) for c in columns]
    factor_labels = ["a", "b"]
    if levels:  # one factor column too
        items.append(intsxp([2, 1, -(2**31)], {"levels": strsxp(factor_labels), "class": strsxp(["factor"])}))
        names.append("f")
    frame = vecsxp(items, {"names": strsxp(names), "class": strsxp(["data.frame"]),
                           "row.names": intsxp([-(2**31), -3])})
    result = to_python(unserialize(serialized(frame)))
    expected = dict(zip(names, columns))
    if levels:
        expected["f"] = ["b", "a", None]
    assert result == expected


def test_references_reuse_symbols() -> None:
    item = vecsxp([strsxp(["x"], {"foo": strsxp(["1"])}), strsxp(["y"], {"foo": strsxp(["2"])})])
    item = item.replace(_symbol("foo"), _int(255 | (1 << 8)))  # second "foo" tag -> reference 1
    item = item.replace(_int(255 | (1 << 8)), _symbol("foo"), 1)
    a, b = unserialize(serialized(item)).values
    assert a.attributes["foo"].values == ["1"] and b.attributes["foo"].values == ["2"]


@given(values=texts.filter(bool), cut=st.integers(1, 30))
def test_truncation_and_trailing_bytes_raise(values: list[str | None], cut: int) -> None:
    blob = serialized(strsxp(values))
    with pytest.raises(CorruptDataError):
        unserialize(blob[: max(len(blob) - cut, 0)])
    with pytest.raises(CorruptDataError, match="trailing"):
        unserialize(blob + b"\0")


def test_unsupported_input_raises() -> None:
    with pytest.raises(CorruptDataError, match="XDR"):
        unserialize(b"A\n" + b"\0" * 20)
    with pytest.raises(CorruptDataError, match="format 4"):
        unserialize(b"X\n" + _int(4) + b"\0" * 8)
    with pytest.raises(CorruptDataError, match="environment"):
        unserialize(serialized(_int(4) + b"\0" * 16))
    with pytest.raises(CorruptDataError, match="reference"):
        unserialize(serialized(_int(255 | (7 << 8))))


def _write_db(tmp_path: Path, objects: dict[str, bytes]) -> Path:
    blobs, where, offset = b"", [], 0
    for payload in objects.values():
        blob = struct.pack(">I", len(payload)) + zlib.compress(payload)
        where.append(intsxp([offset, len(blob)]))
        blobs += blob
        offset += len(blob)
    index = vecsxp([vecsxp(where, {"names": strsxp(list(objects))}), vecsxp([]), _vector(10, _int(1), 1)],
                   {"names": strsxp(["variables", "references", "compressed"])})
    prefix = tmp_path / "Rdata"
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(serialized(index)))
    (tmp_path / "Rdata.rdb").write_bytes(blobs)
    return prefix


def test_lazy_load_db(tmp_path: Path) -> None:
    prefix = _write_db(tmp_path, {"one": serialized(strsxp(["a", "b"])), "two": serialized(strsxp(["é"]))})
    db = LazyLoadDB(prefix)
    assert db.names() == ["one", "two"]
    assert db.load("one") == ["a", "b"] and db.load("two") == ["é"]
    with pytest.raises(KeyError, match="three"):
        db.load("three")
    rdb = tmp_path / "Rdata.rdb"
    data = bytearray(rdb.read_bytes())
    data[8] ^= 0xFF
    rdb.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError):
        db.load("one")


def test_real_austen_data() -> None:
    from kakeyaturbo.models.text import EVALUATION_BOOKS, austen_db

    try:
        db = austen_db()
    except ConfigError as err:
        pytest.skip(f"cannot fetch r-cran-janeaustenr from Debian: {err}")
    assert sorted(db.names()) == sorted(("prideprejudice", *EVALUATION_BOOKS))
    lines = db.load("prideprejudice")
    assert len(lines) > 10_000 and all(isinstance(line, str) for line in lines)
    assert "It is a truth universally acknowledged" in " ".join(lines[:20])
