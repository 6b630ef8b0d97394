"""The codec interface: a frozen, validated config dataclass and a small codec class.

A codec sees plain tensors ``x`` of shape ``[..., n, D]``: the leading dims are independent
streams (e.g. layers x KV heads), ``n`` is the token axis and ``D`` the head dim. The base
class does the plumbing (input checks, flattening to ``[S, n, D]`` float32, the
:class:`~kakeyaturbo.container.Encoded` envelope, output dtype); a codec implements only
``_encode`` and ``_decode`` and declares its payload fields (:attr:`Codec.payload`).

Before a codec's ``_decode`` runs, :meth:`Codec.decode` checks the whole header against the
schema: the container's (:func:`kakeyaturbo.container.check_header`), the config's (the config
class's validation, by the codec's own config), the declared payload fields (names, dtypes,
ranks, which ones the config needs, floats finite) and the output size (at most
:data:`MAX_EXPANSION` elements per byte of container, so decoding costs at most a bounded
multiple of the blob's size). Every failure raises :class:`CorruptDataError` naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from kakeyaturbo.container import OUTPUT_DTYPES, Encoded, dtype_from_name, dtype_name
from kakeyaturbo.errors import ConfigError, CorruptDataError, NonFiniteInputError, ShapeError

FLOAT_DTYPES = tuple(OUTPUT_DTYPES.values())
"""Input dtypes every codec accepts; decode returns the input's dtype."""
MAX_EXPANSION = 256
"""Most decoded elements a container may claim per byte of its size (1/32 bit per element; the
sparsest codec settings store well over a bit per element), checked before decoding."""


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    """Base of every codec config: frozen, validated in ``__post_init__``, JSON round-trippable.

    Subclasses add fields and override :meth:`validate`, raising :class:`ConfigError` through
    the ``check_*`` helpers so that messages name the field and the allowed range.
    """

    version: ClassVar[int] = 1
    added_fields: ClassVar[tuple[str, ...]] = ()
    """Fields added after payloads were first serialized: left out of :meth:`to_dict` while they
    hold their default, so the headers of payloads that do not use them stay byte-identical to
    (and decodable with) those written before the field existed."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` on the first bad one."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict of every field (tuples become lists), except :attr:`added_fields`
        at their default."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in self.added_fields and v == f.default:
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def check_keys(cls, data: Any) -> None:
        """Raise :class:`ConfigError` unless ``data`` is a mapping whose keys are field names."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__}: expected a mapping of config fields, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CodecConfig:
        """Build from :meth:`to_dict` output; unknown keys raise :class:`ConfigError`."""
        cls.check_keys(data)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{name} must be an integer in {rng}, got {value!r}")


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def finite_number(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool) a float32 holds: magnitude at most :data:`FLOAT32_MAX`."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and -FLOAT32_MAX <= value <= FLOAT32_MAX


def check_float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a real number in ``[lo, hi]`` (or ``(lo, hi]``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        left = "(" if lo_open else "["
        raise ConfigError(f"{name} must be a number in {left}{lo}, {hi}], got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_codebook(name: str, table: Any, bits: int) -> None:
    """A scalar codebook must hold exactly ``2**bits`` finite, strictly increasing floats."""
    if table is None:
        return
    vals = list(table)
    if len(vals) != 2**bits:
        raise ConfigError(f"{name} must have 2**bits = {2**bits} entries for bits={bits}, got {len(vals)}")
    t = torch.tensor(vals, dtype=torch.float64)
    if not torch.isfinite(t).all() or not bool((t[1:] > t[:-1]).all()):
        raise ConfigError(f"{name} must be finite and strictly increasing, got {vals}")


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite (integer tensors always are).

    A float sum is finite only if every term is, so one reduction decides; the elementwise test
    runs only when the sum is not finite (a NaN/Inf, or finite values whose sum overflows).
    float8 e4m3 has no Inf: its NaN is the bit pattern ``S.1111.111``.
    """
    if not x.is_floating_point():
        return True
    if x.dtype == torch.float8_e4m3fn:
        return x.numel() == 0 or int((x.view(torch.uint8) & 0x7F).amax()) < 0x7F
    if x.element_size() == 1:
        return bool(torch.isfinite(x.float()).all())
    total = x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(x).all())


def check_input(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """Validate a codec input and flatten it.

    Args:
        x: float tensor ``[..., n, D]``.

    Returns:
        ``(x32, S, n, D)`` with ``x32`` a float32 tensor ``[S, n, D]`` on the input's device.

    Raises:
        ShapeError: not a tensor, not a float dtype, fewer than 2 dims, or an empty axis.
        NonFiniteInputError: NaN or Inf anywhere (the message gives the first position).
    """
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"expected a float tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.dim() < 2:
        raise ShapeError(f"expected shape [..., n, D] with at least 2 dims, got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ShapeError(f"cannot encode an empty tensor of shape {tuple(x.shape)}")
    if not all_finite(x):
        pos = tuple(int(i) for i in (~torch.isfinite(x)).nonzero()[0])
        raise NonFiniteInputError(f"input holds NaN/Inf (first at index {pos}, value {float(x[pos])})")
    n, d = x.shape[-2], x.shape[-1]
    x32 = x.reshape(-1, n, d).to(torch.float32)
    return x32, x32.shape[0], n, d


@dataclasses.dataclass(frozen=True)
class Field:
    """A payload field a codec declares (:attr:`Codec.payload`).

    Attributes:
        dtype: its storage dtype, or the dtypes it may have (the config or shape picks one; the
            codec's ``_decode`` checks the exact one and the shape with :func:`expect_field`).
        rank: its number of dims, or the numbers it may have.
        when: predicate on the codec config saying whether the field is present (None: always).
    """

    dtype: torch.dtype | tuple[torch.dtype, ...]
    rank: int | tuple[int, ...]
    when: Callable[[Any], bool] | None = None

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtypes the field may have."""
        return self.dtype if isinstance(self.dtype, tuple) else (self.dtype,)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The numbers of dims the field may have."""
        return self.rank if isinstance(self.rank, tuple) else (self.rank,)


def output_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in the output ``dtype``; values beyond a narrower float type's range saturate at its
    largest finite value instead of becoming Inf."""
    if dtype in (torch.float16, torch.bfloat16):
        big = torch.finfo(dtype).max
        x = x.clamp(-big, big)
    return x.to(dtype)


def side_fingerprint(side: Mapping[str, torch.Tensor]) -> str:
    """Short SHA-256 of calibration tensors a codec needs besides its config (stored in the config)."""
    h = hashlib.sha256()
    for k in sorted(side):
        t = side[k].detach().contiguous().cpu()
        h.update(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Codec(ABC):
    """A lossy map ``x [..., n, D] -> Encoded -> x_hat [..., n, D]``.

    Subclasses set :attr:`name` and :attr:`config_class` and implement :meth:`_encode` and
    :meth:`_decode` on float32 ``[S, n, D]`` tensors. Codecs with a bit-width knob call it
    ``bits``.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[CodecConfig]]
    payload: ClassVar[Mapping[str, Field]]
    """Every payload field the codec writes, by name: the schema :meth:`decode` checks first."""
    needs_calibration: ClassVar[bool] = False
    """True for codecs built from per-model calibrated data, through :meth:`from_calibration`."""
    folds_whitening: ClassVar[bool] = False
    """True for calibrated codecs whose transforms already include the keys' whitening: the engine
    hands them raw keys and the whitening's name instead of whitening the keys itself."""

    def __init__(self, config: CodecConfig | None = None, **overrides: Any) -> None:
        self.config_class.check_keys(overrides)
        if config is None:
            config = self.config_class(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{self.name} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    @classmethod
    def from_calibration(cls, config: Mapping[str, Any], calibration: Any, layer: int, stream: str,
                         whiten: str, layout: str = "head") -> Codec:
        """Build the codec of one (layer, stream) from a calibration bundle (codecs that need one),
        for the engine ``layout`` its input comes in."""
        raise ConfigError(f"codec {cls.name!r} is not built from a calibration bundle")

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        """Validate config fields as a recipe gives them (before any model loads); raise
        :class:`ConfigError` naming the bad one."""
        cls.config_class.from_dict(config)

    @property
    def side_nbytes(self) -> int:
        """Bytes of per-model calibration data this codec needs (0 for self-contained codecs)."""
        return 0

    def encode(self, x: torch.Tensor) -> Encoded:
        """Encode ``x [..., n, D]`` (any float dtype, any device) into packed bytes."""
        x32, s, n, d = check_input(x)
        fields = self._encode(x32)
        return Encoded(self.name, self.config.to_dict(), tuple(x.shape), dtype_name(x.dtype), fields)

    def decode(self, enc: Encoded) -> torch.Tensor:
        """Decode to a tensor of the encoded shape and dtype on the payload's device.

        Raises:
            CorruptDataError: ``enc`` is not an :class:`Encoded`, is another codec's or config's,
                breaks the header schema (module docstring), or its payload is inconsistent with
                its header or decodes to values beyond float32.
        """
        return self.decode_many([enc])[0]

    def decode_many(self, encs: Sequence[Encoded], *, own: bool = False,
                    dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """:meth:`decode` of each payload; those of one vector size ``D`` that :meth:`join_fields` can
        concatenate (codecs that code every vector alike at a fixed number of bits) in one call over all
        their vectors: many small payloads (a serving engine's blocks, a cache's chunks, a prefill's
        partial last chunk among them) then cost what one large one does. With ``own``, the payloads
        are this process's own, as in :meth:`decode_own`, and skip the checks. ``dtype`` (default: each
        payload's input dtype) is the output dtype; ``torch.float32`` returns the codec's own output
        uncast, for a caller that computes on it before casting once (the cache re-applies RoPE to
        decoded keys).

        Raises:
            CorruptDataError: as :meth:`decode`, for any of them (not checked with ``own``).
        """
        if not own:
            for enc in encs:
                self.check_encoded(enc)
        decode = self._decode if own else self._decode_checked
        groups: dict[int, list[int]] = {}
        for i, enc in enumerate(encs):
            groups.setdefault(enc.shape[-1], []).append(i)
        out: dict[int, torch.Tensor] = {}
        for d, members in groups.items():
            # a whole number of 8-vector groups ends on a byte at any fixed rate: those first, so at most
            # the last payload of a join has a partial byte
            members.sort(key=lambda i: math.prod(encs[i].shape[:-1]) % 8 != 0)
            part = [encs[i] for i in members]
            joined = self.join_fields(part) if len(part) > 1 else None
            if joined is None:
                decoded = [decode(e.fields, math.prod(e.shape[:-2]), e.shape[-2], d) for e in part]
            else:
                sizes = [math.prod(e.shape[:-1]) for e in part]
                decoded = list(decode(joined, 1, sum(sizes), d)[0].split(sizes))
            for i, y in zip(members, decoded):
                out[i] = self._cast(y, encs[i], dtype)
        return [out[i] for i in range(len(encs))]

    def join_fields(self, encs: Sequence[Encoded]) -> dict[str, torch.Tensor] | None:
        """The fields of one payload holding the vectors of ``encs`` (checked payloads of this codec and
        config, of one vector size ``D``) one after another as one stream ``[1, sum of vectors, D]``, or
        None where this codec cannot join them (the default)."""
        return None

    def _decode_checked(self, fields: dict[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        """float32 ``[s, n, d]`` from checked fields; payload errors and non-finite output raise."""
        try:
            out = self._decode(fields, s, n, d)
        except (RuntimeError, IndexError, ValueError) as exc:
            if isinstance(exc, CorruptDataError):
                raise
            raise CorruptDataError(f"{self.name}: payload inconsistent with its header: {exc}") from None
        if not all_finite(out):
            raise CorruptDataError(f"{self.name}: payload decodes to values beyond the float32 range")
        return out

    @staticmethod
    def _cast(out: torch.Tensor, enc: Encoded, dtype: torch.dtype | None = None) -> torch.Tensor:
        return output_cast(out.reshape(enc.shape), dtype or dtype_from_name(enc.dtype, OUTPUT_DTYPES, "input"))

    def decode_own(self, enc: Encoded) -> torch.Tensor:
        """:meth:`decode` of a payload this codec's :meth:`encode` made in this process and nobody
        serialized (a cache's own chunks, decoded again at every step): the same tensor, without the
        checks that guard against corrupt or forged payloads (which cost a pass over every field and
        over the output)."""
        return self.decode_many([enc], own=True)[0]

    def check_encoded(self, enc: Any) -> None:
        """Check ``enc`` against this codec's header schema (module docstring) before anything is decoded."""
        if not isinstance(enc, Encoded):
            raise CorruptDataError(f"expected an Encoded, got {type(enc).__name__}")
        enc.validate()
        if enc.codec != self.name:
            raise CorruptDataError(f"this is a {enc.codec!r} payload; the {self.name!r} codec cannot decode it")
        if enc.config != self.config.to_dict():
            raise CorruptDataError(
                f"payload was encoded with config {enc.config}, this codec has {self.config.to_dict()}; "
                "use kakeyaturbo.codecs.decode(enc) to decode with the payload's own config"
            )
        wanted = {k: f for k, f in self.payload.items() if f.when is None or f.when(self.config)}
        if set(enc.fields) != set(wanted):
            raise CorruptDataError(f"{self.name}: payload holds fields {sorted(enc.fields)}; its config "
                                   f"writes {sorted(wanted)}")
        for key, spec in wanted.items():
            t = enc.fields[key]
            if t.dtype not in spec.dtypes or t.dim() not in spec.ranks:
                raise CorruptDataError(f"{self.name}: field {key!r} is {t.dtype} with {t.dim()} dims, expected "
                                       f"{' or '.join(map(str, spec.dtypes))} with {' or '.join(map(str, spec.ranks))}")
            if not all_finite(t):
                raise CorruptDataError(f"{self.name}: field {key!r} holds NaN/Inf")
        elements = math.prod(enc.shape)
        if elements > MAX_EXPANSION * enc.nbytes:
            raise CorruptDataError(f"{self.name}: header shape {list(enc.shape)} claims {elements} elements, more "
                                   f"than {MAX_EXPANSION} per byte of its {enc.nbytes}-byte container")

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))

    @abstractmethod
    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode float32 ``x [S, n, D]`` into named payload tensors (packed, narrow dtypes)."""

    @abstractmethod
    def _decode(self, fields: dict[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        """Decode payload tensors back to float32 ``[S, n, D]``.

        Implementations check that every field has the size the config and shape imply and
        raise :class:`CorruptDataError` otherwise (use :func:`expect_field`).
        """


def expect_field(
    fields: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """Return ``fields[name]`` after checking its dtype and shape; raise :class:`CorruptDataError` otherwise."""
    if name not in fields:
        raise CorruptDataError(f"payload lacks field {name!r}")
    t = fields[name]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise CorruptDataError(
            f"field {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}"
        )
    return t
