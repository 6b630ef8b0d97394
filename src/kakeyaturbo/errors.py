"""The package's exception hierarchy.

Every failure the library detects raises a subclass of :class:`KakeyaError`, so callers can
catch one type; the subclass says what kind of problem it is and the message names it.
"""

from __future__ import annotations


class KakeyaError(Exception):
    """Base class of every error raised on purpose by KakeyaTurbo."""


class ConfigError(KakeyaError, ValueError):
    """A configuration value is out of range or inconsistent (the message names the field)."""


class NonFiniteInputError(KakeyaError, ValueError):
    """An input tensor holds NaN or Inf."""


class NumericRangeError(KakeyaError, OverflowError):
    """A value does not fit the storage type chosen for it (e.g. beyond the f16 range)."""


class CorruptDataError(KakeyaError, ValueError):
    """Serialized data is truncated, corrupted, of another version, or inconsistent with its header."""


class ShapeError(KakeyaError, ValueError):
    """A tensor has the wrong number of dimensions, size or dtype for the operation."""
