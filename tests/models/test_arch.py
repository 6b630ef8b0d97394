"""ModelFacts for the supported families; anything else is refused by name."""

from __future__ import annotations

import pytest
from transformers import Gemma3Config, GPT2Config, MistralConfig, Qwen2Config

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.models.arch import FULL, SLIDING, decoder_layers, facts
from tests.models.tiny_models import tiny_config, tiny_model


def test_tiny_families() -> None:
    llama = facts(tiny_config("llama"))
    layout = (llama.n_layers, llama.n_q_heads, llama.n_kv_heads, llama.head_dim, llama.group_size)
    assert layout == (2, 4, 2, 16, 2)
    assert llama.layer_types == (FULL, FULL) and not llama.has_qk_norm and llama.sliding_window is None
    assert facts(tiny_config("qwen3")).has_qk_norm
    gemma = facts(tiny_model("gemma3"))
    assert gemma.architecture == "Gemma3ForCausalLM" and gemma.has_qk_norm
    assert gemma.layer_types == (SLIDING, SLIDING, FULL) and gemma.sliding_window == 6
    assert len(decoder_layers(tiny_model("gemma3"))) == 3


def test_other_supported_configs() -> None:
    mistral = facts(MistralConfig(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                  hidden_size=64, sliding_window=16))
    assert mistral.layer_types == (SLIDING, SLIDING) and mistral.head_dim == 8 and mistral.group_size == 4
    qwen2 = facts(Qwen2Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                              hidden_size=32))
    assert qwen2.layer_types == (FULL,) * 3 and qwen2.group_size == 1
    gemma = facts(Gemma3Config(text_config={"num_hidden_layers": 6, "num_attention_heads": 4,
                                            "num_key_value_heads": 1, "head_dim": 32}))
    assert gemma.model_type == "gemma3_text" and gemma.layer_types.count(FULL) == 1


def test_unsupported_architecture_is_named() -> None:
    with pytest.raises(ConfigError, match=r"GPT2Config.*'gpt2'.*not supported.*llama"):
        facts(GPT2Config(n_layer=1))
