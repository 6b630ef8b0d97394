"""capture(): keys before/after RoPE, queries and values match what the model itself computes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kakeyaturbo.errors import ConfigError, ShapeError
from kakeyaturbo.models.arch import decoder_layers, facts
from kakeyaturbo.models.capture import LayerCapture, capture, captured_kv_for_bench
from kakeyaturbo.transforms.rope import Rope
from tests.models.tiny_models import FAMILIES, tiny_model


def _attention_inputs(model: Any, ids: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
    """Hidden states entering each attention module, and the DynamicCache of a plain forward."""
    seen: list[torch.Tensor] = []
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["hidden_states"].detach()), with_kwargs=True)
        for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return seen, out.past_key_values


def _check_against_model(model: Any, ids: torch.Tensor, caps: list[LayerCapture]) -> None:
    f = facts(model)
    hidden, cache = _attention_inputs(model, ids)
    T = ids.shape[1]
    assert len(caps) == f.n_layers
    for i, (layer, cap, h) in enumerate(zip(decoder_layers(model), caps, hidden)):
        attn = layer.self_attn
        assert cap.q_pre.shape == (f.n_kv_heads, f.group_size, T, f.head_dim)
        assert cap.k_pre.shape == cap.k_post.shape == cap.v.shape == (f.n_kv_heads, T, f.head_dim)
        assert cap.layer_type == f.layer_types[i]
        with torch.no_grad():
            k = attn.k_proj(h).view(1, T, f.n_kv_heads, f.head_dim)
            q = attn.q_proj(h).view(1, T, f.n_q_heads, f.head_dim)
            if f.has_qk_norm:
                k, q = attn.k_norm(k), attn.q_norm(q)
        torch.testing.assert_close(cap.k_pre, k[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
        q_grouped = q[0].transpose(0, 1).reshape(f.n_kv_heads, f.group_size, T, f.head_dim)
        torch.testing.assert_close(cap.q_pre, q_grouped, rtol=1e-5, atol=1e-5)
        keys, values = cache.layers[i].keys[0], cache.layers[i].values[0]
        n = keys.shape[1]  # sliding layers keep only the most recent tokens
        torch.testing.assert_close(cap.k_post[:, T - n:], keys.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cap.v[:, T - n:], values.float(), rtol=1e-5, atol=1e-5)
        rope = Rope.from_model(model, i)
        torch.testing.assert_close(rope.invert(cap.k_post, torch.arange(T)), cap.k_pre, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models(family: str) -> None:
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    _check_against_model(model, ids, capture(model, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_weights_reproduced(family: str) -> None:
    """softmax(RoPE(q_pre) · k_postᵀ · scale) with a causal mask equals the model's own attention
    weights on full-attention layers: queries are grouped with the right KV head."""
    model = tiny_model(family)
    T = 9
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(2))
    caps = capture(model, ids)
    with torch.no_grad():
        weights = model(input_ids=ids, output_attentions=True).attentions
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i, (layer, cap) in enumerate(zip(decoder_layers(model), caps)):
        if cap.layer_type != "full_attention":
            continue
        q_post = Rope.from_model(model, i).apply(cap.q_pre, torch.arange(T))
        logits = (q_post @ cap.k_post[:, None].transpose(-1, -2)) * layer.self_attn.scaling
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        torch.testing.assert_close(probs.reshape(-1, T, T), weights[i][0], rtol=1e-4, atol=1e-5)


def test_eager_and_sdpa_capture_agree() -> None:
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(3))
    a = capture(tiny_model("qwen3", "eager"), ids)
    b = capture(tiny_model("qwen3", "sdpa"), ids)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.k_post, y.k_post)


def test_rejects_batches() -> None:
    with pytest.raises(ShapeError, match=r"\[1, T\]"):
        capture(tiny_model("llama"), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.model
def test_default_model(default_model: tuple[Any, Any]) -> None:
    model, tokenizer = default_model
    text = "It is a truth universally acknowledged, that a single man"
    ids = tokenizer(text, return_tensors="pt").input_ids
    caps = capture(model, ids)
    assert len(caps) == 30 and caps[0].q_pre.shape == (3, 3, ids.shape[1], 64)
    _check_against_model(model, ids, caps)


@pytest.mark.model
def test_captured_kv_for_bench() -> None:
    k, v = captured_kv_for_bench(tokens=32)
    assert k.shape == v.shape == (30 * 3, 32, 64) and k.dtype == torch.float32
    assert torch.isfinite(k).all() and torch.isfinite(v).all() and k.std() > 0
    k_cal, _ = captured_kv_for_bench(tokens=32, split="calibration")
    assert k_cal.shape == k.shape and not torch.equal(k_cal, k)
    with pytest.raises(ConfigError, match="split must be"):
        captured_kv_for_bench(tokens=32, split="train")
    kj, vj = captured_kv_for_bench(tokens=32, layout="joint")
    assert kj.shape == vj.shape == (30, 32, 3 * 64)
    assert torch.equal(kj[4, 7, 64:128], k[4 * 3 + 1, 7]) and torch.equal(vj[29, 31, :64], v[29 * 3, 31])
    with pytest.raises(ConfigError, match="layout must be"):
        captured_kv_for_bench(tokens=32, layout="token_major")


def test_gemma3_multimodal_checkpoint_uses_its_text_decoder() -> None:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision,
                                                        mm_tokens_per_image=4)).eval()
    ids = torch.randint(0, 200, (1, 7), generator=torch.Generator().manual_seed(4))
    caps = capture(model, ids)
    assert [c.layer_type for c in caps] == ["sliding_attention", "full_attention"]
    _check_against_model(model, ids, caps)
