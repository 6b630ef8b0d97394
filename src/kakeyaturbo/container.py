"""`Encoded`: the packed output of a codec and its versioned binary container.

An :class:`Encoded` holds only what a decoder needs: the codec name and config, the input's
shape and dtype, and a few named payload tensors (packed codes, f16 scalars, skeletons).
:attr:`Encoded.nbytes` is the exact length of :meth:`Encoded.to_bytes`, header and checksum
included, and is the number every compression ratio in this package is computed from.

Layout (little-endian)::

    magic  b"KKTC"            4 B
    version u16, flags u16    4 B
    header_len u32            4 B
    header  UTF-8 JSON        header_len B   {codec, config, shape, dtype, fields: [[name, dtype, shape]...]}
    payload                   each field's raw bytes, in header order
    crc32  u32                4 B            over everything before it
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kakeyaturbo.errors import CorruptDataError

MAGIC = b"KKTC"
VERSION = 1
_PREFIX = struct.Struct("<4sHHI")

FIELD_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
"""Storage dtypes a payload field may have."""
OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
"""Dtypes an encoded input may have (decode returns this dtype)."""
_NAMES = {v: k for k, v in FIELD_DTYPES.items()} | {v: k for k, v in OUTPUT_DTYPES.items()}

MAX_HEADER_BYTES = 1 << 20
MAX_NESTING = 6
"""Deepest nesting of the header JSON (``{"fields": [[name, dtype, [dims]]]}`` is 4)."""
MAX_DIMS = 8
MAX_DIM = 2**31 - 1
MAX_FIELDS = 64
MAX_NAME = 64
_HEADER_KEYS = frozenset({"codec", "config", "shape", "dtype", "fields"})
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def dtype_name(dtype: torch.dtype) -> str:
    """Storage name of a torch dtype (raises for dtypes the container cannot hold)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise CorruptDataError(f"dtype {dtype} cannot be stored in an Encoded container") from None


def dtype_from_name(name: str, allowed: Mapping[str, torch.dtype] = FIELD_DTYPES, what: str = "field") -> torch.dtype:
    """Inverse of :func:`dtype_name` among ``allowed``; other names raise :class:`CorruptDataError`."""
    try:
        return allowed[name]
    except (KeyError, TypeError):
        raise CorruptDataError(f"{what} dtype {name!r} in header is not one of {sorted(allowed)}") from None


def _bad(what: str, value: Any, expected: str) -> CorruptDataError:
    text = repr(value)
    return CorruptDataError(f"header {what} must be {expected}, got {text[:80]}{'...' if len(text) > 80 else ''}")


def _dims(what: str, value: Any, least: int, lo: int) -> tuple[int, ...]:
    """A header shape: a list of ``least..MAX_DIMS`` integers in ``lo..MAX_DIM``."""
    ok = isinstance(value, (list, tuple)) and least <= len(value) <= MAX_DIMS and all(
        isinstance(v, int) and not isinstance(v, bool) and lo <= v <= MAX_DIM for v in value)
    if not ok:
        raise _bad(what, value, f"a list of {least}..{MAX_DIMS} integers in {lo}..{MAX_DIM}")
    return tuple(value)


def _name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise _bad(what, value, f"a string of 1..{MAX_NAME} characters")
    return value


def check_header(codec: Any, config: Any, shape: Any, dtype: Any,
                 fields: Any) -> tuple[tuple[int, ...], list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """The container-level schema of a header, checked before anything is allocated.

    Args:
        codec, config, shape, dtype: the header's values (as parsed, or held by an :class:`Encoded`).
        fields: ``[[name, dtype name, shape], ...]``.

    Returns:
        ``(shape, specs)``: the shape as a tuple and ``(name, dtype, shape)`` of every field.

    Raises:
        CorruptDataError: naming the first header entry of the wrong type or out of range: the codec
            name (1..64 characters), the config (an object with string keys), the shape (2..8 dims of
            1..2**31-1), the dtype (:data:`OUTPUT_DTYPES`), the fields (at most 64, unique names,
            :data:`FIELD_DTYPES`, 0..8 dims of 0..2**31-1).
    """
    _name("codec", codec)
    if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
        raise _bad("config", config, "an object with string keys")
    dims = _dims("shape", shape, 2, 1)
    dtype_from_name(dtype, OUTPUT_DTYPES, "input")
    if not isinstance(fields, (list, tuple)) or len(fields) > MAX_FIELDS:
        raise _bad("fields", fields, f"a list of at most {MAX_FIELDS} [name, dtype, shape] entries")
    specs = []
    for entry in fields:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise _bad("field entry", entry, "[name, dtype, shape]")
        name = _name("field name", entry[0])
        specs.append((name, dtype_from_name(entry[1], FIELD_DTYPES, f"field {name!r}"),
                      _dims(f"shape of field {name!r}", entry[2], 0, 0)))
    if len({n for n, _, _ in specs}) != len(specs):
        raise CorruptDataError("header names a field twice")
    return dims, specs


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise CorruptDataError(f"header number {text[:40]} is not finite")
    return value


def _constant(text: str) -> Any:
    raise CorruptDataError(f"header holds {text}: numbers must be finite")


def parse_header(raw: bytes) -> dict[str, Any]:
    """Parse header bytes: UTF-8 JSON object, at most :data:`MAX_HEADER_BYTES`, nested at most
    :data:`MAX_NESTING` deep, finite numbers only, exactly the keys of a header."""
    if len(raw) > MAX_HEADER_BYTES:
        raise CorruptDataError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    depth = peak = 0
    for ch in _STRING.sub(b'""', raw).translate(None, _NOT_BRACKETS):
        depth += 1 if ch in b"[{" else -1
        peak = max(peak, depth)
        if peak > MAX_NESTING:
            raise CorruptDataError(f"header nests deeper than {MAX_NESTING} levels")
    try:
        meta = json.loads(raw.decode(), parse_float=_finite_float, parse_constant=_constant)
    except CorruptDataError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptDataError(f"unreadable container header: {exc}") from None
    if not isinstance(meta, dict) or set(meta) != _HEADER_KEYS:
        got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise CorruptDataError(f"container header must be an object with keys {sorted(_HEADER_KEYS)}, got {got}")
    return meta


@dataclass
class Encoded:
    """Packed codec output.

    Attributes:
        codec: registered codec name.
        config: the codec config as a JSON-compatible dict.
        shape: shape of the encoded input ``[..., n, D]``.
        dtype: name of the input dtype (decode returns this dtype).
        fields: payload tensors by name (packed ``uint8`` codes, ``float16`` scalars, ...).
    """

    codec: str
    config: dict[str, Any]
    shape: tuple[int, ...]
    dtype: str
    fields: dict[str, torch.Tensor] = field(default_factory=dict)

    def _header(self) -> bytes:
        meta = {
            "codec": self.codec,
            "config": self.config,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "fields": [[k, dtype_name(v.dtype), list(v.shape)] for k, v in self.fields.items()],
        }
        return json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()

    def validate(self) -> None:
        """Check the header schema (:func:`check_header`) and that every field is a tensor of a
        storage dtype; raise :class:`CorruptDataError` naming what is wrong."""
        if not isinstance(self.fields, Mapping) or not all(isinstance(t, torch.Tensor) for t in self.fields.values()):
            raise CorruptDataError("Encoded.fields must map names to tensors")
        entries = [[k, _NAMES.get(t.dtype), list(t.shape)] for k, t in self.fields.items()]
        check_header(self.codec, self.config, self.shape, self.dtype, entries)

    @property
    def payload_nbytes(self) -> int:
        """Bytes of the payload tensors alone (no header, no checksum)."""
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    @property
    def nbytes(self) -> int:
        """Exact serialized size: ``len(self.to_bytes())``."""
        return _PREFIX.size + len(self._header()) + self.payload_nbytes + 4

    @property
    def device(self) -> torch.device:
        """Device the payload lives on (CPU when there is no payload)."""
        for t in self.fields.values():
            return t.device
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> Encoded:
        """A copy with every payload tensor moved to ``device``."""
        return Encoded(self.codec, dict(self.config), self.shape, self.dtype,
                       {k: v.to(device) for k, v in self.fields.items()})

    def to_bytes(self) -> bytes:
        """Serialize to the versioned container format (see module docstring)."""
        header = self._header()
        parts = [_PREFIX.pack(MAGIC, VERSION, 0, len(header)), header]
        for t in self.fields.values():
            parts.append(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview, device: torch.device | str = "cpu") -> Encoded:
        """Parse a container produced by :meth:`to_bytes`.

        Raises:
            CorruptDataError: wrong magic or version, truncation, checksum mismatch, or a header
                that does not describe the payload exactly. Never returns a partial object.
        """
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise CorruptDataError(f"expected bytes, got {type(blob).__name__}")
        blob = bytes(blob)
        if len(blob) < _PREFIX.size + 4:
            raise CorruptDataError(f"blob of {len(blob)} bytes is shorter than the minimal container")
        magic, version, _flags, header_len = _PREFIX.unpack_from(blob, 0)
        if magic != MAGIC:
            raise CorruptDataError(f"bad magic {magic!r}: not a KakeyaTurbo container (expected {MAGIC!r})")
        if version != VERSION:
            raise CorruptDataError(f"container version {version} is not supported (this build reads {VERSION})")
        (crc,) = struct.unpack_from("<I", blob, len(blob) - 4)
        if zlib.crc32(blob[:-4]) & 0xFFFFFFFF != crc:
            raise CorruptDataError("CRC32 mismatch: the data is corrupted or truncated")
        start = _PREFIX.size
        if start + header_len > len(blob) - 4:
            raise CorruptDataError(f"header length {header_len} runs past the end of the blob")
        meta = parse_header(blob[start : start + header_len])
        codec, config, dtype = meta["codec"], meta["config"], meta["dtype"]
        shape, specs = check_header(codec, config, meta["shape"], dtype, meta["fields"])
        offset = start + header_len
        end = len(blob) - 4
        fields: dict[str, torch.Tensor] = {}
        for name, dt, shp in specs:
            numel = 1
            for s in shp:
                numel *= s
            size = numel * torch.empty((), dtype=dt).element_size()
            if offset + size > end:
                raise CorruptDataError(f"field {name!r} ({size} bytes) runs past the end of the payload")
            raw = torch.frombuffer(bytearray(blob[offset : offset + size]), dtype=torch.uint8) if size else (
                torch.zeros(0, dtype=torch.uint8))
            fields[name] = raw.view(dt).reshape(shp).to(device)
            offset += size
        if offset != end:
            raise CorruptDataError(f"{end - offset} unexplained bytes after the last field")
        return cls(codec, dict(config), shape, dtype, fields)
