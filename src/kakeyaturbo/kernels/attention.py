"""Decode attention straight from compressed blocks (torch reference, CPU or GPU).

One new query per query head attends over a layer's cache: exact parts (sink, hot window: post-RoPE
keys and values as stored) and compressed segments (one :class:`~kakeyaturbo.container.Encoded`
pair each), all in one online softmax (running max ``m`` and sum ``l``, flash-decoding style),
``tile`` tokens at a time. No ``[T, D]`` float tensor is ever built: every float temporary is
``[n_kv, (g,) tile, D]`` or a per-head ``[D, D]`` matrix.

**What the kernel reads.** A segment reads its payload exactly as the codec stored it (the packed
bits, never a pre-unpacked code matrix): a token's codes are gathered per tile from the bit stream
by their bit offsets (each ``kakeya-v2`` vector is ``round(bits·D) - scale_bits`` bits, so vector
``v`` starts at bit ``v·budget`` and component ``j`` at ``v·budget + prefix_j``; rotated-int codes
are fixed width). Both codecs decode as ``x̂ = offset + c · P`` with a per-head coefficient tile
``c [n_kv, tile, E]`` (v2: ``c = z ⊙ σ · g``, ``P = Bᵀ``; rotated-int: ``c`` the dequantised rotated
coordinates, ``P`` the inverse Hadamard rotation cut to ``D`` columns).

**Values** are linear, so ``Σ pᵢ v̂ᵢ = (Σ pᵢ) offset + (Σ pᵢ cᵢ) P``: a segment accumulates
``Σ pᵢ cᵢ`` in coefficient space and unprojects once when the segment ends.

**Keys** of the engine are stored pre-RoPE, and whitened (``k·L``) for codecs that do not fold the
whitening into their own basis (``kakeya-v2`` does). The un-whitening is folded into the
unprojection once per head (``P_k = Bᵀ L⁻¹``, ``offset_k = μ L⁻¹``), so a tile's pre-RoPE keys
cost one ``[tile, E] x [E, D]`` product per KV head (shared by its ``g`` query heads); RoPE is then
applied at the tile's positions and ``scores = q·kᵀ·scale``. Folding into the query instead is not
possible with RoPE in between (it would need one ``D x D`` product per token and query head).
Without RoPE (keys stored post-RoPE, e.g. the rotated-int4 baseline recipe) the query is projected
once, ``q_c = q Pᵀ`` (for rotated-int: the rotated query), and ``scores = q·offset + q_c·cᵀ``: the
keys are never unprojected at all.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Protocol

import torch

from kakeyaturbo.codecs.base import expect_field
from kakeyaturbo.codecs.kakeya_v2 import KakeyaV2Codec, code_bits_per_vector, gain_values
from kakeyaturbo.codecs.rotated_int import RotatedIntCodec
from kakeyaturbo.container import Encoded
from kakeyaturbo.errors import ConfigError, CorruptDataError, ShapeError
from kakeyaturbo.ops.hadamard import random_signs, wht
from kakeyaturbo.ops.varpack import varwidth_nbytes
from kakeyaturbo.packing import packed_nbytes

DEFAULT_TILE = 256


class RopeLike(Protocol):
    """What the kernel needs of a RoPE (:class:`kakeyaturbo.transforms.rope.Rope` provides it)."""

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [..., n, D]`` to ``positions [n]`` (int64)."""


class Segment(Protocol):
    """A compressed run of tokens of one stream (K or V) of one layer, read tile by tile.

    Attributes:
        tokens: tokens held.
        n_kv: KV heads.
        width: coefficient width ``E`` (``D`` for kakeya-v2, the padded width for rotated-int).
    """

    tokens: int
    n_kv: int
    width: int

    def coefficients(self, start: int, stop: int) -> torch.Tensor:
        """float32 ``[n_kv, stop - start, E]``: coefficients of tokens ``start..stop-1``."""

    def unprojection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(offset, P)``: float32 ``[n_kv, D]`` and ``[n_kv, E, D]``, ``x̂ = offset + c · P``."""


def read_bits(packed: torch.Tensor, start: torch.Tensor, width: torch.Tensor | int) -> torch.Tensor:
    """Unsigned LSB-first fields of ``width`` (0..8) bits at bit offsets ``start`` (int64, any shape).

    Args:
        packed: uint8 ``[N]`` bit stream.
        start: int64 bit offsets; a field may straddle two bytes.
        width: int64 tensor broadcastable to ``start``, or an int.

    Returns:
        int64 tensor shaped like ``start`` (0 where the width is 0).
    """
    if packed.numel() == 0:  # every width is 0
        return torch.zeros_like(start)
    last = packed.numel() - 1
    byte = start // 8
    lo = packed[byte.clamp(max=last)].to(torch.int64)
    hi = packed[(byte + 1).clamp(max=last)].to(torch.int64)
    mask = (torch.ones_like(start) << width) - 1
    return ((lo | (hi << 8)) >> (start % 8)) & mask


def _token_streams(start: int, stop: int, n_kv: int, chunk_tokens: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Codec stream and row of (head, token): two int64 ``[n_kv, stop - start]``.

    The engine's codec input is ``[chunks, n_kv, C, D]`` flattened to streams ``chunk * n_kv + h``;
    token ``t`` of head ``h`` is row ``t % C`` of stream ``(t // C) * n_kv + h``.
    """
    t = torch.arange(start, stop, device=device)
    h = torch.arange(n_kv, device=device).unsqueeze(1)
    return (t // chunk_tokens) * n_kv + h, (t % chunk_tokens).expand(n_kv, -1)


def _segment_geometry(enc: Encoded, n_kv: int, name: str) -> tuple[int, int, int]:
    """``(chunks, chunk_tokens, D)`` of an engine-encoded span of one sequence.

    Accepted payload shapes: ``[1, chunks, n_kv, C, D]`` (the engine's head layout at batch 1),
    ``[chunks, n_kv, C, D]`` or flattened ``[chunks * n_kv, C, D]``.
    """
    shape = tuple(enc.shape)
    if len(shape) == 5 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) == 4 and shape[1] == n_kv:
        return shape[0], shape[2], shape[3]
    if len(shape) == 3 and shape[0] % n_kv == 0:
        return shape[0] // n_kv, shape[1], shape[2]
    raise ShapeError(f"{name}: expected a head-layout payload [1, chunks, n_kv, C, D] (or [chunks, n_kv, C, D], "
                     f"[chunks * n_kv, C, D]) with n_kv={n_kv}, got shape {tuple(enc.shape)}")


@dataclasses.dataclass(frozen=True, eq=False)
class V2Segment:
    """A ``kakeya-v2`` payload read straight from its packed bits.

    Attributes:
        codes: uint8 ``[bytes]``, the codec's varwidth bit stream; gains: uint8 packed gain codes.
        chunks, chunk_tokens, n_kv: the head layout (streams ``chunk * n_kv + h``, ``C`` tokens each).
        codec: the codec that encoded it (its transforms; head ``h`` uses transform ``h % S``).
    """

    codes: torch.Tensor
    gains: torch.Tensor
    chunks: int
    chunk_tokens: int
    n_kv: int
    codec: KakeyaV2Codec

    @classmethod
    def from_encoded(cls, enc: Encoded, codec: KakeyaV2Codec, n_kv: int) -> V2Segment:
        """Wrap an engine-encoded span (head layout, batch 1); sizes checked against the header."""
        chunks, c, d = _segment_geometry(enc, n_kv, "kakeya-v2 segment")
        t = codec.transforms
        if d != t.dim or n_kv % t.streams:
            raise ShapeError(f"kakeya-v2 segment: n_kv={n_kv}, D={d} do not fit transforms of S={t.streams}, "
                             f"D={t.dim}")
        widths = t.bits.repeat(chunks * n_kv // t.streams, 1)
        codes = expect_field(enc.fields, "codes", torch.uint8, (varwidth_nbytes(widths, (chunks * n_kv, c, d)),))
        sb = codec.config.scale_bits
        gains = expect_field(enc.fields, "scale", torch.uint8, (packed_nbytes(chunks * n_kv * c, sb),)) if sb \
            else torch.zeros(0, dtype=torch.uint8, device=codes.device)
        return cls(codes, gains, chunks, c, n_kv, codec)

    @property
    def tokens(self) -> int:
        """Tokens held."""
        return self.chunks * self.chunk_tokens

    @property
    def width(self) -> int:
        """Coefficient width ``E = D``."""
        return self.codec.transforms.dim

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Per-transform ``[S, ...]`` -> per-head ``[n_kv, ...]`` on the payload's device."""
        return x.repeat(self.n_kv // x.shape[0], *([1] * (x.dim() - 1))).to(self.codes.device)

    def _vectors(self, start: int, stop: int) -> torch.Tensor:
        """Vector index int64 ``[n_kv, stop - start]`` in the payload's order.

        The codec packs its streams transform-major: stream ``s`` is the ``s // S``-th repeat of
        transform ``s % S``, so row ``i`` of stream ``s`` is vector ``((s % S) * M + s // S) * C + i``
        with ``M`` the repeats.
        """
        streams, row = _token_streams(start, stop, self.n_kv, self.chunk_tokens, self.codes.device)
        s_t = self.codec.transforms.streams
        repeats = self.chunks * self.n_kv // s_t
        return ((streams % s_t) * repeats + streams // s_t) * self.chunk_tokens + row

    @functools.cached_property
    def _state(self) -> tuple[torch.Tensor, ...]:
        """Per-head decode state on the payload's device, built once: widths, bit prefix, table
        slot offsets (int64 ``[n_kv, D]``), levels ``[n_kv, 510]``, sigma ``[n_kv, D]``, gain grid
        ``[n_kv, 2]`` (float32; None without a gain)."""
        t = self.codec.transforms
        widths = self._head(t.bits.long())
        slots = ((1 << widths) - 2).clamp_min(0)
        grid = self._head(t.log_gain) if t.log_gain is not None else None
        return (widths, torch.cumsum(widths, 1) - widths, slots, self._head(t.levels),
                self._head(t.sigma.float()), grid)

    def coefficients(self, start: int, stop: int) -> torch.Tensor:
        """float32 ``[n_kv, stop - start, D]``: ``c = z ⊙ σ · g`` of tokens ``start..stop-1``."""
        cfg = self.codec.config
        widths, prefix, slots, tables, sigma, grid = self._state
        budget = code_bits_per_vector(cfg.bits, cfg.scale_bits, widths.shape[1])
        vec = self._vectors(start, stop)
        codes = read_bits(self.codes, vec.unsqueeze(-1) * budget + prefix.unsqueeze(1), widths.unsqueeze(1))
        slot = slots.unsqueeze(1) + codes  # [n_kv, n, D]
        z = torch.where(widths.unsqueeze(1) > 0, tables.gather(1, slot.flatten(1)).view(slot.shape), 0.0)
        q = read_bits(self.gains, vec * cfg.scale_bits, cfg.scale_bits)  # zeros without a gain code
        return z * sigma.unsqueeze(1) * gain_values(q, grid, cfg.scale_bits).unsqueeze(-1)

    def unprojection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean [n_kv, D], Bᵀ [n_kv, D, D])``, float32."""
        t = self.codec.transforms
        return self._head(t.centre), self._head(t.basis.matrix().float().transpose(1, 2).contiguous())


@dataclasses.dataclass(frozen=True, eq=False)
class RotatedIntSegment:
    """A ``rotated-int`` payload (packed fixed-width codes + f16 group scales [+ zero points]).

    Attributes:
        codes: uint8 packed codes; scale: float16 ``[chunks * n_kv, C, W/g]``; zero: same or None.
        chunks, chunk_tokens, n_kv: the head layout; dim: head dim ``D``; codec: the codec.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    chunks: int
    chunk_tokens: int
    n_kv: int
    dim: int
    codec: RotatedIntCodec

    @classmethod
    def from_encoded(cls, enc: Encoded, codec: RotatedIntCodec, n_kv: int) -> RotatedIntSegment:
        """Wrap an engine-encoded span (head layout, batch 1); sizes checked against the header."""
        chunks, c, d = _segment_geometry(enc, n_kv, "rotated-int segment")
        w, g = codec.layout(d)
        s = chunks * n_kv
        codes = expect_field(enc.fields, "codes", torch.uint8, (packed_nbytes(s * c * w, codec.config.bits),))
        scale = expect_field(enc.fields, "scale", torch.float16, (s, c, w // g))
        zero = None if codec.config.symmetric else expect_field(enc.fields, "zero", torch.float16, (s, c, w // g))
        return cls(codes, scale, zero, chunks, c, n_kv, d, codec)

    @property
    def tokens(self) -> int:
        """Tokens held."""
        return self.chunks * self.chunk_tokens

    @property
    def width(self) -> int:
        """Coefficient width ``E``: the stored (padded, rotated) width ``W``."""
        return self.codec.layout(self.dim)[0]

    def coefficients(self, start: int, stop: int) -> torch.Tensor:
        """float32 ``[n_kv, stop - start, W]``: dequantised (rotated) coordinates."""
        cfg = self.codec.config
        w, g = self.codec.layout(self.dim)
        streams, row = _token_streams(start, stop, self.n_kv, self.chunk_tokens, self.codes.device)
        vec = streams * self.chunk_tokens + row
        pos = (vec.unsqueeze(-1) * w + torch.arange(w, device=vec.device)) * cfg.bits
        codes = read_bits(self.codes, pos, cfg.bits).float().view(*vec.shape, w // g, g)
        scale = self.scale.view(-1, w // g)[vec].float().unsqueeze(-1)
        if self.zero is None:
            qmax = 2 ** (cfg.bits - 1) - 1
            if bool((codes > 2 * qmax).any()):
                raise CorruptDataError(f"symmetric {cfg.bits}-bit code {2 * qmax + 1} is not a valid level")
            y = (codes - qmax) * scale
        else:
            y = self.zero.view(-1, w // g)[vec].float().unsqueeze(-1) + codes * scale
        return y.view(*vec.shape, w)

    def unprojection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(0 [n_kv, D], P [n_kv, W, D])``: the inverse rotation, ``P = H diag(s)/√W`` cut to D columns."""
        cfg = self.codec.config
        w, _ = self.codec.layout(self.dim)
        dev = self.codes.device
        if cfg.rotate:
            eye = torch.eye(w, device=dev)
            p = wht(eye) * random_signs(w, cfg.seed, dev) / math.sqrt(w)
        else:
            p = torch.eye(w, device=dev)
        return torch.zeros(self.n_kv, self.dim, device=dev), p[:, : self.dim].expand(self.n_kv, w, self.dim)


def segment_from_encoded(enc: Encoded, codec: object, n_kv: int) -> Segment:
    """The :class:`Segment` reader of a payload encoded by ``codec`` (kakeya-v2 or rotated-int)."""
    if isinstance(codec, KakeyaV2Codec):
        if enc.config.get("transforms_hash") != codec.config.transforms_hash:
            raise CorruptDataError(f"payload was encoded with transforms {enc.config.get('transforms_hash')!r}; "
                                   f"the codec holds {codec.config.transforms_hash!r}")
        if codec.config.coding != "fixed":
            raise ConfigError(f"compressed decode attention reads fixed-width kakeya-v2 codes; coding="
                              f"{codec.config.coding!r} payloads decode with the codec (KakeyaCache does)")
        if codec.config.head_gain_bits:
            raise ConfigError("compressed decode attention reads per-head kakeya-v2 codes; head_gain_bits="
                              f"{codec.config.head_gain_bits} (joint-layout rows) decode with the codec")
        return V2Segment.from_encoded(enc, codec, n_kv)
    if isinstance(codec, RotatedIntCodec):
        return RotatedIntSegment.from_encoded(enc, codec, n_kv)
    raise ConfigError(f"compressed decode attention supports kakeya-v2 and rotated-int, not "
                      f"{getattr(codec, 'name', type(codec).__name__)!r}")


@dataclasses.dataclass(frozen=True)
class CompressedSpan:
    """Compressed K and V of ``tokens`` consecutive tokens starting at position ``start``."""

    k: Segment
    v: Segment
    start: int

    @property
    def tokens(self) -> int:
        """Tokens covered."""
        return self.k.tokens


@dataclasses.dataclass(frozen=True)
class ExactSpan:
    """Exact tokens (sink or hot window): post-RoPE keys and values ``[n_kv, n, D]`` (any float dtype)."""

    k: torch.Tensor
    v: torch.Tensor


@dataclasses.dataclass(frozen=True)
class LayerStore:
    """Everything one layer holds for one sequence, as the decode kernel reads it.

    Attributes:
        compressed: compressed spans (keys pre-RoPE when ``rope`` is set, whitened when ``k_unwhiten``
            is set).
        exact: exact spans (post-RoPE keys).
        k_unwhiten: float ``[n_kv, D, D]`` ``L⁻¹`` (keys stored as ``k·L``), or None.
        rope: RoPE to apply to decoded keys at their positions, or None (keys stored post-RoPE).
    """

    compressed: Sequence[CompressedSpan] = ()
    exact: Sequence[ExactSpan] = ()
    k_unwhiten: torch.Tensor | None = None
    rope: RopeLike | None = None

    @classmethod
    def from_layer(cls, layer: object) -> LayerStore:
        """The store of a :class:`~kakeyaturbo.cache.KakeyaLayer` holding one sequence (batch 1)."""
        plan = layer.plan
        if layer.sink_k is None or layer.sink_k.shape[0] != 1:
            raise ShapeError("LayerStore.from_layer: the layer must be initialised and hold batch size 1")
        if plan.layout != "head":
            raise ConfigError(f"compressed decode attention reads the 'head' layout, not {plan.layout!r}")
        spans, start = [], layer.chunks_start
        for chunk in layer.chunks:
            k = segment_from_encoded(chunk.k, plan.k_codec, plan.n_kv_heads)
            v = segment_from_encoded(chunk.v, plan.v_codec, plan.n_kv_heads)
            spans.append(CompressedSpan(k, v, start))
            start += chunk.tokens
        exact = [ExactSpan(layer.sink_k[0], layer.sink_v[0]), ExactSpan(layer.hot_k[0], layer.hot_v[0])]
        unwhiten = plan.whitening.L_inv if plan.whitening is not None else None
        return cls(spans, exact, unwhiten, layer.rope)


@dataclasses.dataclass
class _Softmax:
    """Online-softmax state over ``[n_kv, g]`` query heads: running max, sum and output ``[n_kv, g, D]``."""

    m: torch.Tensor
    l: torch.Tensor  # noqa: E741 (the usual name)
    acc: torch.Tensor

    def step(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Admit ``scores [n_kv, g, n]``: returns ``(p [n_kv, g, n], alpha [n_kv, g])`` and rescales
        ``l`` and ``acc`` by ``alpha`` (the caller adds ``p``-weighted values to ``acc``)."""
        m_new = torch.maximum(self.m, scores.amax(-1))
        alpha = torch.exp(self.m - m_new)
        p = torch.exp(scores - m_new.unsqueeze(-1))
        self.m = m_new
        self.l = self.l * alpha + p.sum(-1)
        self.acc = self.acc * alpha.unsqueeze(-1)
        return p, alpha


def _tiles(tokens: int, tile: int) -> range:
    return range(0, tokens, tile)


def _attend_exact(state: _Softmax, q: torch.Tensor, span: ExactSpan, scale: float, tile: int) -> None:
    for a in _tiles(span.k.shape[-2], tile):
        k = span.k[:, a : a + tile].float()  # [n_kv, n, D]
        p, _ = state.step(torch.einsum("hgd,hnd->hgn", q, k) * scale)
        state.acc = state.acc + torch.einsum("hgn,hnd->hgd", p, span.v[:, a : a + tile].float())


def _attend_compressed(state: _Softmax, q: torch.Tensor, span: CompressedSpan, store: LayerStore,
                       scale: float, tile: int) -> None:
    k_off, k_proj = span.k.unprojection()
    if store.k_unwhiten is not None:
        l_inv = store.k_unwhiten.float().to(q.device)
        k_off, k_proj = torch.einsum("hd,hde->he", k_off, l_inv), k_proj @ l_inv
    if store.rope is None:
        q_c = torch.einsum("hgd,hed->hge", q, k_proj)  # query in coefficient space, once
        q_off = torch.einsum("hgd,hd->hg", q, k_off).unsqueeze(-1)
    v_off, v_proj = span.v.unprojection()
    acc_c = q.new_zeros(q.shape[0], q.shape[1], span.v.width)
    p_sum = q.new_zeros(q.shape[:2])
    for a in _tiles(span.tokens, tile):
        b = min(a + tile, span.tokens)
        c_k = span.k.coefficients(a, b)
        if store.rope is None:
            scores = q_off + torch.einsum("hge,hne->hgn", q_c, c_k)
        else:
            k = store.rope.apply(k_off.unsqueeze(1) + c_k @ k_proj,
                                 torch.arange(span.start + a, span.start + b, device=q.device))
            scores = torch.einsum("hgd,hnd->hgn", q, k)
        p, alpha = state.step(scores * scale)
        acc_c = acc_c * alpha.unsqueeze(-1) + torch.einsum("hgn,hne->hge", p, span.v.coefficients(a, b))
        p_sum = p_sum * alpha + p.sum(-1)
    state.acc = state.acc + p_sum.unsqueeze(-1) * v_off.unsqueeze(1) + torch.einsum("hge,hed->hgd", acc_c, v_proj)


def compressed_decode_attention(q: torch.Tensor, store: LayerStore, *, scale: float | None = None,
                                tile: int = DEFAULT_TILE) -> torch.Tensor:
    """Attention of one new query per query head over a layer's compressed + exact cache.

    Args:
        q: ``[H_q, D]`` post-RoPE queries, ``H_q = n_kv * g`` (query head ``i`` reads KV head ``i // g``).
        store: the layer's :class:`LayerStore` (at least one token).
        scale: softmax scale, default ``1/sqrt(D)``.
        tile: tokens per tile (every temporary is O(tile)).

    Returns:
        ``[H_q, D]`` in the dtype of ``q`` (math in float32): equal, up to float32 rounding, to
        decoding every span, applying RoPE and running ``scaled_dot_product_attention``.
    """
    if q.dim() != 2:
        raise ShapeError(f"q must be [H_q, D], got {tuple(q.shape)}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ConfigError(f"tile must be a positive integer, got {tile!r}")
    heads = {s.k.n_kv for s in store.compressed} | {s.v.n_kv for s in store.compressed}
    heads |= {e.k.shape[0] for e in store.exact}
    if len(heads) != 1:
        raise ShapeError(f"the store's spans disagree on (or lack) the KV head count: {sorted(heads)}")
    n_kv = heads.pop()
    h_q, d = q.shape
    if h_q % n_kv:
        raise ShapeError(f"{h_q} query heads are not a multiple of {n_kv} KV heads")
    if not any(s.tokens for s in store.compressed) and not any(e.k.shape[-2] for e in store.exact):
        raise ShapeError("the store holds no tokens")
    qg = q.float().view(n_kv, h_q // n_kv, d)
    sm = _Softmax(qg.new_full(qg.shape[:2], -math.inf), qg.new_zeros(qg.shape[:2]), torch.zeros_like(qg))
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    for e in store.exact:
        _attend_exact(sm, qg, e, s, tile)
    for c in store.compressed:
        _attend_compressed(sm, qg, c, store, s, tile)
    return (sm.acc / sm.l.unsqueeze(-1)).view(h_q, d).to(q.dtype)
