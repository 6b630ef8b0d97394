"""``measure``: run the model on the calibration split once and keep what any fit may need.

Only ``corpus.calibration`` is read here; evaluation windows come from ``corpus.evaluation``, a
disjoint text (for Austen: *Pride and Prejudice* vs the other five novels). Nothing is fitted
here: transforms, whitening, tables and sensitivity probes are made on demand from these
statistics (:mod:`kakeyaturbo.calibration.fits`, :mod:`kakeyaturbo.calibration.probes`).

What a bundle's statistics hold (``/``-separated names):

* ``ids``: int64 ``[W, T]``, the calibration token windows (the probes replay them);
* ``k/{layer}``, ``v/{layer}``: the layer's pre-RoPE keys and values on those windows,
  ``[n_kv, W * T, D]`` window after window, stored in the model's dtype when that is lossless
  (a bf16 model's projections are bf16), else float32;
* ``gram/{layer}``: float64 ``[n_kv, D, D]``, the sum over windows of the per-window Gram of the
  pre-RoPE queries of each KV head's group; ``lag_mass/{layer}``: float64 ``[n_kv, L]``, the summed
  attention mass at each lag bin (within the window on a sliding layer); ``lags``: int64 ``[L]``;
* ``rope/{layer_type}/cos|sin``: float32 ``[T, r]``, the model's rotary tables at positions
  ``0..T-1`` for each layer type, so post-RoPE keys and lag rotations are rebuilt exactly
  without the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from kakeyaturbo import __version__
from kakeyaturbo.calibration.bundle import Calibration, config_hash
from kakeyaturbo.calibration.metric import gram, lag_weights
from kakeyaturbo.errors import ConfigError
from kakeyaturbo.models.arch import SLIDING, decoder_layers, facts
from kakeyaturbo.models.capture import capture
from kakeyaturbo.models.text import Corpus, token_windows
from kakeyaturbo.transforms.rope import Rope


@dataclass(frozen=True)
class CalibrationSettings:
    """How much calibration text the statistics cover, and how whitening metrics are regularised.

    Attributes:
        windows, tokens: calibration windows of ``tokens`` tokens from the calibration split.
        ridge: Σ_q ridge as a fraction of mean(diag Σ_q).
        cond_cap: optional cap on cond(L) by Tikhonov regularisation.
        cond_limit: layers whose cond(L) exceeds this are left unwhitened.
        n_lags: lag bins of the lag-averaged metric.
    """

    windows: int = 8
    tokens: int = 1024
    ridge: float = 1e-3
    cond_cap: float | None = None
    cond_limit: float = 1e4
    n_lags: int = 24

    def __post_init__(self) -> None:
        for name in ("windows", "tokens", "n_lags"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.windows < 1 or self.tokens < 16:
            raise ConfigError(f"need windows >= 1 and tokens >= 16, got {self.windows} and {self.tokens}")
        if not 0 <= self.ridge < 1:
            raise ConfigError(f"ridge must be in [0, 1), got {self.ridge}")
        if self.cond_cap is not None and self.cond_cap <= 1:
            raise ConfigError(f"cond_cap must be > 1, got {self.cond_cap}")
        if self.cond_limit <= 1 or self.n_lags < 1:
            raise ConfigError(f"need cond_limit > 1 and n_lags >= 1, got {self.cond_limit} and {self.n_lags}")

    @classmethod
    def from_dict(cls, data: Any) -> CalibrationSettings:
        """Settings from a bundle manifest; unknown or missing fields raise :class:`ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != known:
            raise ConfigError(f"calibration settings must hold exactly {sorted(known)}, got {data!r}")
        return cls(**data)


class StoredRotary(nn.Module):
    """A rotary module replaying stored tables: ``(x, position_ids [1, n]) -> (cos, sin)`` each
    ``[1, n, r]``, so :class:`~kakeyaturbo.transforms.rope.Rope` works without the model."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        super().__init__()
        self.cos, self.sin = cos, sin

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = position_ids[0].to(self.cos.device)
        if int(pos.max()) >= self.cos.shape[0]:
            raise ConfigError(f"the calibration's rotary tables cover positions 0..{self.cos.shape[0] - 1}, "
                              f"asked for {int(pos.max())}")
        return self.cos[pos].unsqueeze(0), self.sin[pos].unsqueeze(0)


def _storable(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` when that keeps every value, else float32."""
    if dtype.is_floating_point and dtype != torch.float32:
        narrow = x.to(dtype)
        if torch.equal(narrow.float(), x):
            return narrow
    return x.float()


@torch.no_grad()
def measure(model: Any, tokenizer: Any, corpus: Corpus, settings: CalibrationSettings | None = None, *,
            model_name: str, text: str) -> Calibration:
    """Measure the calibration statistics of ``model`` on ``corpus.calibration`` (never its evaluation
    split); a few forward passes, no fits."""
    settings = settings or CalibrationSettings()
    f = facts(model)
    ids = token_windows(tokenizer, corpus.calibration, settings.windows, settings.tokens).to(model.device)
    positions = torch.arange(settings.tokens)
    attention = [layer.self_attn for layer in decoder_layers(model)]
    ropes = [Rope.from_model(model, layer) for layer in range(f.n_layers)]
    stats: dict[str, torch.Tensor] = {"ids": ids.cpu()}
    k: list[list[torch.Tensor]] = [[] for _ in range(f.n_layers)]
    v: list[list[torch.Tensor]] = [[] for _ in range(f.n_layers)]
    for w in tqdm(range(settings.windows), desc="calibrate: statistics", unit="window"):
        for layer, c in enumerate(capture(model, ids[w : w + 1])):
            q_post = ropes[layer].apply(c.q_pre, positions)
            scaling = getattr(attention[layer], "scaling", f.head_dim**-0.5)
            window = f.sliding_window if f.layer_types[layer] == SLIDING else None
            lags, mass = lag_weights(q_post, c.k_post, settings.n_lags, float(scaling), window)
            g = gram(c.q_pre)
            if w == 0:
                stats[f"gram/{layer}"], stats[f"lag_mass/{layer}"], stats["lags"] = g, mass, lags
            else:
                stats[f"gram/{layer}"] += g
                stats[f"lag_mass/{layer}"] += mass
            k[layer].append(c.k_pre)
            v[layer].append(c.v)
    for layer in range(f.n_layers):
        stats[f"k/{layer}"] = _storable(torch.cat(k[layer], dim=1), model.dtype)
        stats[f"v/{layer}"] = _storable(torch.cat(v[layer], dim=1), model.dtype)
    for layer, rope in enumerate(ropes):
        kind = f.layer_types[layer]
        if f"rope/{kind}/cos" not in stats:
            cos, sin = rope.cos_sin(positions, stats["k/0"])
            stats[f"rope/{kind}/cos"], stats[f"rope/{kind}/sin"] = cos.cpu().contiguous(), sin.cpu().contiguous()
    manifest = {
        "model": model_name, "config_hash": config_hash(model.config), "architecture": f.architecture,
        "n_layers": f.n_layers, "n_kv_heads": f.n_kv_heads, "head_dim": f.head_dim,
        "layer_types": list(f.layer_types), "dtype": str(model.dtype).removeprefix("torch."),
        "text": text, "split": corpus.split_note, "settings": asdict(settings),
        "package_version": __version__,
    }
    return Calibration(manifest, stats)
