"""Recipes: which codec (and which pre-transforms) every (layer, stream) of a model gets.

A :class:`Recipe` is a frozen, validated dataclass with a JSON round trip. It names codecs by
their registry name and holds their config as a plain dict; the codecs themselves are built
by :func:`kakeyaturbo.engine.build_plans`; their configs are validated when the recipe is made,
so a bad one is reported before any model loads.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from kakeyaturbo.codecs import codec_class
from kakeyaturbo.codecs import names as codec_names
from kakeyaturbo.errors import ConfigError
from kakeyaturbo.layouts import NAMES as LAYOUT_CHOICES
from kakeyaturbo.layouts import LayoutName as Layout

Whiten = Literal["none", "sigma_q", "lag"]
WHITEN_CHOICES: tuple[str, ...] = ("none", "sigma_q", "lag")
CALIBRATED_CODECS: tuple[str, ...] = ("kakeya-v2",)
"""Codecs whose per-model transforms come from the calibration bundle."""
LayerBits = Literal["uniform", "sensitivity"]
LAYER_BITS_CHOICES: tuple[str, ...] = ("uniform", "sensitivity")
MemberWeights = Literal["uniform", "sensitivity"]
MEMBER_WEIGHTS_CHOICES: tuple[str, ...] = ("uniform", "sensitivity")
SENSITIVITY_GRID: tuple[float, ...] = (1.0, 1.25, 1.5, 1.625, 1.75, 1.875, 2.0, 2.125, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0,
                                        5.0, 6.0)
"""Budgets ``layer_bits="sensitivity"`` chooses among by default (any budget can be fitted)."""
PROBE_BUDGETS: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)
"""Budgets the sensitivity probe measures by default (the grid's other costs are interpolated)."""


def _known_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")


@dataclasses.dataclass(frozen=True)
class StreamRecipe:
    """How one stream (K or V) of a layer is stored.

    Attributes:
        codec: registered codec name; ``"identity"`` is exact bf16 storage.
        config: codec config fields (validated here, by the codec's :meth:`~kakeyaturbo.codecs.Codec.check_config`).
        whiten: K pre-transform: ``"none"``, ``"sigma_q"`` (Cholesky of the query covariance) or
            ``"lag"`` (the calibration's lag-aware variant); must be ``"none"`` for V.
        calibrated_table: use the calibration's Lloyd–Max table as the codec's ``codebook``.
    """

    codec: str = "identity"
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    whiten: Whiten = "none"
    calibrated_table: bool = False

    def __post_init__(self) -> None:
        if self.codec not in codec_names():
            raise ConfigError(f"codec must be one of {codec_names()}, got {self.codec!r}")
        if not isinstance(self.config, Mapping) or not all(isinstance(k, str) for k in self.config):
            raise ConfigError(f"config must be a dict with string keys, got {self.config!r}")
        if "codebook" in self.config and self.calibrated_table:
            raise ConfigError("config.codebook and calibrated_table=True are exclusive: pick one table")
        if self.whiten not in WHITEN_CHOICES:
            raise ConfigError(f"whiten must be one of {list(WHITEN_CHOICES)}, got {self.whiten!r}")
        if not isinstance(self.calibrated_table, bool):
            raise ConfigError(f"calibrated_table must be a bool, got {self.calibrated_table!r}")
        try:
            codec_class(self.codec).check_config(self.config)
        except ConfigError as exc:
            raise ConfigError(f"config of codec {self.codec!r}: {exc}") from None
        object.__setattr__(self, "config", dict(self.config))

    @property
    def is_exact(self) -> bool:
        """True when the stream is stored exactly (identity codec, no whitening)."""
        return self.codec == "identity" and self.whiten == "none"

    @property
    def needs_calibration(self) -> bool:
        """True when building this stream needs a calibration bundle."""
        return self.whiten != "none" or self.calibrated_table or self.codec in CALIBRATED_CODECS

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict."""
        return {"codec": self.codec, "config": dict(self.config), "whiten": self.whiten,
                "calibrated_table": self.calibrated_table}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "stream") -> StreamRecipe:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` naming ``where``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be an object, got {data!r}")
        _known_keys(cls, data, where)
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


EXACT = StreamRecipe()


def _check_budgets(name: str, value: Any, least: int) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name} must be a list of bit budgets, got {value!r}")
    out = tuple(value)
    if (len(out) < least or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 8 for b in out)
            or list(out) != sorted(set(out))):
        raise ConfigError(f"{name} must be {least} or more increasing budgets in (0, 8], got {list(out)}")
    return tuple(float(b) for b in out)


@dataclasses.dataclass(frozen=True)
class SensitivityProbe:
    """How ``layer_bits="sensitivity"`` measures what coding each (layer, stream) costs.

    Each (layer, stream) is coded alone at each of ``budgets`` (``kakeya-v2``, everything else exact)
    on ``windows`` calibration windows (``ctx`` prefix tokens, then ``n_eval`` teacher-forced tokens
    scored, float32 model) and the KL it causes is measured; costs at the other budgets of ``grid``
    are interpolated in log KL. The result is memoised in the calibration bundle under a hash of
    everything here, the recipe's sink and chunk tokens and the bundle's statistics.

    Attributes:
        config: ``kakeya-v2`` config fields the probe codes with (``bits`` set per budget); None:
            the recipe's own K and V configs.
        layout: the probe's engine layout; None: the recipe's.
        sink_tokens: leading tokens the probe keeps exact; None: the recipe's.
        budgets: probed budgets (two or more).
        grid: budgets the allocator chooses among.
        windows, ctx, n_eval: calibration windows scored, prefix and scored tokens of each.
    """

    config: Mapping[str, Any] | None = None
    layout: Layout | None = None
    sink_tokens: int | None = None
    budgets: tuple[float, ...] = PROBE_BUDGETS
    grid: tuple[float, ...] = SENSITIVITY_GRID
    windows: int = 6
    ctx: int = 448
    n_eval: int = 64

    def __post_init__(self) -> None:
        if self.config is not None:
            if not isinstance(self.config, Mapping) or not all(isinstance(k, str) for k in self.config):
                raise ConfigError(f"probe.config must be a dict with string keys or null, got {self.config!r}")
            if "bits" in self.config:
                raise ConfigError("probe.config must not set bits: the probe sets them to each of probe.budgets")
            object.__setattr__(self, "config", dict(self.config))
        if self.layout is not None and self.layout not in LAYOUT_CHOICES:
            raise ConfigError(f"probe.layout must be null or one of {list(LAYOUT_CHOICES)}, got {self.layout!r}")
        if self.sink_tokens is not None:
            _check_nonneg("probe.sink_tokens", self.sink_tokens)
        object.__setattr__(self, "budgets", _check_budgets("probe.budgets", self.budgets, 2))
        object.__setattr__(self, "grid", _check_budgets("probe.grid", self.grid, 1))
        for name in ("windows", "ctx", "n_eval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "n_eval" else 1):
                raise ConfigError(f"probe.{name} must be an integer >= {2 if name == 'n_eval' else 1}, got {value!r}")

    def check_mean(self, mean: float) -> None:
        """Refuse spreading ``mean`` bits per element on average over :attr:`grid` when every budget
        of the grid is dearer (no allocation could spend so little).

        Raises:
            ConfigError: ``mean`` is below the smallest budget of the grid.
        """
        if mean < min(self.grid):
            raise ConfigError(f"layer_bits='sensitivity' spreads {mean:g} bits per element on average over "
                              f"the probe's budgets, the smallest of which is {min(self.grid):g}: use "
                              f"layer_bits='uniform' (name token 'uniform') or a probe grid reaching down to "
                              f"{mean:g}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict."""
        return {"config": None if self.config is None else dict(self.config), "layout": self.layout,
                "sink_tokens": self.sink_tokens, "budgets": list(self.budgets), "grid": list(self.grid),
                "windows": self.windows, "ctx": self.ctx, "n_eval": self.n_eval}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityProbe:
        """Inverse of :meth:`to_dict`; omitted fields take their defaults, unknown ones raise."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"probe must be an object, got {data!r}")
        _known_keys(cls, data, "probe")
        return cls(**data)


def _check_layer_list(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name} must be a list of layer indices, got {value!r}")
    out = tuple(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in out):
        raise ConfigError(f"{name} must hold integers (negative counts from the last layer), got {list(out)}")
    return out


def _check_nonneg(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A full compression recipe.

    Attributes:
        name: the name users type.
        k, v: the default stream recipes.
        pre_rope_keys: store keys before RoPE (the cache inverts RoPE, the codec sees pre-RoPE K).
        boundary_layers: layers that use ``boundary_k``/``boundary_v`` (negative counts from the end).
        boundary_top: also protect the top-n layers of the calibration's sensitivity ranking.
        boundary_k, boundary_v: what boundary layers use (exact bf16 by default).
        sink_tokens: the first tokens of every sequence kept exact.
        chunk_tokens: the cache encodes tokens in chunks of this many (block codecs: their block_size).
        layout: how the engine cuts K and V into codec rows, one of :data:`kakeyaturbo.layouts.NAMES`
            (``"head"``, ``"token_major"``, ``"joint"``: a token's KV heads side by side, so a calibrated
            transform can use the heads' correlation).
        layer_overrides: ``{layer: {"k": {...}, "v": {...}}}`` stream recipes replacing the defaults.
        layer_bits: ``"uniform"``: every layer codes K at ``k.config.bits`` and V at
            ``v.config.bits``. ``"sensitivity"`` (``kakeya-v2`` K and V only): the layers that use the
            defaults share the same total bits, spread over (layer, stream) by the calibration's
            measured KL of each one at each budget (the K/V split is chosen too).
        probe: how ``layer_bits="sensitivity"`` measures those costs (:class:`SensitivityProbe`).
        layer_group: layers coded together by one cross-layer transform (:mod:`kakeyaturbo.groups`): 1
            codes each layer alone; ``G > 1`` (``kakeya-v2`` K and V in the joint layout, keys not whitened)
            cuts the layers the shared streams serve into groups of ``G`` per layer type.
        member_weights: ``"uniform"``: a group's fit and codec treat its members alike;
            ``"sensitivity"`` (``layer_group > 1``): each member's heads are weighted by the square root of
            the KL the sensitivity probe measured for it at the group's budget, relative to the group's
            geometric mean, so the group's basis and bits favour its sensitive members
            (:func:`kakeyaturbo.engine.member_weights`).
        description: free text.
    """

    name: str
    k: StreamRecipe = EXACT
    v: StreamRecipe = EXACT
    pre_rope_keys: bool = True
    boundary_layers: tuple[int, ...] = ()
    boundary_top: int = 0
    boundary_k: StreamRecipe = EXACT
    boundary_v: StreamRecipe = EXACT
    sink_tokens: int = 0
    chunk_tokens: int = 64
    layout: Layout = "head"
    layer_overrides: Mapping[int, Mapping[str, StreamRecipe]] = dataclasses.field(default_factory=dict)
    layer_bits: LayerBits = "uniform"
    probe: SensitivityProbe = dataclasses.field(default_factory=lambda: SensitivityProbe())
    layer_group: int = 1
    member_weights: MemberWeights = "uniform"
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"name must be a non-empty string, got {self.name!r}")
        for field in ("k", "v", "boundary_k", "boundary_v"):
            if not isinstance(getattr(self, field), StreamRecipe):
                raise ConfigError(f"{field} must be a StreamRecipe, got {getattr(self, field)!r}")
        for field in ("v", "boundary_v"):
            if getattr(self, field).whiten != "none":
                raise ConfigError(f"{field}.whiten must be 'none': whitening applies to keys only")
        if not isinstance(self.pre_rope_keys, bool):
            raise ConfigError(f"pre_rope_keys must be a bool, got {self.pre_rope_keys!r}")
        layers = _check_layer_list("boundary_layers", self.boundary_layers)
        object.__setattr__(self, "boundary_layers", layers)
        _check_nonneg("boundary_top", self.boundary_top)
        _check_nonneg("sink_tokens", self.sink_tokens)
        _check_nonneg("chunk_tokens", self.chunk_tokens)
        if self.chunk_tokens == 0:
            raise ConfigError("chunk_tokens must be an integer >= 1, got 0")
        if self.layout not in LAYOUT_CHOICES:
            raise ConfigError(f"layout must be one of {list(LAYOUT_CHOICES)}, got {self.layout!r}")
        if self.layer_bits not in LAYER_BITS_CHOICES:
            raise ConfigError(f"layer_bits must be one of {list(LAYER_BITS_CHOICES)}, got {self.layer_bits!r}")
        if self.layer_bits == "sensitivity":
            for name, sr in (("k", self.k), ("v", self.v)):
                bits = sr.config.get("bits")
                if sr.codec not in CALIBRATED_CODECS or isinstance(bits, bool) or not isinstance(bits, (int, float)):
                    raise ConfigError(f"layer_bits='sensitivity' spreads the budgets of calibrated codecs "
                                      f"{list(CALIBRATED_CODECS)}; {name} is {sr.codec!r} with bits={bits!r}")
        if not isinstance(self.probe, SensitivityProbe):
            raise ConfigError(f"probe must be a SensitivityProbe, got {self.probe!r}")
        if self.layer_bits == "sensitivity":
            self.probe.check_mean((float(self.k.config["bits"]) + float(self.v.config["bits"])) / 2)
        self._check_layer_group()
        if not isinstance(self.description, str):
            raise ConfigError(f"description must be a string, got {self.description!r}")
        object.__setattr__(self, "layer_overrides", self._normalise_overrides(self.layer_overrides))

    def _check_layer_group(self) -> None:
        g = self.layer_group
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ConfigError(f"layer_group must be an integer >= 1, got {g!r}")
        if self.member_weights not in MEMBER_WEIGHTS_CHOICES:
            raise ConfigError(f"member_weights must be one of {list(MEMBER_WEIGHTS_CHOICES)}, got "
                              f"{self.member_weights!r}")
        if g == 1:
            if self.member_weights != "uniform":
                raise ConfigError("member_weights='sensitivity' weights the members of cross-layer groups: it needs "
                                  "layer_group > 1")
            return
        if self.layout != "joint":
            raise ConfigError(f"layer_group={g} codes the joint rows of several layers: it needs layout 'joint', "
                              f"got {self.layout!r}")
        for name, sr in (("k", self.k), ("v", self.v)):
            if sr.codec not in CALIBRATED_CODECS or sr.whiten != "none":
                raise ConfigError(f"layer_group={g} is built for calibrated {list(CALIBRATED_CODECS)} streams with "
                                  f"keys not whitened; {name} is {sr.codec!r} (whiten {sr.whiten!r})")

    @staticmethod
    def _normalise_overrides(raw: Any) -> dict[int, dict[str, StreamRecipe]]:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"layer_overrides must map layer -> {{'k': ..., 'v': ...}}, got {raw!r}")
        out: dict[int, dict[str, StreamRecipe]] = {}
        for key, streams in raw.items():
            try:
                layer = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"layer_overrides key {key!r} is not a layer index") from None
            if not isinstance(streams, Mapping) or not streams or set(streams) - {"k", "v"}:
                raise ConfigError(f"layer_overrides[{layer}] must map 'k' and/or 'v' to stream recipes")
            parsed: dict[str, StreamRecipe] = {}
            for stream, sr in streams.items():
                where = f"layer_overrides[{layer}].{stream}"
                parsed[stream] = sr if isinstance(sr, StreamRecipe) else StreamRecipe.from_dict(sr, where)
                if stream == "v" and parsed[stream].whiten != "none":
                    raise ConfigError(f"{where}.whiten must be 'none': whitening applies to keys only")
            out[layer] = parsed
        return out

    @property
    def needs_calibration(self) -> bool:
        """True when some stream needs a calibration bundle (or boundary layers come from its ranking)."""
        return (self.boundary_top > 0 or self.layer_bits != "uniform" or self.member_weights != "uniform"
                or any(sr.needs_calibration for sr in self.streams))

    @property
    def streams(self) -> list[StreamRecipe]:
        """Every stream recipe this recipe can use."""
        extra = [sr for streams in self.layer_overrides.values() for sr in streams.values()]
        return [self.k, self.v, self.boundary_k, self.boundary_v, *extra]

    def sensitivity_setup(self) -> dict[str, Any]:
        """What the sensitivity probe of this recipe measures, resolved (its memo key): per stream the
        stream recipe (``bits`` left out) a layer is coded with, the layout, exact sink tokens, chunk
        size, key storage, probed budgets and calibration windows (:class:`SensitivityProbe`)."""
        p = self.probe

        def coded(sr: StreamRecipe) -> dict[str, Any]:
            own = p.config is None
            config = {k: v for k, v in sr.config.items() if k != "bits"} if own else dict(p.config)
            return {"codec": CALIBRATED_CODECS[0], "config": config, "whiten": sr.whiten if own else "none",
                    "calibrated_table": False}

        return {"k": coded(self.k), "v": coded(self.v), "layout": p.layout or self.layout,
                "sink_tokens": self.sink_tokens if p.sink_tokens is None else p.sink_tokens,
                "chunk_tokens": self.chunk_tokens, "pre_rope_keys": self.pre_rope_keys,
                "budgets": list(p.budgets), "windows": p.windows, "ctx": p.ctx, "n_eval": p.n_eval}

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (layer override keys become strings in JSON; ``member_weights`` only when
        set, so the dicts of recipes written before it existed stay the same)."""
        return {
            "name": self.name,
            "description": self.description,
            "k": self.k.to_dict(),
            "v": self.v.to_dict(),
            "pre_rope_keys": self.pre_rope_keys,
            "boundary_layers": list(self.boundary_layers),
            "boundary_top": self.boundary_top,
            "boundary_k": self.boundary_k.to_dict(),
            "boundary_v": self.boundary_v.to_dict(),
            "sink_tokens": self.sink_tokens,
            "chunk_tokens": self.chunk_tokens,
            "layout": self.layout,
            "layer_overrides": {str(layer): {s: sr.to_dict() for s, sr in streams.items()}
                                for layer, streams in sorted(self.layer_overrides.items())},
            "layer_bits": self.layer_bits,
            "probe": self.probe.to_dict(),
            "layer_group": self.layer_group,
            **({"member_weights": self.member_weights} if self.member_weights != "uniform" else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`; omitted fields take their defaults, unknown ones raise."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a recipe must be a JSON object, got {type(data).__name__}")
        _known_keys(cls, data, "recipe")
        if "name" not in data:
            raise ConfigError("recipe: the field 'name' is missing")
        kwargs = dict(data)
        for field in ("k", "v", "boundary_k", "boundary_v"):
            if field in kwargs:
                kwargs[field] = StreamRecipe.from_dict(kwargs[field], field)
        if "probe" in kwargs:
            kwargs["probe"] = SensitivityProbe.from_dict(kwargs["probe"])
        return cls(**kwargs)

    def to_json(self) -> str:
        """Pretty JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the recipe as JSON to ``path``."""
        Path(path).write_text(self.to_json())

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "recipe") -> Recipe:
        """Parse JSON text (or UTF-8 bytes); text that is not UTF-8, not JSON, nested deeper than
        Python's parser goes, or not a valid recipe raises :class:`ConfigError` naming ``source``."""
        try:
            text = text.decode() if isinstance(text, bytes) else text
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: not UTF-8 text ({exc})") from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"{source}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
