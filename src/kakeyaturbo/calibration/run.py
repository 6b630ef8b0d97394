"""``calibrate``: run the model on the calibration split and measure everything a recipe may use.

Only ``corpus.calibration`` is read here; evaluation windows come from ``corpus.evaluation``, a
disjoint text (for Austen: *Pride and Prejudice* vs the other five novels).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from kakeyaturbo import __version__, codecs
from kakeyaturbo.calibration.bundle import Calibration, config_hash
from kakeyaturbo.calibration.metric import (
    cholesky_pair,
    gram,
    lag_metric,
    lag_weights,
    regularise,
    rope_matrices,
    whitening_hazard,
)
from kakeyaturbo.codecs.kakeya_v2 import LAYOUTS
from kakeyaturbo.engine import join_heads
from kakeyaturbo.errors import ConfigError
from kakeyaturbo.models.arch import decoder_layers, facts
from kakeyaturbo.models.capture import capture
from kakeyaturbo.models.forward import logits, prefill
from kakeyaturbo.models.text import Corpus, token_windows
from kakeyaturbo.ops import lloyd_max
from kakeyaturbo.transforms.rope import Rope

TABLE_CODEC = {"pca": "randomized", "variance_ratio": 1.0, "block_size": 512}
"""Settings of the ``kakeya`` codec whose residuals the calibrated tables are fitted on (those of
the seed's recipes that use calibrated tables: randomized PCA, rank D/2, variance ratio 1.0)."""

V2_BITS = (1.0, 1.25, 1.5, 1.625, 1.75, 1.875, 2.0, 2.125, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 5.0, 6.0)
"""Bit budgets for which ``kakeya-v2`` transforms are fitted (per layer and stream)."""
V2_PROBE_BITS = (1.0, 1.5, 2.0, 3.0, 4.0)
"""Budgets at which each (layer, stream) is probed alone for the sensitivity-driven layer budgets
(the costs of the other fitted budgets are interpolated from these)."""
V2_KEY_SPACES = ("sigma_q", "lag", "none", "post_rope")
"""Key spaces v2 key transforms can be fitted in: Σ_q or lag whitening (folded into the basis),
raw pre-RoPE keys, post-RoPE keys."""
V2_ABLATIONS: tuple[dict[str, Any], ...] = ({"scale_bits": 0}, {"rotate_groups": False}, {"allocation": "uniform"})
"""Single-option departures from the default fit, each fitted at ``v2_ablation_bits`` (with the
mean switched on and off, and the key spaces, they make the ablation's rows)."""


@dataclass(frozen=True)
class CalibrationSettings:
    """How much calibration text to use and how to regularise.

    Attributes:
        windows, tokens: calibration windows of ``tokens`` tokens from the calibration split.
        ridge: Σ_q ridge as a fraction of mean(diag Σ_q).
        cond_cap: optional cap on cond(L) by Tikhonov regularisation.
        cond_limit: layers whose cond(L) exceeds this are left unwhitened.
        n_lags: lag bins of the lag-averaged metric.
        table_bits: bit widths of the calibrated Lloyd–Max tables.
        sensitivity_ctx, sensitivity_eval: window split of every sensitivity probe.
        probe_bits: bit width of the boundary-layer probe (``kakeya`` codec on one layer at a time).
        v2_bits: bit budgets of the ``kakeya-v2`` transforms.
        v2_key_spaces: key spaces the v2 key transforms are fitted in at every budget
            (:data:`V2_KEY_SPACES`; the built-in recipes code raw pre-RoPE keys, "none": the
            ablation measured Σ_q and lag whitening as harmful for this codec).
        v2_key_center: fit the v2 key transforms with (True) and/or without (False) a static mean.
        v2_layouts: engine layouts the default v2 fits (key space "none") are made for at every
            budget: "head" (one transform per KV head) and/or "joint" (one per layer over the
            KV heads concatenated; :data:`kakeyaturbo.codecs.kakeya_v2.LAYOUTS`).
        v2_joint_head_gain_bits: widths of per-head gain codes (``head_gain_bits``) with which the
            joint-layout fits are made too, at every budget and for both streams (empty: none).
        v2_joint_reflector_bits: minimum reflector widths (``reflector_bits``: the joint basis
            stored as Householder reflectors, a third (3 bits) to 40 % (4 bits) of its int8 bytes) with which every
            head-gain joint fit is made too (empty: none).
        v2_ablation_bits: if set, also fit at this budget every key space (with and without the
            mean), values with a mean, and each option of :data:`V2_ABLATIONS` (what the ablation
            recipes in ``benchmarks/recipes/ablation`` use; None skips them).
        v2_probe_bits: budgets (a subset of ``v2_bits``) at which each (layer, stream) is coded
            alone with ``kakeya-v2`` and the KL it causes measured, in float32 (what recipes with
            ``layer_bits: "sensitivity"`` allocate from); empty skips the probe.
        v2_probe_windows: calibration windows the v2 probe scores (``sensitivity_eval`` tokens each).
        v2_probe_sink_tokens: leading tokens the v2 probe keeps exact (as the recipes it serves).
    """

    windows: int = 8
    tokens: int = 1024
    ridge: float = 1e-3
    cond_cap: float | None = None
    cond_limit: float = 1e4
    n_lags: int = 24
    table_bits: tuple[int, ...] = (2, 3, 4)
    sensitivity_ctx: int = 448
    sensitivity_eval: int = 64
    probe_bits: int = 2
    v2_bits: tuple[float, ...] = V2_BITS
    v2_key_spaces: tuple[str, ...] = ("none",)
    v2_key_center: tuple[bool, ...] = (True, False)
    v2_layouts: tuple[str, ...] = ("head", "joint")
    v2_joint_head_gain_bits: tuple[int, ...] = (4,)
    v2_joint_reflector_bits: tuple[int, ...] = (3, 4)
    v2_ablation_bits: float | None = 3.0
    v2_probe_bits: tuple[float, ...] = V2_PROBE_BITS
    v2_probe_windows: int = 6
    v2_probe_sink_tokens: int = 2

    def __post_init__(self) -> None:
        if self.windows < 1 or self.tokens < 16:
            raise ConfigError(f"need windows >= 1 and tokens >= 16, got {self.windows} and {self.tokens}")
        if not 0 <= self.ridge < 1:
            raise ConfigError(f"ridge must be in [0, 1), got {self.ridge}")
        if self.cond_cap is not None and self.cond_cap <= 1:
            raise ConfigError(f"cond_cap must be > 1, got {self.cond_cap}")
        if self.sensitivity_ctx + self.sensitivity_eval > self.tokens:
            raise ConfigError("sensitivity_ctx + sensitivity_eval must fit in one calibration window")
        unknown = sorted(set(self.v2_key_spaces) - set(V2_KEY_SPACES))
        if unknown or not self.v2_key_spaces:
            raise ConfigError(f"v2_key_spaces: need one or more of {list(V2_KEY_SPACES)}, got "
                              f"{list(self.v2_key_spaces)}")
        if set(self.v2_probe_bits) - set(self.v2_bits) or len(set(self.v2_probe_bits)) == 1:
            raise ConfigError(f"v2_probe_bits must be none or two or more of v2_bits {list(self.v2_bits)}, "
                              f"got {list(self.v2_probe_bits)}")
        if self.v2_probe_bits and ("none" not in self.v2_key_spaces or True not in self.v2_key_center):
            raise ConfigError("v2_probe_bits: the probe codes keys with the default fit (key space 'none', with "
                              "the mean); fit it too or pass v2_probe_bits=()")
        if isinstance(self.v2_probe_sink_tokens, bool) or not 0 <= self.v2_probe_sink_tokens < self.sensitivity_ctx:
            raise ConfigError(f"v2_probe_sink_tokens must be in 0..sensitivity_ctx-1, got {self.v2_probe_sink_tokens}")
        if not 1 <= self.v2_probe_windows <= self.windows:
            raise ConfigError(f"v2_probe_windows must be in 1..windows={self.windows}, got {self.v2_probe_windows}")
        if not self.v2_key_center or not set(self.v2_key_center) <= {True, False}:
            raise ConfigError(f"v2_key_center: need True and/or False, got {list(self.v2_key_center)}")
        if "head" not in self.v2_layouts or not set(self.v2_layouts) <= set(LAYOUTS):
            raise ConfigError(f"v2_layouts: need 'head' and optionally 'joint', got {list(self.v2_layouts)}")
        hg = self.v2_joint_head_gain_bits
        if any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8 for b in hg) or len(set(hg)) < len(hg):
            raise ConfigError(f"v2_joint_head_gain_bits: need distinct widths in 1..8, got {list(hg)}")
        if hg and "joint" not in self.v2_layouts:
            raise ConfigError("v2_joint_head_gain_bits needs the 'joint' layout in v2_layouts (or pass none)")
        rb = self.v2_joint_reflector_bits
        if any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in rb) or len(set(rb)) < len(rb):
            raise ConfigError(f"v2_joint_reflector_bits: need distinct widths in 2..8, got {list(rb)}")
        if rb and not hg:
            raise ConfigError("v2_joint_reflector_bits: the reflector fits are made for the head-gain joint fits; "
                              "give v2_joint_head_gain_bits too (or pass no reflector widths)")


@dataclass
class _Pooled:
    """Per-layer statistics accumulated over calibration windows (CPU, float32/64)."""

    gram: torch.Tensor  # [n_kv, D, D] float64, sum over windows of per-window Grams
    lag_mass: torch.Tensor  # [n_kv, L] float64
    k_pre: list[torch.Tensor]  # each [n_kv, T, D]
    k_post: list[torch.Tensor]  # same, post-RoPE (only when a v2 fit needs them)
    v: list[torch.Tensor]


def _needs_post_rope(settings: CalibrationSettings) -> bool:
    return "post_rope" in settings.v2_key_spaces or settings.v2_ablation_bits is not None


def _pool(model: Any, ids: torch.Tensor, settings: CalibrationSettings) -> tuple[list[_Pooled], torch.Tensor]:
    f = facts(model)
    post = _needs_post_rope(settings)
    pooled: list[_Pooled] = []
    lags = torch.zeros(0, dtype=torch.long)
    positions = torch.arange(ids.shape[1])
    attention = [layer.self_attn for layer in decoder_layers(model)]
    for w in tqdm(range(ids.shape[0]), desc="calibrate: capture", unit="window"):
        caps = capture(model, ids[w : w + 1])
        for layer, c in enumerate(caps):
            q_post = Rope.from_model(model, layer).apply(c.q_pre, positions)
            scaling = getattr(attention[layer], "scaling", f.head_dim**-0.5)
            lags, mass = lag_weights(q_post, c.k_post, settings.n_lags, float(scaling))
            g = gram(c.q_pre)
            if w == 0:
                pooled.append(_Pooled(g, mass, [], [], []))
            else:
                pooled[layer].gram += g
                pooled[layer].lag_mass += mass
            p = pooled[layer]
            p.k_pre.append(c.k_pre)
            p.v.append(c.v)
            if post:
                p.k_post.append(c.k_post)
    return pooled, lags


def _whitening(model: Any, pooled: list[_Pooled], lags: torch.Tensor, settings: CalibrationSettings,
               cal: Calibration) -> None:
    f = facts(model)
    skipped: dict[str, str] = {}
    for layer, p in enumerate(pooled):
        if f.layer_types[layer] != "full_attention":
            skipped[str(layer)] = f"{f.layer_types[layer]} layer (kept exact)"
            continue
        sigma = regularise(p.gram / settings.windows, settings.ridge, settings.cond_cap)
        rot = rope_matrices(Rope.from_model(model, layer), lags, f.head_dim)
        weights = p.lag_mass / p.lag_mass.sum(-1, keepdim=True)
        lag = regularise(lag_metric(sigma, rot, weights), settings.ridge, settings.cond_cap)
        k_all = torch.cat(p.k_pre, dim=1)
        reasons = []
        for mode, mat in (("sigma_q", sigma), ("lag", lag)):
            chol, inv = cholesky_pair(mat)
            cal.tensors[f"sigma/{mode}/{layer}"] = mat.float()
            cal.tensors[f"chol/{mode}/{layer}"] = chol
            cal.tensors[f"inv_chol/{mode}/{layer}"] = inv
            hazard = whitening_hazard(k_all, chol, settings.cond_limit)
            if hazard:
                reasons.append(f"{mode}: {hazard}")
        if reasons:
            skipped[str(layer)] = "; ".join(reasons)
    cal.manifest["skipped_whitening"] = skipped


def _keys_for_fitting(cal: Calibration, layer: int, k_pre: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys ``[n_kv, T, D]``, Σ_q-whitened where the layer is whitened."""
    w = cal.whitening(layer, "sigma_q")
    return k_pre if w is None else k_pre @ w[0]


def _tables(pooled: list[_Pooled], settings: CalibrationSettings, cal: Calibration, full: list[int]) -> None:
    """Lloyd–Max tables fitted on the scaled residuals the runtime ``kakeya`` codec produces."""
    for bits in tqdm(settings.table_bits, desc="calibrate: tables", unit="width"):
        codec = codecs.get("kakeya", bits=bits, **TABLE_CODEC)
        for stream in ("k", "v"):
            samples = []
            for layer in full:
                p = pooled[layer]
                x = torch.cat(p.k_pre if stream == "k" else p.v, dim=1)
                if stream == "k":
                    x = _keys_for_fitting(cal, layer, x)
                samples.append(codec.scaled_residuals(x))
            z = torch.cat(samples)
            if z.numel() > 5_000_000:
                z = z[torch.randperm(z.numel(), generator=torch.Generator().manual_seed(0))[:5_000_000]]
            cal.tensors[f"table/{stream}/{bits}"] = lloyd_max.fit(z, bits)


def _v2_fits(settings: CalibrationSettings) -> list[tuple[float, str, str, tuple[tuple[str, Any], ...], str]]:
    """Every (budget, stream, key space, config overrides, layout) the bundle gets transforms for, once each."""

    def key(center: bool, **options: Any) -> tuple[tuple[str, Any], ...]:
        return (() if center else (("center", False),)) + tuple(options.items())

    centers = settings.v2_key_center
    fits = [(b, "v", "none", (), "head") for b in settings.v2_bits]
    fits += [(b, "k", space, key(c), "head") for b in settings.v2_bits for space in settings.v2_key_spaces
             for c in centers]
    joint = [()] + [(("head_gain_bits", hb),) for hb in settings.v2_joint_head_gain_bits]
    joint += [(("head_gain_bits", hb), ("reflector_bits", rb)) for hb in settings.v2_joint_head_gain_bits
              for rb in settings.v2_joint_reflector_bits]
    fits += [(b, stream, "none", options, layout) for layout in settings.v2_layouts if layout != "head"
             for options in joint for b in settings.v2_bits for stream in ("k", "v")]
    ab = settings.v2_ablation_bits
    if ab is not None:
        fits += [(ab, "v", "none", (), "head"), (ab, "v", "none", (("center", True),), "head")]
        fits += [(ab, "k", space, key(c), "head") for space in V2_KEY_SPACES for c in (True, False)]
        for option in V2_ABLATIONS:
            fits += [(ab, "k", settings.v2_key_spaces[0], key(c, **option), "head") for c in (True, False)]
            fits.append((ab, "v", "none", tuple(option.items()), "head"))
    return list(dict.fromkeys(fits))


def _v2(pooled: list[_Pooled], settings: CalibrationSettings, cal: Calibration, full: list[int]) -> None:
    """``kakeya-v2`` static transforms per (budget, layer, stream, key space, fit variant); the
    whitening of a key space is folded into the transforms' basis."""
    from kakeyaturbo.codecs.kakeya_v2 import KakeyaV2Config, fit_transforms, transform_variant

    fits = _v2_fits(settings)
    with tqdm(total=len(fits) * len(full), desc="calibrate: kakeya-v2", unit="fit") as bar:
        for layer in full:
            p = pooled[layer]
            # position 0 of every window (BOS, the attention sink) is kept exact by the v2 recipes
            sources = {name: torch.cat([t[:, 1:] for t in windows], dim=1) for name, windows in
                       (("v", p.v), ("k", p.k_pre), ("post_rope", p.k_post)) if windows}
            for bits, stream, space, overrides, layout in fits:
                x = sources["v" if stream == "v" else "post_rope" if space == "post_rope" else "k"]
                heads = 1
                if layout == "joint":  # [n_kv, N, D] -> [1, N, n_kv * D], the engine's joint rows
                    x, heads = join_heads(x).unsqueeze(0), x.shape[0]
                white = cal.whitening(layer, space) if space in ("sigma_q", "lag") else None
                stored = space if white is not None or space == "post_rope" else "none"
                cfg = KakeyaV2Config(bits=bits, stream=stream, fitted_tables=True, seed=layer, **dict(overrides))
                t = fit_transforms(x, cfg, whiten=None if white is None else white[0], heads=heads)
                prefix = f"v2/{bits:g}/{layer}/{stream}/{stored}/{transform_variant(cfg, layout)}"
                for name, tensor in t.to_tensors().items():
                    cal.tensors[f"{prefix}/{name}"] = tensor
                bar.update()


@torch.no_grad()
def _sensitivity(model: Any, ids: torch.Tensor, settings: CalibrationSettings, full: list[int]) -> dict[int, float]:
    """KL(exact ‖ compressed) of the next-token distribution when only one layer is compressed."""
    from kakeyaturbo.cache import KakeyaCache
    from kakeyaturbo.recipes import Recipe, StreamRecipe

    ctx, n = settings.sensitivity_ctx, settings.sensitivity_eval
    prefix, cont = ids[:1, :ctx], ids[:1, ctx : ctx + n]
    reference = prefill(model, prefix)
    ref = logits(model, cont, copy.deepcopy(reference)).log_softmax(-1)
    probe = StreamRecipe(codec="kakeya", config={"bits": settings.probe_bits, "block_size": 64})
    out = {}
    for layer in tqdm(full, desc="calibrate: layer sensitivity", unit="layer"):
        recipe = Recipe(name=f"probe-{layer}", k=StreamRecipe(), v=StreamRecipe(), chunk_tokens=64,
                        layer_overrides={layer: {"k": probe, "v": probe}})
        cache = KakeyaCache.from_model(model, recipe).ingest(reference)
        alt = logits(model, cont, cache.to_dynamic()).log_softmax(-1)
        out[layer] = float((ref.exp() * (ref - alt)).sum(-1).mean())
    return out


@torch.no_grad()
def _v2_sensitivity(model: Any, ids: torch.Tensor, settings: CalibrationSettings, full: list[int],
                    cal: Calibration) -> dict[str, dict[str, dict[str, float]]]:
    """KL(exact ‖ compressed) of the next-token distribution when one (layer, stream) alone is coded
    with the default ``kakeya-v2`` fit at each probe budget (the first ``v2_probe_sink_tokens``
    exact, as in the recipes the costs serve).

    Runs a float32 copy of the model: in bf16 any perturbation of the cache moves the logits by
    about as much as a 4-bit code does (a floor near KL 1e-3 that would drown the differences).

    Returns:
        ``{stream: {layer: {budget: KL}}}`` (string keys, JSON-ready), KL averaged over
        ``v2_probe_windows`` x ``sensitivity_eval - 1`` scored tokens.
    """
    from kakeyaturbo.cache import KakeyaCache
    from kakeyaturbo.recipes import Recipe, StreamRecipe

    probe_model = model if model.dtype == torch.float32 else copy.deepcopy(model).float()
    ctx, n = settings.sensitivity_ctx, settings.sensitivity_eval
    total: dict[tuple[str, int, float], float] = {}
    probes = [(layer, stream, bits) for layer in full for stream in ("k", "v") for bits in settings.v2_probe_bits]
    with tqdm(total=settings.v2_probe_windows * len(probes), desc="calibrate: v2 layer sensitivity",
              unit="probe") as bar:
        for w in range(settings.v2_probe_windows):
            prefix, cont = ids[w : w + 1, :ctx], ids[w : w + 1, ctx : ctx + n]
            reference = prefill(probe_model, prefix)
            ref = logits(probe_model, cont, copy.deepcopy(reference))[:-1].log_softmax(-1)
            for layer, stream, bits in probes:
                coded = StreamRecipe(codec="kakeya-v2", config={"bits": bits})
                recipe = Recipe(name="v2-probe", sink_tokens=settings.v2_probe_sink_tokens, chunk_tokens=64,
                                layer_overrides={layer: {stream: coded}})
                cache = KakeyaCache.from_model(probe_model, recipe, cal).ingest(reference)
                alt = logits(probe_model, cont, cache.to_dynamic())[:-1].log_softmax(-1)
                kl = float((ref.exp() * (ref - alt)).sum(-1).mean())
                total[layer, stream, bits] = total.get((layer, stream, bits), 0.0) + kl / settings.v2_probe_windows
                bar.update()
    out: dict[str, dict[str, dict[str, float]]] = {"k": {}, "v": {}}
    for (layer, stream, bits), kl in total.items():
        out[stream].setdefault(str(layer), {})[f"{bits:g}"] = max(kl, 0.0)
    return out


def calibrate(model: Any, tokenizer: Any, corpus: Corpus, settings: CalibrationSettings | None = None, *,
              model_name: str, text: str) -> Calibration:
    """Measure a calibration bundle for ``model`` on ``corpus.calibration`` (never its evaluation split)."""
    settings = settings or CalibrationSettings()
    f = facts(model)
    ids = token_windows(tokenizer, corpus.calibration, settings.windows, settings.tokens).to(model.device)
    cal = Calibration(manifest={
        "model": model_name, "config_hash": config_hash(model.config), "architecture": f.architecture,
        "n_layers": f.n_layers, "n_kv_heads": f.n_kv_heads, "head_dim": f.head_dim,
        "text": text, "split": corpus.split_note, "settings": asdict(settings), "package_version": __version__,
        "table_codec": TABLE_CODEC,
    })
    full = [i for i, t in enumerate(f.layer_types) if t == "full_attention"]
    pooled, lags = _pool(model, ids, settings)
    _whitening(model, pooled, lags, settings, cal)
    _tables(pooled, settings, cal, full)
    _v2(pooled, settings, cal, full)
    if settings.v2_probe_bits:
        cal.manifest["v2_sensitivity"] = _v2_sensitivity(model, ids, settings, full, cal)
    sens = _sensitivity(model, ids, settings, full)
    cal.manifest["sensitivity_kl"] = {str(k): v for k, v in sens.items()}
    cal.manifest["boundary_ranking"] = sorted(sens, key=lambda k: -sens[k])
    return cal
