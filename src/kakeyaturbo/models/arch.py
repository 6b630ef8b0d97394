"""Per-architecture facts: head layout, GQA grouping, layer types, q/k-norm.

Supported: Llama, Mistral, Qwen2, Qwen3 (q/k-norm) and Gemma 3 (q/k-norm, sliding-window
layers; for the multimodal checkpoint its text model). Mistral with a ``sliding_window`` slides on
every layer. All of them use the half-split RoPE
convention and an attention module ``self_attn`` with ``q_proj``/``k_proj``/``v_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from kakeyaturbo.errors import ConfigError

FULL = "full_attention"
SLIDING = "sliding_attention"
SUPPORTED = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True, "gemma3_text": True}
"""Supported ``model_type`` values, each mapped to whether it has q/k-norm."""


@dataclass(frozen=True)
class ModelFacts:
    """What the KV-cache machinery needs to know about a model.

    ``layer_types`` holds Hugging Face's names, ``"full_attention"`` or ``"sliding_attention"``,
    one per decoder layer; ``sliding_window`` is None when no layer slides.
    """

    architecture: str
    model_type: str
    n_layers: int
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    has_qk_norm: bool
    sliding_window: int | None
    rope_style: str = "half"

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.n_q_heads // self.n_kv_heads


def text_config(model_or_config: Any) -> Any:
    """The decoder's config of a model or config (the text config of multimodal ones)."""
    config = getattr(model_or_config, "config", model_or_config)
    get_text = getattr(config, "get_text_config", None)
    return get_text(decoder=True) if callable(get_text) else config


def facts(model_or_config: Any) -> ModelFacts:
    """:class:`ModelFacts` of a Hugging Face model or config; ConfigError if unsupported."""
    outer = getattr(model_or_config, "config", model_or_config)
    config = text_config(model_or_config)
    model_type = getattr(config, "model_type", None)
    archs = getattr(outer, "architectures", None)
    if isinstance(model_or_config, nn.Module):
        architecture = type(model_or_config).__name__
    else:
        architecture = archs[0] if archs else type(config).__name__
    if model_type not in SUPPORTED:
        raise ConfigError(
            f"architecture {architecture} (model_type {model_type!r}) is not supported; "
            f"supported model types: "
            f"{', '.join(sorted(SUPPORTED))} (Llama, Mistral, Qwen2, Qwen3, Gemma 3)"
        )
    n_layers = config.num_hidden_layers
    n_q = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    if n_q % n_kv:
        raise ConfigError(f"{architecture}: {n_q} query heads are not a multiple of {n_kv} KV heads")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_q
    default_type = SLIDING if model_type == "mistral" and getattr(config, "sliding_window", None) else FULL
    layer_types = tuple(getattr(config, "layer_types", None) or (default_type,) * n_layers)
    unknown = set(layer_types) - {FULL, SLIDING}
    if len(layer_types) != n_layers or unknown:
        raise ConfigError(f"{architecture}: layer_types {layer_types} do not describe {n_layers} layers "
                          f"of full/sliding attention")
    window = getattr(config, "sliding_window", None) if SLIDING in layer_types else None
    return ModelFacts(
        architecture=architecture,
        model_type=model_type,
        n_layers=n_layers,
        n_q_heads=n_q,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        layer_types=layer_types,
        has_qk_norm=SUPPORTED[model_type],
        sliding_window=window,
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM (each has ``self_attn``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ConfigError(f"{type(model).__name__}: cannot find decoder layers with a self_attn module")
    return layers
