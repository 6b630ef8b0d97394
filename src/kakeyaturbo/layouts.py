"""Engine layouts: how a span of one layer's K or V ``[B, n_kv, T, D]`` becomes codec rows.

Tokens are cut into chunks of ``C`` tokens (``C = min(chunk, T)``; ``T`` a multiple of ``C``), and
every chunk is its own codec stream (a leading axis of the codec input), so a chunk never shares
codec state with its neighbours. The layouts:

* ``"head"``: one stream per (sequence, chunk, KV head): ``[B, T/C, n_kv, C, D]`` (the KV head is
  the innermost stream axis, so codecs with per-head calibrated transforms, such as ``kakeya-v2``,
  find head ``h`` at stream index ``s % n_kv``).
* ``"token_major"``: one stream per (sequence, chunk), rows token-major with the KV heads
  interleaved (row ``t * n_kv + h``), as the seed's PPL harness: ``[B, T/C, C * n_kv, D]``.
* ``"joint"``: one stream per (sequence, chunk), one row per token holding all its KV heads
  (``x[b, :, t, :]`` flattened head-major): ``[B, T/C, C, n_kv * D]``.

A layout is ``calibrated`` when each of its streams holds one fixed thing (one KV head, or all the
heads of a token side by side), so per-stream transforms fitted offline apply to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, get_args

import torch

LayoutName = Literal["head", "token_major", "joint"]
NAMES: tuple[str, ...] = get_args(LayoutName)
"""Every engine layout, by name."""


def join_heads(x: torch.Tensor) -> torch.Tensor:
    """The ``"joint"`` layout's rows: ``[..., n_kv, T, D] -> [..., T, n_kv * D]`` (heads side by side,
    head-major)."""
    return x.transpose(-3, -2).flatten(-2)


def _chunked(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """The ``"head"`` rows: ``[B, n_kv, T, D] -> [B, T/C, n_kv, C, D]`` with ``C = min(chunk, T)``."""
    b, h, t, d = x.shape
    c = min(chunk, t)
    return x.reshape(b, h, t // c, c, d).transpose(1, 2)


def _joint_rows(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``[B, n_kv, T, D] -> [B, T/C, C, n_kv * D]``."""
    return join_heads(_chunked(x, chunk))


def _token_major_rows(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``[B, n_kv, T, D] -> [B, T/C, C * n_kv, D]``, row ``t * n_kv + h``."""
    b, h, t, d = x.shape
    c = min(chunk, t)
    return x.reshape(b, h, t // c, c, d).permute(0, 2, 3, 1, 4).reshape(b, t // c, c * h, d)


def _from_head_rows(rows: torch.Tensor, batch: int, tokens: int, n_kv: int, d: int, chunk: int) -> torch.Tensor:
    """Inverse of :func:`_chunked`: ``-> [B, n_kv, T, D]``."""
    c = min(chunk, tokens)
    return rows.reshape(batch, tokens // c, n_kv, c, d).transpose(1, 2).reshape(batch, n_kv, tokens, d)


def _from_token_rows(rows: torch.Tensor, batch: int, tokens: int, n_kv: int, d: int, chunk: int) -> torch.Tensor:
    """Inverse of the token-major and of the joint rows (both hold a chunk's ``(token, head)`` vectors
    in that order): ``-> [B, n_kv, T, D]``."""
    c = min(chunk, tokens)
    return rows.reshape(batch, tokens // c, c, n_kv, d).permute(0, 3, 1, 2, 4).reshape(batch, n_kv, tokens, d)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One engine layout.

    Attributes:
        name: one of :data:`NAMES`.
        calibrated: each stream holds one fixed thing, so per-stream calibrated transforms apply.
        to_rows: ``(x [B, n_kv, T, D], chunk) -> rows``, the codec input (module docstring).
        from_rows: ``(rows, batch, tokens, n_kv, D, chunk) -> x [B, n_kv, T, D]``, the inverse (``rows``
            of any shape holding the same elements in the same order, e.g. the codec's output).
    """

    name: str
    calibrated: bool
    to_rows: Callable[[torch.Tensor, int], torch.Tensor]
    from_rows: Callable[[torch.Tensor, int, int, int, int, int], torch.Tensor]


LAYOUTS: dict[str, Layout] = {
    "head": Layout("head", True, _chunked, _from_head_rows),
    "token_major": Layout("token_major", False, _token_major_rows, _from_token_rows),
    "joint": Layout("joint", True, _joint_rows, _from_token_rows),
}
CALIBRATED: tuple[str, ...] = tuple(name for name in NAMES if LAYOUTS[name].calibrated)
"""Layouts calibrated transforms exist for: one per KV head (``D = head_dim``) or one per layer over
the KV heads side by side (``D = n_kv * head_dim``)."""
