"""Compressed decode attention (torch reference) against decode-then-SDPA, through the real cache."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from kakeyaturbo.cache import KakeyaLayer
from kakeyaturbo.codecs.kakeya_v2 import KakeyaV2Codec
from kakeyaturbo.codecs.rotated_int import RotatedIntCodec, RotatedIntConfig
from kakeyaturbo.engine import LayerPlan
from kakeyaturbo.errors import ConfigError, CorruptDataError, ShapeError
from kakeyaturbo.kernels.attention import (
    ExactSpan,
    LayerStore,
    compressed_decode_attention,
    read_bits,
    segment_from_encoded,
)
from kakeyaturbo.ops.varpack import pack_varwidth
from kakeyaturbo.transforms.rope import Rope
from kakeyaturbo.transforms.whitening import Whitening

N_KV, G, D, CHUNK = 2, 3, 32, 64


def _rope() -> Rope:
    cfg = LlamaConfig(hidden_size=D * N_KV * G, num_attention_heads=N_KV * G, num_key_value_heads=N_KV,
                      head_dim=D, rope_theta=10000.0)
    return Rope(LlamaRotaryEmbedding(cfg), "half")


def _keys_values(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE-like keys (low rank + mean) and values ``[1, N_KV, t, D]`` float32."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(N_KV, 8, D, generator=g)
    k = torch.randn(1, N_KV, t, 8, generator=g) @ basis + torch.randn(N_KV, 1, D, generator=g) * 2
    v = torch.randn(1, N_KV, t, 8, generator=g) @ torch.randn(N_KV, 8, D, generator=g)
    return k + 0.05 * torch.randn(k.shape, generator=g), v + 0.05 * torch.randn(v.shape, generator=g)


def _whitening(seed: int) -> Whitening:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N_KV, D, D, generator=g) / math.sqrt(D)
    lower = torch.linalg.cholesky(a @ a.transpose(1, 2) + 0.5 * torch.eye(D))
    return Whitening(lower, torch.linalg.inv(lower))


@functools.cache
def _plan(codec: str, pre_rope: bool, whiten: bool, seed: int) -> LayerPlan:
    rope = _rope() if pre_rope else None
    whitening = _whitening(seed) if whiten else None
    if codec == "rotated-int4":
        k_codec = v_codec = RotatedIntCodec(RotatedIntConfig(bits=4))
    else:
        k, v = _keys_values(512, seed + 1)
        k = rope.invert(k, torch.arange(512)) if rope is not None else k
        k = whitening.forward(k) if whitening is not None else k
        k_codec = KakeyaV2Codec.calibrate(k[0], bits=3.0, stream="k", seed=seed)
        v_codec = KakeyaV2Codec.calibrate(v[0], bits=3.0, stream="v", seed=seed)
    return LayerPlan(0, k_codec, v_codec, whitening, False, "head", N_KV, D, CHUNK)


def _layer(codec: str, *, t: int, extra: int, sink: int, pre_rope: bool, whiten: bool,
           dtype: torch.dtype = torch.float32, seed: int = 0) -> KakeyaLayer:
    """A KakeyaLayer prefilled with ``t`` tokens and then fed ``extra`` more in one update."""
    rope = _rope() if pre_rope else None
    layer = KakeyaLayer(_plan(codec, pre_rope, whiten, seed), sink, rope)
    k, v = _keys_values(t + extra, seed)
    layer.update(k[..., :t, :].to(dtype), v[..., :t, :].to(dtype))
    if extra:
        layer.update(k[..., t:, :].to(dtype), v[..., t:, :].to(dtype))
    return layer


def _reference(q: torch.Tensor, layer: KakeyaLayer) -> torch.Tensor:
    """Decode everything (the cache's own path), then SDPA with GQA: ``[H_q, D]`` float32."""
    k, v = layer.full()
    out = F.scaled_dot_product_attention(q.float()[None, :, None, :], k.float(), v.float(), enable_gqa=True)
    return out[0, :, 0, :]


def _query(seed: int) -> torch.Tensor:
    return torch.randn(N_KV * G, D, generator=torch.Generator().manual_seed(seed)) * 0.5


@pytest.mark.parametrize("codec", ["kakeya-v2", "rotated-int4"])
@pytest.mark.parametrize("pre_rope,whiten", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("tile", [1, 48, 256])
def test_matches_decode_then_sdpa(codec: str, pre_rope: bool, whiten: bool, tile: int) -> None:
    layer = _layer(codec, t=200, extra=70, sink=4, pre_rope=pre_rope, whiten=whiten and codec == "kakeya-v2")
    assert layer.chunks and layer.hot_k.shape[-2] > 0 and layer.sink_k.shape[-2] == 4
    q = _query(1)
    got = compressed_decode_attention(q, LayerStore.from_layer(layer), tile=tile)
    torch.testing.assert_close(got, _reference(q, layer), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("codec", ["kakeya-v2", "rotated-int4"])
def test_bf16_cache_within_bf16_tolerance(codec: str) -> None:
    layer = _layer(codec, t=256, extra=9, sink=2, pre_rope=True, whiten=False, dtype=torch.bfloat16)
    q = _query(2).bfloat16()
    got = compressed_decode_attention(q, LayerStore.from_layer(layer), tile=64)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _reference(q, layer), rtol=2e-2, atol=2e-2)


class _NoBigFloats(TorchDispatchMode):
    """Fails on any op that allocates a float tensor of ``limit`` elements or more (views are free)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
                assert t.numel() < self.limit, f"{func} made a float tensor of {tuple(t.shape)}"
        return out


@pytest.mark.parametrize("codec", ["kakeya-v2", "rotated-int4"])
def test_temporaries_are_tile_sized(codec: str) -> None:
    """With 2,048 compressed tokens and tile 16, no float temporary reaches T*D/4 elements."""
    layer = _layer(codec, t=2048, extra=0, sink=0, pre_rope=True, whiten=codec == "kakeya-v2")
    store = LayerStore.from_layer(layer)
    q = _query(3)
    ref = _reference(q, layer)
    with _NoBigFloats(2048 * D // 4) as mode:
        got = compressed_decode_attention(q, store, tile=16)
    assert mode.largest <= max(N_KV * D * D, N_KV * G * 16 * D)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@given(widths=st.lists(st.integers(0, 8), min_size=1, max_size=12), n=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_read_bits_inverts_pack_varwidth(widths: list[int], n: int, seed: int) -> None:
    w = torch.tensor(widths)
    g = torch.Generator().manual_seed(seed)
    codes = (torch.rand(n, len(widths), generator=g) * (1 << w)).long()
    packed = pack_varwidth(codes, w)
    prefix = torch.cumsum(w, 0) - w
    start = torch.arange(n).unsqueeze(1) * int(w.sum()) + prefix
    assert torch.equal(read_bits(packed, start, w.expand(n, -1)), codes)


def test_exact_only_and_errors() -> None:
    k, v = _keys_values(10, 0)
    store = LayerStore(exact=[ExactSpan(k[0], v[0])])
    q = _query(4)
    ref = F.scaled_dot_product_attention(q[None, :, None], k, v, enable_gqa=True)[0, :, 0]
    torch.testing.assert_close(compressed_decode_attention(q, store, tile=3), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ShapeError, match="multiple"):
        compressed_decode_attention(q[:5], store)
    with pytest.raises(ShapeError, match=r"\[H_q, D\]"):
        compressed_decode_attention(q[0], store)
    with pytest.raises(ConfigError, match="tile"):
        compressed_decode_attention(q, store, tile=0)
    with pytest.raises(ShapeError, match="no tokens"):
        compressed_decode_attention(q, LayerStore(exact=[ExactSpan(k[0, :, :0], v[0, :, :0])]))


def test_segment_errors() -> None:
    layer = _layer("rotated-int4", t=128, extra=0, sink=0, pre_rope=False, whiten=False)
    enc = layer.chunks[0].k
    with pytest.raises(ShapeError, match="head-layout"):
        segment_from_encoded(enc, layer.plan.k_codec, 3)
    enc.fields["codes"] = enc.fields["codes"][:-1]
    with pytest.raises(CorruptDataError):
        segment_from_encoded(enc, layer.plan.k_codec, N_KV)
    with pytest.raises(ConfigError, match="supports"):
        segment_from_encoded(enc, object(), N_KV)
    v2 = _layer("kakeya-v2", t=128, extra=0, sink=0, pre_rope=False, whiten=False)
    other = _plan("kakeya-v2", False, False, seed=5).k_codec
    with pytest.raises(CorruptDataError, match="transforms"):
        segment_from_encoded(v2.chunks[0].k, other, N_KV)


def test_entropy_coded_v2_payloads_are_refused_by_name() -> None:
    k, _ = _keys_values(128, 0)
    codec = KakeyaV2Codec.calibrate(k[0], bits=3.0, stream="k", coding="entropy")
    enc = codec.encode(k[0].reshape(N_KV, 1, 128, -1).transpose(0, 1).reshape(N_KV, 128, -1))
    with pytest.raises(ConfigError, match="coding='entropy'"):
        segment_from_encoded(enc, codec, N_KV)
    gains = KakeyaV2Codec.calibrate(k[0], bits=3.0, stream="k", head_gain_bits=4, heads=2)
    with pytest.raises(ConfigError, match="head_gain_bits=4"):
        segment_from_encoded(gains.encode(k[0].reshape(N_KV, 1, 128, -1).transpose(0, 1).reshape(N_KV, 128, -1)),
                             gains, N_KV)
