"""models.forward: the cache keyword follows the model's forward signature, and a prefill fills the cache."""

from __future__ import annotations

from typing import Any

import torch
import transformers

from kakeyaturbo.models.forward import prefill, with_cache
from tests.models.tiny_models import tiny_model


class _OldSignature(torch.nn.Module):
    """A forward as transformers < 5.20 spells it (``past_key_values``)."""

    def forward(self, input_ids: Any = None, past_key_values: Any = None, use_cache: bool = False) -> Any:
        return past_key_values


def test_with_cache_names_the_keyword_the_forward_takes():
    cache = object()
    assert with_cache(_OldSignature(), cache) == {"past_key_values": cache}
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    expected = "cache" if (major, minor) >= (5, 20) else "past_key_values"  # the installed transformers
    assert with_cache(tiny_model("llama"), cache) == {expected: cache}


def test_prefill_fills_every_layer_of_the_cache():
    """Under either spelling: a keyword the forward does not know would leave the cache empty."""
    model = tiny_model("llama")
    cache = prefill(model, torch.randint(0, 96, (1, 12)))
    assert [layer.get_seq_length() for layer in cache.layers] == [12, 12]
