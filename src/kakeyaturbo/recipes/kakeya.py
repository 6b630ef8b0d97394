"""The ``kakeya-v2`` recipe family as one validated config, with readable generated names.

:class:`KakeyaConfig` holds every design choice of a KakeyaTurbo v2 recipe (K and V coded by
``kakeya-v2``); its defaults are the shipped design. :meth:`KakeyaConfig.to_recipe` builds the
:class:`~kakeyaturbo.recipes.recipe.Recipe`, :attr:`KakeyaConfig.name` names it with one token per
field that departs from the defaults, in a fixed order, and :meth:`KakeyaConfig.from_name` reads such
a name back::

    kakeya-2.5b                          the shipped design at 2.5 bits/elem
    kakeya-k3-v2.5b-uniform              K 3, V 2.5 bits, every layer at those budgets
    kakeya-2.625b-probe-head             2.625 bits, sensitivities measured by the per-head probe
    kakeya-3b-head-gain0-refl0-fixed     per-head transforms, no head gains, int8 basis, fixed widths

Tokens, in their order (each only when its field departs from the default):

============================  ==========================================================
``{b}b`` / ``k{b}-v{vb}b``    ``bits`` (and ``v_bits``)
``head``                      ``layout="head"``
``group{n}``                  ``layer_group`` (cross-layer transforms over ``n`` layers)
``weighted``                  ``member_weights="sensitivity"`` (a group's members weighted by sensitivity)
``gain{n}`` / ``vgain{n}``    ``head_gain_bits`` / ``v_head_gain_bits``
``refl{n}``                   ``reflector_bits``
``fixed`` / ``entropy``       ``coding``
``uniform``                   ``layer_bits="uniform"``
``sink{n}`` / ``chunk{n}``    ``sink_tokens`` / ``chunk_tokens``
``post-rope`` / ``sigma-q``   ``key_space`` (also ``lag``)
``no-kmean`` / ``vmean``      ``center=False`` / ``value_center=True``
``scale{n}``                  ``scale_bits``
``no-rotation``               ``rotate_groups=False``
``alloc-uniform``             ``allocation="uniform"``
``tables-fitted|gaussian``    ``fitted_tables=True`` / ``False``
``probe-head[-sink{n}]``      ``probe``: :data:`HEAD_PROBE` (with its own ``sink_tokens``)
============================  ==========================================================

Numbers are written with ``:g`` (positional digits where ``:g`` would not read back exactly). Only
two probes besides the default one have a token: :data:`HEAD_PROBE` (the per-head default-fit probe
the shipped presets' figures were measured with) and that probe with its own sink tokens; a config
with any other probe has no name (:attr:`KakeyaConfig.name` raises, :meth:`KakeyaConfig.to_recipe`
needs an explicit name).

:data:`PRESETS` are the shipped recipes (``kakeya-quality``, ``kakeya-balanced``, ``kakeya-max``,
``kakeya-extreme``): a config and the description their recipe carries.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, NamedTuple

import numpy as np

from kakeyaturbo.codecs.kakeya_v2 import ALLOCATIONS, CODINGS, LAYOUTS, KakeyaV2Config
from kakeyaturbo.errors import ConfigError
from kakeyaturbo.recipes.recipe import (
    LAYER_BITS_CHOICES,
    MEMBER_WEIGHTS_CHOICES,
    Recipe,
    SensitivityProbe,
    StreamRecipe,
)

CODEC = "kakeya-v2"
PREFIX = "kakeya-"
HEAD_PROBE = SensitivityProbe(config={}, layout="head")
"""The per-head probe with the codec's default fit options (token ``probe-head``)."""
KEY_SPACES: dict[str, tuple[bool, str]] = {
    "pre_rope": (True, "none"), "post_rope": (False, "none"), "sigma_q": (True, "sigma_q"), "lag": (True, "lag"),
}
"""``key_space`` -> (``Recipe.pre_rope_keys``, ``StreamRecipe.whiten`` of K)."""
_CHOICES: dict[str, tuple[Any, ...]] = {
    "layout": LAYOUTS, "coding": CODINGS, "layer_bits": LAYER_BITS_CHOICES, "key_space": tuple(KEY_SPACES),
    "allocation": ALLOCATIONS, "member_weights": MEMBER_WEIGHTS_CHOICES,
}
_RANGES: dict[str, tuple[int, int | None]] = {
    "head_gain_bits": (0, 8), "v_head_gain_bits": (0, 8), "reflector_bits": (0, 8), "scale_bits": (0, 8),
    "sink_tokens": (0, None), "chunk_tokens": (1, None), "layer_group": (1, None),
}


def _num(x: float) -> str:
    """``x`` written with ``:g``, or in positional digits where ``:g`` would not read back exactly."""
    s = f"{x:g}"
    return s if float(s) == x and "e" not in s else np.format_float_positional(x, trim="-")


@dataclasses.dataclass(frozen=True)
class KakeyaConfig:
    """A KakeyaTurbo v2 recipe: K and V coded by ``kakeya-v2``; the defaults are the shipped design.

    Attributes:
        bits: average bits per element of K and V (of K when ``v_bits`` is set), in (0, 8]; with
            ``layer_bits="sensitivity"`` the budget every (layer, stream) shares.
        v_bits: V's budget when it differs from ``bits`` (None: the same; equal to ``bits``: None).
        layout: ``"joint"`` (the KV heads of a token of a layer coded as one vector, one transform
            per layer) or ``"head"`` (one transform per KV head).
        layer_group: layers one joint transform spans (:mod:`kakeyaturbo.groups`; > 1 needs the joint
            layout and keys not whitened).
        member_weights: ``"sensitivity"`` weights each member of a group by its measured sensitivity in
            the group's fit and codec (``Recipe.member_weights``; needs ``layer_group > 1``), or ``"uniform"``.
        head_gain_bits: bits of each KV head's log-gain code before a joint transform, 0..8 (0: none).
        v_head_gain_bits: V's ``head_gain_bits`` when it differs (None: the same; equal: None).
        reflector_bits: 0 stores the basis int8; 2..8 stores it as Householder reflectors of at
            least this many bits (orthogonal bases only, so only for ``key_space`` ``pre_rope`` or
            ``post_rope``).
        coding: ``"fixed"`` widths, ``"entropy"`` coded, or ``"auto"`` (entropy from 2.125 bits).
        layer_bits: ``"sensitivity"`` (budgets spread over (layer, stream) by the calibration's
            measured KL) or ``"uniform"`` (every layer at ``bits`` / ``v_bits``).
        sink_tokens: leading tokens kept exact.
        chunk_tokens: tokens the cache encodes at a time.
        key_space: what K is coded in: ``"pre_rope"``, ``"post_rope"``, or pre-RoPE keys whitened
            with the query covariance (``"sigma_q"``) or its lag-aware variant (``"lag"``).
        center: subtract a static mean from K.
        value_center: subtract a static mean from V.
        scale_bits: bits of the per-vector log-gain code, 0..8.
        rotate_groups: mix a seeded rotation into each group of equal-bit components.
        allocation: ``"waterfill"`` or ``"uniform"`` bits over the components.
        fitted_tables: Lloyd-Max tables fitted to the coefficients (True), N(0,1) tables (False),
            or the codec's default, unstated in the recipe (None).
        probe: how ``layer_bits="sensitivity"`` measures its costs.
    """

    bits: float = 2.5
    v_bits: float | None = None
    layout: Literal["head", "joint"] = "joint"
    layer_group: int = 1
    member_weights: Literal["uniform", "sensitivity"] = "uniform"
    head_gain_bits: int = 4
    v_head_gain_bits: int | None = None
    reflector_bits: int = 4
    coding: Literal["fixed", "entropy", "auto"] = "auto"
    layer_bits: Literal["uniform", "sensitivity"] = "sensitivity"
    sink_tokens: int = 2
    chunk_tokens: int = 64
    key_space: Literal["pre_rope", "post_rope", "sigma_q", "lag"] = "pre_rope"
    center: bool = True
    value_center: bool = False
    scale_bits: int = 8
    rotate_groups: bool = True
    allocation: Literal["waterfill", "uniform"] = "waterfill"
    fitted_tables: bool | None = None
    probe: SensitivityProbe = SensitivityProbe()

    def __post_init__(self) -> None:
        for name in ("bits", "v_bits"):
            value = getattr(self, name)
            if value is None and name == "v_bits":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 8:
                raise ConfigError(f"{name} must be a number in (0, 8]{' or null' if name == 'v_bits' else ''}, "
                                  f"got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.v_bits == self.bits:
            object.__setattr__(self, "v_bits", None)
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name, (lo, hi) in _RANGES.items():
            value = getattr(self, name)
            if value is None and name == "v_head_gain_bits":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
                raise ConfigError(f"{name} must be an integer in {lo}..{'' if hi is None else hi}, got {value!r}")
        if self.v_head_gain_bits == self.head_gain_bits:
            object.__setattr__(self, "v_head_gain_bits", None)
        for name in ("center", "value_center", "rotate_groups"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.fitted_tables is not None and not isinstance(self.fitted_tables, bool):
            raise ConfigError(f"fitted_tables must be true, false or null, got {self.fitted_tables!r}")
        if self.reflector_bits and KEY_SPACES[self.key_space][1] != "none":
            raise ConfigError(f"reflector_bits must be 0 with key_space={self.key_space!r}: a whitened basis is not "
                              f"orthogonal, reflectors store orthogonal bases only; got {self.reflector_bits}")
        if not isinstance(self.probe, SensitivityProbe):
            raise ConfigError(f"probe must be a SensitivityProbe, got {self.probe!r}")
        if self.layer_bits == "sensitivity":
            self.probe.check_mean((self.bits + (self.bits if self.v_bits is None else self.v_bits)) / 2)
        if self.layer_group > 1 and (self.layout != "joint" or KEY_SPACES[self.key_space][1] != "none"):
            raise ConfigError(f"layer_group={self.layer_group} needs layout 'joint' and key_space 'pre_rope' or "
                              f"'post_rope', got {self.layout!r}, {self.key_space!r}")
        if self.member_weights != "uniform" and self.layer_group == 1:
            raise ConfigError("member_weights='sensitivity' (token 'weighted') weights the members of cross-layer "
                              "groups: it needs layer_group > 1 (token 'group<n>')")
        for stream in ("k", "v"):
            KakeyaV2Config(stream=stream, **self.codec_config(stream))

    def codec_config(self, stream: Literal["k", "v"]) -> dict[str, Any]:
        """``kakeya-v2`` config of K or V: ``bits`` and the fields that depart from the codec's defaults."""
        v = stream == "v"
        out: dict[str, Any] = {"bits": self.v_bits if v and self.v_bits is not None else self.bits}
        if self.coding != "fixed":
            out["coding"] = self.coding
        gain = self.v_head_gain_bits if v and self.v_head_gain_bits is not None else self.head_gain_bits
        if gain:
            out["head_gain_bits"] = gain
        if self.reflector_bits:
            out["reflector_bits"] = self.reflector_bits
        if (self.value_center if v else self.center) != (not v):
            out["center"] = self.value_center if v else self.center
        if self.scale_bits != 8:
            out["scale_bits"] = self.scale_bits
        if not self.rotate_groups:
            out["rotate_groups"] = False
        if self.allocation != "waterfill":
            out["allocation"] = self.allocation
        if self.fitted_tables is not None:
            out["fitted_tables"] = self.fitted_tables
        return out

    def to_recipe(self, name: str | None = None, description: str = "") -> Recipe:
        """The recipe: K and V ``kakeya-v2`` with :meth:`codec_config`, the engine fields from this config.

        Args:
            name: the recipe's name; None: :attr:`name`.
            description: the recipe's description; "": :meth:`describe`.
        """
        pre_rope, whiten = KEY_SPACES[self.key_space]
        return Recipe(
            name=self.name if name is None else name,
            description=description or self.describe(),
            k=StreamRecipe(CODEC, self.codec_config("k"), whiten=whiten),
            v=StreamRecipe(CODEC, self.codec_config("v")),
            pre_rope_keys=pre_rope,
            sink_tokens=self.sink_tokens,
            chunk_tokens=self.chunk_tokens,
            layout=self.layout,
            layer_bits=self.layer_bits,
            probe=self.probe,
            layer_group=self.layer_group,
            member_weights=self.member_weights,
        )

    def _tokens(self) -> list[tuple[str, str]]:
        """(name token, description phrase) of every field that departs from the defaults, in name order."""
        d = _DEFAULT
        out: list[tuple[str, str]] = []
        if self.layout != d.layout:
            out.append(("head", "one transform per KV head"))
        if self.layer_group != d.layer_group:
            out.append((f"group{self.layer_group}", f"one transform per {self.layer_group} layers"))
        if self.member_weights != d.member_weights:
            out.append(("weighted", "a group's members weighted by their measured sensitivity"))
        if self.head_gain_bits != d.head_gain_bits:
            out.append((f"gain{self.head_gain_bits}", _gains(self.head_gain_bits)))
        if self.v_head_gain_bits is not None:
            out.append((f"vgain{self.v_head_gain_bits}", "V: " + _gains(self.v_head_gain_bits)))
        if self.reflector_bits != d.reflector_bits:
            out.append((f"refl{self.reflector_bits}", "int8 basis" if not self.reflector_bits
                        else f"{self.reflector_bits}-bit reflectors"))
        if self.coding != d.coding:
            out.append((self.coding, f"{self.coding} coding"))
        if self.layer_bits != d.layer_bits:
            out.append(("uniform", "the same budget for every layer"))
        if self.sink_tokens != d.sink_tokens:
            out.append((f"sink{self.sink_tokens}", f"first {self.sink_tokens} token(s) exact"))
        if self.chunk_tokens != d.chunk_tokens:
            out.append((f"chunk{self.chunk_tokens}", f"chunks of {self.chunk_tokens} tokens"))
        if self.key_space != d.key_space:
            out.append((self.key_space.replace("_", "-"), {"post_rope": "keys coded after RoPE",
                                                           "sigma_q": "keys whitened with the query covariance",
                                                           "lag": "keys whitened lag-aware"}[self.key_space]))
        if not self.center:
            out.append(("no-kmean", "keys without the static mean"))
        if self.value_center:
            out.append(("vmean", "values with a static mean"))
        if self.scale_bits != d.scale_bits:
            out.append((f"scale{self.scale_bits}", f"{self.scale_bits}-bit per-vector gain"))
        if not self.rotate_groups:
            out.append(("no-rotation", "no rotation in the equal-bit groups"))
        if self.allocation != d.allocation:
            out.append(("alloc-uniform", "the same bits for every component"))
        if self.fitted_tables is not None:
            out.append((f"tables-{'fitted' if self.fitted_tables else 'gaussian'}",
                        "fitted Lloyd-Max tables" if self.fitted_tables else "N(0,1) Lloyd-Max tables"))
        if self.probe != d.probe:
            sink = self.probe.sink_tokens
            if dataclasses.replace(self.probe, sink_tokens=None) != HEAD_PROBE:
                raise ConfigError(f"this config's probe has no name token (only the default probe and the per-head "
                                  f"probe {HEAD_PROBE} with optional sink_tokens do): {self.probe}; pass a name to "
                                  f"to_recipe")
            phrase = "sensitivities from the per-head probe" + ("" if sink is None else f" with {sink} sink token(s)")
            out.append(("probe-head" + ("" if sink is None else f"-sink{sink}"), phrase))
        return out

    @property
    def name(self) -> str:
        """Generated name: ``kakeya-`` + the budget + one token per departure from the defaults (module doc).

        Raises:
            ConfigError: the probe has no name token.
        """
        budget = f"{_num(self.bits)}b" if self.v_bits is None else f"k{_num(self.bits)}-v{_num(self.v_bits)}b"
        return "-".join([PREFIX + budget, *(token for token, _ in self._tokens())])

    def describe(self) -> str:
        """One line: the budget and how this config departs from the shipped design."""
        budget = (f"{_num(self.bits)} bits/elem" if self.v_bits is None
                  else f"K {_num(self.bits)}, V {_num(self.v_bits)} bits/elem")
        try:
            changes = [phrase for _, phrase in self._tokens()]
        except ConfigError:
            changes = [f"probe {self.probe}"]
        return f"KakeyaTurbo v2, {budget}" + (f"; unlike the shipped design: {', '.join(changes)}" if changes
                                               else ", the shipped design") + "."

    @classmethod
    def from_name(cls, name: str) -> KakeyaConfig:
        """Parse a name :attr:`name` generated.

        Raises:
            ConfigError: ``name`` is not a generated name (saying where it stops parsing), or its config is invalid.
        """
        m = _NAME.fullmatch(name) if isinstance(name, str) else None
        if m is None:
            raise ConfigError(f"{name!r} is not a generated kakeya name: expected 'kakeya-<bits>b' or "
                              f"'kakeya-k<bits>-v<bits>b', then tokens in this order, each at most once: "
                              f"{_TOKEN_HELP}; e.g. 'kakeya-2.5b', 'kakeya-k3-v2.5b-head-uniform'")
        g = m.groupdict()
        kw: dict[str, Any] = {}
        if g["bits"] is not None:
            kw["bits"] = float(g["bits"])
        else:
            kw["bits"], kw["v_bits"] = float(g["kbits"]), float(g["vbits"])
        for key, field in (("gain", "head_gain_bits"), ("vgain", "v_head_gain_bits"), ("refl", "reflector_bits"),
                           ("sink", "sink_tokens"), ("chunk", "chunk_tokens"), ("scale", "scale_bits"),
                           ("group", "layer_group")):
            if g[key] is not None:
                kw[field] = int(g[key])
        if g["layout"]:
            kw["layout"] = "head"
        if g["weighted"]:
            kw["member_weights"] = "sensitivity"
        if g["coding"]:
            kw["coding"] = g["coding"]
        if g["layer_bits"]:
            kw["layer_bits"] = "uniform"
        if g["key_space"]:
            kw["key_space"] = g["key_space"].replace("-", "_")
        if g["no_kmean"]:
            kw["center"] = False
        if g["vmean"]:
            kw["value_center"] = True
        if g["no_rotation"]:
            kw["rotate_groups"] = False
        if g["alloc"]:
            kw["allocation"] = "uniform"
        if g["tables"]:
            kw["fitted_tables"] = g["tables"] == "fitted"
        if g["probe"]:
            sink = g["probe_sink"]
            kw["probe"] = HEAD_PROBE if sink is None else dataclasses.replace(HEAD_PROBE, sink_tokens=int(sink))
        config = cls(**kw)
        if config.name != name:
            raise ConfigError(f"{name!r} is not how its config is named: write {config.name!r} (a token repeats a "
                              f"default, or a number is not written with :g)")
        return config


_DEFAULT = KakeyaConfig()


def _gains(bits: int) -> str:
    return f"{bits}-bit head gains" if bits else "no head gains"


_N = r"[0-9]+(?:\.[0-9]+)?"
_I = r"[0-9]+"
_NAME = re.compile(
    rf"kakeya-(?:(?P<bits>{_N})b|k(?P<kbits>{_N})-v(?P<vbits>{_N})b)"
    rf"(?:-(?P<layout>head))?(?:-group(?P<group>{_I}))?(?:-(?P<weighted>weighted))?(?:-gain(?P<gain>{_I}))?(?:-vgain(?P<vgain>{_I}))?(?:-refl(?P<refl>{_I}))?"
    rf"(?:-(?P<coding>fixed|entropy))?(?:-(?P<layer_bits>uniform))?(?:-sink(?P<sink>{_I}))?"
    rf"(?:-chunk(?P<chunk>{_I}))?(?:-(?P<key_space>post-rope|sigma-q|lag))?(?:-(?P<no_kmean>no-kmean))?"
    rf"(?:-(?P<vmean>vmean))?(?:-scale(?P<scale>{_I}))?(?:-(?P<no_rotation>no-rotation))?"
    rf"(?:-(?P<alloc>alloc-uniform))?(?:-tables-(?P<tables>fitted|gaussian))?"
    rf"(?:-(?P<probe>probe-head)(?:-sink(?P<probe_sink>{_I}))?)?"
)
_TOKEN_HELP = ("head, group<n>, weighted, gain<n>, vgain<n>, refl<n>, fixed|entropy, uniform, sink<n>, chunk<n>, "
               "post-rope|sigma-q|lag, no-kmean, vmean, scale<n>, no-rotation, alloc-uniform, tables-fitted|gaussian, "
               "probe-head[-sink<n>]")


class Preset(NamedTuple):
    """A shipped recipe: its config and the description its recipe carries."""

    config: KakeyaConfig
    description: str

    def recipe(self, name: str) -> Recipe:
        """The preset's recipe under ``name``."""
        return self.config.to_recipe(name, self.description)


_DESIGN = (
    "joint-head transforms, all KV heads of a token of a layer coded as one vector with one calibrated orthogonal "
    "basis per (layer, stream), stored as quantised Householder reflectors of 4-8 bits ({mb} MB per model); a 4-bit "
    "log gain per KV head before the basis; each (layer, stream) gets its budget from the calibration's measured "
    "sensitivity; pre-RoPE keys with a static mean, values without; water-filled bits; {coding}; first two tokens "
    "exact."
)
_AUTO = ("layers given 2.125 bits or more entropy-coded (uniform steps, prefix codes in fixed per-vector slots, 8-bit "
         "step code), the others fixed-width with fitted Lloyd-Max tables and an 8-bit log gain")
PRESETS: dict[str, Preset] = {
    "kakeya-quality": Preset(KakeyaConfig(bits=2.625, probe=HEAD_PROBE), (
        "KakeyaTurbo v2, 2.625 bits/elem on average (~5.9x; ACCEPT in snapshot and streaming on 8 and 32 windows at "
        "ctx 1024 and at ctx 2048): " + _DESIGN.format(mb="0.88", coding=_AUTO))),
    "kakeya-balanced": Preset(KakeyaConfig(bits=2.5, probe=HEAD_PROBE), (
        "KakeyaTurbo v2, 2.5 bits/elem on average (~6.2x; ACCEPT in both modes on 8 windows at ctx 1024; MARGINAL "
        "with |dppl| < 1 % on 32 windows and at ctx 2048 in streaming (top-1 94.7 / 94.9 %)): "
        + _DESIGN.format(mb="0.87", coding=_AUTO))),
    "kakeya-max": Preset(KakeyaConfig(bits=1.5, probe=HEAD_PROBE), (
        "KakeyaTurbo v2, 1.5 bits/elem on average (~10.1x; MARGINAL in snapshot and streaming on 8 and 32 windows at "
        "ctx 1024 and at ctx 2048): " + _DESIGN.format(mb="0.76", coding=(
            "fixed-width codes with fitted Lloyd-Max tables and an 8-bit log gain (entropy coding from 2.125 bits, "
            "which this budget's layers mostly stay below)")))),
    "kakeya-extreme": Preset(KakeyaConfig(bits=0.875, layer_group=4, reflector_bits=3, layer_bits="uniform"), (
        "KakeyaTurbo v2 across layers, 0.875 bits/elem (~17.5x; MARGINAL in snapshot and streaming on 8 and 32 "
        "windows at ctx 1024 and at ctx 2048): the layers of each type cut in order into groups of four, all KV heads "
        "of a token of a group coded as one vector with one calibrated orthogonal basis per (group, stream), stored "
        "as quantised Householder reflectors of 3 bits (1.48 MB per model); a 4-bit log gain per KV head before the "
        "basis; the same budget for every layer; pre-RoPE keys with a static mean, values without; water-filled "
        "bits; fixed-width codes with fitted Lloyd-Max tables and an 8-bit log gain; first two tokens exact. Served "
        "by KakeyaCache (the block store and the vLLM connector code one layer at a time and refuse it).")),
}
"""The shipped recipes by name."""


def config_for(name: str) -> KakeyaConfig:
    """The config a preset name or a generated name stands for.

    Raises:
        ConfigError: neither a preset nor a generated kakeya name.
    """
    if name in PRESETS:
        return PRESETS[name].config
    return KakeyaConfig.from_name(name)
