"""`KakeyaCache`: a transformers ``Cache`` whose layers hold K/V compressed by a recipe.

Each decoder layer is a :class:`KakeyaLayer` holding, in token order:

1. **sink**: the first ``recipe.sink_tokens`` tokens, exact (model dtype);
2. **chunks**: :class:`~kakeyaturbo.engine.StoredChunk` objects encoded once by the layer's
   :class:`~kakeyaturbo.engine.LayerPlan` and never re-encoded: one per ``update`` that completes
   chunks (each chunk a separate codec stream inside it, so one codec call serves them all);
3. **hot window**: fewer than ``chunk_tokens`` most recent tokens, exact, waiting to fill a chunk.

A prefill (the first ``update``) is encoded whole, its last chunk possibly partial, so a prefilled
cache holds no hot window; tokens added later wait in the hot window until they fill a chunk.

Attention calls ``update`` with post-RoPE keys ``[B, n_kv, T, D]``. With ``recipe.pre_rope_keys``
a layer inverts RoPE at the tokens' positions before encoding and re-applies it after decoding;
positions are the layer's own token count, ``0..T-1``. Inversion and re-application use the same
positions, so they cancel exactly: a left-padded batch (whose rows the model rotates by shifted
positions) is still served correctly, its stored keys merely carry a constant per-row rotation.
Exact layers (both streams ``identity`` without whitening, e.g. boundary layers) keep everything as
received, like ``DynamicLayer``.

Every ``update`` returns the full K/V for attention: decoded chunks (in float32, RoPE re-applied)
and exact parts, cast to the model's dtype, with the update's own new tokens exact: a forward pass
attends to the keys it has just computed as they are (so a prefill is exact), and the chunks those
tokens complete are encoded right after. Feeding tokens one by one or in groups that end on chunk
boundaries therefore gives the same attention inputs. Those decoded tensors are transient; what the cache
holds between steps is only what :meth:`KakeyaCache.memory_report` counts.

**Sliding-window layers** (Gemma 2/3, Mistral with a window, ...) hold only what a later query can
see, like transformers' ``DynamicSlidingWindowLayer``: once the window of ``W`` tokens has passed
them, sink tokens and hot-window tokens of exact layers are dropped one by one and stored chunks (or
whole chunks of a prefill's hot window, before they are encoded) whole, so a compressed sliding layer
holds its last ``W - 1`` tokens plus at most one chunk's worth before them. ``update`` returns the
positions the model's sliding mask expects (``get_mask_sizes`` says which), and ``memory_report``
measures every layer against what an exact ``DynamicCache`` of the same model holds (a sliding
layer's last ``W - 1`` tokens).

Supported: batch size >= 1, greedy/sampled ``generate``, ``crop`` (negative counts), ``reset``.
A crop that lands inside a stored chunk group decodes that group into the hot window: its surviving
tokens are then held exactly as decoded, and whole chunks of them are encoded a second time on the
next ``update``. Every ``update`` decodes all chunks (cost linear in the context, like transformers'
``QuantizedCache``) unless the cache has a ``decoded_budget``: stored chunks never change, so up to that
many bytes of their decoded K/V (post-RoPE, model dtype; the oldest chunks first, split evenly over the
compressed layers) are kept and reused by later steps — counted as held bytes (``decoded``) in
:meth:`KakeyaCache.memory_report`, so the ratio says what the speed costs. Beam search and batch
re-indexing (``reorder_cache``, ``batch_repeat_interleave``, ``batch_select_indices``) work while
nothing is encoded and raise :class:`~kakeyaturbo.errors.ConfigError` afterwards. Offloading is
not supported.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from kakeyaturbo import groups, recipes
from kakeyaturbo.engine import CalibrationLike, LayerPlan, StoredChunk, build_plans
from kakeyaturbo.errors import ConfigError, ShapeError
from kakeyaturbo.models.arch import SLIDING, facts
from kakeyaturbo.transforms.rope import Rope

RopeFactory = Callable[[int], Rope]


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _positions(start: int, count: int) -> torch.Tensor:
    return torch.arange(start, start + count)


def _check_budget(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"decoded_budget must be a number of bytes >= 0, got {value!r}")


class KakeyaLayer(CacheLayerMixin):
    """One decoder layer's compressed K/V store (see the module docstring).

    Args:
        plan: the layer's :class:`LayerPlan`.
        sink_tokens: leading tokens kept exact.
        rope: the layer's RoPE when keys are stored pre-RoPE, else None.
        sliding_window: the layer's attention window ``W`` (a query sees itself and the ``W - 1``
            tokens before it), or None for full attention.
        decoded_budget: bytes of decoded chunks this layer may keep for reuse (0: decode every step).
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, plan: LayerPlan, sink_tokens: int = 0, rope: Rope | None = None,
                 sliding_window: int | None = None, decoded_budget: int = 0) -> None:
        super().__init__()
        if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                           or sliding_window < 1):
            raise ConfigError(f"layer {plan.layer}: sliding_window must be a positive integer or None, "
                              f"got {sliding_window!r}")
        _check_budget(decoded_budget)
        self.decoded_budget = decoded_budget
        self.group: _Group | None = None  # set by KakeyaCache for a layer of a cross-layer group
        self.plan = plan
        self.sink_tokens = sink_tokens
        self.rope = rope
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self._clear()

    def _clear(self) -> None:
        self.length = 0
        self.sunk = 0
        self.chunks_start = 0
        self.chunks: list[StoredChunk] = []
        self.kept: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # decoded chunks kept, one per chunk
        self.sink_k = self.sink_v = self.hot_k = self.hot_v = None
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record device/dtype and create empty sink and hot window ``[B, n_kv, 0, D]``."""
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.sink_k, self.hot_k = key_states[..., :0, :].clone(), key_states[..., :0, :].clone()
        self.sink_v, self.hot_v = value_states[..., :0, :].clone(), value_states[..., :0, :].clone()
        self.is_initialized = True

    @property
    def stored_tokens(self) -> int:
        """Tokens held in encoded chunks."""
        return sum(c.tokens for c in self.chunks)

    @property
    def held_start(self) -> int:
        """Position of the first token held (0 until a sliding window drops tokens)."""
        held_sink = self.sink_k.shape[-2] if self.is_initialized else 0
        return self.sunk - held_sink if held_sink else self.chunks_start

    def window_start(self, length: int) -> int:
        """First position a query at position ``length`` attends to (0 for full attention)."""
        return 0 if self.sliding_window is None else max(length - self.sliding_window + 1, 0)

    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        p = self.plan
        for name, x in (("key_states", key_states), ("value_states", value_states)):
            if x.dim() != 4 or x.shape[1] != p.n_kv_heads or x.shape[3] != p.head_dim:
                raise ShapeError(f"layer {p.layer}: {name} must be [B, n_kv={p.n_kv_heads}, T, "
                                 f"D={p.head_dim}], got {tuple(x.shape)}")
            if x.shape[0] != self.sink_k.shape[0]:
                raise ShapeError(f"layer {p.layer}: batch size changed from {self.sink_k.shape[0]} "
                                 f"to {x.shape[0]}")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``T`` new tokens (post-RoPE keys ``[B, n_kv, T, D]``) and return the K/V attention
        sees: every token held (full attention), or from the window start of the first new token on
        (sliding attention, as ``DynamicSlidingWindowLayer`` returns them).

        Returns:
            ``(keys, values)`` each ``[B, n_kv, n, D]`` in the model's dtype.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check(key_states, value_states)
        room = self.sink_tokens - self.sunk
        if room > 0:
            self.sink_k = torch.cat([self.sink_k, key_states[..., :room, :]], dim=-2)
            self.sink_v = torch.cat([self.sink_v, value_states[..., :room, :]], dim=-2)
            self.sunk = self.sink_k.shape[-2]
            self.chunks_start = self.sunk
        skip = max(room, 0)
        self.hot_k = torch.cat([self.hot_k, key_states[..., skip:, :]], dim=-2)
        self.hot_v = torch.cat([self.hot_v, value_states[..., skip:, :]], dim=-2)
        prefill = self.length == 0
        visible = self.window_start(self.length) - self.held_start
        self.length += key_states.shape[-2]
        keys, values = self.full()
        self._evict()
        self._flush(everything=prefill)
        return keys[..., visible:, :], values[..., visible:, :]

    def _evict(self) -> None:
        """Drop what no later query can see (sliding layers): sink tokens one by one, stored chunks
        whole, and hot-window tokens one by one on exact layers, whole chunks otherwise (so chunks stay
        on the same grid of positions)."""
        start = self.window_start(self.length)
        if start <= self.held_start:
            return
        cut = self.sink_k.shape[-2] - min(max(self.sunk - start, 0), self.sink_k.shape[-2])
        self.sink_k, self.sink_v = self.sink_k[..., cut:, :], self.sink_v[..., cut:, :]
        while self.chunks and self.chunks_start + self.chunks[0].tokens <= start:
            self.chunks_start += self.chunks.pop(0).tokens
            self.kept.pop(0)
        if self.chunks or start <= self.chunks_start:
            return
        drop = start - self.chunks_start
        if not self.plan.exact:
            drop -= drop % self.plan.chunk_tokens
        self.hot_k, self.hot_v = self.hot_k[..., drop:, :].clone(), self.hot_v[..., drop:, :].clone()
        self.chunks_start += drop

    def _flush(self, everything: bool) -> None:
        """Encode the hot window's whole chunks (one :class:`StoredChunk`, each chunk its own codec
        stream); with ``everything`` (a prefill) also the partial chunk left over. In a cross-layer group
        only the group's last layer codes, the hot windows of all its layers side by side (the earlier
        layers, updated first in the same forward, hold theirs exact until then)."""
        c = self.plan.chunk_tokens
        held = self.hot_k.shape[-2]
        n = held // c * c
        spans = [(0, n)] if n else []
        if everything and held > n:
            spans.append((n, held))
        if self.group is not None and self is not self.group.layers[-1]:
            return
        members = [self] if self.group is None else self.group.aligned()
        if self.plan.exact or not spans:
            return
        plan = self.plan if self.group is None else self.plan.group
        k_all = groups.join([m._keys_to_code() for m in members])
        v_all = groups.join([m.hot_v for m in members])
        coded = [plan.encode(k_all[..., a:b, :], v_all[..., a:b, :]) for a, b in spans]
        for m in members:
            m._take(coded, spans[-1][1])

    def _keys_to_code(self) -> torch.Tensor:
        """The hot window's keys as the plan codes them: float32, RoPE inverted if keys are stored pre-RoPE."""
        k = self.hot_k.float()
        if self.rope is not None:
            k = self.rope.invert(k, _positions(self.chunks_start + self.stored_tokens, k.shape[-2]))
        return k

    def _take(self, coded: list[StoredChunk], done: int) -> None:
        """Hold ``coded``, the encoded first ``done`` tokens of the hot window, in their place."""
        self.chunks.extend(coded)
        self.kept.extend([None] * len(coded))
        self.hot_k = self.hot_k[..., done:, :].clone()
        self.hot_v = self.hot_v[..., done:, :].clone()

    def _decode(self, chunks: list[StoredChunk], starts: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Decode stored chunks whose first tokens are at ``starts`` (one codec call per stream for all
        of them where the codec joins payloads; in a cross-layer group, one for all its layers):
        post-RoPE K and V, model dtype."""
        out = []
        key_dtype = torch.float32 if self.rope is not None else self.dtype  # RoPE'd in float32, cast once
        decoded = (self.plan.decode_many(chunks, key_dtype, self.dtype) if self.group is None
                   else self.group.decode(self, chunks, key_dtype, self.dtype))
        for chunk, start, (k, v) in zip(chunks, starts, decoded):
            if self.rope is not None:
                k = self.rope.apply(k, _positions(start, chunk.tokens), self.dtype)
            out.append((k, v))
        return out

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything held: ``(keys, values)`` each ``[B, n_kv, length - held_start, D]``, post-RoPE,
        model dtype (stored chunks decoded or taken from those kept, exact parts as they are)."""
        starts = list(itertools.accumulate((c.tokens for c in self.chunks), initial=self.chunks_start))[:-1]
        todo = [i for i, kv in enumerate(self.kept) if kv is None]
        fresh = dict(zip(todo, self._decode([self.chunks[i] for i in todo], [starts[i] for i in todo])))
        room = self.decoded_budget - self.decoded_nbytes
        keys, values = [self.sink_k], [self.sink_v]
        for i in range(len(self.chunks)):
            kv = self.kept[i]
            if kv is None:
                kv = fresh[i]
                if _nbytes(kv[0]) + _nbytes(kv[1]) <= room:
                    self.kept[i] = kv
                    room -= _nbytes(kv[0]) + _nbytes(kv[1])
            keys.append(kv[0])
            values.append(kv[1])
        keys.append(self.hot_k)
        values.append(self.hot_v)
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)

    @property
    def decoded_nbytes(self) -> int:
        """Bytes of decoded chunks kept for reuse."""
        return sum(_nbytes(kv[0]) + _nbytes(kv[1]) for kv in self.kept if kv is not None)

    def get_seq_length(self) -> int:
        """Tokens seen (sink + chunks + hot window, and on a sliding layer those it dropped)."""
        return self.length

    def reference_tokens(self) -> int:
        """Tokens an exact transformers cache of this layer holds now (``DynamicLayer``: all of them,
        ``DynamicSlidingWindowLayer``: the last ``W - 1``)."""
        return self.length if self.sliding_window is None else min(self.length, self.sliding_window - 1)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the mask of a query of ``query_length`` new tokens: the
        positions :meth:`update` returns."""
        return self.reference_tokens() + query_length, self.window_start(self.length)

    def get_max_length(self) -> int:
        """The window on a sliding layer, else no maximum (``-1``)."""
        return -1 if self.sliding_window is None else self.sliding_window

    def reset(self) -> None:
        """Drop everything held."""
        self._clear()
        if self.group is not None:
            self.group.reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative count, as ``DynamicLayer``).

        A crop inside a stored chunk decodes that chunk into the hot window (module docstring); a
        sliding layer cannot be cropped below the tokens it still holds.
        """
        if tokens_to_remove > 0:
            raise ConfigError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        new_len = max(0, self.length + tokens_to_remove)
        if new_len < self.held_start:
            raise ConfigError(f"layer {self.plan.layer}: cannot crop to {new_len} tokens, the sliding window "
                              f"already dropped the tokens before position {self.held_start}")
        if new_len <= self.sunk:
            cut = self.sunk - new_len
            self.sink_k = self.sink_k[..., : self.sink_k.shape[-2] - cut, :]
            self.sink_v = self.sink_v[..., : self.sink_v.shape[-2] - cut, :]
            self.sunk = self.chunks_start = new_len
            self.chunks, self.kept = [], []
            self.hot_k, self.hot_v = self.hot_k[..., :0, :], self.hot_v[..., :0, :]
        else:
            start = self.chunks_start
            for i, chunk in enumerate(self.chunks):
                if start + chunk.tokens > new_len:
                    self.hot_k, self.hot_v = self.kept[i] or self._decode([chunk], [start])[0]
                    self.chunks, self.kept = self.chunks[:i], self.kept[:i]
                    break
                start += chunk.tokens
            keep = new_len - start
            self.hot_k, self.hot_v = self.hot_k[..., :keep, :].clone(), self.hot_v[..., :keep, :].clone()
        self.length = new_len

    def _reindex(self, what: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.chunks:
            raise ConfigError(f"{what} is not supported once KakeyaCache has encoded chunks (they would "
                              "have to be re-encoded); use greedy or sampled decoding")
        if self.is_initialized:
            self.sink_k, self.sink_v = fn(self.sink_k), fn(self.sink_v)
            self.hot_k, self.hot_v = fn(self.hot_k), fn(self.hot_v)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam reordering (only while nothing is encoded)."""
        self._reindex("beam search (reorder_cache)", lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times (only while nothing is encoded)."""
        self._reindex("batch_repeat_interleave", lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices`` (only while nothing is encoded)."""
        self._reindex("batch_select_indices", lambda t: t[indices, ...])

    def memory(self) -> dict[str, int]:
        """Bytes held now: packed, decoded (chunks kept decoded), hot_window, sink, exact_layers, total,
        bf16_equivalent (what an exact transformers cache holds for this layer in bf16: every token, or
        a sliding layer's last ``W - 1``) and counts (``tokens`` seen, ``held_tokens``)."""
        exact_parts = _nbytes(self.sink_k) + _nbytes(self.sink_v) + _nbytes(self.hot_k) + _nbytes(self.hot_v)
        packed = sum(c.nbytes if self.group is None else self.group.share(self, c.nbytes) for c in self.chunks)
        decoded = self.decoded_nbytes
        batch = self.sink_k.shape[0] if self.is_initialized else 0
        out = {
            "layer": self.plan.layer,
            "exact": self.plan.exact,
            "tokens": self.length,
            "held_tokens": self.length - self.held_start if self.is_initialized else 0,
            "window": self.sliding_window,
            "chunks": len(self.chunks),
            "packed": packed,
            "decoded": decoded,
            "hot_window": 0 if self.plan.exact else _nbytes(self.hot_k) + _nbytes(self.hot_v),
            "sink": 0 if self.plan.exact else _nbytes(self.sink_k) + _nbytes(self.sink_v),
            "exact_layers": exact_parts if self.plan.exact else 0,
            "total": packed + decoded + exact_parts,
            "bf16_equivalent": 2 * 2 * batch * self.plan.n_kv_heads * self.reference_tokens() * self.plan.head_dim,
        }
        return out


class _Group:
    """The layers of one cross-layer group in a cache (:mod:`kakeyaturbo.groups`), in model order.

    They see the same tokens, so they hold chunks over the same spans: the group's last layer encodes
    their hot windows side by side (:meth:`KakeyaLayer._flush`), every layer holds the same
    :class:`StoredChunk` objects, and the first layer to decode a list of them decodes every layer's part
    in one codec call per stream and hands the others theirs (kept until they ask, within the forward).

    Args:
        plan: the group's plan (:attr:`~kakeyaturbo.engine.LayerPlan.members`).
    """

    def __init__(self, plan: LayerPlan) -> None:
        self.plan = plan
        self.layers: list[KakeyaLayer] = []
        self._handed: dict[int, tuple[tuple[StoredChunk, ...], list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def aligned(self) -> list[KakeyaLayer]:
        """The layers, checked to hold the same tokens in the same places."""
        first = self.layers[0]
        for layer in self.layers[1:]:
            if (layer.length, layer.chunks_start, len(layer.chunks), layer.hot_k.shape) != (
                    first.length, first.chunks_start, len(first.chunks), first.hot_k.shape):
                raise ShapeError(f"{self.plan.where} share a cross-layer code but hold different tokens (layer "
                                 f"{layer.plan.layer}: {layer.length}, layer {first.plan.layer}: {first.length}): "
                                 "update every layer of the model once per forward, in order")
        return self.layers

    def decode(self, layer: KakeyaLayer, chunks: list[StoredChunk], key_dtype: torch.dtype,
               value_dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``layer``'s part of each chunk, ``(k_pre, v)`` each ``[B, n_kv, T, D]`` (as
        :meth:`~kakeyaturbo.engine.LayerPlan.decode_many`), handed on if another layer decoded them."""
        index = self.layers.index(layer)
        handed = self._handed.pop(index, None)
        if handed is not None and len(handed[0]) == len(chunks) and all(a is b for a, b in zip(handed[0], chunks)):
            return handed[1]
        parts = [(groups.split(k, len(self.layers)), groups.split(v, len(self.layers)))
                 for k, v in self.plan.decode_many(chunks, key_dtype, value_dtype)]
        for j in range(len(self.layers)):
            if j != index:
                self._handed[j] = (tuple(chunks), [(ks[j], vs[j]) for ks, vs in parts])
        return [(ks[index], vs[index]) for ks, vs in parts]

    def share(self, layer: KakeyaLayer, nbytes: int) -> int:
        """``layer``'s share of a group chunk's ``nbytes`` (split evenly, the remainder to the first layers)."""
        index, n = self.layers.index(layer), len(self.layers)
        return nbytes // n + (index < nbytes % n)

    def reset(self) -> None:
        """Drop parts handed on and not taken."""
        self._handed.clear()


def exact_cache(model_config: Any, states: Sequence[tuple[torch.Tensor, torch.Tensor]],
                lengths: Sequence[int]) -> Cache:
    """A transformers ``DynamicCache`` for ``model_config`` (its sliding layers windowed) holding
    ``states``: per layer ``(keys, values)`` each ``[B, n_kv, n, D]``, the last ``n`` of that layer's
    ``lengths[i]`` tokens (a sliding layer needs at least its last ``W - 1``)."""
    from transformers import DynamicCache

    out = DynamicCache(config=model_config)
    for idx, ((k, v), length) in enumerate(zip(states, lengths)):
        out.update(k, v, idx)
        layer = out.layers[idx]
        if layer.is_sliding:
            layer.cumulative_length = length
        elif k.shape[-2] != length:
            raise ShapeError(f"layer {idx}: a full-attention layer needs all {length} tokens, got {k.shape[-2]}")
    return out


def _text_config(model_config: Any) -> Any:
    return model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config


def rope_factory(config: Any) -> RopeFactory:
    """RoPE built from the model's own rotary class, found by ``config.model_type``."""
    model_type = getattr(config, "model_type", None)
    hint = "pass rope=lambda layer: Rope.from_model(model, layer) (or use KakeyaCache.from_model)"
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        raise ConfigError(f"cannot find the rotary embedding of model type {model_type!r}; {hint}") from None
    found = [obj for name, obj in vars(module).items() if name.endswith("RotaryEmbedding")
             and isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__]
    if len(found) != 1:
        raise ConfigError(f"model type {model_type!r} has {len(found)} rotary embedding classes; {hint}")
    rotary = found[0](config=config)
    layer_types = getattr(config, "layer_types", None)
    return lambda layer: Rope(rotary, "half", layer_types[layer] if layer_types else None)


class KakeyaCache(Cache):
    """A ``transformers.Cache`` storing K/V as a recipe says.

    Args:
        model_config: the model's config (``model.config``).
        recipe: a :class:`~kakeyaturbo.recipes.Recipe`, a built-in name or a recipe JSON path.
        calibration: the calibration bundle, for recipes that need one.
        rope: ``layer -> Rope``; by default built from the model's own rotary class (only needed
            when the recipe stores pre-RoPE keys).
        decoded_budget: bytes of decoded chunks kept for reuse between steps, split evenly over the
            compressed layers (0, the default: every step decodes what it reads; see the module docstring).

    Example::

        cache = KakeyaCache(model.config, "fp8")
        out = model.generate(**inputs, cache=cache, max_new_tokens=64)
        cache.memory_report()["ratio"]
    """

    def __init__(self, model_config: Any, recipe: recipes.Recipe | str | Path,
                 calibration: CalibrationLike | None = None, rope: RopeFactory | None = None,
                 decoded_budget: int = 0) -> None:
        _check_budget(decoded_budget)
        config = _text_config(model_config)
        self.recipe = recipe if isinstance(recipe, recipes.Recipe) else recipes.load(recipe)
        f = facts(config)
        self.model_config = config
        self.plans = build_plans(self.recipe, f.n_layers, f.n_kv_heads, f.head_dim, calibration, f.layer_types)
        needs_rope = self.recipe.pre_rope_keys and not all(p.exact for p in self.plans)
        rope_for = (rope or rope_factory(config)) if needs_rope else None
        share = decoded_budget // max(sum(not p.exact for p in self.plans), 1)
        super().__init__(layers=[
            KakeyaLayer(p, self.recipe.sink_tokens, rope_for(p.layer) if rope_for and not p.exact else None,
                        f.sliding_window if f.layer_types[p.layer] == SLIDING else None, 0 if p.exact else share)
            for p in self.plans
        ])
        made: dict[int, _Group] = {}
        for p, layer in zip(self.plans, self.layers):
            if p.group is not None:
                layer.group = made.setdefault(id(p.group), _Group(p.group))
                layer.group.layers.append(layer)

    @classmethod
    def from_model(cls, model: nn.Module, recipe: recipes.Recipe | str | Path,
                   calibration: CalibrationLike | None = None, decoded_budget: int = 0) -> KakeyaCache:
        """A cache for ``model``, with RoPE taken from the model's own rotary module; what the recipe
        needs from a :class:`~kakeyaturbo.calibration.Calibration` is fitted (or read back) first."""
        from kakeyaturbo.calibration.probes import prepare

        recipe = recipe if isinstance(recipe, recipes.Recipe) else recipes.load(recipe)
        prepare(recipe, calibration, model)
        return cls(model.config, recipe, calibration, rope=lambda layer: Rope.from_model(model, layer),
                   decoded_budget=decoded_budget)

    def ingest(self, reference: Cache) -> KakeyaCache:
        """Store the content of an exact cache (e.g. a prefill's ``DynamicCache``) as attention would
        during that prefill: every layer's post-RoPE K and V pass through :meth:`update`."""
        for idx, layer in enumerate(reference.layers):
            self.update(layer.keys, layer.values, idx)
        return self

    def to_dynamic(self) -> Cache:
        """A plain ``DynamicCache`` holding what this cache would hand attention now (decoded chunks,
        RoPE re-applied; sliding layers as ``DynamicSlidingWindowLayer``): the snapshot-mode view.
        The copy is transient float storage."""
        return exact_cache(self.model_config, [layer.full() for layer in self.layers],
                           [layer.get_seq_length() for layer in self.layers])

    def memory_report(self) -> dict[str, Any]:
        """Bytes held now.

        Returns:
            ``packed`` (sum of ``Encoded.nbytes``), ``decoded`` (chunks kept decoded within the
            ``decoded_budget``), ``hot_window``, ``sink``, ``exact_layers``,
            ``total`` (their sum), ``bf16_equivalent`` (K and V of every held token in bf16),
            ``ratio`` (bf16_equivalent / total; None while empty), ``model_side`` (per-model bytes
            such as whitening matrices, not in ``ratio``), ``tokens`` and ``layers`` (per-layer dicts).
        """
        layers = [layer.memory() for layer in self.layers]
        keys = ("packed", "decoded", "hot_window", "sink", "exact_layers", "total", "bf16_equivalent")
        report: dict[str, Any] = {k: sum(entry[k] for entry in layers) for k in keys}
        report["ratio"] = report["bf16_equivalent"] / report["total"] if report["total"] else None
        report["model_side"] = sum(p.side_nbytes for p in self.plans)
        report["tokens"] = self.get_seq_length()
        report["layers"] = layers
        return report


def compress(model: nn.Module, recipe: recipes.Recipe | recipes.KakeyaConfig | str | Path = "kakeya-balanced",
             calibration: CalibrationLike | None = None, decoded_budget: int = 0) -> KakeyaCache:
    """The one verb: a :class:`KakeyaCache` for ``model`` that stores its K/V as ``recipe`` says.

    ``kt.compress(model, "kakeya-balanced", calibration=kt.calibrate(model, tokenizer, texts))``;
    pass the result to ``model.generate(..., cache=cache)``. Recipes of calibrated codecs
    have what they need fitted from the calibration's statistics on first use (memoised in its
    bundle directory, if it has one); baselines such as ``"fp8"`` or ``"kivi-4"`` need none.

    Raises:
        ConfigError: an unknown recipe, or one that needs a calibration without one.
    """
    if isinstance(recipe, recipes.KakeyaConfig):
        recipe = recipe.to_recipe()
    recipe = recipe if isinstance(recipe, recipes.Recipe) else recipes.load(recipe)
    if calibration is None and recipe.needs_calibration:
        raise ConfigError(f"recipe {recipe.name!r} is built from calibrated statistics: pass "
                          "calibration=kt.calibrate(model, tokenizer, texts) (or kt.Calibration.load(DIR))")
    return KakeyaCache.from_model(model, recipe, calibration, decoded_budget)
