"""KakeyaTurbo: KV-cache compression for transformer language models.

Public API::

    import kakeyaturbo as kt
    codec = kt.codecs.get("kakeya", bits=3, block_size=512)
    enc = codec.encode(x)            # x: [..., n, D]
    x_hat = codec.decode(enc)
    enc.nbytes == len(enc.to_bytes())
    kt.Encoded.from_bytes(blob)

    calibration = kt.calibrate(model, tokenizer, texts)          # statistics, a few forward passes
    cache = kt.compress(model, "kakeya-balanced", calibration=calibration)   # a transformers Cache
    model.generate(**inputs, cache=cache)

Heavier parts (the transformers cache, recipes, calibration, models) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from kakeyaturbo import codecs
from kakeyaturbo.container import Encoded
from kakeyaturbo.errors import (
    ConfigError,
    CorruptDataError,
    KakeyaError,
    NonFiniteInputError,
    NumericRangeError,
    ShapeError,
)

__version__ = "0.1.0"

_LAZY = {
    "KakeyaCache": "kakeyaturbo.cache",
    "Calibration": "kakeyaturbo.calibration",
    "calibrate": "kakeyaturbo.calibration",
    "compress": "kakeyaturbo.cache",
    "calibration": "kakeyaturbo.calibration",
    "recipes": "kakeyaturbo.recipes",
    "models": "kakeyaturbo.models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith(name) else getattr(module, name)
    raise AttributeError(f"module 'kakeyaturbo' has no attribute {name!r}")


__all__ = [
    "Calibration",
    "ConfigError",
    "CorruptDataError",
    "Encoded",
    "KakeyaCache",
    "KakeyaError",
    "NonFiniteInputError",
    "NumericRangeError",
    "ShapeError",
    "calibrate",
    "codecs",
    "compress",
    "recipes",
]
