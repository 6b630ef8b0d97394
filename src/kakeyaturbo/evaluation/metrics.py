"""Quality metrics of a compressed cache against the exact one: per-token NLL, KL, top-1 agreement,
their pooled summary with bootstrap intervals over windows, and the verdict rule.

Conventions (stated in every report, see ``docs/architecture.md``):

* ``ppl = exp(mean NLL)`` pooled over all scored tokens of all windows (not a mean of per-window
  perplexities);
* ``delta_ppl_pct = 100 * (exp(mean NLL_alt - mean NLL_ref) - 1)``;
* ``kl`` is the forward KL(p_ref || p_alt) averaged over tokens;
* 95 % intervals are percentile bootstraps that resample whole windows with replacement.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from kakeyaturbo.errors import ConfigError, NonFiniteInputError, ShapeError

THRESHOLDS: dict[str, dict[str, float]] = {
    "ACCEPT": {"abs_delta_ppl_pct": 1.0, "top1_pct": 95.0},
    "MARGINAL": {"abs_delta_ppl_pct": 3.0, "top1_pct": 85.0},
}


@dataclasses.dataclass(frozen=True)
class TokenMetrics:
    """Per-token metrics of one window, all float32 (``top1`` bool) CPU tensors of shape ``[T]``.

    Attributes:
        nll_ref: negative log-likelihood of the label under the exact cache's logits.
        nll_alt: the same under the compressed cache's logits.
        kl: KL(p_ref || p_alt) in nats.
        top1: whether both argmaxes agree.
    """

    nll_ref: torch.Tensor
    nll_alt: torch.Tensor
    kl: torch.Tensor
    top1: torch.Tensor

    @property
    def tokens(self) -> int:
        """Number of scored tokens ``T``."""
        return int(self.nll_ref.numel())


@dataclasses.dataclass(frozen=True)
class Summary:
    """Pooled statistics over all windows, each point estimate with a 95 % bootstrap interval.

    ``per_window_delta_ppl_pct`` keeps each window's own Δppl (noisy; shown to judge spread).
    """

    ppl_ref: float
    ppl: float
    delta_ppl_pct: float
    kl: float
    top1_pct: float
    ppl_ref_ci95: tuple[float, float]
    ppl_ci95: tuple[float, float]
    delta_ppl_ci95: tuple[float, float]
    kl_ci95: tuple[float, float]
    top1_ci95: tuple[float, float]
    tokens_scored: int
    windows: int
    per_window_delta_ppl_pct: tuple[float, ...]
    n_boot: int
    seed: int


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ShapeError(f"{name} must be a float tensor [T, V], got {shape}")
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise NonFiniteInputError(f"{name} holds NaN/Inf (first at index {pos})")


def token_metrics(logits_ref: torch.Tensor, logits_alt: torch.Tensor, labels: torch.Tensor) -> TokenMetrics:
    """Per-token NLL, KL and top-1 agreement of one window, computed in float32.

    Args:
        logits_ref: ``[T, V]`` float logits with the exact cache (any float dtype, any device).
        logits_alt: ``[T, V]`` float logits with the compressed cache.
        labels: ``[T]`` integer next-token ids in ``[0, V)``.

    Returns:
        :class:`TokenMetrics` with CPU tensors of shape ``[T]``.

    Raises:
        ShapeError: wrong ranks/shapes/dtypes or labels out of range.
        NonFiniteInputError: NaN/Inf in either logits tensor.
    """
    _check_logits("logits_ref", logits_ref)
    _check_logits("logits_alt", logits_alt)
    if logits_ref.shape != logits_alt.shape:
        shapes = f"{tuple(logits_ref.shape)} vs {tuple(logits_alt.shape)}"
        raise ShapeError(f"logits_ref and logits_alt must have the same shape, got {shapes}")
    t, v = logits_ref.shape
    if not isinstance(labels, torch.Tensor) or labels.shape != (t,) or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ShapeError(f"labels must be an integer tensor [{t}], got {shape}")
    if t and (int(labels.min()) < 0 or int(labels.max()) >= v):
        raise ShapeError(f"labels must lie in [0, {v}), got range [{int(labels.min())}, {int(labels.max())}]")
    lp_ref = torch.log_softmax(logits_ref.float(), dim=-1)
    lp_alt = torch.log_softmax(logits_alt.to(lp_ref.device).float(), dim=-1)
    idx = labels.to(lp_ref.device, torch.int64).unsqueeze(-1)
    kl = (lp_ref.exp() * (lp_ref - lp_alt)).sum(-1).clamp_min(0.0)
    return TokenMetrics(
        nll_ref=-lp_ref.gather(-1, idx).squeeze(-1).cpu(),
        nll_alt=-lp_alt.gather(-1, idx).squeeze(-1).cpu(),
        kl=kl.cpu(),
        top1=(lp_ref.argmax(-1) == lp_alt.argmax(-1)).cpu(),
    )


def _pooled(weights: torch.Tensor, sums: torch.Tensor, count: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pooled statistics for window weightings ``weights [B, W]`` (float64) of per-window
    ``sums [W, 4]`` (nll_ref, nll_alt, kl, top1) and token counts ``count [W]``; each result ``[B]``."""
    mean = (weights @ sums) / (weights @ count).unsqueeze(-1)
    return {
        "ppl_ref": mean[:, 0].exp(),
        "ppl": mean[:, 1].exp(),
        "delta_ppl_pct": 100.0 * torch.expm1(mean[:, 1] - mean[:, 0]),
        "kl": mean[:, 2],
        "top1_pct": 100.0 * mean[:, 3],
    }


def summarize(per_window: list[TokenMetrics], *, n_boot: int = 2000, seed: int = 0) -> Summary:
    """Pool windows into one :class:`Summary` with 95 % percentile bootstrap intervals over windows.

    Each bootstrap replicate draws ``len(per_window)`` windows with replacement and recomputes the
    pooled statistics over all tokens of the drawn windows; the interval is the 2.5th–97.5th
    percentile of ``n_boot`` replicates. Deterministic for a given ``seed``.

    Raises:
        ConfigError: no windows, no scored tokens, or ``n_boot < 1``.
        ShapeError: a window's tensors disagree in length.
    """
    if not per_window:
        raise ConfigError("summarize needs at least one window, got none")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    for i, m in enumerate(per_window):
        sizes = {m.nll_ref.numel(), m.nll_alt.numel(), m.kl.numel(), m.top1.numel()}
        if len(sizes) != 1:
            raise ShapeError(f"window {i}: per-token tensors have different lengths {sorted(sizes)}")
    count = torch.tensor([m.tokens for m in per_window], dtype=torch.float64)
    if count.sum() == 0:
        raise ConfigError("summarize needs at least one scored token, every window is empty")
    sums = torch.tensor(
        [[float(m.nll_ref.double().sum()), float(m.nll_alt.double().sum()), float(m.kl.double().sum()),
          float(m.top1.double().sum())] for m in per_window],
        dtype=torch.float64,
    )
    w = len(per_window)
    point = _pooled(torch.ones(1, w, dtype=torch.float64), sums, count)
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, w, (n_boot, w), generator=gen)
    weights = torch.zeros(n_boot, w, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(n_boot, w, dtype=torch.float64)
    )
    # a replicate that drew only empty windows has no tokens: it carries no information, drop it
    weights = weights[(weights @ count) > 0]
    boot = _pooled(weights, sums, count)
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    ci = {k: tuple(float(x) for x in torch.quantile(v, q)) for k, v in boot.items()}
    nonempty = count > 0
    per_win = 100.0 * torch.expm1((sums[nonempty, 1] - sums[nonempty, 0]) / count[nonempty])
    return Summary(
        ppl_ref=float(point["ppl_ref"][0]),
        ppl=float(point["ppl"][0]),
        delta_ppl_pct=float(point["delta_ppl_pct"][0]),
        kl=float(point["kl"][0]),
        top1_pct=float(point["top1_pct"][0]),
        ppl_ref_ci95=ci["ppl_ref"],
        ppl_ci95=ci["ppl"],
        delta_ppl_ci95=ci["delta_ppl_pct"],
        kl_ci95=ci["kl"],
        top1_ci95=ci["top1_pct"],
        tokens_scored=int(count.sum()),
        windows=w,
        per_window_delta_ppl_pct=tuple(float(x) for x in per_win),
        n_boot=n_boot,
        seed=seed,
    )


def verdict(delta_ppl_pct: float, top1_pct: float) -> str:
    """``"ACCEPT"`` if |Δppl| ≤ 1 % and top-1 ≥ 95 %, ``"MARGINAL"`` if |Δppl| ≤ 3 % and top-1 ≥ 85 %,
    else ``"REJECT"`` (bounds inclusive, see :data:`THRESHOLDS`).

    Raises:
        NonFiniteInputError: either value is NaN (an infinite Δppl is simply a REJECT).
    """
    for name, value in (("delta_ppl_pct", delta_ppl_pct), ("top1_pct", top1_pct)):
        if math.isnan(float(value)):
            raise NonFiniteInputError(f"verdict: {name} is NaN")
    for label in ("ACCEPT", "MARGINAL"):
        t = THRESHOLDS[label]
        if abs(delta_ppl_pct) <= t["abs_delta_ppl_pct"] and top1_pct >= t["top1_pct"]:
            return label
    return "REJECT"
