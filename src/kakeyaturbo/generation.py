"""Timed generation: ``model.generate`` with any cache, and when each new token came out.

:func:`timed_generate` hands ``generate`` a streamer that stamps the clock as each token arrives, so
the prefill (prompt forward and first token) and every later step are timed inside the one call a
user makes; an optional ``on_token`` callback (e.g. reading the cache's memory report) runs between
steps and is not counted in them.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from kakeyaturbo.models.forward import with_cache


def held_bytes(cache: Any) -> int:
    """Bytes a cache holds now: a KakeyaTurbo cache's memory report, or a transformers cache's tensors."""
    if hasattr(cache, "memory_report"):
        return int(cache.memory_report()["total"])
    return sum(t.numel() * t.element_size() for layer in cache.layers if layer.is_initialized
               for t in (layer.keys, layer.values))


@dataclasses.dataclass(frozen=True)
class GenerationTiming:
    """Wall-clock seconds of one ``generate`` call.

    Attributes:
        prompt_tokens: tokens of the prompt (per row).
        prefill_s: from the call to the first new token (prompt forward, cache encode, first token).
        step_s: seconds of each later token (one decode step each), in order.
    """

    prompt_tokens: int
    prefill_s: float
    step_s: tuple[float, ...]

    @property
    def new_tokens(self) -> int:
        """Tokens generated (the first one included)."""
        return len(self.step_s) + 1

    @property
    def per_token_s(self) -> float | None:
        """Median seconds of a decode step (None with a single new token)."""
        return statistics.median(self.step_s) if self.step_s else None

    @property
    def tokens_per_s(self) -> float | None:
        """Decode-step tokens per second (the first token excluded: it is the prefill's)."""
        return len(self.step_s) / sum(self.step_s) if self.step_s and sum(self.step_s) > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: prompt and new tokens, prefill, median step, tokens/s."""
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens, "prefill_s": self.prefill_s,
                "per_token_s": self.per_token_s, "tokens_per_s": self.tokens_per_s}

    def summary(self) -> str:
        """One line: prefill, per-token latency, tokens/s."""
        line = f"prefill {self.prefill_s * 1e3:.0f} ms ({self.prompt_tokens} tokens)"
        if self.per_token_s is not None:
            line += f", {self.per_token_s * 1e3:.1f} ms/token, {self.tokens_per_s:.1f} tokens/s"
        return line


class _Clock(BaseStreamer):
    """Stamps the clock as ``generate`` emits the prompt and each new token."""

    def __init__(self, on_token: Callable[[], None] | None) -> None:
        self.on_token = on_token
        self.arrived: list[float] = []
        self.resumed: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.arrived.append(time.perf_counter())
        if self.on_token is not None and len(self.arrived) > 1:  # the first put is the prompt
            self.on_token()
        self.resumed.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush."""


@torch.no_grad()
def timed_generate(model: Any, inputs: Mapping[str, torch.Tensor], cache: Any, *, max_new_tokens: int,
                   sample: bool = False, seed: int = 0,
                   on_token: Callable[[], None] | None = None) -> tuple[torch.Tensor, GenerationTiming]:
    """Greedy (or sampled, temperature 0.7) ``model.generate(**inputs, cache=cache)``, timed.

    Args:
        inputs: the tokenizer's output (``input_ids [B, T]``, optional ``attention_mask``).
        cache: a transformers cache (``KakeyaCache``, ``DynamicCache``, ...), filled in place.
        on_token: called after each new token, outside the timed steps.

    Returns:
        ``(new_ids [B, n], timing)``.
    """
    clock = _Clock(on_token)
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(**inputs, **with_cache(model, cache), max_new_tokens=max_new_tokens, do_sample=sample,
                         temperature=0.7 if sample else None, top_p=None, top_k=None, streamer=clock)
    prompt = inputs["input_ids"].shape[1]
    first = clock.arrived[1] if len(clock.arrived) > 1 else time.perf_counter()
    steps = tuple(a - r for a, r in zip(clock.arrived[2:], clock.resumed[1:]))
    return out[:, prompt:], GenerationTiming(prompt, first - start, steps)
