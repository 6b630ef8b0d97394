"""Per-layer diagnostic: does a recipe's key metric predict the error attention really sees?

For one window of text, each layer's K and V go through the recipe's cache layer exactly as in a
prefill; then per layer (relative errors, mean over KV heads):

* ``metric_sigma_q``: ``E[e Σ_q eᵀ] / E[k Σ_q kᵀ]`` with ``e`` the pre-RoPE key error — the zero-lag
  logit error Σ_q whitening optimises;
* ``metric_lag``: the same with the lag-averaged metric ``M``;
* ``logit``: the real post-RoPE logit error ``E[(q_i·(k̂_j − k_j))²] / E[(q_i·k_j)²]`` over causal
  pairs ``j ≤ i``, with the layer's actual queries;
* ``value``: ``E‖v̂ − v‖² / E‖v‖²``.
"""

from __future__ import annotations

from typing import Any

import torch

from kakeyaturbo.cache import KakeyaCache
from kakeyaturbo.calibration.bundle import Calibration
from kakeyaturbo.calibration.fits import metric
from kakeyaturbo.models.capture import capture
from kakeyaturbo.recipes import Recipe
from kakeyaturbo.transforms.rope import Rope


def _metric(e: torch.Tensor, k: torch.Tensor, sigma: torch.Tensor) -> float:
    """``E[e Σ eᵀ] / E[k Σ kᵀ]`` for ``e, k [n_kv, T, D]`` and ``Σ [n_kv, D, D]``."""
    num = torch.einsum("htd,hde,hte->", e.double(), sigma.double(), e.double())
    den = torch.einsum("htd,hde,hte->", k.double(), sigma.double(), k.double())
    return float(num / den)


@torch.no_grad()
def layer_errors(model: Any, ids: torch.Tensor, recipe: Recipe, calibration: Calibration) -> list[dict[str, Any]]:
    """One row per compressed layer for ``ids [1, T]`` (see the module docstring)."""
    cache = KakeyaCache.from_model(model, recipe, calibration)
    positions = torch.arange(ids.shape[1])
    rows = []
    for layer, cap in enumerate(capture(model, ids)):
        plan_layer = cache.layers[layer]
        if plan_layer.plan.exact:
            continue
        dtype = next(model.parameters()).dtype
        plan_layer.update(cap.k_post[None].to(dtype), cap.v[None].to(dtype))
        k_hat_post, v_hat = (t[0].float() for t in plan_layer.full())
        rope = Rope.from_model(model, layer)
        e_pre = rope.invert(k_hat_post, positions) - cap.k_pre
        q_post = rope.apply(cap.q_pre, positions)  # [n_kv, g, T, D]
        causal = torch.ones(len(positions), len(positions), dtype=torch.bool).tril()
        err = torch.einsum("hgtd,hsd->hgts", q_post, k_hat_post - cap.k_post)[..., causal]
        ref = torch.einsum("hgtd,hsd->hgts", q_post, cap.k_post)[..., causal]
        rows.append({
            "layer": layer,
            "metric_sigma_q": _metric(e_pre, cap.k_pre, metric(calibration, layer, "sigma_q")),
            "metric_lag": _metric(e_pre, cap.k_pre, metric(calibration, layer, "lag")),
            "logit": float((err.double() ** 2).mean() / (ref.double() ** 2).mean()),
            "value": float(((v_hat - cap.v) ** 2).sum() / (cap.v**2).sum()),
            "whitened": plan_layer.plan.k_space != "none",
        })
    return rows


def markdown(rows: list[dict[str, Any]], recipe: str) -> str:
    """A Markdown table of :func:`layer_errors` rows."""
    head = (f"Per-layer relative errors of recipe `{recipe}`\n\n| layer | whitened | Σ_q metric | lag metric | "
            "real post-RoPE logit | V |\n|---:|---|---:|---:|---:|---:|\n")
    body = "".join(f"| {r['layer']} | {'yes' if r['whitened'] else 'no'} | {r['metric_sigma_q']:.3e} | "
                   f"{r['metric_lag']:.3e} | {r['logit']:.3e} | {r['value']:.3e} |\n" for r in rows)
    return head + body
