"""Recipes: validation naming the field, JSON round trips, the built-in set."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kakeyaturbo as kt
from kakeyaturbo.errors import ConfigError
from kakeyaturbo.recipes import EXACT, Recipe, StreamRecipe

REQUIRED = [
    "exact", "fp8", "rotated-int2", "rotated-int3", "rotated-int4", "rotated-int8", "kivi-2", "kivi-4",
    "turboquant-2", "turboquant-3", "turboquant-4", "turboquant-prod-3", "turboquant-prod-4",
    "rotated-int8-k-turboquant-4-v", "rotated-int8-k-turboquant-3-v", "v1.3-ppl", "v1.4-pareto",
]


def test_builtin_names():
    assert set(REQUIRED) <= set(kt.recipes.names())


@pytest.mark.parametrize("name", kt.recipes.names())
def test_builtin_loads_and_roundtrips(name, tmp_path):
    recipe = kt.recipes.load(name)
    assert recipe.name == name and recipe.description
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    path = tmp_path / "r.json"
    recipe.save(path)
    assert kt.recipes.load(path) == recipe


def test_seed_recipes_match_the_spec():
    v13 = kt.recipes.load("v1.3-ppl")
    assert v13.boundary_layers == (0, 1, 7, 14, 28, 29) and v13.layout == "token_major"
    assert v13.k.whiten == "sigma_q" and v13.k.calibrated_table and v13.v.calibrated_table
    assert v13.k.config["bits"] == 3 and v13.k.config["outlier_threshold"] == 2.0
    assert v13.v.config["bits"] == 2 and v13.v.config["share_basis"] is True
    assert v13.chunk_tokens == v13.k.config["block_size"] == 512
    v14 = kt.recipes.load("v1.4-pareto")
    assert v14.boundary_layers == (0, 1, 28, 29) and v14.k.config["pca"] == "exact"
    assert v14.v.codec == "besicovitch" and v14.v.config["direction_bits"] == 3
    kivi = kt.recipes.load("kivi-2")
    assert kivi.k.config["axis"] == "channel" and kivi.v.config["axis"] == "token"
    exact = kt.recipes.load("exact")
    assert exact.k.is_exact and exact.v.is_exact


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"chunk_tokens": 1.5}, "chunk_tokens"),
        ({"sink_tokens": -1}, "sink_tokens"),
        ({"boundary_top": True}, "boundary_top"),
        ({"boundary_layers": (0, "x")}, "boundary_layers"),
        ({"boundary_layers": "01"}, "boundary_layers"),
        ({"layout": "rows"}, "layout"),
        ({"pre_rope_keys": 1}, "pre_rope_keys"),
        ({"v": StreamRecipe("fp8", whiten="sigma_q")}, "v.whiten"),
        ({"boundary_v": StreamRecipe(whiten="lag")}, "boundary_v.whiten"),
        ({"k": {"codec": "fp8"}}, "k must be a StreamRecipe"),
        ({"layer_overrides": {"x": {"k": {}}}}, "layer_overrides"),
        ({"layer_overrides": {3: {"q": {}}}}, "layer_overrides[3]"),
        ({"layer_overrides": {3: {"v": {"whiten": "sigma_q"}}}}, "layer_overrides[3].v"),
        ({"layer_overrides": {3: {"k": {"codec": "nope"}}}}, "layer_overrides[3].k"),
        ({"name": ""}, "name"),
        ({"layer_bits": "greedy"}, "layer_bits"),
        ({"layer_bits": "sensitivity", "k": StreamRecipe("fp8")}, "layer_bits='sensitivity'.*k is 'fp8'"),
        ({"layer_bits": "sensitivity", "k": StreamRecipe("kakeya-v2", {"bits": 2}),
          "v": StreamRecipe("kakeya-v2")}, "v is 'kakeya-v2' with bits=None"),
        ({"layer_bits": "sensitivity", "k": StreamRecipe("kakeya-v2", {"bits": 1}),
          "v": StreamRecipe("kakeya-v2", {"bits": 0.5})}, "spreads 0.75 bits .* smallest of which is 1"),
        ({"layer_group": 0}, "layer_group must be an integer >= 1"),
        ({"layer_group": 2.0}, "layer_group must be an integer >= 1"),
        ({"layer_group": 2, "k": StreamRecipe("kakeya-v2"), "v": StreamRecipe("kakeya-v2")}, "needs layout 'joint'"),
        ({"layer_group": 2, "layout": "joint", "k": StreamRecipe("kakeya-v2"), "v": StreamRecipe("fp8")},
         "v is 'fp8'"),
        ({"layer_group": 2, "layout": "joint", "k": StreamRecipe("kakeya-v2", whiten="sigma_q"),
          "v": StreamRecipe("kakeya-v2")}, "k is 'kakeya-v2' \\(whiten 'sigma_q'\\)"),
    ],
)
def test_bad_recipe_names_the_field(kwargs, field):
    args = {"name": "r", **kwargs}
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        Recipe(**args)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"codec": "nope"}, "codec"),
        ({"whiten": "pca"}, "whiten"),
        ({"calibrated_table": "yes"}, "calibrated_table"),
        ({"config": {1: 2}}, "config"),
        ({"codec": "kakeya", "config": {"codebook": [0.0, 1.0]}, "calibrated_table": True}, "codebook"),
    ],
)
def test_bad_stream_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        StreamRecipe(**kwargs)


def test_codec_configs_are_checked_when_the_recipe_is_read():
    with pytest.raises(ConfigError, match=r"k: config of codec 'kakeya': bits must be an integer in 1..4, got 9"):
        Recipe.from_dict({"name": "r", "k": {"codec": "kakeya", "config": {"bits": 9}}})
    with pytest.raises(ConfigError, match=r"v: config of codec 'kakeya-v2': KakeyaV2Config: unknown field\(s\)"):
        Recipe.from_dict({"name": "r", "v": {"codec": "kakeya-v2", "config": {"bits": 2.0, "foo": 1}}})
    assert Recipe.from_dict({"name": "r", "k": {"codec": "kakeya-v2", "config": {"bits": 2.5}}}).k.config == {
        "bits": 2.5}


@pytest.mark.parametrize("content, message", [
    (b"\x80\xff\x00binary", "not UTF-8 text"),
    (b'{"k": {"codec": "fp8"}}', "the field 'name' is missing"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b'{"name": "r", "k": {"codec": "kakeya", "config": {"bits": 9}}}', "bits must be an integer"),
    (b'["a", "list"]', "must be a JSON object"),
])
def test_bad_recipe_files_raise_config_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "recipe.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as exc:
        kt.recipes.load(path)
    assert str(path) in str(exc.value)


def test_unknown_keys_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="unknown field"):
        Recipe.from_dict({"name": "r", "bits": 3})
    with pytest.raises(ConfigError, match=r"k: unknown field"):
        Recipe.from_dict({"name": "r", "k": {"codec": "fp8", "bits": 3}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        kt.recipes.load(bad)
    with pytest.raises(ConfigError, match="unknown recipe 'no-such-recipe'"):
        kt.recipes.load("no-such-recipe")


def test_layer_override_keys_become_ints():
    recipe = Recipe.from_dict({"name": "r", "layer_overrides": {"-1": {"k": {"codec": "fp8"}}}})
    assert recipe.layer_overrides == {-1: {"k": StreamRecipe("fp8")}}
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe


_codec_configs = st.one_of(
    st.tuples(st.sampled_from(["identity", "fp8"]), st.just({})),
    st.tuples(st.just("rotated-int"), st.fixed_dictionaries({"bits": st.sampled_from([2, 3, 4, 8]),
                                                             "group_size": st.sampled_from([8, 16, 32])})),
    st.tuples(st.just("kivi"), st.fixed_dictionaries({"bits": st.sampled_from([2, 4]),
                                                      "group_size": st.integers(1, 64)})),
)
_streams = st.builds(
    lambda cc, table: StreamRecipe(codec=cc[0], config=cc[1], calibrated_table=table),
    _codec_configs, st.booleans(),
)


@given(
    k=_streams,
    v=_streams,
    boundary=st.lists(st.integers(-4, 30), max_size=5).map(tuple),
    sink=st.integers(0, 8),
    chunk=st.integers(1, 1024),
    layout=st.sampled_from(["head", "token_major"]),
    whiten=st.sampled_from(["none", "sigma_q", "lag"]),
    overrides=st.dictionaries(st.integers(-3, 30), st.fixed_dictionaries({"v": _streams}), max_size=3),
)
def test_json_roundtrip_property(k, v, boundary, sink, chunk, layout, whiten, overrides):
    k = StreamRecipe(k.codec, k.config, whiten, k.calibrated_table)
    recipe = Recipe("p", k, v, boundary_layers=boundary, sink_tokens=sink, chunk_tokens=chunk, layout=layout,
                    layer_overrides=overrides, boundary_k=EXACT)
    assert Recipe.from_json(recipe.to_json()) == recipe
