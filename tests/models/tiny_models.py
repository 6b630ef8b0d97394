"""Randomly initialised tiny decoder models of each supported family (no downloads)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON: dict[str, Any] = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
)


def tiny_config(family: str) -> Any:
    """Config of a 2-layer (Gemma 3: 3-layer) model with 4 query and 2 KV heads of dim 16."""
    if family == "llama":
        return LlamaConfig(**COMMON, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                      "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64})
    if family == "qwen3":
        return Qwen3Config(**COMMON)
    if family == "gemma3":
        cfg = {**COMMON, "num_hidden_layers": 3}
        return Gemma3TextConfig(**cfg, sliding_window=6,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    raise ValueError(family)


FAMILIES = ("llama", "qwen3", "gemma3")
_CLASSES = {"llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM, "gemma3": Gemma3ForCausalLM}


def tiny_model(family: str, attn_implementation: str = "eager", seed: int = 0) -> Any:
    """A randomly initialised tiny model in eval mode, float32, on the CPU."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    config._attn_implementation = attn_implementation
    model = _CLASSES[family](config).eval()
    with torch.no_grad():  # non-trivial q/k-norm weights so the norm's effect is visible
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.normal_(0.0, 0.5)
    return model
