"""Calibration bundles: a whole (small) calibration on a tiny random Llama, save/load, and the errors
that protect against using a bundle with the wrong model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from kakeyaturbo import recipes
from kakeyaturbo.cache import KakeyaCache
from kakeyaturbo.calibration import Calibration, CalibrationSettings, config_hash, fits, prepare
from kakeyaturbo.calibration.bundle import read_manifest, statistics_id
from kakeyaturbo.calibration.probes import pending_probes
from kakeyaturbo.codecs.kakeya_v2 import KakeyaV2Config, fit_transforms
from kakeyaturbo.errors import ConfigError, CorruptDataError
from kakeyaturbo.evaluation.sweep import load_grid
from kakeyaturbo.layouts import join_heads
from kakeyaturbo.ops.bitalloc import interpolate_costs
from tests.conftest import TINY_PROBE

SWEEPS = Path(__file__).parents[2] / "benchmarks" / "sweeps"
ABLATIONS = (SWEEPS / "ablation-ctx1024.json", SWEEPS / "ablation-layer-bits-ctx1024.json")


@pytest.mark.model
def test_bundle_holds_statistics_and_fits_on_demand(tmp_path, tiny_bundle):
    model, stats = tiny_bundle
    cal = Calibration(stats.manifest, stats.statistics)
    assert stats.statistics["k/1"].shape == (2, 2 * 96, 16) and stats.statistics["ids"].shape == (2, 96)
    assert not any(name.startswith(("v2/", "chol/", "table/")) for name in stats.statistics)  # nothing fitted
    assert cal.skipped_whitening == {}
    chol, inv = cal.whitening(1, "sigma_q")
    assert chol.shape == (2, 16, 16) and torch.allclose(chol @ inv, torch.eye(16).expand(2, 16, 16), atol=1e-3)
    assert cal.whitening(1, "lag")[0].shape == (2, 16, 16)
    table = cal.table("k", 2)
    assert len(table) == 4 and list(table) == sorted(table) and len(cal.table("k", 3)) == 8  # any width
    cal.save(tmp_path / "b")
    cfg = KakeyaV2Config.for_calibration({"bits": 2.7, "head_gain_bits": 4, "reflector_bits": 3}, "k")
    fitted = cal.v2_transforms(0, "k", "none", "joint", cfg)  # any budget: fitted when first asked
    assert fitted.basis.matrix().shape == (1, 32, 32) and fitted.heads == 2 and "reflectors" in fitted.to_tensors()
    assert int(fitted.bits.long().sum()) == round(2.7 * 32) - 8 - 2 * 4
    assert {f.name.split("-")[0] for f in (tmp_path / "b" / "fits").iterdir()} == {"table", "v2"}  # written there
    again = Calibration.load(tmp_path / "b").v2_transforms(0, "k", "none", "joint", cfg)  # read back, not refitted
    assert again.fingerprint() == fitted.fingerprint()
    sinkless = stats.statistics["k/0"].float().reshape(2, 2, 96, 16)[:, :, 1:].reshape(2, -1, 16)
    direct = fit_transforms(join_heads(sinkless).unsqueeze(0), KakeyaV2Config(
        bits=2.7, head_gain_bits=4, reflector_bits=3, fitted_tables=True, seed=0), heads=2)
    assert direct.fingerprint() == fitted.fingerprint()  # the fit is the codec's own, on the sinkless sample


@pytest.mark.model
def test_a_cross_layer_group_is_fitted_on_its_layers_rows_side_by_side(tiny_bundle):
    _, stats = tiny_bundle
    cal = Calibration(stats.manifest, stats.statistics)
    cfg = KakeyaV2Config.for_calibration({"bits": 2.0, "head_gain_bits": 4, "reflector_bits": 3}, "v")
    fitted = cal.v2_transforms((0, 2), "v", "none", "joint", cfg)
    assert fitted.basis.matrix().shape == (1, 64, 64) and fitted.heads == 4
    sinkless = [stats.statistics[f"v/{i}"].float().reshape(2, 2, 96, 16)[:, :, 1:].reshape(2, -1, 16) for i in (0, 2)]
    direct = fit_transforms(join_heads(torch.cat(sinkless)).unsqueeze(0), KakeyaV2Config(
        stream="v", bits=2.0, head_gain_bits=4, reflector_bits=3, fitted_tables=True, seed=0), heads=4)
    assert direct.fingerprint() == fitted.fingerprint()  # seeded by its first layer
    assert cal.v2_transforms(0, "v", "none", "joint", cfg).fingerprint() != fitted.fingerprint()  # its own key
    k_cfg = KakeyaV2Config.for_calibration({"bits": 2.0}, "k")
    for layer, space, layout, match in [((0,), "none", "joint", "two or more increasing layers"),
                                        ((1, 0), "none", "joint", "two or more increasing layers"),
                                        ((0, 3), "none", "joint", "out of range"),
                                        ((0, 1), "none", "head", "joint layout with keys in 'none' or 'post_rope'"),
                                        ((0, 1), "sigma_q", "joint", "joint layout with keys in")]:
        with pytest.raises(ConfigError, match=match):
            cal.v2_transforms(layer, "k", space, layout, k_cfg)


@pytest.mark.model
def test_fits_in_batches_are_the_fits_one_by_one_under_the_same_keys(tmp_path, tiny_bundle, monkeypatch):
    _, stats = tiny_bundle
    joint = {"head_gain_bits": 4, "reflector_bits": 4, "coding": "auto"}
    requests = [(layer, stream, space, layout, KakeyaV2Config.for_calibration({"bits": bits, **extra}, stream))
                for layer in range(3) for bits in (1.5, 2.5, 3.0)
                for stream, space in (("k", "none"), ("k", "post_rope"), ("k", "sigma_q"), ("k", "lag"), ("v", "none"))
                for layout, extra in (("head", {}), ("joint", joint))
                if layout == "head" or space in ("none", "post_rope")]  # joint rows are not whitened
    requests += [(layers, stream, "none", "joint", KakeyaV2Config.for_calibration({"bits": bits, **joint}, stream))
                 for layers in ((0, 1), (1, 2), (0, 1, 2)) for bits in (1.5, 2.5) for stream in ("k", "v")]
    one, many = Calibration(stats.manifest, stats.statistics), Calibration(stats.manifest, stats.statistics)
    one.save(tmp_path / "one")
    many.save(tmp_path / "many")
    many.v2_transforms(*requests[4])  # one already memoised
    fit_bytes = 8 * fits.FIT_COPIES * 2 * 2 * 95 * 16  # of one fit: n_kv * windows * (tokens - 1) * head_dim
    monkeypatch.setattr(fits, "FIT_BATCH_BYTES", 5 * fit_bytes)  # batches of 5
    batched = fits.v2_transforms_batch(many, [*requests, requests[7]])  # and one asked twice
    assert len(batched) == len(requests) + 1 and batched[-1].fingerprint() == batched[7].fingerprint()
    for r, t in zip(requests, batched):
        alone = one.v2_transforms(*r)
        mine, theirs = t.to_tensors(), alone.to_tensors()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    files = [{path.name: path.read_bytes() for path in (tmp_path / name / "fits").glob("v2-*")}
             for name in ("one", "many")]
    assert len(files[0]) == len(requests) and files[0] == files[1]  # same names, same bytes


@pytest.mark.model
def test_a_corrupt_or_foreign_fit_file_is_a_miss(tmp_path, tiny_bundle):
    _, stats = tiny_bundle
    cal = Calibration(stats.manifest, stats.statistics)
    cal.save(tmp_path / "b")
    cfg = KakeyaV2Config.for_calibration({"bits": 3.0}, "v")
    good = cal.v2_transforms(2, "v", "none", "head", cfg).fingerprint()
    (path,) = (tmp_path / "b" / "fits").iterdir()
    path.write_bytes(path.read_bytes()[:100])
    assert Calibration.load(tmp_path / "b").v2_transforms(2, "v", "none", "head", cfg).fingerprint() == good
    other = Calibration.load(tmp_path / "b")
    other.memo_put(json.dumps({"kind": "v2", "forged": True}), {"x": torch.zeros(1)})
    forged = next(f for f in (tmp_path / "b" / "fits").iterdir() if f != path)
    path.write_bytes(forged.read_bytes())  # a valid file written for another key
    assert Calibration.load(tmp_path / "b").v2_transforms(2, "v", "none", "head", cfg).fingerprint() == good


@pytest.mark.model
@pytest.mark.parametrize("coding", ["fixed", "entropy"])
def test_bundle_round_trip_and_use(tmp_path, tiny_bundle, coding):
    model, cal = tiny_bundle
    Calibration(cal.manifest, cal.statistics).save(tmp_path / "b")
    back = Calibration.load(tmp_path / "b")
    as_json = json.loads(json.dumps({**cal.manifest, "bundle_version": 3}))
    assert back.manifest == as_json and back.statistics.keys() == cal.statistics.keys()
    back.check_model("tiny", config_hash(model.config))
    recipe = recipes.Recipe.from_dict({
        "name": "v2", "sink_tokens": 1, "chunk_tokens": 16,
        "k": {"codec": "kakeya-v2", "config": {"bits": 3.0, "coding": coding}, "whiten": "sigma_q"},
        "v": {"codec": "kakeya-v2", "config": {"bits": 3.0, "coding": coding}},
    })
    cache = KakeyaCache.from_model(model, recipe, back)
    assert all(p.k_codec.config.entropy_coded == (coding == "entropy") for p in cache.plans)
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 40)), cache=cache)
    report = cache.memory_report()
    chunks = [c for layer in cache.layers for c in layer.chunks]
    payload_bits = 8 * sum(c.k.payload_nbytes + c.v.payload_nbytes for c in chunks)
    elements = 3 * 2 * 2 * 39 * 16  # layers x (K, V) x heads x post-sink tokens x D
    assert payload_bits / elements == pytest.approx(3.0, abs=0.05)  # per-token bytes at the budget
    assert report["ratio"] > 1.5 and report["model_side"] > 0  # (tiny chunks: headers weigh a lot)


@pytest.mark.model
@pytest.mark.parametrize("head_gain_bits, reflector_bits", [(0, 0), (4, 0), (4, 3)])
def test_joint_layout_codes_the_heads_of_a_layer_together(tiny_bundle, head_gain_bits, reflector_bits):
    model, cal = tiny_bundle
    spec = {"codec": "kakeya-v2", "config": {"bits": 3.0, "coding": "auto", "head_gain_bits": head_gain_bits,
                                             "reflector_bits": reflector_bits}}
    recipe = recipes.Recipe.from_dict({"name": "joint", "sink_tokens": 1, "chunk_tokens": 16, "layout": "joint",
                                       "k": spec, "v": spec})
    cache = KakeyaCache.from_model(model, recipe, cal)
    assert all(p.k_codec.transforms.dim == 32 and p.v_codec.transforms.streams == 1 for p in cache.plans)
    assert all(p.v_codec.transforms.heads == (2 if head_gain_bits else 1) for p in cache.plans)
    assert all(("reflectors" in p.k_codec.transforms.to_tensors()) == bool(reflector_bits) for p in cache.plans)
    ids = torch.randint(0, 100, (1, 40))
    with torch.no_grad():
        model(ids, cache=cache)
    chunk = cache.layers[1].chunks[0]
    assert tuple(chunk.k.shape) == (1, 2, 16, 32)  # [B, chunks, C, n_kv * D]
    payload_bits = 8 * (chunk.k.payload_nbytes + chunk.v.payload_nbytes)
    assert payload_bits == 2 * 2 * 16 * round(3.0 * 32)  # K and V, 2 chunks x 16 tokens, 3 bits x 32 features
    k, v = cache.layers[1].full()
    assert k.shape == (1, 2, 40, 16) and torch.isfinite(k).all() and torch.isfinite(v).all()
    tokenmajor = recipes.Recipe.from_dict({**recipe.to_dict(), "layout": "token_major"})
    with pytest.raises(ConfigError, match="transforms exist for layouts"):
        KakeyaCache.from_model(model, tokenmajor, cal)


@pytest.mark.model
def test_bundle_errors(tmp_path, tiny_bundle):
    model, cal = tiny_bundle
    with pytest.raises(ConfigError, match="not a calibration bundle"):
        Calibration.load(tmp_path / "missing")
    Calibration(cal.manifest, cal.statistics).save(tmp_path / "b")
    with pytest.raises(ConfigError, match="made for model 'tiny'"):
        Calibration.load(tmp_path / "b").check_model("other", "0123")
    with pytest.raises(ConfigError, match="key space must be one of"):
        cal.v2_transforms(0, "v", "sigma_q", "head", KakeyaV2Config.for_calibration({"bits": 2.5}, "v"))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({**manifest, "bundle_version": 2}))
    with pytest.raises(ConfigError, match=r"version 2.*`kakeya calibrate --force --model tiny --out "):
        Calibration.load(tmp_path / "b")
    (tmp_path / "b" / "statistics.safetensors").write_bytes(b"garbage")
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptDataError, match="unreadable"):
        Calibration.load(tmp_path / "b")
    assert statistics_id(read_manifest(tmp_path / "b")) == cal.stats_id  # the manifest alone names the statistics
    (tmp_path / "b" / "statistics.safetensors").unlink()
    assert read_manifest(tmp_path / "b") == manifest
    with pytest.raises(ConfigError, match="not a calibration bundle"):
        Calibration.load(tmp_path / "b")
    no_probe = recipes.Recipe.from_dict({"name": "spread", "layer_bits": "sensitivity", "probe": TINY_PROBE,
                                         "k": {"codec": "kakeya-v2", "config": {"bits": 2.5}},
                                         "v": {"codec": "kakeya-v2", "config": {"bits": 2.5}}})
    with pytest.raises(ConfigError, match="needs the model: run `kakeya calibrate --model tiny --recipe NAME`"):
        KakeyaCache(model.config, no_probe, Calibration(cal.manifest, cal.statistics))


def test_settings_validated():
    with pytest.raises(ConfigError, match="ridge"):
        CalibrationSettings(ridge=2.0)
    with pytest.raises(ConfigError, match="windows must be an integer"):
        CalibrationSettings(windows=2.5)
    with pytest.raises(ConfigError, match="must hold exactly"):
        CalibrationSettings.from_dict({"windows": 2})


@pytest.mark.model
@pytest.mark.parametrize("name", sorted({c["recipe"] for grid in ABLATIONS for c in load_grid(grid)} - {"exact"}))
def test_every_ablation_recipe_runs_on_the_statistics(name, tiny_bundle):
    model, cal = tiny_bundle
    recipe = dataclasses.replace(recipes.load(name), chunk_tokens=16)
    recipe = dataclasses.replace(recipe, probe=recipes.SensitivityProbe(**{**recipe.probe.to_dict(), **TINY_PROBE}))
    cache = KakeyaCache.from_model(model, recipe, cal)
    assert all(p.whitening is None for p in cache.plans)  # v2 folds any whitening into its basis
    assert {p.k_space for p in cache.plans} == {recipe.k.whiten}
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 40)), cache=cache)
    k, v = cache.layers[1].full()
    assert torch.isfinite(k).all() and torch.isfinite(v).all() and cache.memory_report()["ratio"] > 1


@pytest.mark.model
def test_v2_sensitivity_drives_layer_budgets(tiny_bundle):
    model, stats = tiny_bundle
    cal = Calibration(stats.manifest, stats.statistics)
    recipe = recipes.Recipe.from_dict({
        "name": "spread", "sink_tokens": 1, "chunk_tokens": 16, "layer_bits": "sensitivity", "probe": TINY_PROBE,
        "k": {"codec": "kakeya-v2", "config": {"bits": 2.5}}, "v": {"codec": "kakeya-v2", "config": {"bits": 2.5}},
    })
    assert pending_probes(recipe, cal) == ["sensitivity probe"]
    plans = KakeyaCache.from_model(model, recipe, cal).plans
    assert pending_probes(recipe, cal) == []
    probed = cal.sensitivity(recipe.sensitivity_setup())
    assert set(probed) == {"k", "v"} and set(probed["k"]) == {0, 1, 2}
    assert all(set(per) == {2.0, 3.0} and min(per.values()) >= 0 for s in probed.values() for per in s.values())
    bits = [p.k_codec.config.bits for p in plans] + [p.v_codec.config.bits for p in plans]
    assert set(bits) <= {2.0, 2.5, 3.0} and sum(bits) <= 6 * 2.5
    joint = recipes.Recipe.from_dict({**recipe.to_dict(), "layout": "joint"})  # its own probe: another setup
    assert joint.sensitivity_setup() != recipe.sensitivity_setup()
    with pytest.raises(ConfigError, match="has not measured the sensitivity probe"):
        cal.sensitivity(joint.sensitivity_setup())
    pinned = recipes.Recipe.from_dict({**joint.to_dict(), "probe": {**TINY_PROBE, "config": {}, "layout": "head"}})
    assert pinned.sensitivity_setup()["k"]["config"] == {} and pinned.sensitivity_setup()["layout"] == "head"


def test_costs_interpolate_in_log_kl():
    costs = interpolate_costs({1.0: 1e-2, 2.0: 1e-4, 3.0: 1e-5}, (1.5, 2.0, 4.0))
    assert costs[1.5] == pytest.approx(1e-3) and costs[4.0] == pytest.approx(1e-6) and costs[2.0] == pytest.approx(1e-4)


@pytest.mark.model
def test_recipes_layers_command(tmp_path, tiny_bundle, capsys):
    from kakeyaturbo.cli import main

    model, cal = tiny_bundle
    recipe = tmp_path / "spread.json"
    recipe.write_text(json.dumps({
        "name": "spread", "sink_tokens": 2, "layer_bits": "sensitivity", "probe": TINY_PROBE,
        "k": {"codec": "kakeya-v2", "config": {"bits": 2.5}}, "v": {"codec": "kakeya-v2", "config": {"bits": 2.5}},
    }))
    bundle = Calibration(cal.manifest, cal.statistics)
    bundle.save(tmp_path / "b")
    prepare(recipes.load(recipe), bundle, model)  # what `kakeya calibrate --recipe` does
    args = ["recipes", str(recipe), "--layers", "--calibration", str(tmp_path / "b"), "--plot", str(tmp_path / "p.png"),
            "--json", str(tmp_path / "bits.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    bits = json.loads((tmp_path / "bits.json").read_text())["layer_bits"]
    assert len(bits) == 3 and "mean over coded streams" in out and (tmp_path / "p.png").is_file()
    assert main(["recipes", "--plot", str(tmp_path / "q.png")]) == 1
    assert "--layers needs a recipe name" in capsys.readouterr().err


def test_prepare_refuses_a_recipe_before_any_forward(tiny_bundle, monkeypatch):
    model, cal = tiny_bundle
    recipe = recipes.Recipe.from_dict({
        "name": "bad", "layer_bits": "sensitivity", "probe": TINY_PROBE,
        "k": {"codec": "kakeya-v2", "config": {"bits": 2.5}}, "v": {"codec": "kakeya-v2", "config": {"bits": 2.5}},
        "boundary_layers": [0], "boundary_v": {"codec": "rotated-int", "config": {"group_size": 12, "rotate": False}},
    })

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran before the recipe was checked")

    monkeypatch.setattr(model, "forward", no_forward)
    with pytest.raises(ConfigError, match=r"cannot serve layer\(s\) \[0\].*V stream, codec 'rotated-int'"):
        prepare(recipe, Calibration(cal.manifest, cal.statistics), model)


@pytest.mark.model
def test_a_batched_fit_error_names_the_layers_and_streams(tiny_bundle):
    _, stats = tiny_bundle
    cal = Calibration(stats.manifest, stats.statistics)
    whitened = KakeyaV2Config.for_calibration({"bits": 2.5, "reflector_bits": 4}, "k")  # reflectors cannot whiten
    with pytest.raises(ConfigError, match=r"kakeya-v2 fit of layer 0 K, layer 1 K: fit_transforms: reflector_bits"):
        fits.v2_transforms_batch(cal, [(layer, "k", "sigma_q", "head", whitened) for layer in (1, 0)])
