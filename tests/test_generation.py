"""Timed generation on a tiny random Llama: the same tokens as a plain ``generate``, one timing per step."""

from __future__ import annotations

import statistics

import pytest
import torch
from transformers import DynamicCache

from kakeyaturbo.cache import KakeyaCache
from kakeyaturbo.generation import GenerationTiming, timed_generate
from tests.test_cache import FP8_16, prompt, tiny


@pytest.mark.parametrize("recipe", [None, FP8_16])
def test_timed_generate_gives_generate_tokens_and_a_time_per_step(recipe):
    model = tiny("llama", torch.bfloat16)
    ids = prompt(1, 30)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def cache():
        return DynamicCache(config=model.config) if recipe is None else KakeyaCache(model.config, recipe)

    ref = model.generate(**inputs, cache=cache(), max_new_tokens=9, do_sample=False, pad_token_id=0)
    seen = []
    held = cache()
    new, timing = timed_generate(model, inputs, held, max_new_tokens=9, on_token=lambda: seen.append(
        held.get_seq_length()))
    assert torch.equal(new, ref[:, 30:])
    assert timing.prompt_tokens == 30 and timing.new_tokens == 9 and len(timing.step_s) == 8
    assert timing.prefill_s > 0 and all(s > 0 for s in timing.step_s)
    assert seen == list(range(30, 39))  # called once per new token, the cache one token behind it
    summary = timing.to_dict()
    assert summary["per_token_s"] == statistics.median(timing.step_s)
    assert summary["tokens_per_s"] == pytest.approx(8 / sum(timing.step_s))


def test_timing_of_a_single_token_has_no_step():
    timing = GenerationTiming(5, 0.25, ())
    assert timing.new_tokens == 1 and timing.per_token_s is None and timing.tokens_per_s is None
    assert timing.summary() == "prefill 250 ms (5 tokens)"
    assert "ms/token" in GenerationTiming(5, 0.25, (0.01, 0.03)).summary()
