"""Rotary position embedding, forward and inverse, driven by the model's own rotary module.

Keys are compressed before RoPE: the cache receives post-RoPE keys from the attention layer,
inverts RoPE at the keys' positions, and re-applies it after decoding. The cos/sin tables come
from the model's rotary embedding module (so scaled variants such as YaRN or llama3 and the
per-layer-type tables of Gemma 3 are reproduced exactly); only the pairing convention is ours
to know: ``"half"`` (rotate_half: pairs ``(j, j + r/2)``, Llama/Qwen/Mistral/Gemma) or
``"interleaved"`` (pairs ``(2j, 2j+1)``). With ``r < D`` (partial rotary) the last ``D - r``
channels pass through unchanged.

A scaled rotary (cos and sin multiplied by an attention factor ``s``) is a rotation times
``s``; :meth:`Rope.invert` divides by ``cos² + sin²`` so ``invert(apply(x)) == x`` always.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Literal

import torch
from torch import nn

from kakeyaturbo.errors import ConfigError, ShapeError

Style = Literal["half", "interleaved"]

SEQUENCE_DEPENDENT = ("dynamic", "longrope")
"""``rope_type`` of rotary modules whose tables change with the longest sequence seen (not shared)."""
_TABLES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str | None, str, str], tuple[torch.Tensor, torch.Tensor]]]
_TABLES = weakref.WeakKeyDictionary()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((-b, a), dim=-1).flatten(-2)


class Rope:
    """RoPE of one attention layer.

    Args:
        rotary_emb: the model's rotary module, called as ``rotary_emb(x, position_ids[, layer_type])``
            and returning ``(cos, sin)`` of shape ``[1, n, r]``.
        style: pairing convention, ``"half"`` or ``"interleaved"``.
        layer_type: passed to rotary modules that keep one table per layer type (Gemma 3).
    """

    def __init__(self, rotary_emb: nn.Module, style: Style = "half", layer_type: str | None = None) -> None:
        if style not in ("half", "interleaved"):
            raise ConfigError(f"RoPE style must be 'half' or 'interleaved', got {style!r}")
        self.rotary_emb = rotary_emb
        self.style = style
        self.layer_type = layer_type
        params = inspect.signature(rotary_emb.forward).parameters
        self._takes_layer_type = "layer_type" in params

    @classmethod
    def from_model(cls, model: nn.Module, layer_idx: int = 0) -> Rope:
        """RoPE of decoder layer ``layer_idx`` of a Hugging Face causal LM (for multimodal models
        such as Gemma 3, of its text decoder)."""
        base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
        rotary = getattr(base, "rotary_emb", None)
        if rotary is None:
            arch = type(model).__name__
            raise ConfigError(f"{arch}: no rotary_emb module found; this architecture is not supported")
        layer_types = getattr(getattr(base, "config", model.config), "layer_types", None)
        layer_type = layer_types[layer_idx] if layer_types else None
        return cls(rotary, "half", layer_type)

    @torch.no_grad()
    def cos_sin(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for ``positions [n]`` (int64): float32 ``(cos, sin)`` each ``[n, r]``, laid out for
        this style (the rotary module's tables repeat the ``r/2`` frequencies as two halves; the
        interleaved style needs each frequency on two adjacent channels).

        Rows are taken from tables of positions ``0..P-1`` made by the rotary module (rows past ``P``
        added when a larger position comes), shared by every :class:`Rope` of the same module, layer type and
        device (a cache re-applies RoPE to its whole context in every layer and step); the module computes
        each position's row alone, so the rows equal those of a call on ``positions``. Rotary modules
        whose tables depend on the longest sequence seen (``rope_type`` "dynamic", "longrope") are called
        on ``positions`` every time instead."""
        pos = positions.reshape(-1).to(like.device)
        if (getattr(self.rotary_emb, "rope_type", "default") in SEQUENCE_DEPENDENT or pos.numel() == 0
                or int(pos.min()) < 0):
            return self._tables(pos)
        shared = _TABLES.setdefault(self.rotary_emb, {})
        key = (self.layer_type, self.style, str(like.device))
        have = shared[key][0].shape[0] if key in shared else 0
        needed = int(pos.max()) + 1
        if have < needed:  # only the missing rows, as far as asked (a module's tables may end there)
            more = self._tables(torch.arange(have, needed, device=like.device))
            shared[key] = more if not have else tuple(torch.cat(p) for p in zip(shared[key], more))
        cos, sin = shared[key]
        return cos.index_select(0, pos), sin.index_select(0, pos)

    def _tables(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(cos, sin)`` ``[n, r]`` of ``pos [n]`` from the rotary module, in this style's layout."""
        probe = torch.zeros(1, 1, dtype=torch.float32, device=pos.device)
        if self._takes_layer_type:
            cos, sin = self.rotary_emb(probe, pos.reshape(1, -1), self.layer_type)
        else:
            cos, sin = self.rotary_emb(probe, pos.reshape(1, -1))
        cos, sin = cos[0].float(), sin[0].float()
        if self.style == "interleaved":
            half = cos.shape[-1] // 2
            cos, sin = cos[:, :half].repeat_interleave(2, -1), sin[:, :half].repeat_interleave(2, -1)
        return cos, sin

    def _split(self, x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        if r > x.shape[-1] or r % 2:
            raise ShapeError(f"rotary dim {r} does not fit head dim {x.shape[-1]}")
        return x[..., :r], x[..., r:]

    def _rot(self, x: torch.Tensor) -> torch.Tensor:
        return _rotate_half(x) if self.style == "half" else _rotate_interleaved(x)

    def apply(self, x: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rotate ``x [..., n, D]`` to ``positions [n]``; returns ``dtype`` (default: that of ``x``),
        the math in float32."""
        cos, sin = self.cos_sin(positions, x)
        if x.shape[-2] != cos.shape[0]:
            raise ShapeError(f"{x.shape[-2]} tokens but {cos.shape[0]} positions")
        rot, rest = self._split(x.float(), cos.shape[-1])
        out = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)  # cast once, on the write
        out[..., : cos.shape[-1]] = rot * cos + self._rot(rot) * sin
        out[..., cos.shape[-1] :] = rest
        return out

    def invert(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`apply`: ``invert(apply(x, p), p) == x`` up to float32 rounding."""
        cos, sin = self.cos_sin(positions, x)
        if x.shape[-2] != cos.shape[0]:
            raise ShapeError(f"{x.shape[-2]} tokens but {cos.shape[0]} positions")
        rot, rest = self._split(x.float(), cos.shape[-1])
        out = (rot * cos - self._rot(rot) * sin) / (cos * cos + sin * sin)
        return torch.cat((out, rest), dim=-1).to(x.dtype)
