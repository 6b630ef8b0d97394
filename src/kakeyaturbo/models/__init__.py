"""Model integration: loading the default model and text offline, per-architecture facts, and
capturing the queries, keys and values attention sees. transformers is imported only when a
model is loaded."""

from kakeyaturbo.models.arch import ModelFacts, decoder_layers, facts
from kakeyaturbo.models.capture import LayerCapture, capture, captured_kv_for_bench
from kakeyaturbo.models.loading import cache_dir, load_model
from kakeyaturbo.models.text import Corpus, load_corpus, token_windows

__all__ = [
    "Corpus",
    "LayerCapture",
    "ModelFacts",
    "cache_dir",
    "capture",
    "captured_kv_for_bench",
    "decoder_layers",
    "facts",
    "load_corpus",
    "load_model",
    "token_windows",
]
