"""BlockCodec and the KV block frame: round trips, sinks and RoPE, keys, and damaged or foreign blocks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kakeyaturbo.cache import rope_factory
from kakeyaturbo.engine import build_plans
from kakeyaturbo.errors import ConfigError, CorruptDataError, ShapeError
from kakeyaturbo.integrations.blocks import BlockCodec, BlockIdentity, identity_for, prefix_keys, read_header
from kakeyaturbo.recipes import KakeyaConfig, Recipe, StreamRecipe
from tests.test_cache import prompt, tiny

ID = BlockIdentity("tiny", "cafe", "r", "")
FP8 = Recipe("fp8-16", StreamRecipe("fp8"), StreamRecipe("fp8"), chunk_tokens=16, sink_tokens=4)


@pytest.fixture(scope="module")
def kv():
    """A bf16 tiny Llama's post-RoPE K/V of 64 tokens, ``[layers, n_kv, 64, D]`` each."""
    model = tiny("llama", torch.bfloat16)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt(1, 64), cache=cache)
    k = torch.stack([layer.keys[0] for layer in cache.layers])
    v = torch.stack([layer.values[0] for layer in cache.layers])
    return model, k, v


def codec(model, recipe, block=32, identity=ID):
    plans = build_plans(recipe, 2, 2, 16)
    return BlockCodec(plans, block, identity, recipe.sink_tokens, rope_factory(model.config))


def test_exact_blocks_are_bit_exact(kv):
    model, k, v = kv
    c = codec(model, Recipe("exact", chunk_tokens=16))
    for start in (0, 32):
        blob = c.encode(k[:, :, start : start + 32], v[:, :, start : start + 32], start)
        k2, v2 = c.decode(blob, start)
        assert torch.equal(k2, k[:, :, start : start + 32]) and torch.equal(v2, v[:, :, start : start + 32])
        assert k2.dtype == torch.bfloat16


def test_fp8_block_keeps_sinks_exact_and_codes_pre_rope_keys(kv):
    model, k, v = kv
    c = codec(model, FP8)
    blob = c.encode(k[:, :, :32], v[:, :, :32], 0)
    header, parts = read_header(blob)
    assert header["start"] == 0 and header["tokens"] == 32 and len(parts) == 2 * (2 + 4)  # exact sink, 16 + 12
    k2, v2 = c.decode(blob, 0)
    assert torch.equal(k2[:, :, :4], k[:, :, :4]) and torch.equal(v2[:, :, :4], v[:, :, :4])
    err = (k2.float() - k[:, :, :32].float()).norm() / k[:, :, :32].float().norm()
    assert 0 < err < 0.05  # fp8 on pre-RoPE keys, RoPE re-applied at the block's positions
    later = c.decode(c.encode(k[:, :, 32:], v[:, :, 32:], 32), 32)[0]
    assert (later.float() - k[:, :, 32:].float()).norm() / k[:, :, 32:].float().norm() < 0.05
    assert len(read_header(c.encode(k[:, :, 32:], v[:, :, 32:], 32))[1]) == 2 * 2  # no sink: two chunks of 16


def test_damaged_foreign_and_misplaced_blocks_are_refused(kv):
    model, k, v = kv
    c = codec(model, FP8)
    blob = c.encode(k[:, :, 32:], v[:, :, 32:], 32)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    for bad, match in ((bytes(flipped), "CRC32"), (blob[:-9], "CRC32"), (b"KTVX" + blob[4:], "magic"),
                       (b"", "shorter")):
        with pytest.raises(CorruptDataError, match=match):
            c.decode(bad, 32)
    with pytest.raises(CorruptDataError, match="coded for"):
        codec(model, FP8, identity=BlockIdentity("other", "cafe", "r", "")).decode(blob, 32)
    with pytest.raises(CorruptDataError, match="expected 32 from 0"):
        c.decode(blob, 0)
    with pytest.raises(ShapeError, match="block_size"):
        c.encode(k, v, 0)


def test_decode_many_equals_decode_and_a_bad_block_fails_alone(kv):
    model, k, v = kv
    c = codec(model, FP8)
    good = [(c.encode(k[:, :, s : s + 32], v[:, :, s : s + 32], s), s) for s in (0, 32)]
    truncated = (good[1][0][:-9], 32)
    forged = (codec(model, Recipe("exact", chunk_tokens=16)).encode(k[:, :, 32:], v[:, :, 32:], 32), 32)  # same id
    out = c.decode_many([good[0], truncated, forged, good[1]])
    assert isinstance(out[1], CorruptDataError) and "CRC32" in str(out[1])
    assert isinstance(out[2], CorruptDataError) and "lacks part" in str(out[2])
    for got, (blob, start) in zip((out[0], out[3]), good):
        assert all(torch.equal(a, b) for a, b in zip(got, c.decode(blob, start)))
    assert c.decode_many([]) == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_a_block_or_a_corrupt_data_error(blob):
    try:
        header, parts = read_header(b"KTVB\x01\x00" + blob)
    except CorruptDataError as exc:  # the only way a read may fail
        assert "block" in str(exc)
    else:
        assert isinstance(header["parts"], list) and len(parts) == len(header["parts"])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 50_000), min_size=0, max_size=40), st.integers(1, 8), st.integers(0, 39))
def test_keys_name_whole_prefixes(tokens, block, change):
    keys = prefix_keys(tokens, block, ID)
    assert len(keys) == len(tokens) // block and len(set(keys)) == len(keys)
    assert prefix_keys(tokens[: len(tokens) // 2], block, ID) == keys[: len(tokens) // 2 // block]
    if change < len(tokens):
        edited = tokens[:change] + [tokens[change] + 1] + tokens[change + 1 :]
        other = prefix_keys(edited, block, ID)
        j = change // block
        assert other[:j] == keys[:j] and all(a != b for a, b in zip(other[j:], keys[j:]))
    assert not set(prefix_keys(tokens, block, BlockIdentity("tiny", "cafe", "r2", ""))) & set(keys)


def test_cross_layer_recipes_are_refused_with_what_to_do_instead(kv):
    model, _, _ = kv
    grouped = KakeyaConfig(bits=2, layer_group=4).to_recipe()
    with pytest.raises(ConfigError, match="codes groups of 4 layers together.*serve it with KakeyaCache"):
        identity_for("tiny", model.config, grouped, 32)
    with pytest.raises(ConfigError, match="codes groups of 4 layers together"):
        BlockCodec.for_recipe(grouped, model.config, 32, ID)
