"""Rope: forward/inverse round trip, and agreement with the model's own rotary application."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.errors import ConfigError, ShapeError
from kakeyaturbo.transforms.rope import _TABLES, Rope
from tests.models.conftest import default_model  # noqa: F401  (fixture)
from tests.models.tiny_models import FAMILIES, tiny_model

_MODELS = {family: tiny_model(family) for family in FAMILIES}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
@given(start=st.integers(0, 200), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_round_trip_tiny(family: str, start: int, n: int, seed: int) -> None:
    model = _MODELS[family]
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, n, model.config.head_dim, generator=g) * 10
    positions = torch.arange(start, start + n)
    for layer in range(model.config.num_hidden_layers):
        rope = Rope.from_model(model, layer)
        assert _rel(rope.invert(rope.apply(k, positions), positions), k) < 1e-5
        assert _rel(rope.apply(rope.invert(k, positions), positions), k) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_hf_apply_rotary(family: str) -> None:
    """Same result as the modelling file's apply_rotary_pos_emb with the model's cos/sin."""
    model = _MODELS[family]
    module = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    k = torch.randn(1, 2, 7, model.config.head_dim)
    positions = torch.arange(3, 10)
    for layer, layer_type in enumerate(getattr(model.config, "layer_types", None) or ["x"] * 2):
        args = (layer_type,) if family == "gemma3" else ()
        cos, sin = model.model.rotary_emb(k, positions[None], *args)
        _, expected = module.apply_rotary_pos_emb(k, k, cos, sin)
        torch.testing.assert_close(Rope.from_model(model, layer).apply(k, positions), expected)


def test_gemma3_layer_types_use_their_own_tables() -> None:
    model = _MODELS["gemma3"]
    k = torch.randn(2, 5, 16)
    positions = torch.arange(50, 55)
    sliding, full = Rope.from_model(model, 0), Rope.from_model(model, 2)
    assert (sliding.layer_type, full.layer_type) == ("sliding_attention", "full_attention")
    assert _rel(sliding.apply(k, positions), full.apply(k, positions)) > 1e-3


@given(first=st.lists(st.integers(0, 300), min_size=1, max_size=20),
       then=st.lists(st.integers(0, 600), min_size=1, max_size=20))
def test_shared_tables_equal_the_modules_rows(first: list[int], then: list[int]) -> None:
    """Rows served from the shared, growing tables are the module's own rows for those positions, in any
    order and after growth; every Rope of one module and layer type reads the same tables."""
    model = _MODELS["llama"]
    a, b = Rope.from_model(model, 0), Rope.from_model(model, 1)
    for rope, positions in ((a, first), (b, then), (a, first + then)):
        pos = torch.tensor(positions)
        expected = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos[None])
        for got, want in zip(rope.cos_sin(pos, torch.zeros(1)), expected):
            assert torch.equal(got, want[0])
    assert _TABLES[model.model.rotary_emb][None, "half", "cpu"][0].shape[0] >= max(first + then) + 1


def test_sequence_dependent_rotary_is_not_shared() -> None:
    """A dynamic-scaling rotary's tables depend on the longest sequence seen: computed per call, not kept."""
    model = tiny_model("llama")
    model.model.rotary_emb.rope_type = "dynamic"
    rope = Rope.from_model(model, 0)
    rope.cos_sin(torch.arange(5), torch.zeros(1))
    assert model.model.rotary_emb not in _TABLES


def test_apply_writes_the_requested_dtype() -> None:
    rope = Rope.from_model(_MODELS["llama"], 0)
    k = torch.randn(2, 9, _MODELS["llama"].config.head_dim)
    positions = torch.arange(4, 13)
    out = rope.apply(k, positions, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, rope.apply(k, positions).to(torch.bfloat16))
    cos, sin = rope.cos_sin(positions, k)  # the same float32 rounding as the textbook formula
    h = k.shape[-1] // 2
    assert torch.equal(rope.apply(k, positions), k * cos + torch.cat((-k[..., h:], k[..., :h]), -1) * sin)


def test_interleaved_round_trip_and_partial_rotary() -> None:
    rope = Rope(_MODELS["llama"].model.rotary_emb, "interleaved")
    k = torch.randn(3, 6, 20)  # 16 rotary channels + 4 passed through
    positions = torch.arange(6)
    y = rope.apply(k, positions)
    torch.testing.assert_close(y[..., 16:], k[..., 16:])
    assert _rel(rope.invert(y, positions), k) < 1e-5


def test_errors() -> None:
    rotary = _MODELS["llama"].model.rotary_emb
    with pytest.raises(ConfigError, match="style"):
        Rope(rotary, "adjacent")  # type: ignore[arg-type]
    rope = Rope(rotary)
    with pytest.raises(ShapeError, match="positions"):
        rope.apply(torch.randn(2, 5, 16), torch.arange(4))
    with pytest.raises(ShapeError, match="rotary dim"):
        rope.apply(torch.randn(2, 5, 8), torch.arange(5))
    with pytest.raises(ConfigError, match="rotary_emb"):
        Rope.from_model(torch.nn.Linear(2, 2))


@pytest.mark.model
def test_default_model_round_trip(default_model: tuple[Any, Any]) -> None:  # noqa: F811
    model, _ = default_model
    k = torch.randn(3, 300, 64) * 5
    positions = torch.arange(1000, 1300)
    for layer in (0, 29):
        rope = Rope.from_model(model, layer)
        assert _rel(rope.invert(rope.apply(k, positions), positions), k) < 1e-5
