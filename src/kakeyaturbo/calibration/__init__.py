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

from kakeyaturbo.calibration.bundle import Calibration, config_hash, default_bundle_dir
from kakeyaturbo.calibration.run import CalibrationSettings, calibrate

__all__ = ["Calibration", "CalibrationSettings", "calibrate", "config_hash", "default_bundle_dir"]
