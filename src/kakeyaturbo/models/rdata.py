"""A small reader of R's serialization format and of R lazy-load databases (``.rdx``/``.rdb``).

Only what reading packaged text data needs: XDR streams of format 2 or 3; NULL, symbols,
pairlists (attribute lists, skipped or kept), character, logical, integer, double, complex and
raw vectors, generic lists, references, and the compact integer/real sequences and ``wrap_*``
ALTREP classes. Environments, closures, byte code and external pointers raise
:class:`CorruptDataError` naming the type.

A lazy-load database is an index ``NAME.rdx`` (a gzip-compressed serialized list whose
``variables`` element maps object names to ``(offset, length)`` in ``NAME.rdb``) and the blob
file ``NAME.rdb``: every blob is a 4-byte big-endian uncompressed length followed by the
compressed serialization (zlib; with ``compressed`` 2 or 3 a one-byte method tag precedes the
bzip2/xz/zlib/raw data).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kakeyaturbo.errors import CorruptDataError

NA_INTEGER = -(2**31)

_NIL = 254
_REF = 255
_SPECIAL_CONSTANTS = {242, 241, 253, 252, 251, 250}  # empty/base/global env, unbound, missing, base ns
_PAIRLIST_TYPES = {2, 6, 239, 240}  # LISTSXP, LANGSXP, ATTRLISTSXP, ATTRLANGSXP
_TYPE_NAMES = {
    3: "closure",
    4: "environment",
    5: "promise",
    17: "...",
    21: "bytecode",
    22: "externalptr",
    23: "weakref",
    25: "S4",
    247: "persistent",
    248: "package environment",
    249: "namespace",
}
_VECTOR_KINDS = {10: "logical", 13: "integer", 14: "double", 15: "complex", 16: "character", 19: "list",
                 20: "expression", 24: "raw"}
_LATIN1_MASK = 1 << 2


@dataclass(frozen=True)
class RSymbol:
    """An R symbol (a name)."""

    name: str


@dataclass
class RVector:
    """An R vector: ``kind`` (``"character"``, ``"integer"``, ``"list"``, ...), its elements and attributes.

    Character elements are ``str`` or ``None`` (NA); integer/logical NA is ``None``; list elements
    are whatever the reader returns for each item.
    """

    kind: str
    values: list[Any]
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class RPairlist:
    """An R pairlist (or call): ``(tag, value)`` pairs in order, tags ``None`` where absent."""

    items: list[tuple[str | None, Any]]
    attributes: dict[str, Any] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CorruptDataError(f"R serialization truncated: need {n} bytes at offset {self.pos}, "
                                   f"{len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = struct.unpack(">II", self.take(8))
            n = (hi << 32) | lo
        if n < 0:
            raise CorruptDataError(f"R serialization: negative vector length {n}")
        return n

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise CorruptDataError("R serialization: only the XDR ('X\\n') format is supported")
        version = self.int()
        if version not in (2, 3):
            raise CorruptDataError(f"R serialization format {version} is not supported (2 or 3)")
        self.take(8)
        if version == 3:
            self.take(self.length())

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if kind == _NIL or kind in _SPECIAL_CONSTANTS:
            return None
        if kind == _REF:
            index = flags >> 8 or self.int()
            if not 1 <= index <= len(self.refs):
                raise CorruptDataError(f"R serialization: reference {index} to an unknown object")
            return self.refs[index - 1]
        if kind == 1:
            sym = RSymbol(self._text(self.item()))
            self.refs.append(sym)
            return sym
        if kind in _PAIRLIST_TYPES:
            return self._pairlist(has_attr, has_tag)
        if kind == 9:
            return self._charsxp(flags)
        if kind == 238:
            return self._altrep()
        if kind in _VECTOR_KINDS:
            vec = RVector(_VECTOR_KINDS[kind], self._vector_values(kind))
            if has_attr:
                vec.attributes = self._attributes(self.item())
            return vec
        name = _TYPE_NAMES.get(kind, f"type {kind}")
        raise CorruptDataError(f"R serialization: objects of type {name} are not supported by this reader")

    def _text(self, obj: Any) -> str:
        if not isinstance(obj, str):
            raise CorruptDataError("R serialization: a symbol's name is not a string")
        return obj

    def _charsxp(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None
        raw = self.take(n)
        encoding = "latin-1" if (flags >> 12) & _LATIN1_MASK else "utf-8"
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as err:
            raise CorruptDataError(f"R serialization: string is not valid {encoding}: {err}") from err

    def _vector_values(self, kind: int) -> list[Any]:
        n = self.length()
        if kind in (10, 13):
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            return [None if v == NA_INTEGER else v for v in ints]
        if kind == 14:
            return list(struct.unpack(f">{n}d", self.take(8 * n)))
        if kind == 15:
            parts = struct.unpack(f">{2 * n}d", self.take(16 * n))
            return [complex(parts[2 * i], parts[2 * i + 1]) for i in range(n)]
        if kind == 24:
            return list(self.take(n))
        values = [self.item() for _ in range(n)]
        if kind == 16 and any(v is not None and not isinstance(v, str) for v in values):
            raise CorruptDataError("R serialization: a character vector holds a non-string element")
        return values

    def _pairlist(self, has_attr: bool, has_tag: bool) -> RPairlist:
        out = RPairlist([])
        while True:
            if has_attr:
                out.attributes.update(self._attributes(self.item()))
            tag = self.item() if has_tag else None
            out.items.append((tag.name if isinstance(tag, RSymbol) else None, self.item()))
            flags = self.int()
            kind = flags & 0xFF
            if kind == _NIL:
                return out
            if kind not in _PAIRLIST_TYPES:
                raise CorruptDataError(f"R serialization: pairlist continues with type {kind}")
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

    def _attributes(self, obj: Any) -> dict[str, Any]:
        if not isinstance(obj, RPairlist):
            raise CorruptDataError("R serialization: attributes are not a pairlist")
        return {tag: value for tag, value in obj.items if tag is not None}

    def _altrep(self) -> Any:
        info, state, attrs = self.item(), self.item(), self.item()
        cls = info.items[0][1].name if isinstance(info, RPairlist) and info.items else "?"
        if cls in ("compact_intseq", "compact_realseq") and isinstance(state, RVector):
            n, start, step = (int(v) for v in state.values)
            values: list[Any] = [start + i * step for i in range(n)]
            vec = RVector("integer" if cls == "compact_intseq" else "double", values)
        elif cls.startswith("wrap_") and isinstance(state, RVector) and state.values:
            vec = state.values[0]
        else:
            raise CorruptDataError(f"R serialization: ALTREP class {cls!r} is not supported")
        if attrs is not None:
            vec.attributes = self._attributes(attrs)
        return vec


def unserialize(data: bytes) -> Any:
    """Read one object from an uncompressed XDR R serialization (what ``serialize(x, NULL)`` writes).

    Returns None (NULL), :class:`RSymbol`, :class:`RPairlist`, :class:`RVector` or ``str``
    (a lone CHARSXP). Raises CorruptDataError on truncation, trailing bytes or unsupported types.
    """
    reader = _Reader(data)
    reader.header()
    obj = reader.item()
    if reader.pos != len(data):
        raise CorruptDataError(f"R serialization: {len(data) - reader.pos} trailing bytes after the object")
    return obj


def to_python(obj: Any) -> Any:
    """Plain Python view of a read object.

    Character/numeric vectors -> ``list``; factors -> ``list[str | None]`` of their labels;
    data frames -> ``dict[column, list]``; lists with names -> ``dict``; other lists -> ``list``;
    pairlists -> ``dict`` (tagged) or ``list``.
    """
    if isinstance(obj, RPairlist):
        if all(tag is not None for tag, _ in obj.items):
            return {tag: to_python(v) for tag, v in obj.items}
        return [to_python(v) for _, v in obj.items]
    if not isinstance(obj, RVector):
        return obj
    classes = obj.attributes.get("class")
    class_names = classes.values if isinstance(classes, RVector) else []
    if "factor" in class_names:
        levels = obj.attributes.get("levels")
        if not isinstance(levels, RVector) or levels.kind != "character":
            raise CorruptDataError("R factor without character levels")
        labels = levels.values
        if any(c is not None and not 1 <= c <= len(labels) for c in obj.values):
            raise CorruptDataError("R factor code outside its levels")
        return [None if c is None else labels[c - 1] for c in obj.values]
    values = [to_python(v) for v in obj.values] if obj.kind in ("list", "expression") else list(obj.values)
    names = obj.attributes.get("names")
    if obj.kind == "list" and isinstance(names, RVector) and len(names.values) == len(values):
        return dict(zip(names.values, values))
    return values


_DECOMPRESSORS = {b"2": bz2.decompress, b"X": lzma.decompress, b"Z": zlib.decompress, b"0": bytes}


def _decompress_blob(blob: bytes, method: int) -> bytes:
    if len(blob) < 4:
        raise CorruptDataError("lazy-load blob shorter than its 4-byte length header")
    size = struct.unpack(">I", blob[:4])[0]
    body, decompress = blob[4:], zlib.decompress
    if method in (2, 3):
        tag, body = body[:1], body[1:]
        if tag not in _DECOMPRESSORS:
            raise CorruptDataError(f"lazy-load blob: unknown compression tag {tag!r}")
        decompress = _DECOMPRESSORS[tag]
    try:
        out = decompress(body)
    except (zlib.error, OSError, lzma.LZMAError, EOFError) as err:
        raise CorruptDataError(f"lazy-load blob does not decompress: {err}") from err
    if len(out) != size:
        raise CorruptDataError(f"lazy-load blob: header says {size} bytes, decompressed {len(out)}")
    return out


class LazyLoadDB:
    """An R lazy-load database ``prefix.rdx`` + ``prefix.rdb`` (e.g. a package's ``data/Rdata``).

    Args:
        prefix: path without the extension, e.g. ``.../janeaustenr/data/Rdata``.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        rdx = self.prefix.with_name(self.prefix.name + ".rdx")
        try:
            index = to_python(unserialize(gzip.decompress(rdx.read_bytes())))
        except (OSError, EOFError, zlib.error) as err:
            raise CorruptDataError(f"cannot read lazy-load index {rdx}: {err}") from err
        variables = index.get("variables") if isinstance(index, dict) else None
        if not isinstance(variables, dict):
            raise CorruptDataError(f"{rdx} is not a lazy-load index (no 'variables' list)")
        self._where = {name: tuple(v) for name, v in variables.items()}
        compressed = index.get("compressed", [True])
        self._method = int(compressed[0]) if compressed else 1

    def names(self) -> list[str]:
        """Names of the objects stored in the database, in index order."""
        return list(self._where)

    def read(self, name: str) -> Any:
        """The raw read object ``name`` (see :func:`unserialize`); KeyError if absent."""
        if name not in self._where:
            raise KeyError(f"{name!r} is not in {self.prefix} (has: {', '.join(self._where)})")
        offset, length = self._where[name]
        rdb = self.prefix.with_name(self.prefix.name + ".rdb")
        with rdb.open("rb") as fh:
            fh.seek(offset)
            blob = fh.read(length)
        if len(blob) != length:
            raise CorruptDataError(f"{rdb}: object {name!r} truncated ({len(blob)} of {length} bytes)")
        return unserialize(_decompress_blob(blob, self._method))

    def load(self, name: str) -> Any:
        """Object ``name`` as plain Python (see :func:`to_python`)."""
        return to_python(self.read(name))
