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
from typing import Literal

import torch
from torch import nn

from kakeyaturbo.errors import ConfigError, ShapeError

Style = Literal["half", "interleaved"]


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
        interleaved style needs each frequency on two adjacent channels)."""
        pos = positions.reshape(1, -1).to(like.device)
        probe = like.new_zeros(1, 1, dtype=torch.float32)
        if self._takes_layer_type:
            cos, sin = self.rotary_emb(probe, pos, self.layer_type)
        else:
            cos, sin = self.rotary_emb(probe, pos)
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

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [..., n, D]`` to ``positions [n]``; returns the dtype of ``x`` (math in float32)."""
        cos, sin = self.cos_sin(positions, x)
        if x.shape[-2] != cos.shape[0]:
            raise ShapeError(f"{x.shape[-2]} tokens but {cos.shape[0]} positions")
        rot, rest = self._split(x.float(), cos.shape[-1])
        out = rot * cos + self._rot(rot) * sin
        return torch.cat((out, rest), dim=-1).to(x.dtype)

    def invert(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`apply`: ``invert(apply(x, p), p) == x`` up to float32 rounding."""
        cos, sin = self.cos_sin(positions, x)
        if x.shape[-2] != cos.shape[0]:
            raise ShapeError(f"{x.shape[-2]} tokens but {cos.shape[0]} positions")
        rot, rest = self._split(x.float(), cos.shape[-1])
        out = (rot * cos - self._rot(rot) * sin) / (cos * cos + sin * sin)
        return torch.cat((out, rest), dim=-1).to(x.dtype)
