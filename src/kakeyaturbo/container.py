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

_DTYPES: dict[str, torch.dtype] = {
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
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Storage name of a torch dtype (raises for dtypes the container cannot hold)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise CorruptDataError(f"dtype {dtype} cannot be stored in an Encoded container") from None


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; unknown names raise :class:`CorruptDataError`."""
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise CorruptDataError(f"unknown dtype {name!r} in header") from None


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
        try:
            meta = json.loads(blob[start : start + header_len].decode())
            codec, config, dtype = meta["codec"], meta["config"], meta["dtype"]
            shape = tuple(int(s) for s in meta["shape"])
            specs = [(str(n), dtype_from_name(d), tuple(int(s) for s in shp)) for n, d, shp in meta["fields"]]
        except CorruptDataError:
            raise
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CorruptDataError(f"unreadable container header: {exc}") from None
        if not isinstance(codec, str) or not isinstance(config, Mapping) or not isinstance(dtype, str):
            raise CorruptDataError("container header has fields of the wrong type")
        if any(s < 0 for s in shape) or any(s < 0 for _, _, shp in specs for s in shp):
            raise CorruptDataError("negative dimension in container header")
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
