"""Calibration: what a recipe needs to know about a model, measured once on calibration text.

``kakeya calibrate`` runs the model on the calibration split (never the evaluation split) and
writes a bundle directory (``tensors.safetensors`` + ``manifest.json``) holding, per layer:

* Σ_q per KV head: the Gram matrix of the pre-RoPE queries of that head's query group
  (``[n_kv, D, D]``), symmetrised and ridge-regularised, with its Cholesky factor ``L`` and
  ``L⁻¹`` (whitening ``k·L`` makes plain MSE equal the zero-lag logit error ``e Σ_q eᵀ``);
* the lag-averaged metric ``M = Σ_Δ p(Δ) R_Δᵀ Σ_q R_Δ`` with ``p(Δ)`` the attention mass the
  layer puts at lag ``Δ`` on calibration text, and its Cholesky factors;
* layers where whitening is unsafe (f16 overflow of whitened keys, extreme condition number)
  listed with the reason and left unwhitened;
* Lloyd–Max tables per stream and bit width fitted on the residuals the runtime ``kakeya``
  codec produces;
* a boundary-layer sensitivity ranking (KL of the model's output when only that layer is
  compressed by a probe recipe);
* the ``kakeya-v2`` static transforms per (layer, stream).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kakeyaturbo.errors import ConfigError, CorruptDataError
from kakeyaturbo.packing import F16_MAX

BUNDLE_VERSION = 1
WhitenMode = str  # "sigma_q" | "lag"


def gram(q_pre: torch.Tensor) -> torch.Tensor:
    """Second moment of the queries of each KV head's group.

    Args:
        q_pre: ``[n_kv, g, T, D]`` float pre-RoPE queries (``g`` query heads per KV head).

    Returns:
        float64 ``[n_kv, D, D]``: ``Σ qᵀq / (g·T)``, symmetrised.
    """
    n_kv, g, t, d = q_pre.shape
    q = q_pre.reshape(n_kv, g * t, d).to(torch.float64)
    s = q.transpose(1, 2) @ q / (g * t)
    return (s + s.transpose(1, 2)) / 2


def regularise(sigma: torch.Tensor, ridge: float, cond_cap: float | None) -> torch.Tensor:
    """``Σ + ridge·mean(diag Σ)·I``, then (optionally) the smallest extra ``λI`` that brings the
    condition number of ``chol(Σ)`` (``sqrt`` of Σ's) under ``cond_cap``.

    Args:
        sigma: ``[..., D, D]`` symmetric positive semi-definite.
    """
    d = sigma.shape[-1]
    eye = torch.eye(d, dtype=sigma.dtype, device=sigma.device)
    mean_diag = sigma.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    out = sigma + ridge * mean_diag * eye
    if cond_cap is not None:
        ev = torch.linalg.eigvalsh(out)
        lo, hi = ev[..., :1], ev[..., -1:]
        c2 = cond_cap**2
        lam = ((hi - c2 * lo) / (c2 - 1)).clamp_min(0)
        out = out + lam[..., None] * eye
    return out


def cholesky_pair(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor ``L`` (``L Lᵀ = Σ``) and ``L⁻¹``, float32, each ``[..., D, D]``."""
    chol = torch.linalg.cholesky(sigma.to(torch.float64))
    eye = torch.eye(sigma.shape[-1], dtype=torch.float64, device=sigma.device).expand_as(chol)
    inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return chol.float(), inv.float()


def rope_matrices(rope: Any, lags: torch.Tensor, d: int) -> torch.Tensor:
    """``R_Δ`` for each lag (row-vector convention: ``rope(x, Δ) = x R_Δ``): ``[len(lags), D, D]``."""
    eye = torch.eye(d, dtype=torch.float32)
    rows = [rope.apply(eye, torch.full((d,), int(lag), dtype=torch.long)) for lag in lags.tolist()]
    return torch.stack(rows)


def lag_metric(sigma: torch.Tensor, rot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``M = Σ_Δ w_Δ R_Δᵀ Σ R_Δ`` per KV head: the expected logit-error metric over lags.

    A query at position ``p`` and a key at ``s`` meet as ``q R_p (k R_s)ᵀ = q R_Δ kᵀ`` with
    ``Δ = p − s``, so a pre-RoPE key error ``e`` costs ``E[(q R_Δ eᵀ)²] = e R_Δᵀ Σ R_Δ eᵀ``.

    Args:
        sigma: ``[n_kv, D, D]`` float64 query second moment.
        rot: ``[L, D, D]`` rotation matrices.
        weights: ``[n_kv, L]`` lag weights summing to 1 per head.
    """
    r = rot.to(sigma.dtype)
    per_lag = r.transpose(-1, -2).unsqueeze(0) @ sigma.unsqueeze(1) @ r.unsqueeze(0)  # [n_kv, L, D, D]
    return (weights.to(sigma.dtype)[..., None, None] * per_lag).sum(1)


def lag_weights(q_post: torch.Tensor, k_post: torch.Tensor, n_lags: int, scaling: float) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Attention mass per lag, measured: the mean softmax probability a query puts at lag Δ.

    Args:
        q_post: ``[n_kv, g, T, D]`` post-RoPE queries; k_post: ``[n_kv, T, D]`` post-RoPE keys.
        n_lags: number of lag bins (log-spaced representative lags are returned).
        scaling: the attention's softmax scale (``1/sqrt(D)`` usually).

    Returns:
        ``(lags [L] int64, weights [n_kv, L] float64)`` with the probability mass of each
        log-spaced lag bin assigned to the bin's representative lag.
    """
    n_kv, g, t, _ = q_post.shape
    scores = torch.einsum("hgtd,hsd->hgts", q_post.double(), k_post.double()) * scaling
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = scores.softmax(-1)  # [n_kv, g, T, T]
    idx = torch.arange(t)
    lag = (idx[:, None] - idx[None, :]).clamp_min(0)  # [T, T]
    edges = torch.unique(torch.cat([torch.zeros(1), torch.logspace(0, math.log10(t), n_lags)]).long())
    bins = torch.bucketize(lag, edges[1:], right=True)  # bin index per (i, j)
    nb = len(edges)
    mass = torch.zeros(n_kv, nb, dtype=torch.float64)
    flat = (probs * causal).sum(1).reshape(n_kv, -1)  # sum over group heads
    mass.scatter_add_(1, bins.reshape(1, -1).expand(n_kv, -1), flat)
    mass = mass / mass.sum(-1, keepdim=True)
    return edges, mass


@dataclass
class Calibration:
    """A calibration bundle in memory.

    Attributes:
        manifest: model id and config hash, text and split, settings, package version, notes.
        tensors: every tensor of the bundle by name (``sigma.{layer}``, ``chol.{mode}.{layer}``,
            ``inv_chol.{mode}.{layer}``, ``table.{stream}.{bits}``, ``v2.{layer}.{stream}.*``).
    """

    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    # --- the protocol the engine uses ---------------------------------------------------------
    def whitening(self, layer: int, mode: WhitenMode = "sigma_q") -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(L, L⁻¹)`` each ``[n_kv, D, D]`` for ``layer``, or None where whitening was skipped."""
        if mode not in ("sigma_q", "lag"):
            raise ConfigError(f"whitening mode must be 'sigma_q' or 'lag', got {mode!r}")
        if str(layer) in self.skipped_whitening:
            return None
        key = f"chol.{mode}.{layer}"
        if key not in self.tensors:
            raise ConfigError(f"calibration bundle has no {mode} whitening for layer {layer}")
        return self.tensors[key], self.tensors[f"inv_chol.{mode}.{layer}"]

    def table(self, stream: str, bits: int) -> tuple[float, ...] | None:
        """Calibrated Lloyd–Max table for ``stream`` ("k"/"v") at ``bits``, or None if not fitted."""
        t = self.tensors.get(f"table.{stream}.{bits}")
        return None if t is None else tuple(float(v) for v in t.tolist())

    @property
    def boundary_ranking(self) -> list[int]:
        """Layers ordered from most to least sensitive to compression."""
        return list(self.manifest.get("boundary_ranking", []))

    @property
    def skipped_whitening(self) -> dict[str, str]:
        """Layers left unwhitened, with the reason."""
        return dict(self.manifest.get("skipped_whitening", {}))

    def v2_tensors(self, layer: int, stream: str) -> dict[str, torch.Tensor]:
        """The ``kakeya-v2`` transform tensors of one (layer, stream)."""
        prefix = f"v2.{layer}.{stream}."
        out = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        if not out:
            raise ConfigError(f"calibration bundle has no kakeya-v2 transforms for layer {layer} stream {stream}")
        return out

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
        except (ValueError, OSError, RuntimeError) as exc:
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


def config_hash(config: Any) -> str:
    """Hash of the attention-relevant model config (layers, heads, head dim, RoPE)."""
    keys = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "hidden_size", "rope_theta", "rope_parameters", "rope_scaling", "layer_types", "vocab_size")
    blob = json.dumps({k: getattr(config, k, None) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def whitening_hazard(k_pre: torch.Tensor, chol: torch.Tensor, cond_limit: float) -> str | None:
    """Why whitening ``k_pre [n_kv, T, D]`` by ``chol [n_kv, D, D]`` is unsafe, or None.

    Unsafe: any whitened value (times a 4x head-room for skeleton means and norms) beyond the
    f16 range, or a Cholesky condition number above ``cond_limit``.
    """
    white = k_pre.double() @ chol.double()
    peak = float(white.abs().max())
    norm_peak = float(white.norm(dim=-1).max())
    if max(4 * peak, norm_peak) > F16_MAX:
        return f"whitened keys reach {peak:.4g} (norm {norm_peak:.4g}), too close to the f16 limit {F16_MAX:.0f}"
    sv = torch.linalg.svdvals(chol.double())
    cond = float((sv[..., 0] / sv[..., -1]).max())
    if cond > cond_limit:
        return f"condition number of L is {cond:.4g} > {cond_limit:.4g}"
    return None
