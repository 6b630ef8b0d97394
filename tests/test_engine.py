"""The engine: recipe + calibration + model facts -> per-layer plans that encode/decode token spans."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kakeyaturbo import codecs
from kakeyaturbo.codecs.base import Codec, CodecConfig, check_codebook, check_int, expect_field
from kakeyaturbo.codecs.kakeya_v2 import fit_transforms
from kakeyaturbo.container import Encoded
from kakeyaturbo.engine import build_plans, calibrated_codecs, check_recipe, member_weights, sensitivity_budgets
from kakeyaturbo.errors import ConfigError, CorruptDataError, ShapeError
from kakeyaturbo.recipes import Recipe, SensitivityProbe, StreamRecipe
from tests.transforms.test_whitening import spd_whitening

N_KV, D = 2, 16


@dataclasses.dataclass(frozen=True)
class TableConfig(CodecConfig):
    """A scalar codebook quantiser with a per-vector scale (a test stand-in for table codecs)."""

    bits: int = 2
    codebook: tuple[float, ...] | None = None

    def validate(self) -> None:
        check_int("bits", self.bits, 1, 4)
        check_codebook("codebook", self.codebook, self.bits)


class TableCodec(Codec):
    name = "test-table"
    config_class = TableConfig

    def table(self) -> torch.Tensor:
        levels = self.config.codebook or torch.linspace(-1, 1, 2**self.config.bits).tolist()
        return torch.tensor(levels)

    def _encode(self, x):
        scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-8)
        codes = ((x / scale).unsqueeze(-1) - self.table().to(x.device)).abs().argmin(-1)
        return {"codes": codes.to(torch.uint8), "scale": scale.squeeze(-1).half()}

    def _decode(self, fields, s, n, d):
        codes = expect_field(fields, "codes", torch.uint8, (s, n, d))
        scale = expect_field(fields, "scale", torch.float16, (s, n))
        return self.table().to(codes.device)[codes.long()] * scale.float().unsqueeze(-1)


@pytest.fixture
def table_codec(monkeypatch):
    monkeypatch.setitem(codecs._REGISTRY, "test-table", "tests.test_engine:TableCodec")


class FakeCalibration:
    def __init__(self, skip: dict[int, str] | None = None, tables: dict | None = None,
                 ranking: list[int] | None = None) -> None:
        self.whitenings = {layer: spd_whitening(N_KV, D, seed=layer)[0] for layer in range(4)}
        self.skipped_whitening = skip or {}
        self.tables = tables or {}
        self.boundary_ranking = ranking or []

    def whitening(self, layer, mode="sigma_q"):
        if layer in self.skipped_whitening:
            return None
        w = self.whitenings[layer]
        return w.L, w.L_inv

    def table(self, stream, bits):
        if (stream, bits) not in self.tables:
            raise ConfigError(f"no {stream.upper()} table for {bits} bits")
        return self.tables[stream, bits]


def kv(batch=2, tokens=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, N_KV, tokens, D, generator=g).to(dtype)
    return k, torch.randn(batch, N_KV, tokens, D, generator=g).to(dtype)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_plans_boundary_overrides_and_exact():
    recipe = Recipe("r", StreamRecipe("fp8"), StreamRecipe("fp8"), boundary_layers=(0, -1),
                    layer_overrides={2: {"v": {"codec": "identity"}}, -1: {"k": {"codec": "fp8"}}})
    plans = build_plans(recipe, 5, N_KV, D)
    assert [p.layer for p in plans] == list(range(5))
    assert [p.exact for p in plans] == [True, False, False, False, False]
    assert plans[2].v_codec.name == "identity" and plans[2].k_codec.name == "fp8"
    assert plans[4].k_codec.name == "fp8" and plans[4].v_codec.name == "identity"
    assert plans[1].k_codec is plans[3].k_codec  # one instance per distinct stream recipe


@pytest.mark.parametrize("layout", ["head", "token_major", "joint"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_decode_roundtrip(layout, dtype):
    plan = build_plans(Recipe("r", StreamRecipe("identity"), StreamRecipe("fp8"), chunk_tokens=8,
                              layout=layout), 1, N_KV, D)[0]
    k, v = kv(dtype=dtype)
    chunk = plan.encode(k, v)
    assert chunk.tokens == 32 and chunk.nbytes == len(chunk.k.to_bytes()) + len(chunk.v.to_bytes())
    k_hat, v_hat = plan.decode(chunk)
    assert k_hat.dtype == dtype and v_hat.shape == v.shape
    assert rel(k_hat, k) < 4e-3 and rel(v_hat, v) < 0.1


def test_own_chunks_skip_the_payload_checks_read_ones_keep_them():
    plan = build_plans(Recipe("r", StreamRecipe("fp8"), StreamRecipe("fp8"), chunk_tokens=8), 1, N_KV, D)[0]
    k, v = kv()
    own = plan.encode(k, v)
    read = dataclasses.replace(own, k=kt_from_bytes(own.k), v=kt_from_bytes(own.v), own=False)
    assert own.own and all(torch.equal(a, b) for a, b in zip(plan.decode(own), plan.decode(read)))
    read.k.fields["scale"].fill_(float("nan"))  # what a forged file could hold; own chunks cannot
    with pytest.raises(CorruptDataError, match="NaN"):
        plan.decode(read)


def kt_from_bytes(enc: Encoded) -> Encoded:
    return Encoded.from_bytes(enc.to_bytes())


def test_layouts_as_the_codec_sees_them():
    k, v = kv(tokens=16)
    for layout, shape in (("head", (2, N_KV, 2, 8, D)), ("token_major", (2, 2, 8 * N_KV, D))):
        plan = build_plans(Recipe("r", StreamRecipe("identity"), StreamRecipe("fp8"), chunk_tokens=8,
                                  layout=layout), 1, N_KV, D)[0]
        enc = plan.encode(k, v).k
        assert enc.shape == shape
    rows = enc.fields["values"].float().reshape(shape)  # [B, chunk, t * n_kv + h, D]
    assert torch.allclose(rows[1, 1, 3 * N_KV + 1], k[1, 1, 8 + 3].bfloat16().float())
    joint = build_plans(Recipe("r", StreamRecipe("identity"), StreamRecipe("fp8"), chunk_tokens=8,
                               layout="joint"), 1, N_KV, D)[0].encode(k, v).k
    assert joint.shape == (2, 2, 8, N_KV * D)  # [B, chunk, t, n_kv * D]: a token's heads side by side
    rows = joint.fields["values"].float().reshape(joint.shape)
    assert torch.allclose(rows[1, 1, 3, D : 2 * D], k[1, 1, 8 + 3].bfloat16().float())


def test_span_equals_chunk_by_chunk():
    plan = build_plans(Recipe("r", StreamRecipe("fp8"), StreamRecipe("fp8"), chunk_tokens=8), 1, N_KV, D)[0]
    k, v = kv(tokens=24)
    whole = plan.decode(plan.encode(k, v))
    parts = [plan.decode(plan.encode(k[:, :, i:i + 8], v[:, :, i:i + 8])) for i in range(0, 24, 8)]
    assert torch.equal(whole[0], torch.cat([p[0] for p in parts], dim=2))
    assert torch.equal(whole[1], torch.cat([p[1] for p in parts], dim=2))


def test_whitening_applied_and_skipped():
    cal = FakeCalibration(skip={1: "attention sink"})
    recipe = Recipe("r", StreamRecipe("identity", whiten="sigma_q"), StreamRecipe("fp8"), chunk_tokens=8)
    plans = build_plans(recipe, 2, N_KV, D, calibration=cal)
    assert plans[0].whitening is not None and not plans[0].exact
    assert plans[1].whitening is None and plans[1].whitening_skipped == "attention sink"
    assert plans[0].side_nbytes == plans[0].whitening.nbytes
    k, v = kv(tokens=8)
    chunk = plans[0].encode(k, v)
    stored = chunk.k.fields["values"].float().reshape(2, N_KV, 8, D)
    assert rel(stored, torch.einsum("bhtd,hde->bhte", k, cal.whitenings[0].L)) < 4e-3
    assert rel(plans[0].decode(chunk)[0], k) < 1e-2


def test_calibrated_table_substituted(table_codec):
    table = (-1.5, -0.5, 0.5, 1.5)
    cal = FakeCalibration(tables={("k", 2): table})
    recipe = Recipe("r", StreamRecipe("test-table", {"bits": 2}, calibrated_table=True), StreamRecipe("fp8"))
    plan = build_plans(recipe, 1, N_KV, D, calibration=cal)[0]
    assert plan.k_codec.config.codebook == table
    with pytest.raises(ConfigError, match="no K table for 3 bits"):
        build_plans(Recipe("r", StreamRecipe("test-table", {"bits": 3}, calibrated_table=True)), 1, N_KV, D,
                    calibration=cal)
    with pytest.raises(ConfigError, match="no bits/codebook"):
        build_plans(Recipe("r", StreamRecipe("fp8", calibrated_table=True)), 1, N_KV, D, calibration=cal)


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe("w", StreamRecipe("fp8", whiten="sigma_q")),
        Recipe("t", v=StreamRecipe("fp8", calibrated_table=True)),
        Recipe("b", StreamRecipe("fp8"), boundary_top=2),
    ],
)
def test_calibration_required(recipe):
    with pytest.raises(ConfigError, match="kakeya calibrate"):
        build_plans(recipe, 3, N_KV, D)


def test_boundary_top_from_ranking():
    cal = FakeCalibration(ranking=[2, 0, 1])
    plans = build_plans(Recipe("r", StreamRecipe("fp8"), boundary_top=2), 4, N_KV, D, calibration=cal)
    assert [p.exact for p in plans] == [True, False, True, False]
    with pytest.raises(ConfigError, match="ranks only 3"):
        build_plans(Recipe("r", StreamRecipe("fp8"), boundary_top=4), 4, N_KV, D, calibration=cal)


def test_bad_arguments():
    recipe = Recipe("r", StreamRecipe("fp8"), chunk_tokens=8)
    with pytest.raises(ConfigError, match="boundary_layers: layer 7"):
        build_plans(Recipe("r", boundary_layers=(7,)), 4, N_KV, D)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        build_plans(recipe, 4, 0, D)
    with pytest.raises(ConfigError, match="codec 'fp8'.*unknown field"):  # found when the recipe is made
        StreamRecipe("fp8", {"bits": 4})
    with pytest.raises(ConfigError, match="calibrated on another model"):
        build_plans(Recipe("r", StreamRecipe("fp8", whiten="sigma_q")), 1, N_KV + 1, D,
                    calibration=FakeCalibration())
    plan = build_plans(recipe, 1, N_KV, D)[0]
    k, v = kv(tokens=12)
    with pytest.raises(ShapeError, match="multiple of chunk_tokens=8"):
        plan.encode(k, v)
    k, v = kv(tokens=8)
    with pytest.raises(ShapeError, match="n_kv=2"):
        plan.encode(k[:, :1], v[:, :1])
    with pytest.raises(ShapeError, match="differ"):
        plan.encode(k, v[:1])


def test_check_recipe_names_the_layers_it_cannot_serve():
    bad = {"codec": "rotated-int", "config": {"bits": 4, "group_size": 12, "rotate": False}}  # 12 does not divide 16
    check_recipe(Recipe("r", StreamRecipe("fp8"), StreamRecipe("rotated-int", {"group_size": 8})), 3, N_KV, D)
    with pytest.raises(ConfigError, match=r"cannot serve layer\(s\) \[0\] "):
        check_recipe(Recipe("r", StreamRecipe("fp8"), boundary_layers=(0,), boundary_v=StreamRecipe(**bad)), 3, N_KV, D)
    with pytest.raises(ConfigError, match=r"cannot serve layer\(s\) \[0, 2\] .*head_dim=16.*V stream.*group_size 12"):
        check_recipe(Recipe("r", StreamRecipe("fp8"), StreamRecipe(**bad),
                            layer_overrides={1: {"v": {"codec": "fp8"}}}), 3, N_KV, D)
    with pytest.raises(ConfigError, match=r"layer\(s\) \[0, 1, 2\].*K stream"):  # any layer may rank in the top 1
        check_recipe(Recipe("r", boundary_top=1, boundary_k=StreamRecipe(**bad)), 3, N_KV, D)
    with pytest.raises(ConfigError, match="layer_overrides: layer 5"):
        check_recipe(Recipe("r", layer_overrides={5: {"k": {"codec": "fp8"}}}), 3, N_KV, D)
    check_recipe(Recipe("r", StreamRecipe("kakeya-v2", {"bits": 2.5})), 3, N_KV, D)  # fitted on demand: not coded here


class CostCalibration(FakeCalibration):
    def __init__(self, costs: dict) -> None:
        super().__init__()
        self.costs = costs

    def sensitivity(self, setup):
        out = {"k": {}, "v": {}}
        for (layer, stream), costs in self.costs.items():
            out[stream][layer] = costs
        return out


def test_sensitivity_budgets_follow_the_costs():
    v2 = StreamRecipe("kakeya-v2", {"bits": 2.0})
    recipe = Recipe("s", v2, v2, layer_bits="sensitivity", probe=SensitivityProbe(grid=(1.0, 2.0, 3.0)))
    flat = {1.0: 1.0, 2.0: 0.5, 3.0: 0.25}
    steep = {1.0: 100.0, 2.0: 10.0, 3.0: 1.0}
    cal = CostCalibration({(0, "k"): steep, (0, "v"): flat, (1, "k"): flat, (1, "v"): flat})
    budgets = sensitivity_budgets(recipe, [0, 1], cal)
    assert budgets[0, "k"] == 3.0 and sum(budgets.values()) <= 4 * 2.0
    assert sensitivity_budgets(recipe, [], cal) == {}
    with pytest.raises(ConfigError, match="kakeya calibrate"):
        sensitivity_budgets(recipe, [0], None)
    missing = CostCalibration({(0, "k"): flat})
    with pytest.raises(ConfigError, match="did not measure layer/stream 0v"):
        sensitivity_budgets(recipe, [0], missing)
    with pytest.raises(ConfigError, match="needs costs at two or more budgets"):
        sensitivity_budgets(recipe, [0], CostCalibration({(0, "k"): {1.0: 1.0}, (0, "v"): flat}))


class FittingCalibration(CostCalibration):
    """Fits ``kakeya-v2`` transforms on random rows and records what it was asked for."""

    def __init__(self, costs: dict, skip: dict[int, str]) -> None:
        super().__init__(costs)
        self.skipped_whitening = skip
        self.asked: list[tuple] = []

    def v2_transforms(self, layer, stream, space, layout, config):
        self.asked.append((layer, stream, space, layout, config.bits))
        return fit_transforms(torch.randn(N_KV, 64, D, generator=torch.Generator().manual_seed(layer)), config)


@pytest.mark.parametrize("pre_rope", [True, False])
def test_calibrated_codecs_are_what_build_plans_builds(pre_rope):
    k, v = StreamRecipe("kakeya-v2", {"bits": 2.0}, whiten="sigma_q"), StreamRecipe("kakeya-v2", {"bits": 2.0})
    recipe = Recipe("s", k, v, pre_rope_keys=pre_rope, boundary_layers=(3,), boundary_k=StreamRecipe("fp8"),
                    boundary_v=v, layer_overrides={2: {"v": {"codec": "fp8"}}}, layer_bits="sensitivity",
                    probe=SensitivityProbe(grid=(1.0, 2.0, 3.0)))
    steep, flat = {1.0: 100.0, 2.0: 10.0, 3.0: 1.0}, {1.0: 1.0, 2.0: 0.5, 3.0: 0.25}
    cal = FittingCalibration({(0, "k"): steep, (0, "v"): flat, (1, "k"): flat, (1, "v"): flat}, skip={1: "unsafe"})
    listed = [(c.layer, c.stream, c.space, c.layout, c.config["bits"])
              for c in calibrated_codecs(recipe, 4, N_KV, D, cal)]
    assert all(c.codec == "kakeya-v2" for c in calibrated_codecs(recipe, 4, N_KV, D, cal))
    build_plans(recipe, 4, N_KV, D, cal)
    assert listed == cal.asked  # every calibrated codec, in the order build_plans builds them
    keys = "none" if pre_rope else "post_rope"  # layer 1 is not whitened
    assert [(layer, stream, space) for layer, stream, space, _, _ in listed] == [
        (0, "k", "sigma_q"), (0, "v", "none"), (1, "k", keys), (1, "v", "none"), (2, "k", "sigma_q"), (3, "v", "none")]
    assert listed[0][4] == 3.0 and listed[5][4] == 2.0  # sensitivity budgets on the shared layers only


def test_plans_of_one_calibration_share_their_calibrated_codecs():
    """A second build from the same calibration object (a new cache, a new request) reuses the codecs the
    first built, warm; another calibration object gets its own, and the memo goes with its calibration."""
    import gc

    from kakeyaturbo.engine import _SHARED

    v2 = StreamRecipe("kakeya-v2", {"bits": 2.0})
    recipe = Recipe("s", v2, v2)
    flat = {1.0: 1.0, 2.0: 0.5}
    cal = FittingCalibration({(0, "k"): flat, (0, "v"): flat}, skip={})
    first, again = build_plans(recipe, 2, N_KV, D, cal), build_plans(recipe, 2, N_KV, D, cal)
    assert all(a.k_codec is b.k_codec and a.v_codec is b.v_codec for a, b in zip(first, again))
    assert len(cal.asked) == 4  # fitted once per (layer, stream)
    assert build_plans(Recipe("j", v2, v2, layout="joint"), 2, N_KV, D, cal)[0].k_codec is not first[0].k_codec
    other = FittingCalibration({(0, "k"): flat, (0, "v"): flat}, skip={})
    assert build_plans(recipe, 2, N_KV, D, other)[0].k_codec is not first[0].k_codec
    key = id(other)
    del other
    gc.collect()
    assert key not in _SHARED


def test_shared_codecs_keep_only_the_last_used(monkeypatch):
    from kakeyaturbo import engine

    monkeypatch.setattr(engine, "SHARED_CODECS", 3)
    a, b = StreamRecipe("kakeya-v2", {"bits": 2.0}), StreamRecipe("kakeya-v2", {"bits": 3.0})
    flat = {1.0: 1.0, 2.0: 0.5}
    cal = FittingCalibration({(0, "k"): flat, (0, "v"): flat}, skip={})
    first = build_plans(Recipe("a", a, a), 1, N_KV, D, cal)[0]
    second = build_plans(Recipe("b", b, b), 1, N_KV, D, cal)[0]  # a's K codec, the least recent, is let go
    assert len(engine._SHARED[id(cal)]) == 3 and len(cal.asked) == 4
    again = build_plans(Recipe("b", b, b), 1, N_KV, D, cal)[0]
    assert again.k_codec is second.k_codec and again.v_codec is second.v_codec and len(cal.asked) == 4
    assert build_plans(Recipe("a", a, a), 1, N_KV, D, cal)[0].k_codec is not first.k_codec  # built again


class JointFitting(FittingCalibration):
    """Fits joint-layout ``kakeya-v2`` transforms on random rows of a layer or of a cross-layer group."""

    def v2_transforms(self, layer, stream, space, layout, config):
        members = layer if isinstance(layer, tuple) else (layer,)
        self.asked.append((layer, stream, space, layout, config.bits))
        g = torch.Generator().manual_seed(members[0])
        rows = torch.randn(1, 256, len(members) * N_KV * D, generator=g)
        return fit_transforms(rows, config, heads=len(members) * N_KV)


GROUPED = Recipe("g", StreamRecipe("kakeya-v2", {"bits": 2.0}), StreamRecipe("kakeya-v2", {"bits": 2.0}),
                 layout="joint", layer_group=2, boundary_layers=(5,), chunk_tokens=8)


def test_group_plans_code_their_layers_side_by_side():
    cal = JointFitting({}, skip={})
    types = ["full_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention",
             "full_attention"]
    plans = build_plans(GROUPED, 6, N_KV, D, cal, types)
    assert [p.group.members if p.group else () for p in plans] == [(0, 1), (0, 1), (2, 4), (), (2, 4), ()]
    assert plans[0].group is plans[1].group and plans[0].k_codec is plans[0].group.k_codec
    assert plans[3].group is None and not plans[3].exact and plans[5].exact  # a group of one layer; a boundary
    assert [c.layer for c in calibrated_codecs(GROUPED, 6, N_KV, D, cal, types)] == [
        (0, 1), (0, 1), (2, 4), (2, 4), 3, 3]
    assert [a[0] for a in cal.asked] == [(0, 1), (0, 1), (2, 4), (2, 4), 3, 3]
    side = plans[0].group.side_nbytes
    assert side > 0 and plans[0].side_nbytes == side and plans[1].side_nbytes == 0
    group = plans[0].group
    assert (group.n_kv_heads, group.where) == (2 * N_KV, "layers 0-1")
    k, v = torch.randn(1, 2 * N_KV, 16, D), torch.randn(1, 2 * N_KV, 16, D)
    k_hat, v_hat = group.decode(group.encode(k, v))
    assert k_hat.shape == k.shape and v_hat.shape == v.shape
    with pytest.raises(ConfigError, match="layer 1 is coded with layers 0-1"):
        plans[1].encode(k[:, :N_KV], v[:, :N_KV])
    with pytest.raises(ConfigError, match="layer 0 is coded with layers 0-1"):
        plans[0].decode(group.encode(k, v))
    with pytest.raises(ConfigError, match="layer_types names 2 layers"):
        build_plans(GROUPED, 6, N_KV, D, cal, types[:2])


def test_group_budgets_are_shared_by_their_layers():
    v2 = StreamRecipe("kakeya-v2", {"bits": 2.0})
    probe = SensitivityProbe(grid=(1.0, 2.0, 3.0))
    steep, flat = {1.0: 100.0, 2.0: 10.0, 3.0: 1.0}, {1.0: 1.0, 2.0: 0.5, 3.0: 0.25}
    cal = CostCalibration({(0, "k"): steep, (0, "v"): flat, (1, "k"): flat, (1, "v"): flat,
                           (2, "k"): flat, (2, "v"): flat})
    recipe = Recipe("s", v2, v2, layer_bits="sensitivity", probe=probe)
    alone = sensitivity_budgets(recipe, [0, 1, 2], cal)
    assert sensitivity_budgets(recipe, [(0,), (1,), (2,)], cal) == alone  # groups of one: each layer alone
    shared = sensitivity_budgets(recipe, [(0, 1), 2], cal)
    assert shared[0, "k"] == shared[1, "k"] > shared[2, "k"]  # the group pays for its steep member together
    assert sum(shared.values()) <= 6 * 2.0


def test_member_weights_follow_each_members_measured_kl_at_the_groups_budget():
    v2 = StreamRecipe("kakeya-v2", {"bits": 2.0})
    probe = SensitivityProbe(grid=(1.0, 2.0, 3.0))
    steep, flat = {1.0: 100.0, 2.0: 16.0, 3.0: 1.0}, {1.0: 1.0, 2.0: 1.0, 3.0: 1.0}
    costs = {(layer, s): steep if (layer, s) == (0, "k") else flat for layer in range(3) for s in ("k", "v")}
    cal = JointFitting(costs, skip={})
    recipe = Recipe("w", v2, v2, layout="joint", layer_group=2, member_weights="sensitivity", probe=probe)
    weights = member_weights(recipe, [(0, 1), (2,)], {}, N_KV, cal)
    assert weights[0, "k"] == weights[1, "k"] == [2.0] * N_KV + [0.5] * N_KV  # sqrt(16 / 4), sqrt(1 / 4)
    assert weights[0, "v"] == [1.0] * (2 * N_KV) and (2, "k") not in weights  # a layer alone: no weights
    at_three = member_weights(recipe, [(0, 1)], {(0, "k"): 3.0, (1, "k"): 3.0}, N_KV, cal)
    assert at_three[0, "k"] == [1.0] * (2 * N_KV)  # at the group's budget the members cost the same
    plans = build_plans(recipe, 3, N_KV, D, cal)
    assert plans[0].group.k_codec.config.head_weights == tuple(weights[0, "k"])
    assert plans[2].k_codec.config.head_weights == ()
    with pytest.raises(ConfigError, match="kakeya calibrate"):
        member_weights(recipe, [(0, 1)], {}, N_KV, None)
    with pytest.raises(ConfigError, match="did not measure layer/stream 1k, 1v"):
        member_weights(recipe, [(0, 1)], {}, N_KV, CostCalibration({(0, "k"): flat, (0, "v"): flat}))
    with pytest.raises(ConfigError, match="needs layer_group > 1"):
        Recipe("w", v2, v2, layout="joint", member_weights="sensitivity")
    with pytest.raises(ConfigError, match="member_weights must be one of"):
        Recipe("w", v2, v2, layout="joint", layer_group=2, member_weights="yes")
