"""Forward passes with an explicit cache, the way the harness and calibration run the model."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache


@torch.no_grad()
def prefill(model: Any, ids: torch.Tensor) -> DynamicCache:
    """Run ``ids [B, T]`` through ``model`` and return the exact cache it fills."""
    cache = DynamicCache()
    model(input_ids=ids, cache=cache, use_cache=True)
    return cache


@torch.no_grad()
def logits(model: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Logits ``[T, V]`` (float32) of ``ids [1, T]`` continuing ``cache`` (which is extended)."""
    return model(input_ids=ids, cache=cache, use_cache=True).logits[0].float()
