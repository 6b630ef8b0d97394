"""Fits made on demand from a bundle's statistics (no model needed), each memoised in the bundle.

* :func:`v2_transforms`: the ``kakeya-v2`` transforms of one (layer, stream) for one codec config,
  key space and engine layout, fitted on that layer's calibration K or V (position 0 of every
  window, the BOS attention sink, left out: the recipes keep it exact); :func:`v2_transforms_batch`
  gives many at once, fitting the missing ones in batches;
* :func:`whitening`: Cholesky factors of the regularised Σ_q and lag-averaged metrics, with the
  layers where whitening is unsafe left out (cheap: memoised in memory only);
* :func:`table`: the Lloyd–Max tables of the seed's ``kakeya`` codec, fitted on the residuals it
  produces for the calibration K (Σ_q-whitened where the layer is) or V of every layer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from kakeyaturbo import codecs, groups
from kakeyaturbo.calibration.bundle import Calibration, fit_key
from kakeyaturbo.calibration.metric import cholesky_pair, lag_metric, regularise, rope_matrices, whitening_hazard
from kakeyaturbo.calibration.statistics import CalibrationSettings, StoredRotary
from kakeyaturbo.errors import ConfigError
from kakeyaturbo.groups import LayerGroup
from kakeyaturbo.layouts import join_heads
from kakeyaturbo.ops import lloyd_max
from kakeyaturbo.transforms.rope import Rope

WHITEN_MODES = ("sigma_q", "lag")
KEY_SPACES = ("none", "post_rope", *WHITEN_MODES)
"""Spaces keys are coded in: raw pre-RoPE ("none"), post-RoPE, or whitened (folded into a v2 basis)."""
TABLE_CODEC = {"pca": "randomized", "variance_ratio": 1.0, "block_size": 512}
"""Settings of the ``kakeya`` codec whose residuals the tables are fitted on (those of the seed's
recipes that use calibrated tables: randomized PCA, rank D/2, variance ratio 1.0)."""
TABLE_SAMPLES = 5_000_000
"""At most this many residuals (a seeded random subset) go into one table fit."""
FIT_BATCH_BYTES = 1 << 30
"""Most float64 working set one batch of ``kakeya-v2`` fits may hold (:func:`v2_transforms_batch`)."""
FIT_COPIES = 8
"""Float64 copies of its sample a fit in a batch holds at its peak (what :data:`FIT_BATCH_BYTES` counts)."""


def settings(cal: Calibration) -> CalibrationSettings:
    """The settings the statistics were measured with."""
    return CalibrationSettings.from_dict(cal.manifest["settings"])


def _layer(cal: Calibration, layer: int) -> int:
    n = cal.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ConfigError(f"layer {layer!r} is out of range for a bundle of {n} layers")
    return layer


def rope(cal: Calibration, layer: int) -> Rope:
    """The RoPE of ``layer`` rebuilt from the stored rotary tables."""
    kind = cal.manifest["layer_types"][_layer(cal, layer)]
    return Rope(StoredRotary(cal.stat(f"rope/{kind}/cos"), cal.stat(f"rope/{kind}/sin")), "half")


def keys_and_values(cal: Calibration, layer: int, stream: str, space: str = "none") -> torch.Tensor:
    """float32 ``[n_kv, W * T, D]``: the calibration V (``stream="v"``) or K of ``layer``, keys pre-RoPE
    (``space`` "none" or a whitening, applied by the fit) or post-RoPE (``"post_rope"``)."""
    x = cal.stat(f"{'v' if stream == 'v' else 'k'}/{_layer(cal, layer)}").float()
    if stream == "k" and space == "post_rope":
        s = settings(cal)
        h, _, d = x.shape
        per_window = x.reshape(h, s.windows, s.tokens, d)
        x = rope(cal, layer).apply(per_window, torch.arange(s.tokens)).reshape(h, -1, d)
    return x


def _without_sinks(cal: Calibration, x: torch.Tensor) -> torch.Tensor:
    """``x [n_kv, W * T, D]`` without position 0 of each window: ``[n_kv, W * (T - 1), D]``."""
    s = settings(cal)
    h, _, d = x.shape
    return x.reshape(h, s.windows, s.tokens, d)[:, :, 1:].reshape(h, -1, d)


def _whitenings(cal: Calibration, layer: int) -> dict[str, Any]:
    """``{mode: (L, L_inv) | None, "metric": {mode: M}, "skipped": reason | None}`` for one layer,
    memoised in memory."""
    key = fit_key("whitening", stats=cal.stats_id, layer=layer)
    if key in cal.local:
        return cal.local[key]
    s = settings(cal)
    sigma = regularise(cal.stat(f"gram/{layer}") / s.windows, s.ridge, s.cond_cap)
    mass = cal.stat(f"lag_mass/{layer}")
    rot = rope_matrices(rope(cal, layer), cal.stat("lags"), int(cal.manifest["head_dim"]))
    lag = regularise(lag_metric(sigma, rot, mass / mass.sum(-1, keepdim=True)), s.ridge, s.cond_cap)
    k = keys_and_values(cal, layer, "k")
    out, reasons = {}, []
    for mode, mat in (("sigma_q", sigma), ("lag", lag)):
        out[mode] = cholesky_pair(mat)
        hazard = whitening_hazard(k, out[mode][0], s.cond_limit)
        if hazard:
            reasons.append(f"{mode}: {hazard}")
    if reasons:
        out = {"sigma_q": None, "lag": None}
    out["metric"] = {"sigma_q": sigma.float(), "lag": lag.float()}
    out["skipped"] = "; ".join(reasons) or None
    cal.local[key] = out
    return out


def whitening(cal: Calibration, layer: int, mode: str = "sigma_q") -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(L, L⁻¹)`` float32 each ``[n_kv, D, D]`` of ``mode`` ("sigma_q" or "lag") for ``layer``, or
    None where the layer is not whitened (unsafe: :attr:`skipped_whitening`)."""
    if mode not in WHITEN_MODES:
        raise ConfigError(f"whitening mode must be one of {list(WHITEN_MODES)}, got {mode!r}")
    return _whitenings(cal, _layer(cal, layer))[mode]


def metric(cal: Calibration, layer: int, mode: str = "sigma_q") -> torch.Tensor:
    """float32 ``[n_kv, D, D]``: the regularised Σ_q (``"sigma_q"``) or lag-averaged (``"lag"``) logit-error
    metric of ``layer`` (whitened or not)."""
    if mode not in WHITEN_MODES:
        raise ConfigError(f"metric mode must be one of {list(WHITEN_MODES)}, got {mode!r}")
    return _whitenings(cal, _layer(cal, layer))["metric"][mode]


def skipped_whitening(cal: Calibration) -> dict[int, str]:
    """Layers left unwhitened, with the reason."""
    found = {layer: _whitenings(cal, layer)["skipped"] for layer in range(cal.n_layers)}
    return {layer: why for layer, why in found.items() if why}


def table(cal: Calibration, stream: str, bits: int) -> tuple[float, ...]:
    """The ``2**bits`` increasing Lloyd–Max levels for stream ``"k"``/``"v"`` of the ``kakeya`` codec."""
    if stream not in ("k", "v"):
        raise ConfigError(f"stream must be 'k' or 'v', got {stream!r}")

    def make() -> dict[str, torch.Tensor]:
        codec = codecs.get("kakeya", bits=bits, **TABLE_CODEC)
        samples = []
        for layer in range(cal.n_layers):
            x = keys_and_values(cal, layer, stream)
            white = whitening(cal, layer, "sigma_q") if stream == "k" else None
            samples.append(codec.scaled_residuals(x if white is None else x @ white[0]))
        z = torch.cat(samples)
        if z.numel() > TABLE_SAMPLES:
            z = z[torch.randperm(z.numel(), generator=torch.Generator().manual_seed(0))[:TABLE_SAMPLES]]
        return {"levels": lloyd_max.fit(z, bits)}

    key = fit_key("table", stats=cal.stats_id, stream=stream, bits=bits, codec=TABLE_CODEC)
    levels = cal.memoised(key, make, f"{stream.upper()} table, {bits} bits")["levels"]
    return tuple(float(v) for v in levels.tolist())


class V2Request(NamedTuple):
    """One ``kakeya-v2`` fit asked of a calibration: the arguments of :func:`v2_transforms`."""

    layer: int | LayerGroup
    """A layer, or the layers of a cross-layer group (:mod:`kakeyaturbo.groups`)."""
    stream: str
    space: str
    layout: str
    config: Any
    """A resolved ``KakeyaV2Config``."""


def v2_transforms(cal: Calibration, layer: int | LayerGroup, stream: str, space: str, layout: str,
                  config: Any) -> Any:
    """The :class:`~kakeyaturbo.codecs.kakeya_v2.V2Transforms` serving ``config`` (a resolved
    ``KakeyaV2Config``) on one (layer, stream), fitted on the calibration sample (keys in ``space``;
    ``layout="joint"``: one row per token, its KV heads side by side) with the layer index as the
    rotation seed; memoised under the fit's fields (a batch of one :func:`v2_transforms_batch`).
    ``layer`` a tuple of layers: the transforms of that cross-layer group (joint layout, keys in "none"
    or "post_rope"), fitted on the members' joint rows side by side, seeded by its first layer."""
    return v2_transforms_batch(cal, [V2Request(layer, stream, space, layout, config)])[0]


def v2_transforms_batch(cal: Calibration, requests: Sequence[V2Request | tuple[int, str, str, str, Any]]) -> list[Any]:
    """The transforms of each request, as :func:`v2_transforms` gives them one by one.

    Memoised fits are read back; the others are fitted together
    (:func:`~kakeyaturbo.codecs.kakeya_v2.fit_transforms_batch`, bit-identical to fitting them one by
    one), in batches of requests that agree on the layout, on being whitened or not and on every fit
    field but :data:`~kakeyaturbo.codecs.kakeya_v2.BATCH_FIELDS`, of at most :data:`FIT_BATCH_BYTES`
    working set each, and each is memoised under its own key, counted on the open fitting bar.

    Args:
        requests: ``(layer, stream, space, layout, config)`` each (:class:`V2Request`).

    Returns:
        The :class:`~kakeyaturbo.codecs.kakeya_v2.V2Transforms` of each request, in order.
    """
    from kakeyaturbo.codecs.kakeya_v2 import V2Transforms

    asked = [V2Request(*r) for r in requests]
    keys = [_v2_key(cal, r) for r in asked]
    found = {key: cal.memo_get(key) for key in keys}
    todo: dict[str, dict[str, V2Request]] = {}
    for key, r in zip(keys, asked):
        if found[key] is None:
            todo.setdefault(_v2_batch_group(r), {}).setdefault(key, r)
    size = _v2_batch_size(cal)
    for group in todo.values():
        ordered = sorted(group.items(), key=lambda item: (_members(cal, item[1].layer), item[1].stream,
                                                          item[1].space))
        per_batch = max(1, size // len(_members(cal, ordered[0][1].layer)))
        for start in range(0, len(ordered), per_batch):
            batch = ordered[start : start + per_batch]
            try:
                fitted = _fit_v2(cal, [r for _, r in batch])
            except ConfigError as exc:
                names = ", ".join(sorted({f"{groups.name(r.layer)} {r.stream.upper()}" for _, r in batch}))
                raise ConfigError(f"kakeya-v2 fit of {names}: {exc}") from None
            for (key, r), tensors in zip(batch, fitted):
                found[key] = cal.made(key, tensors, f"{groups.name(r.layer)} {r.stream.upper()} at "
                                                    f"{r.config.bits:g} bits")
    return [V2Transforms.from_tensors(found[key]) for key in keys]


def _members(cal: Calibration, layer: int | LayerGroup) -> LayerGroup:
    """The layers of a request's ``layer`` (one layer, or a group of two or more distinct ones), checked."""
    members = tuple(_layer(cal, i) for i in groups.members(layer))
    if isinstance(layer, tuple) and (len(members) < 2 or list(members) != sorted(set(members))):
        raise ConfigError(f"a cross-layer group must name two or more increasing layers, got {layer!r}")
    return members


def _v2_key(cal: Calibration, r: V2Request) -> str:
    """The memo key of request ``r``, checked."""
    from kakeyaturbo.codecs.kakeya_v2 import LAYOUTS

    members = _members(cal, r.layer)
    if r.layout not in LAYOUTS:
        raise ConfigError(f"kakeya-v2 transforms exist for layouts {list(LAYOUTS)}, not {r.layout!r}")
    if r.space not in KEY_SPACES or (r.stream == "v" and r.space != "none"):
        raise ConfigError(f"key space must be one of {list(KEY_SPACES)} (values: 'none'), got {r.space!r}")
    if len(members) > 1 and (r.layout != "joint" or r.space in WHITEN_MODES):
        raise ConfigError(f"a cross-layer group is coded in the joint layout with keys in 'none' or 'post_rope', "
                          f"got layout {r.layout!r}, key space {r.space!r}")
    layer = members[0] if len(members) == 1 else list(members)
    return fit_key("v2", stats=cal.stats_id, layer=layer, stream=r.stream, space=r.space, layout=r.layout,
                   fit=r.config.fit_fields(seed=members[0]))


def _seed(r: V2Request) -> int:
    """The rotation seed of a request: its (first) layer."""
    return groups.members(r.layer)[0]


def _v2_batch_group(r: V2Request) -> str:
    """What the requests fitted in one batch share: layout, whitened or not, the group size, the fit fields
    but the batch's."""
    from kakeyaturbo.codecs.kakeya_v2 import BATCH_FIELDS

    fit = {k: v for k, v in r.config.fit_fields(seed=_seed(r)).items() if k not in BATCH_FIELDS}
    return json.dumps([r.layout, r.space in WHITEN_MODES, len(groups.members(r.layer)), fit], sort_keys=True)


def _v2_batch_size(cal: Calibration) -> int:
    """How many fits one batch holds: :data:`FIT_BATCH_BYTES` over :data:`FIT_COPIES` float64 copies of
    a layer's sample (``n_kv * W * (T - 1) * D`` elements in either layout)."""
    s = settings(cal)
    elements = int(cal.manifest["n_kv_heads"]) * s.windows * (s.tokens - 1) * int(cal.manifest["head_dim"])
    return max(1, FIT_BATCH_BYTES // (FIT_COPIES * 8 * elements))


def _fit_v2(cal: Calibration, requests: list[V2Request]) -> list[dict[str, torch.Tensor]]:
    """The stored tensors of the fits of one batch (requests of one :func:`_v2_batch_group`), in order."""
    from kakeyaturbo.codecs.kakeya_v2 import fit_transforms_batch

    where = list(dict.fromkeys((r.layer, r.stream, r.space) for r in requests))
    samples = [_v2_sample(cal, layer, stream, space, requests[0].layout) for layer, stream, space in where]
    whiten = None if samples[0][1] is None else torch.stack([white for _, white, _ in samples])
    configs = [type(r.config)(stream=r.stream, **r.config.fit_fields(seed=_seed(r))) for r in requests]
    picks = [where.index((r.layer, r.stream, r.space)) for r in requests]
    fitted = fit_transforms_batch(torch.stack([x for x, _, _ in samples]), configs, whiten=whiten,
                                  heads=samples[0][2], samples=picks)
    return [t.to_tensors() for t in fitted]


def _v2_sample(cal: Calibration, layer: int | LayerGroup, stream: str, space: str, layout: str
               ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """What one (layer, stream) is fitted on: ``(x, L, heads)``: the sinkless calibration sample ``x``
    (``[n_kv, N, D]``, or ``[1, N, n_kv * D]`` in the joint layout: the engine's joint rows; a group's
    ``[1, N, G * n_kv * D]``), the whitening ``L`` of ``space`` (``[n_kv, D, D]``, None unless whitened)
    and the heads a row holds."""
    x = torch.cat([_without_sinks(cal, keys_and_values(cal, i, stream, space)) for i in groups.members(layer)])
    heads = 1
    if layout == "joint":  # [n_kv, N, D] -> [1, N, n_kv * D]
        x, heads = join_heads(x).unsqueeze(0), x.shape[0]
    white = whitening(cal, layer, space) if space in WHITEN_MODES else None
    if space in WHITEN_MODES and white is None:
        raise ConfigError(f"layer {layer} is not whitened ({skipped_whitening(cal)[layer]}): code its keys "
                          "in key space 'none'")
    return x, None if white is None else white[0], heads
