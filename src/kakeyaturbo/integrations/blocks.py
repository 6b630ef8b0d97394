"""One serving block of K/V (every layer, ``block_size`` tokens) coded by a recipe, as bytes.

A serving engine (vLLM) stores K/V in fixed blocks of tokens; :class:`BlockCodec` codes one such
block the way :class:`~kakeyaturbo.cache.KakeyaCache` would code a chunk of it: the recipe's
plans with ``chunk_tokens`` set to the block size, keys stored pre-RoPE where the recipe says so
(inverted at the block's positions with the model's own rotary settings), the recipe's sink tokens
and exact layers stored exactly. The bytes are a frame around the project's own containers::

    b"KTVB" | u16 version | u32 header length | header (JSON) | (u32 length | Encoded bytes)* | u32 CRC32

The header names the model, the recipe, the calibration statistics, the block's first position,
its tokens and layers and the parts that follow; :func:`read_header` checks all of it before any
tensor is made, so a truncated, corrupted or foreign blob raises
:class:`~kakeyaturbo.errors.CorruptDataError` (a *miss* for the store), never garbage K/V.
Keys (:func:`prefix_keys`) chain the block's tokens onto its prefix and onto the model, recipe and
statistics they were coded for, so another model's or recipe's blocks never share a key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import torch

from kakeyaturbo import codecs
from kakeyaturbo.container import Encoded
from kakeyaturbo.engine import LayerPlan, StoredChunk
from kakeyaturbo.errors import ConfigError, CorruptDataError, ShapeError
from kakeyaturbo.recipes import Recipe
from kakeyaturbo.transforms.rope import Rope

_Parts = dict[tuple[int, str, int], Encoded]
"""A block's coded parts by (layer, kind, span)."""
_Parsed = tuple[int, _Parts, torch.dtype, int]
"""A block read and checked: its index in the call, parts, dtype and start."""

MAGIC = b"KTVB"
VERSION = 1
_PREFIX = struct.Struct("<4sHI")
_LENGTH = struct.Struct("<I")
MAX_HEADER = 1 << 20
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SIZES = ("tokens", "layers", "n_kv_heads", "head_dim")
"""Positive sizes every block header states."""


@dataclasses.dataclass(frozen=True)
class BlockIdentity:
    """What a block was coded for; part of every key and checked in every header.

    Attributes:
        model: the model's name or path.
        config_hash: :func:`~kakeyaturbo.calibration.config_hash` of its config.
        recipe: sha256 of the recipe's canonical JSON (its block-sized chunks included).
        stats: the calibration's statistics id, or "" for recipes that need none.
    """

    model: str
    config_hash: str
    recipe: str
    stats: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready fields."""
        return dataclasses.asdict(self)


def serving_recipe(recipe: Recipe, block_size: int) -> Recipe:
    """``recipe`` as it codes blocks of ``block_size`` tokens: its own chunks where they divide the
    block (e.g. two chunks of 64 per vLLM CPU block of 128), else one chunk per block.

    Raises:
        ConfigError: a recipe with cross-layer groups (blocks are coded layer by layer).
    """
    if recipe.layer_group > 1:
        raise ConfigError(f"recipe {recipe.name!r} codes groups of {recipe.layer_group} layers together; the block "
                          "store and the vLLM connector code each layer's blocks alone: serve it with KakeyaCache "
                          "(kt.compress), or store a recipe with layer_group 1")
    return recipe if block_size % recipe.chunk_tokens == 0 else dataclasses.replace(recipe, chunk_tokens=block_size)


def identity_for(model_name: str, model_config: Any, recipe: Recipe, block_size: int,
                 stats: str = "") -> BlockIdentity:
    """The :class:`BlockIdentity` of blocks of ``block_size`` tokens coded by ``recipe`` for a model
    (``stats``: the calibration's statistics id, for recipes that need one)."""
    from kakeyaturbo.calibration import config_hash

    digest = hashlib.sha256(f"{serving_recipe(recipe, block_size).to_json()}|block={block_size}".encode())
    return BlockIdentity(model_name, config_hash(model_config), digest.hexdigest(), stats)


def prefix_keys(token_ids: Sequence[int], block_size: int, identity: BlockIdentity) -> list[str]:
    """Hex keys of the full blocks of ``token_ids``: block ``j``'s key hashes its tokens onto block
    ``j - 1``'s key, starting from ``identity`` (so a key names a whole prefix)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
    digest = hashlib.sha256(json.dumps(identity.to_dict(), sort_keys=True).encode()).digest()
    keys = []
    for j in range(len(token_ids) // block_size):
        block = torch.tensor(list(token_ids[j * block_size : (j + 1) * block_size]), dtype=torch.int64)
        digest = hashlib.sha256(digest + block.numpy().tobytes()).digest()
        keys.append(digest.hex())
    return keys


def read_header(blob: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """The header and the part blobs of a block, after checking magic, version, sizes and CRC.

    Raises:
        CorruptDataError: anything that is not a whole, intact block.
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CorruptDataError(f"a block must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < _PREFIX.size + _LENGTH.size:
        raise CorruptDataError(f"a block of {len(blob)} bytes is shorter than its frame")
    magic, version, header_len = _PREFIX.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CorruptDataError(f"bad magic {magic!r}: not a KakeyaTurbo KV block (expected {MAGIC!r})")
    if version != VERSION:
        raise CorruptDataError(f"KV block version {version} is not supported (this build reads {VERSION})")
    (crc,) = _LENGTH.unpack_from(blob, len(blob) - 4)
    if zlib.crc32(blob[:-4]) & 0xFFFFFFFF != crc:
        raise CorruptDataError("KV block CRC32 mismatch: corrupted or truncated")
    end = _PREFIX.size + header_len
    if header_len > MAX_HEADER or end > len(blob) - 4:
        raise CorruptDataError(f"KV block header length {header_len} is out of bounds")
    try:
        header = json.loads(blob[_PREFIX.size : end])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptDataError(f"KV block header is not JSON: {exc}") from None
    fields = {"identity": dict, "start": int, "tokens": int, "layers": int, "n_kv_heads": int, "head_dim": int,
              "dtype": str, "parts": list}
    if not isinstance(header, dict) or any(not isinstance(header.get(k), t) or isinstance(header.get(k), bool)
                                           for k, t in fields.items()):
        raise CorruptDataError(f"KV block header must hold {sorted(fields)} of the right types")
    if header["dtype"] not in _DTYPES or header["start"] < 0 or min(header[k] for k in SIZES) < 1:
        raise CorruptDataError("KV block header has an unknown dtype or a negative size")
    parts, offset = [], end
    for _ in header["parts"]:
        if offset + _LENGTH.size > len(blob) - 4:
            raise CorruptDataError("KV block ends before its last part")
        (size,) = _LENGTH.unpack_from(blob, offset)
        offset += _LENGTH.size
        if offset + size > len(blob) - 4:
            raise CorruptDataError("a KV block part runs past the end of the block")
        parts.append(blob[offset : offset + size])
        offset += size
    if offset != len(blob) - 4:
        raise CorruptDataError("KV block has bytes after its last part")
    return header, parts


def check_block(header: dict[str, Any], identity: BlockIdentity, start: int, block_size: int, layers: int) -> None:
    """Raise :class:`CorruptDataError` unless a block's header (:func:`read_header`) is that of a block
    coded for ``identity`` covering ``block_size`` tokens from ``start`` over ``layers`` layers."""
    if header["identity"] != identity.to_dict():
        raise CorruptDataError(f"KV block was coded for {header['identity']}, not {identity.to_dict()}")
    if (header["start"], header["tokens"], header["layers"]) != (start, block_size, layers):
        raise CorruptDataError(f"KV block covers {header['tokens']} tokens from {header['start']} over "
                               f"{header['layers']} layers, expected {block_size} from {start} over {layers}")


class BlockCodec:
    """Codes blocks of ``block_size`` tokens of every layer with one recipe's plans.

    Args:
        plans: one :class:`~kakeyaturbo.engine.LayerPlan` per layer, whose ``chunk_tokens`` divides
            ``block_size``.
        block_size: tokens per block.
        identity: what the blocks are coded for (in their header and keys).
        sink_tokens: the recipe's exact leading tokens.
        rope: ``layer -> Rope`` when the recipe stores keys pre-RoPE, else None.
    """

    def __init__(self, plans: Sequence[LayerPlan], block_size: int, identity: BlockIdentity, sink_tokens: int = 0,
                 rope: Any = None) -> None:
        if not plans or any(block_size % p.chunk_tokens for p in plans):
            raise ConfigError(f"BlockCodec needs one plan per layer, with chunks that divide the block of {block_size}")
        self.plans = list(plans)
        self.block_size = block_size
        self.identity = identity
        self.sink_tokens = sink_tokens
        self.ropes: list[Rope | None] = [None if p.exact or rope is None else rope(p.layer) for p in self.plans]
        self._exact = codecs.get("identity")

    @classmethod
    def for_recipe(cls, recipe: Recipe, hf_config: Any, block_size: int, identity: BlockIdentity,
                   calibration: Any = None) -> BlockCodec:
        """The codec of a serving recipe (:func:`serving_recipe`) for a model of ``hf_config``: its plans
        (with the calibration's fits, made beforehand) and, for pre-RoPE keys, the model's RoPE."""
        from kakeyaturbo.cache import rope_factory
        from kakeyaturbo.engine import build_plans
        from kakeyaturbo.models.arch import facts

        f = facts(hf_config)
        plans = build_plans(serving_recipe(recipe, block_size), f.n_layers, f.n_kv_heads, f.head_dim, calibration)
        rope = rope_factory(hf_config) if recipe.pre_rope_keys else None
        return cls(plans, block_size, identity, recipe.sink_tokens, rope)

    def _check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        p = self.plans[0]
        want = (len(self.plans), p.n_kv_heads, self.block_size, p.head_dim)
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
                raise ShapeError(f"a block's {name} must be [layers, n_kv, block_size, D] = {list(want)}, got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")

    def encode(self, k: torch.Tensor, v: torch.Tensor, start: int) -> bytes:
        """The bytes of one block.

        Args:
            k, v: post-RoPE keys and values ``[layers, n_kv, block_size, D]`` of tokens
                ``start .. start + block_size - 1``, in the model's dtype.
            start: position of the block's first token (a multiple of the block size).
        """
        self._check(k, v)
        sink = self._sink(start)
        names: list[list[Any]] = []
        blobs: list[bytes] = []
        for plan, rope, k_l, v_l in zip(self.plans, self.ropes, k, v):
            if plan.exact or sink:
                cut = self.block_size if plan.exact else sink
                for stream, x in (("k", k_l), ("v", v_l)):
                    names.append([plan.layer, f"{stream}_exact", 0])
                    blobs.append(self._exact.encode(x[:, :cut]).to_bytes())
                if plan.exact:
                    continue
            k_pre = k_l[:, sink:].float()
            if rope is not None:
                k_pre = rope.invert(k_pre.unsqueeze(0), torch.arange(start + sink, start + self.block_size))[0]
            for j, (a, b) in enumerate(self._spans(plan, sink)):
                chunk = plan.encode(k_pre[:, a:b].unsqueeze(0), v_l[:, sink + a : sink + b].unsqueeze(0))
                names += [[plan.layer, "k", j], [plan.layer, "v", j]]
                blobs += [chunk.k.to_bytes(), chunk.v.to_bytes()]
        p = self.plans[0]
        header = json.dumps({"identity": self.identity.to_dict(), "start": start, "tokens": self.block_size,
                             "layers": len(self.plans), "n_kv_heads": p.n_kv_heads, "head_dim": p.head_dim,
                             "dtype": str(k.dtype).removeprefix("torch."), "parts": names}, sort_keys=True).encode()
        body = b"".join([_PREFIX.pack(MAGIC, VERSION, len(header)), header,
                         *(_LENGTH.pack(len(b)) + b for b in blobs)])
        return body + _LENGTH.pack(zlib.crc32(body) & 0xFFFFFFFF)

    def decode(self, blob: bytes, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE ``(k, v)`` ``[layers, n_kv, block_size, D]`` (the dtype they were stored from) of
        a block that must have been coded by this codec at ``start``.

        Raises:
            CorruptDataError: a damaged blob, or one coded for another model, recipe, calibration,
                position or geometry.
        """
        out = self.decode_many([(blob, start)])[0]
        if isinstance(out, CorruptDataError):
            raise out
        return out

    def decode_many(self, blocks: Sequence[tuple[bytes, int]]
                    ) -> list[tuple[torch.Tensor, torch.Tensor] | CorruptDataError]:
        """:meth:`decode` of each ``(blob, start)``: a prefix's blocks, each layer's coded spans of all of
        them decoded together (:meth:`~kakeyaturbo.engine.LayerPlan.decode_many`: one codec call per
        layer and stream where the codec joins payloads), as fast per token as one long payload.
        A block that does not decode gets its :class:`CorruptDataError` in its place; the others
        are unaffected."""
        out: list[Any] = [None] * len(blocks)
        parsed: list[_Parsed] = []
        for i, (blob, start) in enumerate(blocks):
            try:
                header, parts = read_header(blob)
                check_block(header, self.identity, start, self.block_size, len(self.plans))
                decoded = {name: Encoded.from_bytes(raw) for name, raw in zip(_names(header["parts"]), parts)}
                parsed.append((i, decoded, _DTYPES[header["dtype"]], start))
            except CorruptDataError as exc:
                out[i] = exc
        try:
            results: list[Any] = self._decode_parsed(parsed)
        except CorruptDataError as exc:  # one of them is bad: each alone, so that only it fails
            results = [exc] if len(parsed) == 1 else [self._decode_one(item) for item in parsed]
        for (i, *_), result in zip(parsed, results):
            out[i] = result
        return out

    def _decode_one(self, item: _Parsed) -> tuple[torch.Tensor, torch.Tensor] | CorruptDataError:
        try:
            return self._decode_parsed([item])[0]
        except CorruptDataError as exc:
            return exc

    def _decode_parsed(self, items: Sequence[_Parsed]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(k, v)`` of each parsed block (its index, parts, dtype and start)."""
        ks: list[list[torch.Tensor]] = [[] for _ in items]
        vs: list[list[torch.Tensor]] = [[] for _ in items]
        for plan, rope in zip(self.plans, self.ropes):
            try:
                layer = self._layer(plan, rope, [(parts, start) for _, parts, _, start in items])
            except (ShapeError, RuntimeError) as exc:  # a forged part of another shape or codec
                raise CorruptDataError(f"KV block layer {plan.layer} does not decode: {exc}") from None
            want_shape = (plan.n_kv_heads, self.block_size, plan.head_dim)
            for j, ((k, v), (_, _, dtype, _)) in enumerate(zip(layer, items)):
                if tuple(k.shape) != want_shape or tuple(v.shape) != want_shape:
                    raise CorruptDataError(f"KV block layer {plan.layer} decodes to {tuple(k.shape)}, "
                                           f"expected {want_shape}")
                ks[j].append(k.to(dtype))
                vs[j].append(v.to(dtype))
        return [(torch.stack(k), torch.stack(v)) for k, v in zip(ks, vs)]

    def _sink(self, start: int) -> int:
        """Exact leading tokens of the block at ``start`` (the recipe's sink tokens that fall in it)."""
        return max(0, min(self.sink_tokens - start, self.block_size))

    def _spans(self, plan: LayerPlan, sink: int) -> list[tuple[int, int]]:
        """The coded tokens ``[0, block_size - sink)`` as the plan encodes them: whole chunks in one
        span, then the partial chunk left over (as a cache's prefill)."""
        coded = self.block_size - sink
        whole = coded // plan.chunk_tokens * plan.chunk_tokens
        return ([(0, whole)] if whole else []) + ([(whole, coded)] if coded > whole else [])

    def _layer(self, plan: LayerPlan, rope: Rope | None, blocks: Sequence[tuple[_Parts, int]]
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """float32 post-RoPE ``(k, v)`` ``[n_kv, block_size, D]`` of one layer of each block (its parts
        and start), every coded span of all of them decoded by one :meth:`LayerPlan.decode_many`."""
        ks: list[list[torch.Tensor]] = []
        vs: list[list[torch.Tensor]] = []
        chunks: list[StoredChunk] = []
        owners: list[int] = []
        positions: list[torch.Tensor] = []
        try:
            for i, (parts, start) in enumerate(blocks):
                sink = self._sink(start)
                exact = plan.exact or sink
                ks.append([self._exact.decode(parts[plan.layer, "k_exact", 0]).float()] if exact else [])
                vs.append([self._exact.decode(parts[plan.layer, "v_exact", 0]).float()] if exact else [])
                if plan.exact:
                    continue
                for j, (a, b) in enumerate(self._spans(plan, sink)):
                    chunks.append(StoredChunk(parts[plan.layer, "k", j], parts[plan.layer, "v", j], b - a,
                                              torch.float32))
                    owners.append(i)
                    positions.append(torch.arange(start + sink + a, start + sink + b))
        except KeyError as exc:
            raise CorruptDataError(f"KV block lacks part {list(exc.args[0])}") from None
        if chunks:
            decoded = plan.decode_many(chunks)
            k_all = torch.cat([k[0] for k, _ in decoded], dim=-2)  # [n_kv, tokens of every span, D]
            if rope is not None:
                k_all = rope.apply(k_all.unsqueeze(0), torch.cat(positions))[0]
            for i, k, (_, v) in zip(owners, k_all.split([c.tokens for c in chunks], dim=-2), decoded):
                ks[i].append(k)
                vs[i].append(v[0])
        return [(torch.cat(k, dim=-2), torch.cat(v, dim=-2)) for k, v in zip(ks, vs)]


def _names(parts: list[Any]) -> list[tuple[int, str, int]]:
    """``[[layer, kind, span], ...]`` from a header, checked."""
    kinds = {"k", "v", "k_exact", "v_exact"}
    if not all(isinstance(p, list) and len(p) == 3 and all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in (p[0], p[2])) and p[1] in kinds for p in parts):
        raise CorruptDataError(f"KV block parts must be [layer, one of {sorted(kinds)}, span] triples")
    names = [(p[0], p[1], p[2]) for p in parts]
    if len(set(names)) != len(names):
        raise CorruptDataError("KV block names a part twice")
    return names
