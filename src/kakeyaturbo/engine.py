"""The compression engine: (recipe, calibration, model facts) -> one :class:`LayerPlan` per layer.

Both the snapshot evaluation and :class:`~kakeyaturbo.cache.KakeyaCache` go through here, so a
recipe means the same thing everywhere. A plan encodes a span of tokens of one layer into a
:class:`StoredChunk` (nothing but :class:`~kakeyaturbo.container.Encoded` objects) and decodes it.

Token spans are cut into chunks of ``chunk_tokens``; one codec call encodes all chunks of a span,
with the chunk as an extra leading (stream) axis, so a chunk never shares codec state (blocks,
bases, group scales) with its neighbours and a span encoded in one call equals its chunks encoded
one by one. The layouts of a chunk as the codec sees it (``"head"``, ``"token_major"``, ``"joint"``)
are :mod:`kakeyaturbo.layouts`; ``kakeya-v2`` fitted on joint rows decorrelates the heads of a layer
jointly (about half the squared error of per-head transforms at the same bits on SmolLM2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from kakeyaturbo import codecs, groups, layouts
from kakeyaturbo.codecs.base import Codec
from kakeyaturbo.container import Encoded
from kakeyaturbo.errors import ConfigError, ShapeError
from kakeyaturbo.groups import LayerGroup
from kakeyaturbo.ops.bitalloc import allocate_budgets, interpolate_costs
from kakeyaturbo.recipes.recipe import Recipe, StreamRecipe
from kakeyaturbo.transforms.whitening import Whitening

CALIBRATE_HINT = ("pass calibration=kt.calibrate(model, tokenizer, texts), or kt.Calibration.load(DIR) of a bundle "
                  "from `kakeya calibrate --out DIR`")


class CalibrationLike(Protocol):
    """What the engine needs from a calibration bundle (``kakeyaturbo.Calibration`` provides it,
    fitting what is asked for on demand).

    Attributes:
        boundary_ranking: layer indices, most sensitive first.
        skipped_whitening: layers the calibration does not whiten, with the reason.
    """

    boundary_ranking: list[int]
    skipped_whitening: dict[int, str]

    def whitening(self, layer: int, mode: str = "sigma_q") -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(L, L_inv)`` each ``[n_kv, D, D]`` for ``layer`` and mode ("sigma_q" or "lag"), or None
        when the layer is not whitened."""

    def v2_transforms(self, layer: int | LayerGroup, stream: str, space: str, layout: str, config: Any) -> Any:
        """The ``kakeya-v2`` transforms serving ``config`` on one (layer, stream), for input in key space
        ``space`` ("none", "post_rope", "sigma_q", "lag") and engine ``layout``; ``layer`` a tuple: those of
        a cross-layer group (:mod:`kakeyaturbo.groups`)."""

    def table(self, stream: str, bits: int) -> tuple[float, ...]:
        """The calibrated Lloyd–Max table (``2**bits`` increasing floats) of stream ``"k"``/``"v"``."""

    def sensitivity(self, setup: Mapping[str, Any]) -> dict[str, dict[int, dict[float, float]]]:
        """Measured KL of coding each (layer, stream) alone at each probed budget, ``{stream: {layer:
        {budget: KL}}}``, for the probe ``setup`` (:meth:`Recipe.sensitivity_setup`)."""


@dataclasses.dataclass
class StoredChunk:
    """Encoded K and V of ``tokens`` consecutive tokens of one layer.

    Attributes:
        k, v: the codec outputs (K after pre-transforms: inverse RoPE, whitening).
        tokens: number of tokens covered.
        dtype: dtype :meth:`LayerPlan.decode` returns (the dtype the tokens arrived in).
        own: made by :meth:`LayerPlan.encode` in this process (not read from bytes), so decoded
            without the checks against corrupt payloads (:meth:`~kakeyaturbo.codecs.base.Codec.decode_own`).
    """

    k: Encoded
    v: Encoded
    tokens: int
    dtype: torch.dtype
    own: bool = False

    @property
    def nbytes(self) -> int:
        """Exact bytes held: ``k.nbytes + v.nbytes`` (serialized size, headers included)."""
        return self.k.nbytes + self.v.nbytes


@dataclasses.dataclass
class LayerPlan:
    """How one decoder layer's K and V are stored.

    Attributes:
        layer: layer index.
        k_codec, v_codec: the codecs (calibrated tables already substituted).
        whitening: the K whitening the plan applies (None: not whitened here; a codec that folds
            the whitening into its own transforms gets raw keys).
        exact: the layer stores K and V exactly (the cache keeps them in the model's dtype).
        layout: one of :data:`kakeyaturbo.layouts.NAMES`.
        n_kv_heads, head_dim: the model's KV geometry.
        chunk_tokens: tokens per chunk.
        whitening_skipped: why the calibration skipped this layer's whitening, if it did.
        k_space: the space K is coded in: ``"none"`` (pre-RoPE or post-RoPE keys as the recipe
            stores them), ``"sigma_q"`` or ``"lag"`` (whitened, by the plan or inside the codec).
        members: on the plan of a cross-layer group (:mod:`kakeyaturbo.groups`), the layers it codes: its
            input is theirs side by side (``n_kv_heads`` counts the heads of all of them; ``layer`` is the
            first); ``()`` on a plan of one layer.
        group: on the plan of a layer coded by a cross-layer group, that group's plan (this plan's codecs are
            the group's; :meth:`encode` and :meth:`decode_many` go through the group).
    """

    layer: int
    k_codec: Codec
    v_codec: Codec
    whitening: Whitening | None
    exact: bool
    layout: str
    n_kv_heads: int
    head_dim: int
    chunk_tokens: int
    whitening_skipped: str | None = None
    k_space: str = "none"
    members: LayerGroup = ()
    group: LayerPlan | None = None

    @property
    def side_nbytes(self) -> int:
        """Per-model bytes this layer needs besides its chunks (whitening, codec side data; a group's are
        counted at its first layer)."""
        if self.group is not None:
            return self.group.side_nbytes if self.layer == self.group.layer else 0
        w = self.whitening.nbytes if self.whitening is not None else 0
        return w + self.k_codec.side_nbytes + self.v_codec.side_nbytes

    @property
    def where(self) -> str:
        """``"layer 4"``, or the layers of a group plan (``"layers 4-7"``)."""
        return groups.name(self.members or self.layer)

    def _direct(self) -> None:
        """Refuse coding a layer that a cross-layer group codes."""
        if self.group is not None:
            raise ConfigError(f"layer {self.layer} is coded with {self.group.where}: code their K and V side by "
                              f"side through its group's plan (plan.group)")

    def _check(self, name: str, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.n_kv_heads or x.shape[3] != self.head_dim:
            raise ShapeError(
                f"{self.where}: {name} must be [B, n_kv={self.n_kv_heads}, T, D={self.head_dim}], "
                f"got {tuple(x.shape)}"
            )
        t = x.shape[2]
        if t == 0 or (t % self.chunk_tokens and t > self.chunk_tokens):
            raise ShapeError(
                f"{self.where}: {name} has {t} tokens: encode a positive multiple of "
                f"chunk_tokens={self.chunk_tokens} or one partial chunk of fewer tokens"
            )

    def _to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The codec input of ``x [B, n_kv, T, D]`` in the plan's layout."""
        return layouts.LAYOUTS[self.layout].to_rows(x, self.chunk_tokens)

    def _from_rows(self, y: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
        """``[B, n_kv, T, D]`` from the codec output ``y``."""
        return layouts.LAYOUTS[self.layout].from_rows(y, batch, tokens, self.n_kv_heads, self.head_dim,
                                                      self.chunk_tokens)

    def encode(self, k_pre: torch.Tensor, v: torch.Tensor) -> StoredChunk:
        """Encode a span of tokens.

        Args:
            k_pre: keys ``[B, n_kv, T, D]`` (pre-RoPE when the recipe says so), float dtype.
            v: values ``[B, n_kv, T, D]``; ``T`` a positive multiple of ``chunk_tokens`` (each chunk
                its own codec stream) or a single partial chunk ``T < chunk_tokens``.

        Returns:
            A :class:`StoredChunk` decoding to the input dtype.
        """
        self._direct()
        self._check("k_pre", k_pre)
        self._check("v", v)
        if k_pre.shape != v.shape:
            raise ShapeError(f"{self.where}: K {tuple(k_pre.shape)} and V {tuple(v.shape)} differ")
        k_in = self.whitening.forward(k_pre) if self.whitening is not None else k_pre
        return StoredChunk(self.k_codec.encode(self._to_rows(k_in)), self.v_codec.encode(self._to_rows(v)),
                           k_pre.shape[2], k_pre.dtype, own=True)

    def decode(self, chunk: StoredChunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode to ``(k_pre_hat, v_hat)``, each ``[B, n_kv, T, D]`` in the chunk's dtype."""
        return self.decode_many([chunk])[0]

    def decode_many(self, chunks: Sequence[StoredChunk], key_dtype: torch.dtype | None = None,
                    value_dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`decode` of each chunk: own chunks without the payload checks, chunks read from bytes
        checked and, where the codec joins payloads (:meth:`~kakeyaturbo.codecs.base.Codec.decode_many`),
        each stream of all of them in one codec call. Keys come in ``key_dtype`` and values in
        ``value_dtype`` (default: the chunk's dtype), each cast once."""
        self._direct()
        own = all(c.own for c in chunks)
        k_out = torch.float32 if self.whitening is not None else key_dtype  # unwhitened in float32
        ks = self.k_codec.decode_many([c.k for c in chunks], own=own, dtype=k_out)
        vs = self.v_codec.decode_many([c.v for c in chunks], own=own, dtype=value_dtype)
        out = []
        for chunk, k_rows, v_rows in zip(chunks, ks, vs):
            batch = chunk.k.shape[0]
            k = self._from_rows(k_rows, batch, chunk.tokens)
            if self.whitening is not None:
                k = self.whitening.inverse(k)
            out.append((k.to(key_dtype or chunk.dtype),
                        self._from_rows(v_rows, batch, chunk.tokens).to(value_dtype or chunk.dtype)))
        return out


def _resolve_layer(name: str, layer: int, n_layers: int) -> int:
    idx = layer + n_layers if layer < 0 else layer
    if not 0 <= idx < n_layers:
        raise ConfigError(f"{name}: layer {layer} is out of range for a model with {n_layers} layers")
    return idx


def _boundary(recipe: Recipe, n_layers: int, calibration: CalibrationLike | None) -> set[int]:
    layers = {_resolve_layer("boundary_layers", i, n_layers) for i in recipe.boundary_layers}
    if recipe.boundary_top:
        if calibration is None:
            raise ConfigError(f"recipe {recipe.name!r}: boundary_top needs a calibration; {CALIBRATE_HINT}")
        ranking = list(calibration.boundary_ranking)
        if recipe.boundary_top > len(ranking):
            raise ConfigError(f"boundary_top={recipe.boundary_top} but the calibration ranks only "
                              f"{len(ranking)} layers")
        layers |= {_resolve_layer("boundary_ranking", i, n_layers) for i in ranking[: recipe.boundary_top]}
    return layers


_SHARED: dict[int, OrderedDict[str, Codec]] = {}
"""Codecs built from each live calibration object (by ``id``; dropped with it), shared by every plan built
from it: a calibrated codec decodes its stored transforms once and keeps what its first call prepares, so a
second cache (a new request) starts warm. The :data:`SHARED_CODECS` used last are kept per calibration."""
SHARED_CODECS = 512
"""Codecs kept per calibration (a kakeya recipe of SmolLM2 builds 60, each about 0.5 MB): a sweep over many
recipes in one process keeps only the last few."""


def _shared_codecs(calibration: CalibrationLike) -> OrderedDict[str, Codec]:
    """The codecs built so far from ``calibration``, least recently used first (a new dict for an object
    that takes no weak references)."""
    key = id(calibration)
    if key not in _SHARED:
        try:
            weakref.finalize(calibration, _SHARED.pop, key, None)
        except TypeError:
            return OrderedDict()
        _SHARED[key] = OrderedDict()
    return _SHARED[key]


class _CodecFactory:
    """Builds codec instances for stream recipes, substituting calibrated tables; shares them between
    the layers of a plan and, for one calibration, between plans (:data:`_SHARED`)."""

    def __init__(self, recipe: Recipe, calibration: CalibrationLike | None) -> None:
        self.recipe = recipe
        self.calibration = calibration
        self._built: OrderedDict[str, Codec] = OrderedDict() if calibration is None else _shared_codecs(calibration)

    def get(self, sr: StreamRecipe, stream: str, layer: int | LayerGroup, space: str) -> Codec:
        """The codec of ``sr`` for one (layer, stream) (``layer`` a tuple: a cross-layer group's); ``space``
        names what the codec is fed ("none", a whitening mode or "post_rope"; calibrated codecs look their
        transforms up by it)."""
        cls = codecs.codec_class(sr.codec)
        per_layer = [layer, space, self.recipe.layout] if cls.needs_calibration else []
        key = json.dumps([stream, sr.codec, sr.config, sr.calibrated_table, *per_layer], sort_keys=True, default=str)
        if key in self._built:
            self._built.move_to_end(key)
        else:
            self._built[key] = self._build(cls, sr, stream, layer, space)
            while len(self._built) > SHARED_CODECS:
                self._built.popitem(last=False)
        return self._built[key]

    def _build(self, cls: type[Codec], sr: StreamRecipe, stream: str, layer: int | LayerGroup, space: str) -> Codec:
        if cls.needs_calibration:
            if self.calibration is None:
                raise ConfigError(f"recipe {self.recipe.name!r}: codec {sr.codec!r} is built from calibrated "
                                  f"transforms; {CALIBRATE_HINT}")
            try:
                return cls.from_calibration(sr.config, self.calibration, layer, stream, space, self.recipe.layout)
            except ConfigError as exc:
                raise ConfigError(f"{groups.name(layer)} {stream.upper()} stream, codec {sr.codec!r}: {exc}") from None
        try:
            codec = cls(cls.config_class.from_dict(sr.config))
        except ConfigError as exc:
            raise ConfigError(f"{stream.upper()} stream, codec {sr.codec!r}: {exc}") from None
        if not sr.calibrated_table:
            return codec
        if self.calibration is None:
            raise ConfigError(f"recipe {self.recipe.name!r} uses a calibrated {stream.upper()} table; "
                              f"{CALIBRATE_HINT}")
        fields = codec.config.to_dict()
        if "codebook" not in fields or not isinstance(fields.get("bits"), int):
            raise ConfigError(f"calibrated_table: codec {sr.codec!r} has no bits/codebook fields to "
                              "calibrate")
        table = self.calibration.table(stream, fields["bits"])
        return type(codec)(codec.config, codebook=tuple(float(t) for t in table))


def _whitening(layer: int, n_kv: int, d: int, calibration: CalibrationLike | None,
               recipe: Recipe, mode: str) -> tuple[Whitening | None, str | None]:
    if calibration is None:
        raise ConfigError(f"recipe {recipe.name!r} whitens K; {CALIBRATE_HINT}")
    mats = calibration.whitening(layer, mode)
    if mats is None:
        return None, calibration.skipped_whitening.get(layer, "skipped by the calibration")
    w = Whitening(*mats)
    if w.n_kv != n_kv or w.head_dim != d:
        raise ConfigError(f"calibration whitening of layer {layer} is for n_kv={w.n_kv}, D={w.head_dim}; "
                          f"the model has n_kv={n_kv}, D={d} (calibrated on another model?)")
    return w, None


def sensitivity_budgets(recipe: Recipe, layers: Sequence[int | LayerGroup],
                        calibration: CalibrationLike | None) -> dict[tuple[int, str], float]:
    """The ``layer_bits="sensitivity"`` budgets: ``{(layer, "k"|"v"): bits}`` for ``layers``.

    The total is what uniform budgets would spend (``len(layers) * (k bits + v bits)``; K and V
    rows have the same size); it is spread over the budgets of ``recipe.probe.grid`` to minimise the
    sum of the KL the calibration's sensitivity probe measured (:meth:`CalibrationLike.sensitivity`,
    interpolated between probed budgets). An item of ``layers`` that is a tuple is a cross-layer group:
    its members share one budget per stream, costing the sum of their measured KL (each measured coded
    alone) and spending their number of layers' bits.
    """
    if calibration is None:
        raise ConfigError(f"recipe {recipe.name!r} has layer_bits='sensitivity'; {CALIBRATE_HINT}")
    units = [groups.members(x) for x in layers]
    items = [(unit, stream) for unit in units for stream in ("k", "v")]
    if not items:
        return {}
    measured = _measured(recipe, units, calibration)
    options = list(recipe.probe.grid)
    tables = [[interpolate_costs(measured[stream][layer], recipe.probe.grid) for layer in unit]
              for unit, stream in items]
    costs = torch.tensor([[sum(t[b] for t in ts) for b in options] for ts in tables], dtype=torch.float64)
    total = sum(map(len, units)) * (float(recipe.k.config["bits"]) + float(recipe.v.config["bits"]))
    try:
        choice = allocate_budgets(costs, torch.tensor(options, dtype=torch.float64), total,
                                  weights=[len(unit) for unit, _ in items])
    except ConfigError as exc:
        raise ConfigError(f"recipe {recipe.name!r}: {exc} (budgets: {options})") from None
    return {(layer, stream): options[int(i)] for (unit, stream), i in zip(items, choice) for layer in unit}


def _measured(recipe: Recipe, units: Sequence[LayerGroup], calibration: CalibrationLike
              ) -> dict[str, dict[int, dict[float, float]]]:
    """The sensitivity probe's costs of ``recipe`` (:meth:`CalibrationLike.sensitivity`), checked to hold
    every layer of ``units`` in both streams."""
    measured = calibration.sensitivity(recipe.sensitivity_setup())
    missing = [f"{layer}{stream}" for unit in units for stream in ("k", "v") for layer in unit
               if layer not in measured[stream]]
    if missing:
        raise ConfigError(f"recipe {recipe.name!r}: the sensitivity probe did not measure layer/stream "
                          f"{', '.join(missing)} (a probe memoised by an older version, which skipped "
                          f"sliding-window layers: delete the bundle's fits/sensitivity-*.safetensors, or "
                          f"run `kakeya calibrate --force` with the same --model and --text)")
    return measured


def member_weights(recipe: Recipe, units: Sequence[LayerGroup], budgets: Mapping[tuple[int, str], float],
                   n_kv_heads: int, calibration: CalibrationLike | None) -> dict[tuple[int, str], list[float]]:
    """The ``member_weights="sensitivity"`` head weights of the cross-layer groups among ``units``:
    ``{(layer, "k"|"v"): [weight per head of the group's row]}`` (every member of a group holds the same list).

    Member ``j`` of a group coded at ``b`` bits gets ``sqrt(KL_j(b) / g)`` on each of its ``n_kv_heads``
    heads, where ``KL_j(b)`` is the KL the sensitivity probe measured coding layer ``j`` alone at ``b``
    (interpolated between probed budgets) and ``g`` the geometric mean of the group's ``KL_j(b)``: with
    the logit error of a member about proportional to its squared error times its sensitivity, the
    group's weighted squared error is what its KL adds up from. ``b`` is the group's budget from
    ``budgets`` (sensitivity budgets), else the recipe's bits. Weights are rounded to 3 significant
    digits (they key the fits).
    """
    if calibration is None:
        raise ConfigError(f"recipe {recipe.name!r} has member_weights='sensitivity'; {CALIBRATE_HINT}")
    grouped = [u for u in units if len(u) > 1]
    measured = _measured(recipe, grouped, calibration)
    out: dict[tuple[int, str], list[float]] = {}
    for unit in grouped:
        for stream, sr in (("k", recipe.k), ("v", recipe.v)):
            b = float(budgets.get((unit[0], stream), sr.config["bits"]))
            kl = [interpolate_costs(measured[stream][layer], (b,))[b] for layer in unit]
            mean = math.exp(sum(math.log(x) for x in kl) / len(kl))
            per_member = [float(f"{math.sqrt(x / mean):.3g}") for x in kl]
            row = [w for w in per_member for _ in range(n_kv_heads)]
            out.update({(layer, stream): row for layer in unit})
    return out


def plan_bits(plans: list[LayerPlan]) -> list[list[float | None]]:
    """``[[k_bits, v_bits], ...]`` per layer: the ``bits`` of each stream's codec config (None for a
    codec without one, such as exact storage), so a record shows where the bits went."""
    return [[getattr(c.config, "bits", None) for c in (p.k_codec, p.v_codec)] for p in plans]


def _check_geometry(n_layers: int, n_kv_heads: int, head_dim: int) -> None:
    for what, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} must be a positive integer, got {value!r}")


def _layer_streams(recipe: Recipe, n_layers: int,
                   boundary: set[int]) -> tuple[list[tuple[StreamRecipe, StreamRecipe]], list[int]]:
    """``([(k, v) stream recipe of each layer], layers the shared k/v recipes serve)``: boundary layers
    take ``boundary_k``/``boundary_v``, then ``layer_overrides`` replace streams per layer."""
    overrides = {_resolve_layer("layer_overrides", i, n_layers): s for i, s in recipe.layer_overrides.items()}
    streams = []
    for layer in range(n_layers):
        k_sr, v_sr = (recipe.boundary_k, recipe.boundary_v) if layer in boundary else (recipe.k, recipe.v)
        streams.append((overrides.get(layer, {}).get("k", k_sr), overrides.get(layer, {}).get("v", v_sr)))
    shared = [i for i in range(n_layers) if i not in boundary and i not in overrides]
    return streams, shared


def check_recipe(recipe: Recipe, n_layers: int, n_kv_heads: int, head_dim: int) -> None:
    """Fail early, before any fit or model forward, when ``recipe`` cannot serve a model of this
    geometry: layer indices out of range, or a codec that cannot code a chunk of ``[n_kv_heads,
    chunk_tokens, head_dim]`` in the recipe's layout (each uncalibrated codec codes one zero chunk;
    calibrated codecs are fitted on the model's own statistics). ``boundary_top`` layers are
    checked like boundary layers: every layer may be one.

    Raises:
        ConfigError: naming the layers, the stream, the codec and why.
    """
    _check_geometry(n_layers, n_kv_heads, head_dim)
    fixed = {_resolve_layer("boundary_layers", i, n_layers) for i in recipe.boundary_layers}
    # with boundary_top, any layer may turn out to be a boundary layer: check both choices
    choices = [fixed, set(range(n_layers))] if recipe.boundary_top else [fixed]
    users: dict[str, tuple[StreamRecipe, str, set[int]]] = {}
    for boundary in choices:
        for layer, pair in enumerate(_layer_streams(recipe, n_layers, boundary)[0]):
            for stream, sr in zip(("k", "v"), pair):
                key = json.dumps([stream, sr.to_dict()], sort_keys=True, default=str)
                users.setdefault(key, (sr, stream, set()))[2].add(layer)
    zeros = layouts.LAYOUTS[recipe.layout].to_rows(torch.zeros(1, n_kv_heads, recipe.chunk_tokens, head_dim),
                                                   recipe.chunk_tokens)
    for sr, stream, used in users.values():
        cls = codecs.codec_class(sr.codec)
        if cls.needs_calibration:
            continue
        try:
            codec = cls(cls.config_class.from_dict(sr.config))
            codec.decode(codec.encode(zeros))
        except (ConfigError, ShapeError) as exc:
            raise ConfigError(f"recipe {recipe.name!r} cannot serve layer(s) {sorted(used)} of this model "
                              f"(n_kv_heads={n_kv_heads}, head_dim={head_dim}, {recipe.layout} layout): "
                              f"{stream.upper()} stream, codec {sr.codec!r}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class LayerStreams:
    """What a recipe gives one layer, before any codec is built.

    Attributes:
        layer: layer index.
        k, v: the K and V stream recipes (boundary and override streams substituted, sensitivity
            budgets filled in).
        whitening: the K whitening (None: not whitened).
        whitening_skipped: why the calibration skipped this layer's whitening, if it did.
        k_space: what the K codec is fed: the whitening mode, ``"none"`` (pre-RoPE keys) or
            ``"post_rope"``.
        group: the layers coded together with this one, itself included (``(layer,)``: alone).
    """

    layer: int
    k: StreamRecipe
    v: StreamRecipe
    whitening: Whitening | None
    whitening_skipped: str | None
    k_space: str
    group: LayerGroup

    def coded(self) -> tuple[tuple[str, StreamRecipe, str], tuple[str, StreamRecipe, str]]:
        """``(stream, stream recipe, space its codec is fed)`` of K and of V."""
        return ("k", self.k, self.k_space), ("v", self.v, "none")


def layer_streams(recipe: Recipe, n_layers: int, n_kv_heads: int, head_dim: int,
                  calibration: CalibrationLike | None = None,
                  layer_types: Sequence[str] | None = None) -> list[LayerStreams]:
    """What ``recipe`` gives each decoder layer (:class:`LayerStreams`), as :func:`build_plans` builds it.

    Boundary layers (``boundary_layers`` plus the calibration's top ``boundary_top``) use
    ``boundary_k``/``boundary_v``; ``layer_overrides`` then replace streams per layer. The remaining
    layers are cut into cross-layer groups of ``recipe.layer_group`` per type of ``layer_types`` (None:
    one type; :func:`kakeyaturbo.groups.form`). With ``layer_bits="sensitivity"`` they get the budgets of
    :func:`sensitivity_budgets`, one per group and stream.

    Raises:
        ConfigError: bad sizes, out-of-range layers, or a recipe that needs calibration (whitening,
            ``boundary_top``, sensitivity budgets) without one.
    """
    _check_geometry(n_layers, n_kv_heads, head_dim)
    streams, shared = _layer_streams(recipe, n_layers, _boundary(recipe, n_layers, calibration))
    types = ["full"] * n_layers if layer_types is None else list(layer_types)
    if len(types) != n_layers:
        raise ConfigError(f"layer_types names {len(types)} layers, the model has {n_layers}")
    units = groups.form(shared, types, recipe.layer_group)
    group_of = {layer: unit for unit in units for layer in unit}
    budgets = sensitivity_budgets(recipe, units, calibration) if recipe.layer_bits == "sensitivity" else {}
    weights = member_weights(recipe, units, budgets, n_kv_heads, calibration) \
        if recipe.member_weights == "sensitivity" else {}
    out = []
    for layer, (k_sr, v_sr) in enumerate(streams):
        k_sr, v_sr = (_resolved(sr, budgets.get((layer, stream)), weights.get((layer, stream)))
                      for sr, stream in ((k_sr, "k"), (v_sr, "v")))
        whitening, skipped = (None, None) if k_sr.whiten == "none" else _whitening(
            layer, n_kv_heads, head_dim, calibration, recipe, k_sr.whiten)
        space = k_sr.whiten if whitening is not None else "none" if recipe.pre_rope_keys else "post_rope"
        out.append(LayerStreams(layer, k_sr, v_sr, whitening, skipped, space, group_of.get(layer, (layer,))))
    return out


def _resolved(sr: StreamRecipe, bits: float | None, head_weights: list[float] | None) -> StreamRecipe:
    """``sr`` with its budget and head weights filled in (None: left as the recipe gives them)."""
    fields = {name: v for name, v in (("bits", bits), ("head_weights", head_weights)) if v is not None}
    return dataclasses.replace(sr, config={**sr.config, **fields}) if fields else sr


@dataclasses.dataclass(frozen=True)
class CalibratedCodec:
    """A codec built from calibrated transforms that a recipe's plans need.

    Attributes:
        codec: the codec name (its class has ``needs_calibration``).
        config: its config fields from the recipe (budget filled in).
        layer, stream: the (layer, K/V stream) it codes (``layer`` a tuple: a cross-layer group's layers).
        space: what it is fed (:attr:`LayerStreams.k_space`; ``"none"`` for V).
        layout: the recipe's engine layout.
    """

    codec: str
    config: Mapping[str, Any]
    layer: int | LayerGroup
    stream: str
    space: str
    layout: str


def _coder(ls: LayerStreams) -> int | LayerGroup | None:
    """What codes layer ``ls``: itself (its index), its cross-layer group (at the group's first layer), or
    None (a later member of a group)."""
    if len(ls.group) == 1:
        return ls.layer
    return ls.group if ls.layer == ls.group[0] else None


def calibrated_codecs(recipe: Recipe, n_layers: int, n_kv_heads: int, head_dim: int,
                      calibration: CalibrationLike | None = None,
                      layer_types: Sequence[str] | None = None) -> list[CalibratedCodec]:
    """Every calibrated codec :func:`build_plans` of ``recipe`` builds, so their transforms can be fitted
    beforehand (in batches); raises as :func:`layer_streams` does."""
    return [CalibratedCodec(sr.codec, sr.config, coder, stream, space, recipe.layout)
            for ls in layer_streams(recipe, n_layers, n_kv_heads, head_dim, calibration, layer_types)
            if (coder := _coder(ls)) is not None
            for stream, sr, space in ls.coded() if codecs.codec_class(sr.codec).needs_calibration]


def build_plans(recipe: Recipe, n_layers: int, n_kv_heads: int, head_dim: int,
                calibration: CalibrationLike | None = None,
                layer_types: Sequence[str] | None = None) -> list[LayerPlan]:
    """One :class:`LayerPlan` per decoder layer, from :func:`layer_streams`.

    A layer is exact when both of its streams are ``identity`` without whitening. The layers of a
    cross-layer group share one group plan (their :attr:`LayerPlan.group`) over their heads side by side.

    Raises:
        ConfigError: bad sizes, out-of-range layers, a codec config its codec rejects, or a recipe
            that needs calibration (whitening, calibrated tables, ``boundary_top``) without one.
    """
    factory = _CodecFactory(recipe, calibration)
    plans = []
    group_plans: dict[LayerGroup, LayerPlan] = {}
    for ls in layer_streams(recipe, n_layers, n_kv_heads, head_dim, calibration, layer_types):
        if len(ls.group) > 1:
            if ls.group not in group_plans:
                group_plans[ls.group] = LayerPlan(
                    ls.group[0], factory.get(ls.k, "k", ls.group, ls.k_space), factory.get(ls.v, "v", ls.group, "none"),
                    None, False, recipe.layout, len(ls.group) * n_kv_heads, head_dim, recipe.chunk_tokens,
                    members=ls.group)
            gp = group_plans[ls.group]
            plans.append(LayerPlan(ls.layer, gp.k_codec, gp.v_codec, None, False, recipe.layout, n_kv_heads, head_dim,
                                   recipe.chunk_tokens, group=gp))
            continue
        k_codec = factory.get(ls.k, "k", ls.layer, ls.k_space)
        whitening = None if k_codec.folds_whitening else ls.whitening  # else the codec's basis already contains it
        plans.append(LayerPlan(ls.layer, k_codec, factory.get(ls.v, "v", ls.layer, "none"), whitening,
                               ls.k.is_exact and ls.v.is_exact, recipe.layout, n_kv_heads, head_dim,
                               recipe.chunk_tokens, ls.whitening_skipped,
                               "none" if ls.k_space == "post_rope" else ls.k_space))
    return plans
