"""KakeyaConfig: validation naming the field, generated names that parse back, presets equal to the old JSON files."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import kakeyaturbo as kt
from kakeyaturbo.errors import ConfigError
from kakeyaturbo.recipes import KakeyaConfig, Recipe, SensitivityProbe
from kakeyaturbo.recipes.kakeya import HEAD_PROBE, PRESETS, config_for


def _preset(name: str, bits: float, description: str) -> dict:
    """The dict of a preset's recipe JSON file as it was shipped before the presets replaced them."""
    stream = {"codec": "kakeya-v2", "config": {"bits": bits, "coding": "auto", "head_gain_bits": 4,
                                               "reflector_bits": 4}, "whiten": "none", "calibrated_table": False}
    return {"name": name, "description": description, "k": stream, "v": stream, "sink_tokens": 2,
            "chunk_tokens": 64, "layout": "joint", "layer_bits": "sensitivity",
            "probe": {"config": {}, "layout": "head"}}


OLD_PRESET_FILES = {
    "kakeya-quality": _preset("kakeya-quality", 2.625, (
        "KakeyaTurbo v2, 2.625 bits/elem on average (~5.9x; ACCEPT in snapshot and streaming on 8 and 32 "
        "windows at ctx 1024 and at ctx 2048): joint-head transforms, all KV heads of a token of a layer "
        "coded as one vector with one calibrated orthogonal basis per (layer, stream), stored as quantised "
        "Householder reflectors of 4-8 bits (0.88 MB per model); a 4-bit log gain per KV head before the "
        "basis; each (layer, stream) gets its budget from the calibration's measured sensitivity; pre-RoPE "
        "keys with a static mean, values without; water-filled bits; layers given 2.125 bits or more entropy-"
        "coded (uniform steps, prefix codes in fixed per-vector slots, 8-bit step code), the others fixed-"
        "width with fitted Lloyd-Max tables and an 8-bit log gain; first two tokens exact."
    )),
    "kakeya-balanced": _preset("kakeya-balanced", 2.5, (
        "KakeyaTurbo v2, 2.5 bits/elem on average (~6.2x; ACCEPT in both modes on 8 windows at ctx 1024; "
        "MARGINAL with |dppl| < 1 % on 32 windows and at ctx 2048 in streaming (top-1 94.7 / 94.9 %)): joint-"
        "head transforms, all KV heads of a token of a layer coded as one vector with one calibrated "
        "orthogonal basis per (layer, stream), stored as quantised Householder reflectors of 4-8 bits (0.87 "
        "MB per model); a 4-bit log gain per KV head before the basis; each (layer, stream) gets its budget "
        "from the calibration's measured sensitivity; pre-RoPE keys with a static mean, values without; "
        "water-filled bits; layers given 2.125 bits or more entropy-coded (uniform steps, prefix codes in "
        "fixed per-vector slots, 8-bit step code), the others fixed-width with fitted Lloyd-Max tables and an"
        " 8-bit log gain; first two tokens exact."
    )),
    "kakeya-max": _preset("kakeya-max", 1.5, (
        "KakeyaTurbo v2, 1.5 bits/elem on average (~10.1x; MARGINAL in snapshot and streaming on 8 and 32 "
        "windows at ctx 1024 and at ctx 2048): joint-head transforms, all KV heads of a token of a layer "
        "coded as one vector with one calibrated orthogonal basis per (layer, stream), stored as quantised "
        "Householder reflectors of 4-8 bits (0.76 MB per model); a 4-bit log gain per KV head before the "
        "basis; each (layer, stream) gets its budget from the calibration's measured sensitivity; pre-RoPE "
        "keys with a static mean, values without; water-filled bits; fixed-width codes with fitted Lloyd-Max "
        "tables and an 8-bit log gain (entropy coding from 2.125 bits, which this budget's layers mostly stay"
        " below); first two tokens exact."
    )),
}


@pytest.mark.parametrize("name", sorted(OLD_PRESET_FILES))
def test_presets_equal_the_json_files_they_replace(name):
    old = Recipe.from_dict(OLD_PRESET_FILES[name])
    assert kt.recipes.load(name).to_dict() == old.to_dict()
    assert PRESETS[name].recipe(name) == old
    assert PRESETS[name].config.name == f"kakeya-{old.k.config['bits']:g}b-probe-head"
    assert name in kt.recipes.names()


def test_defaults_are_the_shipped_design():
    c = KakeyaConfig()
    assert c.name == "kakeya-2.5b"
    r = c.to_recipe()
    assert r.name == "kakeya-2.5b" and r.description.startswith("KakeyaTurbo v2, 2.5 bits/elem")
    assert r.k.config == r.v.config == {"bits": 2.5, "coding": "auto", "head_gain_bits": 4, "reflector_bits": 4}
    assert (r.layout, r.layer_bits, r.sink_tokens, r.chunk_tokens, r.pre_rope_keys) == (
        "joint", "sensitivity", 2, 64, True)


@pytest.mark.parametrize(
    ("config", "name"),
    [
        (KakeyaConfig(bits=2.625, layout="head", reflector_bits=0), "kakeya-2.625b-head-refl0"),
        (KakeyaConfig(bits=3, v_bits=2.5, layer_bits="uniform"), "kakeya-k3-v2.5b-uniform"),
        (KakeyaConfig(bits=3, head_gain_bits=0, reflector_bits=0, coding="fixed", probe=HEAD_PROBE),
         "kakeya-3b-gain0-refl0-fixed-probe-head"),
        (KakeyaConfig(bits=3, head_gain_bits=0, v_head_gain_bits=4), "kakeya-3b-gain0-vgain4"),
        (KakeyaConfig(bits=3, reflector_bits=0, key_space="sigma_q", center=False, value_center=True,
                      scale_bits=0, rotate_groups=False, allocation="uniform", fitted_tables=False, coding="fixed"),
         "kakeya-3b-refl0-fixed-sigma-q-no-kmean-vmean-scale0-no-rotation-alloc-uniform-tables-gaussian"),
        (KakeyaConfig(sink_tokens=1, probe=dataclasses.replace(HEAD_PROBE, sink_tokens=2)),
         "kakeya-2.5b-sink1-probe-head-sink2"),
        (KakeyaConfig(bits=2.1234567), "kakeya-2.1234567b"),
        (KakeyaConfig(bits=2, layer_group=4, reflector_bits=3, probe=HEAD_PROBE), "kakeya-2b-group4-refl3-probe-head"),
        (KakeyaConfig(bits=1.875, layer_group=4, member_weights="sensitivity", reflector_bits=3, probe=HEAD_PROBE),
         "kakeya-1.875b-group4-weighted-refl3-probe-head"),
    ],
)
def test_names(config, name):
    assert config.name == name
    assert KakeyaConfig.from_name(name) == config
    assert kt.recipes.load(name) == config.to_recipe()


def test_codec_configs_spell_only_departures_from_the_codec_defaults():
    c = KakeyaConfig(bits=3, layout="head", head_gain_bits=0, reflector_bits=0, coding="fixed",
                     layer_bits="uniform", sink_tokens=1, center=False, value_center=True)
    r = c.to_recipe("x")
    assert r.k.config == {"bits": 3.0, "center": False} and r.v.config == {"bits": 3.0, "center": True}
    post = KakeyaConfig(key_space="post_rope").to_recipe()
    assert post.pre_rope_keys is False and post.k.whiten == "none"
    lag = KakeyaConfig(key_space="lag", reflector_bits=0).to_recipe()
    assert lag.pre_rope_keys is True and lag.k.whiten == "lag" and lag.v.whiten == "none"


def test_equal_budgets_and_gains_collapse():
    assert KakeyaConfig(bits=3, v_bits=3) == KakeyaConfig(bits=3)
    assert KakeyaConfig(v_head_gain_bits=4) == KakeyaConfig()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 0}, r"bits must be a number in \(0, 8\]"),
        ({"bits": True}, "bits must be a number"),
        ({"v_bits": 9}, "v_bits must be a number in"),
        ({"layout": "token_major"}, r"layout must be one of \['head', 'joint'\]"),
        ({"coding": "huffman"}, "coding must be one of"),
        ({"layer_bits": "greedy"}, "layer_bits must be one of"),
        ({"key_space": "rope"}, "key_space must be one of"),
        ({"allocation": "greedy"}, "allocation must be one of"),
        ({"head_gain_bits": 9}, r"head_gain_bits must be an integer in 0\.\.8"),
        ({"reflector_bits": 1}, "reflector_bits must be 0"),
        ({"chunk_tokens": 0}, r"chunk_tokens must be an integer in 1\.\."),
        ({"sink_tokens": -1}, "sink_tokens must be an integer"),
        ({"center": None}, "center must be true or false"),
        ({"fitted_tables": 1}, "fitted_tables must be true, false or null"),
        ({"key_space": "sigma_q"}, "reflector_bits must be 0 with key_space='sigma_q'"),
        ({"coding": "entropy", "scale_bits": 0}, "coding='entropy' needs scale_bits >= 1"),
        ({"probe": {}}, "probe must be a SensitivityProbe"),
        ({"layer_group": 0}, r"layer_group must be an integer in 1\.\."),
        ({"layer_group": 2, "layout": "head"}, "layer_group=2 needs layout 'joint'"),
        ({"layer_group": 2, "key_space": "lag", "reflector_bits": 0}, "and key_space 'pre_rope' or 'post_rope'"),
        ({"member_weights": "sensitivity"}, r"needs layer_group > 1 \(token 'group<n>'\)"),
        ({"member_weights": "yes", "layer_group": 2}, "member_weights must be one of"),
    ],
)
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        KakeyaConfig(**kwargs)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("kakeya-3b-fixed-head", "not a generated kakeya name.*in this order"),
        ("kakeya-3", "not a generated kakeya name"),
        ("turboquant-3", "not a generated kakeya name"),
        ("kakeya-3b-refl4", "write 'kakeya-3b'"),
        ("kakeya-k3-v3b", "write 'kakeya-3b'"),
        ("kakeya-3.0b", "write 'kakeya-3b'"),
        ("kakeya-9b", "bits must be a number"),
    ],
)
def test_bad_names(name, match):
    with pytest.raises(ConfigError, match=match):
        KakeyaConfig.from_name(name)


def test_other_probes_have_no_name():
    c = KakeyaConfig(probe=SensitivityProbe(windows=3))
    with pytest.raises(ConfigError, match="no name token"):
        _ = c.name
    assert c.to_recipe("mine").probe.windows == 3


def test_cross_layer_preset_is_its_generated_config():
    r = kt.recipes.load("kakeya-extreme")
    assert PRESETS["kakeya-extreme"].config.name == "kakeya-0.875b-group4-refl3-uniform"
    assert r.to_dict() | {"name": "", "description": ""} == (
        kt.recipes.load("kakeya-0.875b-group4-refl3-uniform").to_dict() | {"name": "", "description": ""})
    assert (r.layer_group, r.layer_bits, r.k.config["reflector_bits"]) == (4, "uniform", 3)
    assert "MARGINAL" in r.description and "1.48 MB per model" in r.description


def test_sensitivity_budgets_below_the_probe_grid_are_refused_up_front():
    with pytest.raises(ConfigError, match="smallest of which is 1: use layer_bits='uniform'"):
        KakeyaConfig.from_name("kakeya-0.875b-group4-refl3-probe-head")
    with pytest.raises(ConfigError, match="spreads 0.875 bits"):
        KakeyaConfig(bits=1.25, v_bits=0.5)
    assert KakeyaConfig(bits=1.5, v_bits=0.5).to_recipe().layer_bits == "sensitivity"  # the mean is 1 bit
    assert KakeyaConfig(bits=0.5, layer_bits="uniform").name == "kakeya-0.5b-uniform"


def test_config_for_reads_presets_and_generated_names():
    assert config_for("kakeya-max") == KakeyaConfig(bits=1.5, probe=HEAD_PROBE)
    assert config_for("kakeya-3b-head") == KakeyaConfig(bits=3, layout="head")
    with pytest.raises(ConfigError, match="not a generated kakeya name"):
        config_for("kivi-2")


_probes = st.sampled_from([SensitivityProbe(), HEAD_PROBE, dataclasses.replace(HEAD_PROBE, sink_tokens=0),
                           dataclasses.replace(HEAD_PROBE, sink_tokens=3)])
_bits = st.one_of(st.sampled_from([1, 1.5, 1.625, 2, 2.5, 2.625, 3, 4, 8]), st.floats(0.01, 8.0))


@st.composite
def configs(draw: st.DrawFn) -> KakeyaConfig:
    """Any valid KakeyaConfig with a nameable probe."""
    kw = {
        "bits": draw(_bits), "v_bits": draw(st.one_of(st.none(), _bits)),
        "layout": draw(st.sampled_from(["head", "joint"])), "head_gain_bits": draw(st.integers(0, 8)),
        "v_head_gain_bits": draw(st.one_of(st.none(), st.integers(0, 8))),
        "reflector_bits": draw(st.sampled_from([0, 2, 3, 4, 8])),
        "coding": draw(st.sampled_from(["fixed", "entropy", "auto"])),
        "layer_bits": draw(st.sampled_from(["uniform", "sensitivity"])), "sink_tokens": draw(st.integers(0, 8)),
        "chunk_tokens": draw(st.integers(1, 512)),
        "key_space": draw(st.sampled_from(["pre_rope", "post_rope", "sigma_q", "lag"])),
        "center": draw(st.booleans()), "value_center": draw(st.booleans()), "scale_bits": draw(st.integers(0, 8)),
        "rotate_groups": draw(st.booleans()), "allocation": draw(st.sampled_from(["waterfill", "uniform"])),
        "fitted_tables": draw(st.sampled_from([None, True, False])), "probe": draw(_probes),
        "layer_group": draw(st.integers(1, 6)), "member_weights": draw(st.sampled_from(["uniform", "sensitivity"])),
    }
    try:
        return KakeyaConfig(**kw)
    except ConfigError:
        assume(False)
        raise


@given(configs())
def test_generated_names_parse_back(config):
    assert KakeyaConfig.from_name(config.name) == config


@given(configs())
def test_recipes_round_trip_through_json(config):
    recipe = config.to_recipe()
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
