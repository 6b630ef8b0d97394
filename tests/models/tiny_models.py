"""Randomly initialised tiny decoder models of each supported family (no downloads).

Families: ``llama`` (llama3-scaled RoPE), ``mistral`` (a sliding window on every layer),
``qwen2`` (q/k/v biases), ``qwen3`` (q/k-norm), ``gemma3`` (two sliding layers with their own RoPE
base, then a full one), ``mqa`` (one KV head) and ``d256`` (head_dim 256).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON: dict[str, Any] = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
)
WINDOW = 6
"""The sliding window of the tiny Mistral and Gemma 3."""


def tiny_config(family: str, **overrides: Any) -> Any:
    """Config of a 2-layer (Gemma 3: 3-layer) model with 4 query and 2 KV heads of dim 16 (``mqa``: one KV
    head; ``d256``: dim 256), ``overrides`` applied last."""
    common = {**COMMON, **overrides}
    if family == "llama":
        return LlamaConfig(**common, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                      "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64})
    if family == "mistral":
        return MistralConfig(**{"sliding_window": WINDOW, **common})
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common)
    if family == "gemma3":
        cfg = {**COMMON, "num_hidden_layers": 3, "sliding_window": WINDOW,
               "layer_types": ["sliding_attention", "sliding_attention", "full_attention"], **overrides}
        return Gemma3TextConfig(**cfg)
    if family == "mqa":
        return LlamaConfig(**{**common, "num_key_value_heads": 1})
    if family == "d256":
        return Qwen3Config(**{**common, "head_dim": 256})
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "mqa", "d256")
SLIDING_FAMILIES = ("mistral", "gemma3")
_CLASSES = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM,
            "qwen3": Qwen3ForCausalLM, "gemma3": Gemma3ForCausalLM, "mqa": LlamaForCausalLM, "d256": Qwen3ForCausalLM}


def tiny_model(family: str, attn_implementation: str = "eager", seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised tiny model in eval mode, float32, on the CPU (config ``overrides`` applied)."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = attn_implementation
    model = _CLASSES[family](config).eval()
    with torch.no_grad():  # non-trivial q/k-norm weights and biases so their effect is visible
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.normal_(0.0, 0.5)
            elif name.endswith("proj.bias"):
                p.normal_(0.0, 0.2)
    return model
