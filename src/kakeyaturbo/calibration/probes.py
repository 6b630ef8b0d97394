"""Probes that run the model on the calibration windows, and :func:`prepare`, which makes every fit
and probe a recipe needs before a cache is built.

* the **sensitivity probe** (recipes with ``layer_bits="sensitivity"``): each (layer, stream) coded
  alone at each probe budget, with the codec configuration the recipe's ``probe`` names (by
  default the recipe's own), the KL of the next-token distribution measured on a float32 copy of
  the model (in bf16 any perturbation of the cache moves the logits by about as much as a 4-bit code
  does, a floor near KL 1e-3 that would drown the differences);
* the **boundary ranking** (recipes with ``boundary_top``): the KL when one layer alone is coded
  by the seed's ``kakeya`` codec at 2 bits.

Both are memoised in the bundle under a hash of their setup and of the statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from kakeyaturbo.calibration.bundle import Calibration, fit_key
from kakeyaturbo.errors import ConfigError
from kakeyaturbo.models.arch import decoder_layers
from kakeyaturbo.models.forward import logits, prefill, with_cache

SENSITIVITY = "sensitivity"
BOUNDARY = "boundary"
BOUNDARY_CTX, BOUNDARY_EVAL = 448, 64
BOUNDARY_PROBE = {"codec": "kakeya", "config": {"bits": 2, "block_size": 64}, "chunk_tokens": 64}


def boundary_setup(tokens: int) -> dict[str, Any]:
    """What the boundary ranking measures on calibration windows of ``tokens`` tokens (its memo key):
    ``BOUNDARY_CTX`` + ``BOUNDARY_EVAL`` tokens of the first window (half and a quarter of shorter
    windows) and the probe codec."""
    ctx, n = (BOUNDARY_CTX, BOUNDARY_EVAL) if tokens >= BOUNDARY_CTX + BOUNDARY_EVAL else (tokens // 2, tokens // 4)
    return {"ctx": ctx, "n_eval": n, **BOUNDARY_PROBE}


def sensitivity_key(cal: Calibration, setup: Mapping[str, Any]) -> str:
    """The memo key of the sensitivity probe ``setup`` on ``cal``'s statistics."""
    return fit_key(SENSITIVITY, stats=cal.stats_id, setup=setup)


def boundary_key(cal: Calibration) -> str:
    """The memo key of ``cal``'s boundary ranking (its setup follows the calibration windows' length)."""
    return fit_key(BOUNDARY, stats=cal.stats_id, setup=boundary_setup(int(cal.stat("ids").shape[1])))


def stored_sensitivity(raw: Mapping[str, Any]) -> dict[str, dict[int, dict[float, float]]]:
    """A memoised probe result (JSON: string keys) as ``{stream: {layer: {budget: KL}}}``."""
    return {stream: {int(layer): {float(b): float(kl) for b, kl in costs.items()} for layer, costs in layers.items()}
            for stream, layers in raw.items()}


def _kl(ref: torch.Tensor, alt: torch.Tensor, ref_probs: torch.Tensor | None = None) -> float:
    """Mean KL(ref ‖ alt) over positions of log-probabilities ``[T, V]`` (``ref_probs``: ``ref.exp()``,
    when the caller has it)."""
    return float(((ref.exp() if ref_probs is None else ref_probs) * (ref - alt)).sum(-1).mean())


def _windows(cal: Calibration, count: int, ctx: int, n_eval: int) -> torch.Tensor:
    ids = cal.stat("ids")
    if count > ids.shape[0] or ctx + n_eval > ids.shape[1]:
        where = "" if cal.directory is None else f" --out {cal.directory}"
        raise ConfigError(f"the probe needs {count} windows of {ctx} + {n_eval} tokens; the calibration has "
                          f"{ids.shape[0]} of {ids.shape[1]}: measure more with `kakeya calibrate --force --model "
                          f"{cal.model}{where} --windows {max(count, ids.shape[0])} "
                          f"--tokens {max(ctx + n_eval, ids.shape[1])}`")
    return ids


class _Skipped(nn.Module):
    """Stands in for a decoder layer whose output is already known: returns its input unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@torch.no_grad()
def _logits_from(model: Any, layer: int, hidden: torch.Tensor, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """float32 logits ``[B, T, V]`` of ``ids [B, T]`` over ``cache`` when the decoder layers below
    ``layer`` hold exact K/V: their output is ``hidden [1, T, H]`` (measured once on the exact cache),
    so they are skipped and ``layer`` starts from it."""
    layers = decoder_layers(model)
    below = [layers[i] for i in range(layer)]
    handle = layers[layer].register_forward_pre_hook(
        lambda _m, args, kwargs: ((hidden.expand(ids.shape[0], -1, -1), *args[1:]), kwargs), with_kwargs=True)
    try:
        for i in range(layer):
            layers[i] = _Skipped()
        return model(input_ids=ids, **with_cache(model, cache), use_cache=True).logits.float()
    finally:
        handle.remove()
        for i, module in enumerate(below):
            layers[i] = module


def _stacked(caches: list[Any]) -> Any:
    """One exact transformers cache whose batch rows are what the (batch-1) ``KakeyaCache`` objects
    given hand attention, layer by layer (sliding layers windowed)."""
    from kakeyaturbo.cache import exact_cache

    states = [tuple(torch.cat(parts) for parts in zip(*(c.layers[idx].full() for c in caches)))
              for idx in range(len(caches[0].layers))]
    return exact_cache(caches[0].model_config, states, [layer.get_seq_length() for layer in caches[0].layers])


@torch.no_grad()
def measure_sensitivity(model: Any, cal: Calibration, setup: Mapping[str, Any]) -> dict[str, Any]:
    """Run the sensitivity probe ``setup`` (:meth:`kakeyaturbo.recipes.Recipe.sensitivity_setup`).

    The probes of one layer (both streams, every budget) share one forward pass: their compressed
    caches are the rows of one batch, the continuation repeated on each; the layers below it, whose
    caches are exact, are not run again (their output is the exact pass's). The KL is bit-identical
    to one full forward pass per probe. The probes' ``kakeya-v2`` transforms (every layer, stream and
    budget) are fitted first, in batches (:func:`prefit`).

    Returns:
        ``{stream: {layer: {budget: KL}}}`` with string keys (JSON-ready), the KL averaged over
        ``windows`` x ``n_eval - 1`` scored tokens.
    """
    from kakeyaturbo.cache import KakeyaCache
    from kakeyaturbo.models.arch import facts
    from kakeyaturbo.recipes import Recipe, StreamRecipe

    windows, ctx, n = setup["windows"], setup["ctx"], setup["n_eval"]
    ids = _windows(cal, windows, ctx, n).to(model.device)
    probe_model = model if model.dtype == torch.float32 else copy.deepcopy(model).float()
    base = {"name": "sensitivity-probe", "sink_tokens": setup["sink_tokens"], "chunk_tokens": setup["chunk_tokens"],
            "layout": setup["layout"], "pre_rope_keys": setup["pre_rope_keys"]}
    ropes = _ropes(probe_model)
    probes = [(stream, bits) for stream in ("k", "v") for bits in setup["budgets"]]
    recipes = {
        (layer, stream, bits): Recipe(**base, layer_overrides={layer: {stream: StreamRecipe.from_dict(
            {**setup[stream], "config": {**setup[stream]["config"], "bits": bits}}, "probe")}})
        for layer in range(cal.n_layers) for stream, bits in probes}
    prefit(cal, recipes.values(), facts(probe_model))
    total: dict[tuple[int, str, float], float] = {}
    with tqdm(total=windows * cal.n_layers * len(probes), desc="calibrate: sensitivity probe",
              unit="probe") as bar:
        for w in range(windows):
            prefix, cont = ids[w : w + 1, :ctx], ids[w : w + 1, ctx : ctx + n]
            reference = prefill(probe_model, prefix)
            exact = probe_model(input_ids=cont, **with_cache(probe_model, copy.deepcopy(reference)), use_cache=True,
                                output_hidden_states=True)
            ref = exact.logits[0].float()[:-1].log_softmax(-1)
            ref_probs = ref.exp()
            for layer in range(cal.n_layers):
                caches = [KakeyaCache(probe_model.config, recipes[(layer, *probe)], cal, rope=ropes).ingest(reference)
                          for probe in probes]
                batch = cont.expand(len(probes), -1)
                alt = _logits_from(probe_model, layer, exact.hidden_states[layer], batch, _stacked(caches))
                for (stream, bits), row in zip(probes, alt):
                    kl = _kl(ref, row[:-1].log_softmax(-1), ref_probs)
                    total[layer, stream, bits] = total.get((layer, stream, bits), 0.0) + kl / windows
                bar.update(len(probes))
    out: dict[str, dict[str, dict[str, float]]] = {"k": {}, "v": {}}
    for (layer, stream, bits), kl in total.items():
        out[stream].setdefault(str(layer), {})[f"{bits:g}"] = max(kl, 0.0)
    return out


@torch.no_grad()
def measure_boundary(model: Any, cal: Calibration) -> list[int]:
    """Layers ordered by the KL (most first) that coding one of them alone with the seed's codec
    causes, on the first calibration window."""
    from kakeyaturbo.cache import KakeyaCache
    from kakeyaturbo.recipes import Recipe, StreamRecipe

    setup = boundary_setup(int(cal.stat("ids").shape[1]))
    ctx, n = setup["ctx"], setup["n_eval"]
    ids = _windows(cal, 1, ctx, n).to(model.device)
    prefix, cont = ids[:1, :ctx], ids[:1, ctx : ctx + n]
    reference = prefill(model, prefix)
    ref = logits(model, cont, copy.deepcopy(reference)).log_softmax(-1)
    probe = StreamRecipe(codec=setup["codec"], config=setup["config"])
    kl = {}
    for layer in tqdm(range(cal.n_layers), desc="calibrate: boundary ranking", unit="layer"):
        recipe = Recipe(name=f"probe-{layer}", chunk_tokens=setup["chunk_tokens"],
                        layer_overrides={layer: {"k": probe, "v": probe}})
        cache = KakeyaCache(model.config, recipe, rope=_ropes(model)).ingest(reference)
        kl[layer] = _kl(ref, logits(model, cont, cache.to_dynamic()).log_softmax(-1))
    return sorted(kl, key=lambda k: -kl[k])


def _ropes(model: Any) -> Any:
    from kakeyaturbo.transforms.rope import Rope

    return lambda layer: Rope.from_model(model, layer)


def prefit(cal: Calibration, recipes: Iterable[Any], f: Any) -> None:
    """Fit (or read back), in batches (:func:`~kakeyaturbo.calibration.fits.v2_transforms_batch`), every
    ``kakeya-v2`` transform the plans of ``recipes`` will ask ``cal`` for on a model of facts ``f``
    (:class:`~kakeyaturbo.models.arch.ModelFacts`; :func:`~kakeyaturbo.engine.calibrated_codecs`), so
    that building them reads memoised fits."""
    from kakeyaturbo.calibration.fits import V2Request, v2_transforms_batch
    from kakeyaturbo.codecs.kakeya_v2 import KakeyaV2Codec, KakeyaV2Config
    from kakeyaturbo.engine import calibrated_codecs

    v2_transforms_batch(cal, [V2Request(c.layer, c.stream, c.space, c.layout,
                                        KakeyaV2Config.for_calibration(c.config, c.stream))
                              for recipe in recipes
                              for c in calibrated_codecs(recipe, f.n_layers, f.n_kv_heads, f.head_dim, cal,
                                                         f.layer_types)
                              if c.codec == KakeyaV2Codec.name])


def _probes(recipe: Any, cal: Calibration) -> list[tuple[str, Callable[[Any], Any], str]]:
    """The model-running probes ``recipe`` needs from ``cal``: ``(memo key, measure(model), label)``."""
    probes: list[tuple[str, Callable[[Any], Any], str]] = []
    if recipe.layer_bits == "sensitivity":
        setup = recipe.sensitivity_setup()
        probes.append((sensitivity_key(cal, setup), lambda model: measure_sensitivity(model, cal, setup),
                       "sensitivity probe"))
    if recipe.boundary_top:
        probes.append((boundary_key(cal), lambda model: measure_boundary(model, cal), "boundary ranking"))
    return probes


def pending_probes(recipe: Any, cal: Calibration) -> list[str]:
    """Labels of the probes ``recipe`` needs that ``cal`` has not memoised (each runs the model once;
    the ``kakeya-v2`` fits need only the statistics)."""
    return [label for key, _, label in _probes(recipe, cal) if cal.memo_get(key) is None]


def prepare(recipe: Any, calibration: Calibration | None, model: Any) -> None:
    """Make (or read back) every fit and probe ``recipe`` needs from ``calibration`` for ``model``:
    its sensitivity probe, boundary ranking and ``kakeya-v2`` transforms (fitted in batches:
    :func:`prefit`), with progress bars; quick once everything is memoised. First, before any fit or
    forward, checks that ``recipe`` can serve
    every layer of ``model`` (:func:`~kakeyaturbo.engine.check_recipe`); only that for recipes that need
    no calibration (or for another :class:`~kakeyaturbo.engine.CalibrationLike`)."""
    from kakeyaturbo.calibration.bundle import config_hash
    from kakeyaturbo.engine import build_plans, check_recipe
    from kakeyaturbo.models.arch import facts

    f = facts(model)
    check_recipe(recipe, f.n_layers, f.n_kv_heads, f.head_dim)
    if not isinstance(calibration, Calibration) or not recipe.needs_calibration:
        return
    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    calibration.check_model(name, config_hash(model.config))
    with calibration.fitting(f"fitting {recipe.name}"):
        for key, measure, label in _probes(recipe, calibration):
            calibration.memoised(key, lambda measure=measure: measure(model), label)
        prefit(calibration, [recipe], f)
        build_plans(recipe, f.n_layers, f.n_kv_heads, f.head_dim, calibration, f.layer_types)
