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
from kakeyaturbo.calibration import Calibration, CalibrationSettings, config_hash
from kakeyaturbo.errors import ConfigError, CorruptDataError

ABLATIONS = Path(__file__).parents[2] / "benchmarks" / "recipes" / "ablation"


@pytest.mark.model
def test_bundle_contents(tiny_bundle):
    model, cal = tiny_bundle
    assert sorted(cal.boundary_ranking) == [0, 1, 2] and cal.skipped_whitening == {}
    chol, inv = cal.whitening(1, "sigma_q")
    assert chol.shape == (2, 16, 16) and torch.allclose(chol @ inv, torch.eye(16).expand(2, 16, 16), atol=1e-3)
    assert cal.whitening(1, "lag")[0].shape == (2, 16, 16)
    table = cal.table("k", 2)
    assert len(table) == 4 and list(table) == sorted(table) and cal.table("k", 3) is None
    assert cal.manifest["settings"]["tokens"] == 96 and cal.manifest["split"] == "all text is calibration"
    variants = {"/".join(k.split("/")[3:6]) for k in cal.tensors if k.startswith("v2/")}
    fits = {"waterfill": "g8-r1-waterfill", "no gain": "g0-r1-waterfill", "no rotation": "g8-r0-waterfill",
            "uniform": "g8-r1-uniform"}
    keys = {f"k/{space}/m{m}-{fits['waterfill']}" for space in ("sigma_q", "lag", "none", "post_rope") for m in (0, 1)}
    keys |= {f"k/none/m{m}-{fit}" for fit in fits.values() for m in (0, 1)}
    values = {f"v/none/m0-{fit}" for fit in fits.values()} | {f"v/none/m1-{fits['waterfill']}"}
    joint = {f"{stream}/none/m{m}-g8{h}-r1-waterfill-joint" for stream, m in (("k", 1), ("v", 0))
             for h in ("", "-h4", "-h4-o3", "-h4-o4")}
    assert variants == keys | values | joint
    assert cal.tensors["v2/3/0/k/none/m1-g8-r1-waterfill-joint/basis_q"].shape == (1, 32, 32)  # 2 heads x D=16
    assert cal.tensors["v2/3/0/v/none/m0-g8-h4-r1-waterfill-joint/head_log_gain"].shape == (1, 2, 2)
    assert cal.tensors["v2/3/0/k/none/m1-g8-h4-o3-r1-waterfill-joint/reflector_bits"].shape == (1, 32)
    assert "v2/3/0/v/none/m0-g8-r1-waterfill/mean" not in cal.tensors  # values are not centred


@pytest.mark.model
@pytest.mark.parametrize("coding", ["fixed", "entropy"])
def test_bundle_round_trip_and_use(tmp_path, tiny_bundle, coding):
    model, cal = tiny_bundle
    cal.save(tmp_path / "b")
    back = Calibration.load(tmp_path / "b")
    as_json = json.loads(json.dumps({**cal.manifest, "bundle_version": 2}))
    assert back.manifest == as_json and back.tensors.keys() == cal.tensors.keys()
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
    assert all((p.k_codec.transforms.reflectors is not None) == bool(reflector_bits) for p in cache.plans)
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
    with pytest.raises(ConfigError, match="layout must be one of"):
        KakeyaCache.from_model(model, tokenmajor, cal)


@pytest.mark.model
def test_bundle_errors(tmp_path, tiny_bundle):
    model, cal = tiny_bundle
    with pytest.raises(ConfigError, match="not a calibration bundle"):
        Calibration.load(tmp_path / "missing")
    cal.save(tmp_path / "b")
    with pytest.raises(ConfigError, match="made for model 'tiny'"):
        Calibration.load(tmp_path / "b").check_model("other", "0123")
    with pytest.raises(ConfigError, match=r"no kakeya-v2 transforms at 2.5 bits.*fitted .*3/k/sigma_q/m1-g8-r1"):
        cal.v2_tensors(0, "k", 2.5, "sigma_q", "m1-g8-r1-waterfill")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({**manifest, "bundle_version": 99}))
    with pytest.raises(CorruptDataError, match="version 99"):
        Calibration.load(tmp_path / "b")
    (tmp_path / "b" / "tensors.safetensors").write_bytes(b"garbage")
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptDataError, match="unreadable"):
        Calibration.load(tmp_path / "b")


def test_settings_validated():
    with pytest.raises(ConfigError, match="ridge"):
        CalibrationSettings(ridge=2.0)
    with pytest.raises(ConfigError, match="fit in one calibration window"):
        CalibrationSettings(tokens=64, sensitivity_ctx=60)
    with pytest.raises(ConfigError, match="v2_probe_bits must be"):
        CalibrationSettings(v2_bits=(2.0, 3.0), v2_probe_bits=(2.0, 2.5))
    with pytest.raises(ConfigError, match="key space 'none'"):
        CalibrationSettings(v2_key_spaces=("sigma_q",))
    with pytest.raises(ConfigError, match="v2_probe_sink_tokens"):
        CalibrationSettings(v2_probe_sink_tokens=448)
    with pytest.raises(ConfigError, match="v2_probe_windows"):
        CalibrationSettings(windows=2, v2_probe_windows=3)
    with pytest.raises(ConfigError, match="v2_layouts"):
        CalibrationSettings(v2_layouts=("joint",))
    with pytest.raises(ConfigError, match="v2_joint_head_gain_bits needs the 'joint' layout"):
        CalibrationSettings(v2_layouts=("head",))
    for widths in ((0,), (4, 4), (True,)):
        with pytest.raises(ConfigError, match="v2_joint_head_gain_bits: need distinct widths"):
            CalibrationSettings(v2_joint_head_gain_bits=widths)
    for widths in ((1,), (3, 3), (9,)):
        with pytest.raises(ConfigError, match="v2_joint_reflector_bits: need distinct widths"):
            CalibrationSettings(v2_joint_reflector_bits=widths)
    with pytest.raises(ConfigError, match="v2_joint_reflector_bits: the reflector fits"):
        CalibrationSettings(v2_joint_head_gain_bits=())


@pytest.mark.model
@pytest.mark.parametrize("path", sorted(ABLATIONS.glob("*.json")), ids=lambda p: p.stem)
def test_every_ablation_recipe_runs_on_a_bundle_fitted_with_ablations(path, tiny_bundle):
    model, cal = tiny_bundle
    recipe = dataclasses.replace(recipes.load(path), chunk_tokens=16)
    cache = KakeyaCache.from_model(model, recipe, cal)
    assert all(p.whitening is None for p in cache.plans)  # v2 folds any whitening into its basis
    assert {p.k_space for p in cache.plans} == {recipe.k.whiten}
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 40)), cache=cache)
    k, v = cache.layers[1].full()
    assert torch.isfinite(k).all() and torch.isfinite(v).all() and cache.memory_report()["ratio"] > 1


@pytest.mark.model
def test_v2_sensitivity_drives_layer_budgets(tiny_bundle):
    model, cal = tiny_bundle
    probed = cal.manifest["v2_sensitivity"]
    assert set(probed) == {"k", "v"} and set(probed["k"]) == {"0", "1", "2"}
    assert all(set(per) == {"2", "3"} and min(per.values()) >= 0 for s in probed.values() for per in s.values())
    costs = cal.v2_costs(1, "v")
    assert list(costs) == [2.0, 3.0] and costs[2.0] == pytest.approx(max(probed["v"]["1"]["2"], 1e-9))
    recipe = recipes.Recipe.from_dict({
        "name": "spread", "sink_tokens": 1, "chunk_tokens": 16, "layer_bits": "sensitivity",
        "k": {"codec": "kakeya-v2", "config": {"bits": 2.5}}, "v": {"codec": "kakeya-v2", "config": {"bits": 2.5}},
    })
    plans = KakeyaCache.from_model(model, recipe, cal).plans
    bits = [p.k_codec.config.bits for p in plans] + [p.v_codec.config.bits for p in plans]
    assert set(bits) <= {2.0, 3.0} and sum(bits) <= 6 * 2.5
    no_probe = Calibration({**cal.manifest, "v2_sensitivity": {}}, cal.tensors)
    with pytest.raises(ConfigError, match="no kakeya-v2 sensitivity for layer 0 stream k"):
        KakeyaCache.from_model(model, recipe, no_probe)


def test_v2_costs_interpolate_in_log_kl():
    cal = Calibration({"settings": {"v2_bits": [1.0, 1.5, 2.0, 3.0, 4.0]},
                       "v2_sensitivity": {"k": {"0": {"1": 1e-2, "2": 1e-4, "3": 1e-5}}}})
    costs = cal.v2_costs(0, "k")
    assert costs[1.5] == pytest.approx(1e-3) and costs[4.0] == pytest.approx(1e-6) and costs[2.0] == pytest.approx(1e-4)


@pytest.mark.model
def test_recipes_layers_command(tmp_path, tiny_bundle, capsys):
    from kakeyaturbo.cli import main

    _, cal = tiny_bundle
    cal.save(tmp_path / "b")
    recipe = tmp_path / "spread.json"
    recipe.write_text(json.dumps({
        "name": "spread", "sink_tokens": 2, "layer_bits": "sensitivity",
        "k": {"codec": "kakeya-v2", "config": {"bits": 2.5}}, "v": {"codec": "kakeya-v2", "config": {"bits": 2.5}},
    }))
    args = ["recipes", str(recipe), "--layers", "--calibration", str(tmp_path / "b"), "--plot", str(tmp_path / "p.png"),
            "--json", str(tmp_path / "bits.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    bits = json.loads((tmp_path / "bits.json").read_text())["layer_bits"]
    assert len(bits) == 3 and "mean over coded streams" in out and (tmp_path / "p.png").is_file()
    assert main(["recipes", "--plot", str(tmp_path / "q.png")]) == 1
    assert "--layers needs a recipe name" in capsys.readouterr().err
