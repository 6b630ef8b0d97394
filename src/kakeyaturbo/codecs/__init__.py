"""Codec registry: ``get(name, **config)``, ``names()``, ``decode(enc)``.

Codecs are imported lazily, so importing the package stays fast and a codec's optional
dependencies are only needed when it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from kakeyaturbo.codecs.base import Codec, CodecConfig
from kakeyaturbo.container import Encoded
from kakeyaturbo.errors import ConfigError, CorruptDataError

_REGISTRY: dict[str, str] = {
    "identity": "kakeyaturbo.codecs.identity:IdentityCodec",
    "fp8": "kakeyaturbo.codecs.fp8:Fp8Codec",
    "rotated-int": "kakeyaturbo.codecs.rotated_int:RotatedIntCodec",
    "kivi": "kakeyaturbo.codecs.kivi:KiviCodec",
    "turboquant": "kakeyaturbo.codecs.turboquant:TurboQuantCodec",
    "turboquant-prod": "kakeyaturbo.codecs.turboquant:TurboQuantProdCodec",
    "besicovitch": "kakeyaturbo.codecs.besicovitch:BesicovitchCodec",
    "kakeya": "kakeyaturbo.codecs.kakeya:KakeyaCodec",
    "kakeya-v2": "kakeyaturbo.codecs.kakeya_v2:KakeyaV2Codec",
}


def names() -> list[str]:
    """Every registered codec name."""
    return list(_REGISTRY)


def codec_class(name: str) -> type[Codec]:
    """The class registered under ``name``; unknown names (or not a string) raise :class:`ConfigError`."""
    try:
        target = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown codec {name!r}; registered: {names()}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def get(name: str, **config: Any) -> Codec:
    """Instantiate codec ``name`` with config fields given as keyword arguments."""
    return codec_class(name)(**config)


def decode(enc: Encoded) -> Any:
    """Decode an :class:`Encoded` with the codec and config recorded in it.

    Raises:
        CorruptDataError: ``enc`` is not a valid container of a registered codec and a valid config
            of it (the message names the field), or its payload does not decode.
        ConfigError: the codec needs calibrated data besides the payload (decode with that codec).
    """
    if not isinstance(enc, Encoded):
        raise CorruptDataError(f"expected an Encoded, got {type(enc).__name__}")
    enc.validate()
    try:
        cls = codec_class(enc.codec)
        config = cls.config_class.from_dict(enc.config)
    except ConfigError as exc:
        raise CorruptDataError(f"header of a {enc.codec!r} payload: {exc}") from None
    return cls(config).decode(enc)


__all__ = ["Codec", "CodecConfig", "codec_class", "decode", "get", "names"]
