"""Fits made on demand from a bundle's statistics (no model needed), each memoised in the bundle.

* :func:`v2_transforms`: the ``kakeya-v2`` transforms of one (layer, stream) for one codec config,
  key space and engine layout, fitted on that layer's calibration K or V (position 0 of every
  window, the BOS attention sink, left out: the recipes keep it exact);
* :func:`whitening`: Cholesky factors of the regularised Σ_q and lag-averaged metrics, with the
  layers where whitening is unsafe left out (cheap: memoised in memory only);
* :func:`table`: the Lloyd–Max tables of the seed's ``kakeya`` codec, fitted on the residuals it
  produces for the calibration K (Σ_q-whitened where the layer is) or V of every layer.
"""

from __future__ import annotations

from typing import Any

import torch

from kakeyaturbo import codecs
from kakeyaturbo.calibration.bundle import Calibration, fit_key
from kakeyaturbo.calibration.metric import cholesky_pair, lag_metric, regularise, rope_matrices, whitening_hazard
from kakeyaturbo.calibration.statistics import CalibrationSettings, StoredRotary
from kakeyaturbo.errors import ConfigError
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


def v2_transforms(cal: Calibration, layer: int, stream: str, space: str, layout: str, config: Any) -> Any:
    """The :class:`~kakeyaturbo.codecs.kakeya_v2.V2Transforms` serving ``config`` (a resolved
    ``KakeyaV2Config``) on one (layer, stream), fitted on the calibration sample (keys in ``space``;
    ``layout="joint"``: one row per token, its KV heads side by side) with the layer index as the
    rotation seed; memoised under the fit's fields."""
    from kakeyaturbo.codecs.kakeya_v2 import LAYOUTS, V2Transforms, fit_transforms

    layer = _layer(cal, layer)
    if layout not in LAYOUTS:
        raise ConfigError(f"kakeya-v2 transforms exist for layouts {list(LAYOUTS)}, not {layout!r}")
    if space not in KEY_SPACES or (stream == "v" and space != "none"):
        raise ConfigError(f"key space must be one of {list(KEY_SPACES)} (values: 'none'), got {space!r}")
    fit = config.fit_fields(seed=layer)

    def make() -> dict[str, torch.Tensor]:
        x = _without_sinks(cal, keys_and_values(cal, layer, stream, space))
        heads = 1
        if layout == "joint":  # [n_kv, N, D] -> [1, N, n_kv * D], the engine's joint rows
            x, heads = join_heads(x).unsqueeze(0), x.shape[0]
        white = whitening(cal, layer, space) if space in WHITEN_MODES else None
        if space in WHITEN_MODES and white is None:
            raise ConfigError(f"layer {layer} is not whitened ({skipped_whitening(cal)[layer]}): code its keys "
                              "in key space 'none'")
        cfg = type(config)(stream=stream, **fit)
        return fit_transforms(x, cfg, whiten=None if white is None else white[0], heads=heads).to_tensors()

    key = fit_key("v2", stats=cal.stats_id, layer=layer, stream=stream, space=space, layout=layout, fit=fit)
    what = f"layer {layer} {stream.upper()} at {config.bits:g} bits"
    return V2Transforms.from_tensors(cal.memoised(key, make, what))
