"""Hostile containers: valid encodings of every codec, forged by one mutation each, and how decoding them ends.

A *base* is a small valid encoding (:func:`bases`) and the codec that decodes it. A *mutation*
(:data:`MUTATIONS`) forges its bytes: random corruption (bit flips, truncation; the CRC then no
longer matches) or an edit of the header or payload with the CRC recomputed, so the decoders see
it. :func:`outcome` decodes a forged blob and says how it ended (:data:`OUTCOMES`); the fuzz
command (:mod:`kakeyaturbo.commands.fuzz`) adds the time and memory watch, the test suite a
property test over the same cases.
"""

from __future__ import annotations

import dataclasses
import json
import random
import struct
import zlib
from collections.abc import Callable
from typing import Any

import torch

from kakeyaturbo import codecs
from kakeyaturbo.codecs.base import FLOAT_DTYPES, Codec
from kakeyaturbo.container import Encoded
from kakeyaturbo.errors import KakeyaError

_PREFIX = struct.Struct("<4sHHI")

OUTCOMES = ("decoded", "library_error", "other_exception", "hang", "over_allocation", "dtype_change",
            "non_finite")
"""How a case ends: decoded fine; a :class:`KakeyaError`; another exception; over 1 s; more memory than
allowed; decoded to a non-float dtype; decoded to NaN/Inf. Only the first two are acceptable."""

HANG_SECONDS = 1.0

# interesting replacements of a header number (the forged values among them)
NUMBERS: tuple[Any, ...] = (0, -1, 1, 2, 3, 7, 255, 256, 65535, 2**24, 2**26, 2**31, 2**32, 2**40, 2**63, 2**64,
                            2**70, 10**400, 0.5, -0.0, 1e300, float("inf"), float("-inf"), float("nan"), True,
                            None, "3", [], {}, [1], {"a": 1})
ITEMSIZE = {"uint8": 1, "int8": 1, "float8_e4m3fn": 1, "int16": 2, "float16": 2, "bfloat16": 2, "int32": 4,
            "float32": 4, "int64": 8}
DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64",
          "float8_e4m3fn", "complex64", "", 7, None)


@dataclasses.dataclass(frozen=True)
class Base:
    """A valid encoding to forge: the codec that made it, its input's dtype and its bytes."""

    name: str
    codec: Codec
    dtype: torch.dtype
    blob: bytes


def _kv(s: int, n: int, d: int, seed: int) -> torch.Tensor:
    """KV-like float32 ``[s, n, d]``: a mean, a decaying spectrum, noise."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.exp(-torch.arange(d, dtype=torch.float32) / 4.0) * 3.0
    return torch.randn(s, 1, d, generator=g) + torch.randn(s, n, d, generator=g) * spectrum


CONFIGS: dict[str, list[dict[str, Any]]] = {
    "identity": [{}],
    "fp8": [{}],
    "rotated-int": [{"bits": 4}, {"bits": 3, "symmetric": False, "rotate": False, "group_size": 8}],
    "kivi": [{"bits": 2, "axis": "channel", "group_size": 8}, {"bits": 4, "axis": "token", "group_size": 8}],
    "turboquant": [{"bits": 3}, {"bits": 2, "variant": "shipped", "block": 32}],
    "turboquant-prod": [{"bits": 3}],
    "besicovitch": [{"block_size": 8}, {"magnitude_mode": "f16", "group_size": 3},
                    {"magnitude_scales": (1.0,) * 8}],
    "kakeya": [{"bits": 2, "block_size": 16, "kmeans_k": 4}, {"block_size": 8, "outlier_threshold": 1.5,
                                                             "share_basis": True, "skeleton_dtype": "float32"},
               {"block_size": 32, "pca": "randomized", "rank": 4}],
    "kakeya-v2": [{"bits": 3.0}, {"bits": 2.5, "coding": "entropy", "stream": "v"},
                  {"bits": 2.0, "scale_bits": 0, "fitted_tables": True}],
}
"""The configs each codec's bases are encoded with (each optional payload field used by one)."""


def bases(seed: int = 0, names: list[str] | None = None) -> list[Base]:
    """Small valid encodings of every config of :data:`CONFIGS` of the codecs ``names`` (None: all),
    ``[2, 20, 16]`` inputs, float32 and bfloat16; kakeya-v2 fitted on another draw."""
    out = []
    for name, configs in CONFIGS.items():
        if names is not None and name not in names:
            continue
        cls = codecs.codec_class(name)
        for i, cfg in enumerate(configs):
            x = _kv(2, 20, 16, seed + i)
            codec = cls.calibrate(_kv(2, 64, 16, seed + 100 + i), **cfg) if cls.needs_calibration else cls(**cfg)
            for dtype in (torch.float32, torch.bfloat16):
                out.append(Base(name, codec, dtype, codec.encode(x.to(dtype)).to_bytes()))
    return out


def _seal(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """The header (parsed) and payload of a valid container."""
    header_len = _PREFIX.unpack_from(blob, 0)[3]
    start = _PREFIX.size
    return json.loads(blob[start:start + header_len]), blob[start + header_len:-4]


def assemble(header: str | bytes, payload: bytes) -> bytes:
    """A container of this header text and payload, CRC recomputed."""
    raw = header.encode() if isinstance(header, str) else header
    return _seal(_PREFIX.pack(b"KKTC", 1, 0, len(raw)) + raw + payload)


def _dump(meta: Any) -> str:
    return json.dumps(meta, separators=(",", ":"), sort_keys=True)


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every number / string / bool / null leaf of a JSON value."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaves(v, (*path, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaves(v, (*path, i))] or [path]
    return [path]


def _set(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    node[path[0]] = _set(node[path[0]], path[1:], value)
    return node


def _flip(blob: bytes, rng: random.Random) -> bytes:
    out = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(out) * 8)
        out[i // 8] ^= 1 << (i % 8)
    return bytes(out)


def _truncate(blob: bytes, rng: random.Random) -> bytes:
    return blob[:rng.randrange(len(blob))]


def _number(blob: bytes, rng: random.Random) -> bytes:
    meta, payload = split(blob)
    path = rng.choice(_leaves(meta))
    return assemble(_dump(_set(meta, path, rng.choice(NUMBERS))), payload)


def _scaled(value: Any, rng: random.Random) -> Any:
    return value * 2 ** rng.choice((1, 8, 24, 26, 30, 40, 64, 70)) if rng.random() < 0.7 else rng.choice(NUMBERS)


def _shape(blob: bytes, rng: random.Random) -> bytes:
    meta, payload = split(blob)
    shape = list(meta["shape"])
    kind = rng.randrange(4)
    if kind == 0:
        i = rng.randrange(len(shape))
        shape[i] = _scaled(shape[i], rng)
    elif kind == 1:
        shape = [rng.choice((1, 2, 2**20, 2**31)), *shape]
    elif kind == 2:
        shape = shape[rng.randrange(len(shape)):]
    else:
        shape = [shape[0] * shape[1], *shape[2:]] if len(shape) > 2 else [2, shape[0] // 2 or 1, *shape[1:]]
    meta["shape"] = shape
    return assemble(_dump(meta), payload)


def _field_shape(blob: bytes, rng: random.Random) -> bytes:
    """A field's declared shape changed; its bytes resized to match when ``resize`` (half the cases)."""
    meta, payload = split(blob)
    if not meta["fields"]:
        return _shape(blob, rng)
    i = rng.randrange(len(meta["fields"]))
    name, dtype, shape = meta["fields"][i]
    new = list(shape)
    if new and rng.random() < 0.8:
        j = rng.randrange(len(new))
        new[j] = rng.choice((0, 1, new[j] + 1, max(new[j] - 1, 0), new[j] * 2, 2**64, 2**31))
    else:
        new = rng.choice(([2**64, 0], [], [1] * 40, [0]))
    meta["fields"][i] = [name, dtype, new]
    if rng.random() < 0.5 and all(isinstance(v, int) and 0 <= v < 2**20 for v in new):
        size = ITEMSIZE[dtype]
        start, end = _field_offsets(meta, payload, i, old=shape)
        count = 1
        for v in new:
            count *= v
        body = payload[start:end]
        body = (body * (count * size // max(len(body), 1) + 1))[:count * size] if body else bytes(count * size)
        payload = payload[:start] + body + payload[end:]
    return assemble(_dump(meta), payload)


def _field_offsets(meta: dict[str, Any], payload: bytes, index: int, old: list[int]) -> tuple[int, int]:
    """Start and end in ``payload`` of field ``index`` (whose original shape was ``old``)."""
    start = 0
    for j, (_, dtype, shape) in enumerate(meta["fields"]):
        count = 1
        for v in (old if j == index else shape):
            count *= v
        if j == index:
            return start, start + count * ITEMSIZE[dtype]
        start += count * ITEMSIZE[dtype]
    return start, len(payload)


def _dtype(blob: bytes, rng: random.Random) -> bytes:
    meta, payload = split(blob)
    if meta["fields"] and rng.random() < 0.5:
        meta["fields"][rng.randrange(len(meta["fields"]))][1] = rng.choice(DTYPES)
    else:
        meta["dtype"] = rng.choice(DTYPES)
    return assemble(_dump(meta), payload)


def _deep(blob: bytes, rng: random.Random) -> bytes:
    meta, payload = split(blob)
    depth = rng.choice((30, 1000, 100_000))
    path = rng.choice(_leaves(meta))
    text = _dump(_set(meta, path, "@@DEEP@@"))
    return assemble(text.replace('"@@DEEP@@"', "[" * depth + "]" * depth), payload)


def _structure(blob: bytes, rng: random.Random) -> bytes:
    """A header key removed or added, the header replaced by another JSON value, or a config key dropped."""
    meta, payload = split(blob)
    kind = rng.randrange(5)
    if kind == 0:
        del meta[rng.choice(sorted(meta))]
    elif kind == 1:
        meta[rng.choice(("extra", "config", "fields"))] = rng.choice(NUMBERS)
    elif kind == 2 and meta["config"]:
        del meta["config"][rng.choice(sorted(meta["config"]))]
    elif kind == 3:
        meta["config"]["unknown_option"] = 1
    else:
        return assemble(rng.choice(("[]", "null", "1", '"x"', "{", "\xff\xfe", "[" * 5000)), payload)
    return assemble(_dump(meta), payload)


def _payload(blob: bytes, rng: random.Random) -> bytes:
    """Payload bytes overwritten (random bytes, or f16/f32 Inf and NaN patterns), the CRC recomputed."""
    meta, payload = split(blob)
    if not payload:
        return _number(blob, rng)
    out = bytearray(payload)
    pattern = rng.choice((b"\x00\x7c", b"\x00\xfc", b"\xff\x7f", b"\x00\x00\x80\x7f", b"\x7f", b"\xff",
                          bytes([rng.randrange(256)])))
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i:i + len(pattern)] = pattern
    header = json.dumps(meta, separators=(",", ":"), sort_keys=True)
    return assemble(header, bytes(out[:len(payload)]))


MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "bitflip": _flip,
    "truncate": _truncate,
    "header_number": _number,
    "header_shape": _shape,
    "field_shape": _field_shape,
    "dtype": _dtype,
    "deep_nesting": _deep,
    "structure": _structure,
    "payload": _payload,
}
"""Every mutation by name: ``(valid blob, rng) -> forged blob``."""


def forge(base: Base, mutation: str, seed: int) -> bytes:
    """``base``'s bytes forged by ``mutation`` (deterministic in ``seed``)."""
    return MUTATIONS[mutation](base.blob, random.Random(seed))


def decode(base: Base, blob: bytes) -> torch.Tensor:
    """Decode a (forged) blob as a user would: parse it, then decode with the payload's own config
    (kakeya-v2, which needs its transforms: with the base's codec)."""
    enc = Encoded.from_bytes(blob)
    if type(base.codec).needs_calibration:
        return base.codec.decode(enc)
    return codecs.decode(enc)


def outcome(base: Base, blob: bytes) -> tuple[str, str]:
    """How decoding ``blob`` ends, as ``(outcome, detail)``: one of :data:`OUTCOMES` but ``hang`` and
    ``over_allocation`` (which the caller measures) and the exception type or output dtype."""
    try:
        out = decode(base, blob)
    except MemoryError:
        return "over_allocation", "MemoryError"
    except Exception as exc:  # noqa: BLE001 - counting what escapes is the point
        if "allocate memory" in str(exc):  # torch's allocator refused (possibly wrapped in a library error)
            return "over_allocation", type(exc).__name__
        return ("library_error" if isinstance(exc, KakeyaError) else "other_exception"), type(exc).__name__
    if out.dtype not in FLOAT_DTYPES:
        return "dtype_change", str(out.dtype)
    if not bool(torch.isfinite(out).all()):
        return "non_finite", str(out.dtype)
    return "decoded", str(out.dtype)
