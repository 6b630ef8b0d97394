"""The default model, loaded once per session (real-model tests are marked ``model``)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def default_model() -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M from the packaged GGUF (converted and cached once)."""
    from kakeyaturbo.models.loading import load_model

    return load_model(attn_implementation="eager")
