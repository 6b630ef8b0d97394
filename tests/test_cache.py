"""KakeyaCache inside real (tiny, random) Llama and Qwen3 models on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import kakeyaturbo as kt
from kakeyaturbo.cache import KakeyaCache, KakeyaLayer
from kakeyaturbo.engine import build_plans
from kakeyaturbo.errors import ConfigError
from kakeyaturbo.models.arch import facts
from kakeyaturbo.recipes import Recipe, StreamRecipe

SIZES = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}


def tiny(arch: str, dtype: torch.dtype = torch.float32, **sizes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = {**SIZES, **sizes}
    model = LlamaForCausalLM(LlamaConfig(**sizes)) if arch == "llama" else Qwen3ForCausalLM(
        Qwen3Config(**sizes, head_dim=16))
    return model.eval().to(dtype)


def generate(model, ids, cache, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, pad_token_id=0,
                          max_new_tokens=kwargs.pop("max_new_tokens", 12), **kwargs)


def prompt(batch=1, tokens=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, SIZES["vocab_size"], (batch, tokens), generator=g)


FP8_16 = Recipe("fp8-16", StreamRecipe("fp8"), StreamRecipe("fp8"), chunk_tokens=16, sink_tokens=4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_exact_recipe_matches_dynamic_cache(arch):
    model = tiny(arch)
    ids = prompt(2)
    ref = generate(model, ids, DynamicCache(config=model.config), do_sample=False)
    cache = KakeyaCache(model.config, "exact")
    assert torch.equal(generate(model, ids, cache, do_sample=False), ref)
    report = cache.memory_report()
    assert report["exact_layers"] == report["total"] > 0 and report["packed"] == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("sample", [False, True])
def test_fp8_generates_and_holds_fewer_bytes(arch, sample):
    model = tiny(arch, torch.bfloat16)
    cache = KakeyaCache(model.config, FP8_16)
    torch.manual_seed(3)
    out = generate(model, prompt(2, 40), cache, do_sample=sample, max_new_tokens=30)
    assert out.shape == (2, 70)
    report = cache.memory_report()
    assert report["tokens"] == cache.get_seq_length() == 69
    assert report["total"] < report["bf16_equivalent"] and report["ratio"] > 1
    parts = ("packed", "decoded", "hot_window", "sink", "exact_layers")
    assert report["total"] == sum(report[p] for p in parts)
    # prefill of 40: 4 sink, 2 x 16 in one group, a partial chunk of 4; generation: 16 more, 13 hot
    assert [entry["chunks"] for entry in report["layers"]] == [3, 3]
    assert report["layers"][0]["hot_window"] == 2 * 2 * 2 * 13 * 16 * 2  # K+V, batch 2, 2 heads, bf16


def test_long_prefill_reaches_the_nominal_ratio():
    model = tiny("llama", torch.bfloat16, hidden_size=256)  # head dim 64
    cache = KakeyaCache(model.config, "fp8")
    with torch.no_grad():
        model(prompt(1, 2048 + 40), cache=cache)
    report = cache.memory_report()
    d = model.config.head_dim
    nominal = 16 / (8 + 16 / d)  # e4m3 + one f16 scale per vector
    assert report["hot_window"] == 0  # a prefill is encoded whole, its last chunk partial
    chunks = [c for layer in cache.layers for c in layer.chunks]
    payload = sum(c.k.payload_nbytes + c.v.payload_nbytes for c in chunks)
    assert payload * nominal == report["bf16_equivalent"]  # the codec's bytes are nominal
    assert report["packed"] < payload * 1.01  # container headers, one per stored group and stream
    assert report["ratio"] >= nominal / 1.01


def test_every_token_encoded_once():
    model = tiny("llama")
    cache = KakeyaCache(model.config, FP8_16)
    seen: list[int] = []
    codec = cache.plans[0].k_codec  # shared by both layers
    original = codec.encode
    codec.encode = lambda x: seen.append(x.shape[0] * x.shape[1] * x.shape[3]) or original(x)  # [B, chunks, n_kv, C, D]
    generate(model, prompt(1, 40), cache, do_sample=False, max_new_tokens=40)
    # per layer: the 36 post-sink prompt tokens are encoded at once (2 chunks in one call + a partial
    # chunk of 4), the 39 generated tokens complete 2 chunks (one call each) and leave 7 hot
    assert len(seen) == 2 * 4
    assert sum(seen) == 2 * (36 + 32)
    assert cache.get_seq_length() == 79 and len(cache.layers[0].chunks) == 4
    assert cache.layers[0].hot_k.shape[-2] == 7


@pytest.mark.parametrize(("arch", "module"), [("llama", "k_proj"), ("qwen3", "k_norm")])
def test_pre_rope_keys_are_k_proj_outputs(arch, module):
    model = tiny(arch)
    captured = []
    attn = model.model.layers[1].self_attn
    hook = getattr(attn, module).register_forward_hook(lambda m, i, o: captured.append(o))
    recipe = Recipe("k", StreamRecipe("identity"), StreamRecipe("fp8"), chunk_tokens=32)
    cache = KakeyaCache(model.config, recipe)
    with torch.no_grad():
        model(prompt(1, 32), cache=cache)
    hook.remove()
    k_pre = captured[0].reshape(1, 32, 2, 16).transpose(1, 2)  # Qwen3: after k_norm, before RoPE
    layer = cache.layers[1]
    stored, _ = layer.plan.decode(layer.chunks[0])
    assert float((stored - k_pre).norm() / k_pre.norm()) < 5e-3  # identity = bf16 storage
    post, _ = layer.full()
    assert float((post - k_pre).norm() / k_pre.norm()) > 0.1  # RoPE is really undone


def layer_and_data(tokens=100, seed=0):
    plan = build_plans(FP8_16, 1, 2, 16)[0]
    g = torch.Generator().manual_seed(seed)
    return KakeyaLayer(plan, sink_tokens=4), torch.randn(1, 2, tokens, 16, generator=g), torch.randn(
        1, 2, tokens, 16, generator=g)


@pytest.mark.parametrize("remove", [-3, -30, -98, -100, -150])
def test_crop(remove):
    layer, k, v = layer_and_data()
    layer.update(k, v)
    full_k, full_v = layer.full()  # what is stored (update itself returns its own tokens exact)
    layer.crop(remove)
    keep = max(0, 100 + remove)
    assert layer.get_seq_length() == keep
    # the prefill stored its 96 post-sink tokens as one group: a crop inside it decodes the group
    assert not layer.chunks and layer.hot_k.shape[-2] == max(0, keep - 4)
    k2, v2 = layer.update(k[..., :1, :], v[..., :1, :])
    assert torch.equal(k2[..., :keep, :], full_k[..., :keep, :])
    assert torch.equal(v2[..., :keep, :], full_v[..., :keep, :])
    assert torch.equal(k2[..., keep:, :], k[..., :1, :]) and k2.shape[-2] == keep + 1


def test_crop_positive_and_layer_sizes():
    layer, k, v = layer_and_data()
    with pytest.raises(ConfigError, match="negative"):
        layer.crop(3)
    layer.update(k, v)
    assert layer.get_mask_sizes(5) == (105, 0) and layer.get_max_length() == -1


def test_reset_and_reuse():
    model = tiny("llama")
    cache = KakeyaCache(model.config, FP8_16)
    first = generate(model, prompt(), cache, do_sample=False)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_report()["total"] == 0
    assert torch.equal(generate(model, prompt(), cache, do_sample=False), first)


def test_batch_reindexing_only_before_encoding():
    layer, k, v = layer_and_data(tokens=24)
    layer.update(k[..., :3, :].expand(2, -1, -1, -1), v[..., :3, :].expand(2, -1, -1, -1))
    layer.batch_select_indices(torch.tensor([1]))
    layer.update(k[..., :20, :], v[..., :20, :])
    assert len(layer.chunks) == 1
    with pytest.raises(ConfigError, match="reorder_cache"):
        layer.reorder_cache(torch.tensor([0]))


def test_constructor_errors_and_from_model():
    model = tiny("llama")
    with pytest.raises(ConfigError, match="kakeya calibrate"):
        KakeyaCache(model.config, Recipe("w", StreamRecipe("fp8", whiten="sigma_q")))
    with pytest.raises(ConfigError, match="unknown recipe"):
        KakeyaCache(model.config, "nope")
    a = generate(model, prompt(), KakeyaCache(model.config, FP8_16), do_sample=False)
    assert torch.equal(generate(model, prompt(), KakeyaCache.from_model(model, FP8_16), do_sample=False), a)
    assert isinstance(kt.KakeyaCache(model.config, "fp8"), KakeyaCache)


def test_whitened_keys_with_a_calibration():
    from tests.test_engine import FakeCalibration

    model = tiny("llama")
    recipe = Recipe("w", StreamRecipe("identity", whiten="sigma_q"), StreamRecipe("identity"),
                    chunk_tokens=16)
    cache = KakeyaCache(model.config, recipe, calibration=FakeCalibration(skip={0: "sink layer"}))
    assert cache.plans[0].whitening is None and cache.plans[1].whitening is not None
    ref = generate(model, prompt(), DynamicCache(config=model.config), do_sample=False)
    assert torch.equal(generate(model, prompt(), cache, do_sample=False), ref)  # bf16 storage: tokens hold
    report = cache.memory_report()
    assert report["model_side"] == cache.plans[1].whitening.nbytes and report["packed"] > 0


def test_update_attends_to_its_own_tokens_exactly_then_stores_them_encoded():
    layer, k, v = layer_and_data(tokens=36)
    keys, values = layer.update(k, v)
    assert torch.equal(keys, k) and torch.equal(values, v)  # the prefill attends exactly
    stored_k, _ = layer.full()
    assert not torch.equal(stored_k[..., 4:, :], k[..., 4:, :])  # ... and is stored through fp8
    assert torch.equal(stored_k[..., :4, :], k[..., :4, :])  # sink tokens stay exact


def test_groups_ending_on_chunk_boundaries_equal_token_by_token():
    model = tiny("llama", torch.float32)
    ids = prompt(1, 40 + 32)
    outs = []
    for groups in ([(40 + i, 41 + i) for i in range(32)], [(40, 56), (56, 72)]):
        cache = KakeyaCache(model.config, FP8_16)
        with torch.no_grad():
            model(ids[:, :40], cache=cache)
            outs.append(torch.cat([model(ids[:, a:b], cache=cache).logits[0] for a, b in groups]))
    assert torch.allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_tiny_architectures_generate_through_the_cache(family):
    """Gemma 3 included (sliding-window layers): `exact` equals DynamicCache, fp8 runs."""
    from tests.models.tiny_models import tiny_model

    model = tiny_model(family)
    ids = torch.randint(1, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    ref = generate(model, ids, None, do_sample=False)
    assert torch.equal(generate(model, ids, KakeyaCache.from_model(model, "exact"), do_sample=False), ref)
    cache = KakeyaCache.from_model(model, "fp8")
    assert generate(model, ids, cache, do_sample=False).shape == ref.shape and cache.get_seq_length() == 31


# --- sliding-window layers (tiny random Mistral with a window on every layer, Gemma 3 with two) ---

def _sliding(family: str, dtype: torch.dtype = torch.float32, **overrides: int) -> torch.nn.Module:
    from tests.models.tiny_models import tiny_model

    return tiny_model(family, **overrides).to(dtype)


def _steps(model, cache, ids, prefill):
    """Logits ``[T - prefill, V]`` of a prefill then one token per forward through ``cache``."""
    with torch.no_grad():
        out = [model(ids[:, :prefill], cache=cache).logits[0, -1:]]
        out += [model(ids[:, t : t + 1], cache=cache).logits[0] for t in range(prefill, ids.shape[1])]
    return torch.cat(out)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_exact_recipe_equals_dynamic_cache_past_the_window(family):
    from tests.models.tiny_models import WINDOW

    model = _sliding(family)
    ids = prompt(2, 10)
    ref = generate(model, ids, DynamicCache(config=model.config), do_sample=False, max_new_tokens=5 * WINDOW)
    cache = KakeyaCache.from_model(model, "exact")
    assert torch.equal(generate(model, ids, cache, do_sample=False, max_new_tokens=5 * WINDOW), ref)
    report = cache.memory_report()
    sliding = [layer for layer in report["layers"] if layer["window"] == WINDOW]
    assert sliding and all(layer["held_tokens"] == WINDOW - 1 for layer in sliding)
    assert report["total"] == 2 * report["bf16_equivalent"]  # float32: twice the bf16 reference, token for token
    one = _steps(model, KakeyaCache.from_model(model, "exact"), ids[:1], 3)
    assert torch.equal(one, _steps(model, DynamicCache(config=model.config), ids[:1], 3))


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_layers_drop_chunks_and_hold_flat_memory(family):
    model = _sliding(family, torch.bfloat16, sliding_window=24)
    recipe = Recipe("fp8-8", StreamRecipe("fp8"), StreamRecipe("fp8"), chunk_tokens=8, sink_tokens=2)
    cache = KakeyaCache.from_model(model, recipe)
    ids = prompt(1, 120)
    totals = []
    with torch.no_grad():
        model(ids[:, :40], cache=cache)
        for t in range(40, 120):
            model(ids[:, t : t + 1], cache=cache)
            totals.append(cache.memory_report()["total"])
    kinds = facts(model).layer_types
    for layer, kind in zip(cache.memory_report()["layers"], kinds):
        if kind == "sliding_attention":  # the window (23 tokens) on the grid of 8-token chunks, no sink
            assert layer["window"] == 24 and layer["sink"] == 0 and 23 <= layer["held_tokens"] < 23 + 8
            assert layer["chunks"] <= 4 and layer["bf16_equivalent"] == 2 * 2 * 2 * 23 * 16
        else:
            assert layer["held_tokens"] == layer["tokens"] == 120
    if all(kind == "sliding_attention" for kind in kinds):
        assert totals[-16:] == totals[-32:-16]  # flat: the same 8-step cycle of the hot window, not growing
    else:
        assert totals[-1] > totals[-40]  # the full layer grows


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_snapshot_view_continues_like_the_cache(family):
    model = _sliding(family, sliding_window=12)
    recipe = Recipe("fp8-4", StreamRecipe("fp8"), StreamRecipe("fp8"), chunk_tokens=4, sink_tokens=2)
    ids = prompt(1, 40)
    cache = KakeyaCache.from_model(model, recipe)
    with torch.no_grad():
        model(ids[:, :36], cache=cache)
        plain = cache.to_dynamic()
        a = model(ids[:, 36:37], cache=plain).logits
        b = model(ids[:, 36:37], cache=cache).logits
    assert torch.allclose(a, b, atol=1e-5) and plain.get_seq_length() == 37


def test_sliding_layer_crop_within_and_below_the_window():
    model = _sliding("mistral", sliding_window=12)
    recipe = Recipe("fp8-4", StreamRecipe("fp8"), StreamRecipe("fp8"), chunk_tokens=4, sink_tokens=2)
    cache = KakeyaCache.from_model(model, recipe)
    with torch.no_grad():
        model(prompt(1, 30), cache=cache)
    layer = cache.layers[0]
    assert layer.held_start == 18 and layer.get_mask_sizes(1) == (12, 19)  # the chunk holding 19 starts at 18
    layer.crop(-3)
    assert layer.get_seq_length() == 27 and layer.held_start == 18
    with pytest.raises(ConfigError, match="sliding window already dropped"):
        layer.crop(-20)


@pytest.mark.parametrize("budget", [10**9, 3000])
def test_decoded_budget_reuses_chunks_unchanged_and_counts_them(budget):
    model = tiny("llama", torch.bfloat16)
    ids = prompt(1, 40)
    plain = KakeyaCache(model.config, FP8_16)
    ref = generate(model, ids, plain, do_sample=False, max_new_tokens=30)
    cache = KakeyaCache(model.config, FP8_16, decoded_budget=budget)
    assert torch.equal(generate(model, ids, cache, do_sample=False, max_new_tokens=30), ref)
    report, base = cache.memory_report(), plain.memory_report()
    assert report["packed"] == base["packed"] and report["decoded"] > 0 == base["decoded"]
    assert report["total"] == base["total"] + report["decoded"]
    assert all(layer["decoded"] <= budget // 2 for layer in report["layers"])  # split over the 2 layers
    # groups of 32 + 4 tokens (prefill) and 16 (generated) after 4 sink tokens: decoded K and V of 2 heads of
    # D 16 in bf16 take 4096, 512 and 2048 B; 1500 B per layer keep the 4-token group only
    kept = [kv is not None for kv in cache.layers[0].kept]
    assert kept == ([True] * 3 if budget > 3000 else [False, True, False])
    layer = cache.layers[0]
    held = layer.full()
    layer.crop(-20)  # into the last group: decoded into the hot window
    assert len(layer.kept) == len(layer.chunks) == 2
    assert torch.equal(layer.full()[0], held[0][..., :49, :])


def test_decoded_budget_refuses_nonsense():
    model = tiny("llama")
    for bad in (-1, 1.5, True, "1MB"):
        with pytest.raises(ConfigError, match="decoded_budget"):
            KakeyaCache(model.config, FP8_16, decoded_budget=bad)


def test_decoded_budget_on_sliding_layers_drops_what_the_window_drops():
    model = _sliding("mistral", torch.bfloat16, sliding_window=24)
    recipe = Recipe("fp8-8", StreamRecipe("fp8"), StreamRecipe("fp8"), chunk_tokens=8, sink_tokens=2)
    ids = prompt(1, 60)
    plain, kept = KakeyaCache.from_model(model, recipe), KakeyaCache.from_model(model, recipe, decoded_budget=10**9)
    assert torch.equal(generate(model, ids, kept, do_sample=False, max_new_tokens=40),
                       generate(model, ids, plain, do_sample=False, max_new_tokens=40))
    for layer in kept.layers:
        assert len(layer.kept) == len(layer.chunks) and all(kv is not None for kv in layer.kept)
        assert layer.decoded_nbytes == sum(2 * 2 * 2 * c.tokens * 16 for c in layer.chunks)  # K+V, 2 heads, bf16


# --- cross-layer groups (kakeya-v2 over two layers of the tiny calibrated Llama, conftest.tiny_bundle) ---

def _grouped(tiny_bundle, **fields):
    from kakeyaturbo.recipes import KakeyaConfig

    model, cal = tiny_bundle
    recipe = KakeyaConfig(bits=2.5, layer_group=2, layer_bits="uniform", chunk_tokens=16, **fields).to_recipe()
    return model, cal, recipe


def test_a_group_is_coded_once_by_its_last_layer_and_decoded_once_per_step(tiny_bundle, monkeypatch):
    model, cal, recipe = _grouped(tiny_bundle)
    cache = kt.compress(model, recipe, calibration=cal)
    group = cache.layers[0].group
    assert group is cache.layers[1].group and [la.plan.layer for la in group.layers] == [0, 1]
    assert cache.layers[2].group is None  # the third layer is a group of one
    ids = prompt(1, 40)
    with torch.no_grad():
        model(ids[:, :36], cache=cache)
    first, second = cache.layers[0], cache.layers[1]
    assert [c.tokens for c in first.chunks] == [32, 2] and all(a is b for a, b in zip(first.chunks, second.chunks))
    report = cache.memory_report()
    assert report["packed"] == sum(c.nbytes for c in first.chunks + cache.layers[2].chunks)
    assert report["model_side"] == sum(p.side_nbytes for p in {id(p.group or p): p.group or p
                                                               for p in cache.plans}.values())
    calls = []
    decode = group.plan.decode_many
    monkeypatch.setattr(group.plan, "decode_many", lambda *a, **k: calls.append(1) or decode(*a, **k))
    with torch.no_grad():
        model(ids[:, 36:37], cache=cache)
    assert len(calls) == 1 and not group._handed  # decoded for both layers, the second took its part
    # what each layer hands attention is its part of the group's decode, RoPE re-applied
    k_pre, v_hat = group.plan.decode_many(first.chunks)[0]
    keys, values = second.full()
    want = second.rope.apply(k_pre[:, 2:].float(), torch.arange(2, 34), keys.dtype)
    assert torch.equal(keys[..., 2:34, :], want) and torch.equal(values[..., 2:34, :], v_hat[:, 2:])


def test_grouped_cache_streams_token_by_token_like_in_steps(tiny_bundle):
    model, cal, recipe = _grouped(tiny_bundle)
    ids = prompt(1, 40 + 32)
    outs = []
    for spans in ([(40 + i, 41 + i) for i in range(32)], [(40, 56), (56, 72)]):
        cache = kt.compress(model, recipe, calibration=cal)
        with torch.no_grad():
            model(ids[:, :40], cache=cache)
            outs.append(torch.cat([model(ids[:, a:b], cache=cache).logits[0] for a, b in spans]))
        assert [c.tokens for c in cache.layers[1].chunks] == [32, 6, 16, 16]
    assert torch.allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_grouped_cache_generates_crops_and_refuses_layers_out_of_step(tiny_bundle):
    model, cal, recipe = _grouped(tiny_bundle)
    cache = kt.compress(model, recipe, calibration=cal)
    out = generate(model, prompt(2, 30), cache, do_sample=False, max_new_tokens=20)
    assert out.shape == (2, 50) and cache.memory_report()["ratio"] > 1
    cache.crop(-12)
    assert {la.get_seq_length() for la in cache.layers} == {37}
    assert all(a is b for a, b in zip(cache.layers[0].chunks, cache.layers[1].chunks))
    assert not cache.layers[0].group._handed
    with torch.no_grad():
        model(prompt(2, 12, seed=4), cache=cache)  # the crop's decoded tokens are coded again, by the group
    assert all(a is b for a, b in zip(cache.layers[0].chunks, cache.layers[1].chunks))
    k = torch.randn(2, 2, 16, 16)
    cache.layers[0].update(k, k)  # the first layer alone: the second holds fewer tokens
    with pytest.raises(kt.ShapeError, match="layers 0-1 share a cross-layer code but hold different tokens"):
        cache.layers[1].update(k[..., :8, :], k[..., :8, :])
