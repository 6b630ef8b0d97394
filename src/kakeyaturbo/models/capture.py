"""Capturing what attention sees: per layer, queries, keys before/after RoPE, and values.

Forward hooks on each attention module's ``q_proj``/``k_proj``/``v_proj`` (and ``q_norm``/
``k_norm`` where the model has them) record the projections of one forward pass; nothing of the
modelling code is replaced. Post-RoPE keys come from :class:`~kakeyaturbo.transforms.rope.Rope`
driven by the model's own rotary module at positions ``0..T-1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kakeyaturbo.errors import ConfigError, ShapeError
from kakeyaturbo.models.arch import ModelFacts, decoder_layers, facts
from kakeyaturbo.transforms.rope import Rope


@dataclass
class LayerCapture:
    """What one attention layer saw for a single sequence of ``T`` tokens (float32, CPU).

    Attributes:
        q_pre: ``[n_kv, g, T, D]`` queries grouped by the KV head they attend (GQA group size
            ``g``), after q-norm where the model has it, before RoPE.
        k_pre: ``[n_kv, T, D]`` keys after k-norm (where present), before RoPE.
        k_post: ``[n_kv, T, D]`` keys after RoPE (what the KV cache receives).
        v: ``[n_kv, T, D]`` values.
        layer_type: ``"full_attention"`` or ``"sliding_attention"``.
    """

    q_pre: torch.Tensor
    k_pre: torch.Tensor
    k_post: torch.Tensor
    v: torch.Tensor
    layer_type: str


def _heads(x: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """``[1, T, n_heads * D]`` projection output -> ``[1, T, n_heads, D]``."""
    return x.reshape(x.shape[0], x.shape[1], n_heads, head_dim)


def _normed_layout(normed_in: torch.Tensor, proj: torch.Tensor, name: str) -> bool:
    """Whether a norm's input was ``proj [1, T, H, D]`` transposed to ``[1, H, T, D]`` (Gemma 3)
    rather than ``proj`` itself (Qwen3); ShapeError if it was neither."""
    if normed_in.shape == proj.shape and torch.equal(normed_in, proj):
        return False
    if normed_in.shape == proj.transpose(1, 2).shape and torch.equal(normed_in, proj.transpose(1, 2)):
        return True
    raise ShapeError(f"{name}: its input is not the projection's output; unsupported attention layout")


class _Recorder:
    """Hooks on one attention module; ``result()`` assembles ``(q_pre, k_pre, v)`` each ``[1, T, H, D]``."""

    def __init__(self, attn: nn.Module, f: ModelFacts) -> None:
        self.f = f
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [getattr(attn, name).register_forward_hook(self._hook(name))
                        for name in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm") if hasattr(attn, name)]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def record(_module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            self.out[name] = output.detach()
            if name.endswith("_norm"):
                self.out[name + "_in"] = inputs[0].detach()
        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _stream(self, proj: str, norm: str, n_heads: int) -> torch.Tensor:
        x = _heads(self.out[proj], n_heads, self.f.head_dim)
        if norm not in self.out:
            return x
        transposed = _normed_layout(self.out[norm + "_in"], x, norm)
        y = self.out[norm]
        return y.transpose(1, 2) if transposed else y

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        missing = {"q_proj", "k_proj", "v_proj"} - set(self.out)
        if missing:
            raise ShapeError(f"attention projections {sorted(missing)} did not run during the forward pass")
        q = self._stream("q_proj", "q_norm", self.f.n_q_heads)
        k = self._stream("k_proj", "k_norm", self.f.n_kv_heads)
        v = _heads(self.out["v_proj"], self.f.n_kv_heads, self.f.head_dim)
        return q, k, v


@torch.no_grad()
def capture(model: nn.Module, input_ids: torch.Tensor) -> list[LayerCapture]:
    """Run ``model`` on one sequence ``input_ids [1, T]`` (positions ``0..T-1``, no cache) and
    return one :class:`LayerCapture` per decoder layer."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ShapeError(f"capture takes input_ids [1, T], got shape {tuple(input_ids.shape)}")
    f = facts(model)
    layers = decoder_layers(model)
    recorders = [_Recorder(layer.self_attn, f) for layer in layers]
    try:
        model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        for rec in recorders:
            rec.remove()
    T = input_ids.shape[1]
    positions = torch.arange(T)
    out = []
    for i, rec in enumerate(recorders):
        q, k, v = (t[0].float().transpose(0, 1) for t in rec.result())  # [H, T, D]
        k_post = Rope.from_model(model, i).apply(k, positions.to(k.device))
        out.append(LayerCapture(
            q_pre=q.reshape(f.n_kv_heads, f.group_size, T, f.head_dim).cpu(),
            k_pre=k.cpu(),
            k_post=k_post.cpu(),
            v=v.cpu(),
            layer_type=f.layer_types[i],
        ))
    return out


def captured_kv_for_bench(tokens: int, split: str = "evaluation", layout: str = "head") -> list[torch.Tensor]:
    """K and V of the default model on the start of one part of the Austen text (BOS + ``tokens - 1``).

    ``split`` is ``"evaluation"`` (the five novels) or ``"calibration"`` (*Pride and Prejudice*,
    what calibrated codecs are fitted on). Returns ``[K, V]``, each float32: with ``layout="head"``
    ``[layers * n_kv, tokens, D]`` (layer-major), with ``layout="joint"`` ``[layers, tokens,
    n_kv * D]`` (a token's KV heads side by side, as the engine's joint layout). K is pre-RoPE
    (after k-norm where present): what the codecs see once the cache stores pre-RoPE keys.
    """
    from kakeyaturbo.codecs.base import check_choice
    from kakeyaturbo.layouts import CALIBRATED, join_heads
    from kakeyaturbo.models.loading import load_model
    from kakeyaturbo.models.text import load_corpus, token_windows

    if split not in ("evaluation", "calibration"):
        raise ConfigError(f"split must be 'evaluation' or 'calibration', got {split!r}")
    check_choice("layout", layout, CALIBRATED)
    model, tokenizer = load_model()
    text = getattr(load_corpus("austen"), split)
    ids = token_windows(tokenizer, text[: 8 * tokens + 10_000], 1, tokens)
    layers = capture(model, ids)
    if layout == "joint":
        return [torch.stack([join_heads(t) for t in ts]) for ts in ([c.k_pre for c in layers], [c.v for c in layers])]
    return [torch.cat([c.k_pre for c in layers]), torch.cat([c.v for c in layers])]
