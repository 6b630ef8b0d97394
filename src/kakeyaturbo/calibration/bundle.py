"""The calibration bundle: ``manifest.json`` + ``tensors.safetensors``, and the accessors the
engine uses (whitening per layer and mode, calibrated tables, boundary ranking, v2 transforms)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kakeyaturbo.errors import ConfigError, CorruptDataError

BUNDLE_VERSION = 2
WHITEN_MODES = ("sigma_q", "lag")


@dataclass
class Calibration:
    """A calibration bundle in memory.

    Attributes:
        manifest: model id and config hash, text and split, settings, package version, notes.
        tensors: every tensor of the bundle by ``/``-separated name: ``sigma/{mode}/{layer}``,
            ``chol/{mode}/{layer}``, ``inv_chol/{mode}/{layer}``, ``table/{stream}/{bits}``,
            ``v2/{bits}/{layer}/{stream}/{space}/{variant}/{field}``.
    """

    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    # --- the protocol the engine uses ---------------------------------------------------------
    def whitening(self, layer: int, mode: str = "sigma_q") -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(L, L⁻¹)`` each ``[n_kv, D, D]`` for ``layer``, or None where whitening was skipped."""
        if mode not in WHITEN_MODES:
            raise ConfigError(f"whitening mode must be 'sigma_q' or 'lag', got {mode!r}")
        if layer in self.skipped_whitening:
            return None
        key = f"chol/{mode}/{layer}"
        if key not in self.tensors:
            raise ConfigError(f"calibration bundle has no {mode} whitening for layer {layer}")
        return self.tensors[key], self.tensors[f"inv_chol/{mode}/{layer}"]

    def table(self, stream: str, bits: int) -> tuple[float, ...] | None:
        """Calibrated Lloyd–Max table for ``stream`` ("k"/"v") at ``bits``, or None if not fitted."""
        t = self.tensors.get(f"table/{stream}/{bits}")
        return None if t is None else tuple(float(v) for v in t.tolist())

    @property
    def boundary_ranking(self) -> list[int]:
        """Layers ordered from most to least sensitive to compression."""
        return list(self.manifest.get("boundary_ranking", []))

    @property
    def skipped_whitening(self) -> dict[int, str]:
        """Layers left unwhitened, with the reason."""
        return {int(k): v for k, v in self.manifest.get("skipped_whitening", {}).items()}

    def v2_tensors(self, layer: int, stream: str, bits: float, space: str, variant: str) -> dict[str, torch.Tensor]:
        """The ``kakeya-v2`` transform tensors of one (layer, stream) at a bit budget, fitted on that
        stream in key space ``space`` ("none"; for keys also "sigma_q", "lag" or "post_rope") with the
        fit options ``variant`` (:attr:`KakeyaV2Config.fit_variant`)."""
        prefix = f"v2/{bits:g}/{layer}/{stream}/{space}/{variant}/"
        out = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        if not out:
            fitted = sorted({"/".join(k.split("/")[i] for i in (1, 3, 4, 5)) for k in self.tensors
                             if k.startswith("v2/") and k.split("/")[2] == str(layer)})
            raise ConfigError(f"calibration bundle has no kakeya-v2 transforms at {bits:g} bits for layer {layer} "
                              f"stream {stream}, key space {space!r}, fit {variant!r}; fitted (bits/stream/space/"
                              f"fit): {', '.join(fitted) or 'none'} (recalibrate: `kakeya calibrate --v2-bits "
                              f"{bits:g}`, `--v2-key-space`, `--v2-ablation`)")
        return out

    def v2_costs(self, layer: int, stream: str) -> dict[float, float]:
        """Predicted KL of coding one (layer, stream) alone with ``kakeya-v2``, at every fitted budget.

        Measured at the calibration's probe budgets (``v2_sensitivity``); in between, interpolated
        linearly in log KL; beyond them, extrapolated along the nearest measured segment.

        Raises:
            ConfigError: the bundle has no v2 sensitivity for that layer and stream.
        """
        probed = self.manifest.get("v2_sensitivity", {}).get(stream, {}).get(str(layer))
        if not probed:
            raise ConfigError(f"calibration bundle has no kakeya-v2 sensitivity for layer {layer} stream {stream} "
                              "(layer_bits: \"sensitivity\" needs it; recalibrate with `kakeya calibrate --force`)")
        xs = sorted(float(b) for b in probed)
        ys = [math.log(max(probed[f"{b:g}"], _KL_FLOOR)) for b in xs]
        budgets = [float(b) for b in self.manifest["settings"]["v2_bits"]]
        return {b: math.exp(_log_linear(xs, ys, b)) for b in budgets}

    # --- identity checks ------------------------------------------------------------------------
    def check_model(self, model_id: str, config_hash: str) -> None:
        """Raise :class:`ConfigError` if the bundle was made for another model or head layout."""
        mine = (self.manifest.get("model"), self.manifest.get("config_hash"))
        if mine[1] != config_hash:
            raise ConfigError(
                f"calibration bundle was made for model {mine[0]!r} (config {mine[1]}), not for {model_id!r} "
                f"(config {config_hash}); run `kakeya calibrate --model {model_id}`"
            )

    # --- files -------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``manifest.json`` and ``tensors.safetensors`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in self.tensors.items()}, str(out / "tensors.safetensors"))
        manifest = {**self.manifest, "bundle_version": BUNDLE_VERSION}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Calibration:
        """Read a bundle written by :meth:`save`.

        Raises:
            ConfigError: the directory or a file is missing.
            CorruptDataError: unreadable manifest or tensors, or another bundle version.
        """
        d = Path(directory)
        if not (d / "manifest.json").is_file() or not (d / "tensors.safetensors").is_file():
            raise ConfigError(f"{d} is not a calibration bundle (needs manifest.json and tensors.safetensors); "
                              "create one with `kakeya calibrate --out DIR`")
        try:
            manifest = json.loads((d / "manifest.json").read_text())
            tensors = load_file(str(d / "tensors.safetensors"))
        except (ValueError, OSError, RuntimeError, SafetensorError) as exc:
            raise CorruptDataError(f"calibration bundle {d} is unreadable: {exc}") from None
        if manifest.get("bundle_version") != BUNDLE_VERSION:
            raise CorruptDataError(
                f"calibration bundle version {manifest.get('bundle_version')} is not {BUNDLE_VERSION}; recalibrate"
            )
        return cls(manifest, tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of per-model data a recipe may use (reported as ``bytes_model``)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


_KL_FLOOR = 1e-9
"""Smallest KL the cost interpolation works with (a probe can measure 0)."""


def _log_linear(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear ``y(x)`` through ``(xs, ys)`` (``xs`` increasing, two or more points),
    extended beyond both ends along the end segments."""
    i = min(max(sum(1 for v in xs if v <= x) - 1, 0), len(xs) - 2)
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return ys[i] + t * (ys[i + 1] - ys[i])


def config_hash(config: Any) -> str:
    """Hash of the attention-relevant model config (layers, heads, head dim, RoPE)."""
    keys = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "hidden_size", "rope_theta", "rope_parameters", "rope_scaling", "layer_types", "vocab_size")
    blob = json.dumps({k: getattr(config, k, None) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_bundle_dir(model_name: str) -> Path:
    """Where ``kakeya calibrate`` puts a model's bundle by default (inside the cache directory)."""
    from kakeyaturbo.models.loading import cache_dir

    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    return cache_dir() / "calibration" / slug
