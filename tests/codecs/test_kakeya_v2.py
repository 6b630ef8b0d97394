"""kakeya-v2: the codec contract (adapted: v2 needs its transforms), transforms storage, quality."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import kakeyaturbo as kt
from kakeyaturbo.codecs.kakeya_v2 import (
    AUTO_ENTROPY_BITS,
    CODINGS,
    TABLE_SLOTS,
    KakeyaV2Codec,
    KakeyaV2Config,
    V2Transforms,
    fit_transforms,
    fit_transforms_batch,
    group_rotations,
)
from kakeyaturbo.ops.bitalloc import water_fill
from kakeyaturbo.ops.householder import reflectors_nbytes

S, D = 4, 32


def synth(
    s: int, n: int, d: int, sample_seed: int, *, heavy: bool = True, values: bool = False
) -> torch.Tensor:
    """KV-like ``[s, n, d]``: fixed random basis and mean, spectrum 0.88**j, Student-t(4) coefficients
    (when ``heavy``), log-normal per-vector gains; ``sample_seed`` draws only the samples."""
    g = torch.Generator().manual_seed(99)
    basis, _ = torch.linalg.qr(torch.randn(s, d, d, generator=g))
    mean = torch.zeros(s, 1, d) if values else torch.randn(s, 1, d, generator=g)
    g = torch.Generator().manual_seed(sample_seed)
    z = torch.randn(s, n, d, generator=g)
    if heavy:
        chi2 = torch.randn(s, n, d, 4, generator=g).pow(2).sum(-1) / 4
        z = z / chi2.sqrt() / math.sqrt(2.0)
    gain = torch.exp(0.3 * torch.randn(s, n, 1, generator=g))
    return mean + gain * (z * 0.88 ** torch.arange(d)) @ basis.transpose(1, 2)


def rel_mse(y: torch.Tensor, x: torch.Tensor) -> float:
    """Squared error over the variance around each stream's mean."""
    y, x = y.float(), x.float()
    return float(((y - x) ** 2).sum() / ((x - x.mean(-2, keepdim=True)) ** 2).sum())


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return synth(S, 2048, D, 1)


CODEC_PARAMS = [(coding, 0, 0) for coding in CODINGS] + [("fixed", 4, 0), ("entropy", 4, 0), ("fixed", 0, 4),
                                                          ("entropy", 4, 3)]
"""(coding, head_gain_bits, reflector_bits) of the contract tests; head gains split each row into 2 heads."""


@pytest.fixture(scope="module", params=CODEC_PARAMS, ids=lambda p: f"{p[0]}-h{p[1]}-o{p[2]}")
def codec(calib, request) -> KakeyaV2Codec:
    coding, head_gain_bits, reflector_bits = request.param
    return KakeyaV2Codec.calibrate(calib, bits=3.0, stream="k", coding=coding, head_gain_bits=head_gain_bits,
                                   reflector_bits=reflector_bits, heads=2)


def _x(device, dtype=torch.float32, n: int = 100) -> torch.Tensor:
    return synth(S, n, D, 7).reshape(2, 2, n, D).to(device=device, dtype=dtype)


# ---- contract --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 37])
def test_odd_token_counts(codec, n):
    x = _x("cpu", n=n)
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_per_token_streaming(codec):
    x = _x("cpu", n=50)
    whole = codec.decode(codec.encode(x))
    head, tail = x[..., :17, :], x[..., 17:, :]
    parts = torch.cat([codec.decode(codec.encode(head)), codec.decode(codec.encode(tail))], -2)
    assert torch.equal(whole, parts)


def test_rejects_streams_and_dims_that_differ_from_the_transforms(codec):
    with pytest.raises(kt.ShapeError, match=r"3 streams of D=32.*S=4 streams of D=32.*multiple of S"):
        codec.encode(torch.zeros(3, 10, D))
    with pytest.raises(kt.ShapeError, match=r"4 streams of D=16.*S=4 streams of D=32"):
        codec.encode(torch.zeros(S, 10, 16))


def test_repeated_streams_use_transform_i_mod_s(codec):
    x = _x("cpu", n=12).reshape(S, 12, D)
    twice = torch.stack([x, x * 0.5])  # [2, S, n, D]: stream i of each copy uses transform i
    y = codec.decode(codec.encode(twice))
    assert torch.equal(y[0], codec.decode(codec.encode(x)))
    assert torch.equal(y[1], codec.decode(codec.encode(x * 0.5)))


def test_zero_vectors_stay_finite_and_huge_ones_raise_naming_the_vector(codec):
    x = _x("cpu", n=4).reshape(S, 4, D)
    x[:, 0] = 0.0
    assert torch.isfinite(codec.decode(codec.encode(x))).all()
    x[2, 1] *= 1e6
    with pytest.raises(kt.NumericRangeError, match=r"vector at index \(2, 1\)"):
        codec.encode(x)


def test_one_large_element_raises_and_tiny_vectors_keep_the_smallest_gains_absolute_error(codec):
    x = _x("cpu", n=4).reshape(S, 4, D)
    y = x.clone()
    y[1, 3, 5] = 7e4
    with pytest.raises(kt.NumericRangeError, match=r"\(1, 3\) \(largest value 70000 at channel 5\)"):
        codec.encode(y)
    t = codec.transforms
    tiny = t.centre.unsqueeze(1) + 1e-9 * (x - t.centre.unsqueeze(1))  # coefficients far below the grid
    err = (codec.decode(codec.encode(tiny)) - tiny).pow(2).mean(-1).sqrt()  # [S, n]
    smallest = t.log_gain[:, 0].exp() * t.sigma.float().pow(2).mean(-1).sqrt() * 4
    assert bool((err <= smallest.unsqueeze(1)).all())


def test_payload_fields_of_the_wrong_size_raise_corrupt_data(codec):
    enc = codec.encode(_x("cpu"))
    enc.fields["codes"] = enc.fields["codes"][:-1]
    with pytest.raises(kt.CorruptDataError, match="codes"):
        codec.decode(enc)
    enc = codec.encode(_x("cpu"))
    enc.shape = (3, 100, D)
    with pytest.raises(kt.CorruptDataError, match="3 streams of D=32"):
        codec.decode(enc)


def test_decoding_with_other_transforms_is_refused(codec, calib):
    other = KakeyaV2Codec.calibrate(calib[:, :1024], bits=3.0, stream="k")
    enc = codec.encode(_x("cpu"))
    with pytest.raises(kt.CorruptDataError, match="encoded with transforms"):
        other.decode(enc)
    with pytest.raises(kt.CorruptDataError, match="kakeya-v2"):
        kt.codecs.get("identity").decode(enc)


def test_codec_refuses_transforms_that_do_not_match_its_config(codec):
    t = codec.transforms
    with pytest.raises(kt.ConfigError, match="needs its calibrated transforms"):
        KakeyaV2Codec(codec.config)
    with pytest.raises(kt.ConfigError, match="fingerprint"):
        KakeyaV2Codec(dataclasses.replace(codec.config, transforms_hash="0" * 16), transforms=t)
    with pytest.raises(kt.ConfigError, match="fitted_tables"):
        KakeyaV2Codec(dataclasses.replace(codec.config, fitted_tables=True), transforms=t)
    with pytest.raises(kt.ConfigError, match="centred=False.*hold a mean"):
        KakeyaV2Codec(dataclasses.replace(codec.config, stream="v"), transforms=t)
    with pytest.raises(kt.ConfigError, match="scale_bits=0"):
        KakeyaV2Codec(dataclasses.replace(codec.config, scale_bits=0), transforms=t)
    with pytest.raises(kt.ConfigError, match="code bits per vector"):
        KakeyaV2Codec(dataclasses.replace(codec.config, bits=4.0), transforms=t)
    flipped = 4 - codec.config.head_gain_bits
    with pytest.raises(kt.ConfigError, match=f"head_gain_bits={flipped} but the transforms"):
        KakeyaV2Codec(dataclasses.replace(codec.config, head_gain_bits=flipped), transforms=t)
    flipped = 4 if codec.config.reflector_bits == 0 else 0
    with pytest.raises(kt.ConfigError, match=f"reflector_bits={flipped} but the transforms store"):
        KakeyaV2Codec(dataclasses.replace(codec.config, reflector_bits=flipped), transforms=t)


@pytest.mark.parametrize("field,value,match", [
    ("bits", 0.0, "bits"), ("bits", 8.5, "bits"), ("stream", "q", "stream"),
    ("scale_bits", 9, "scale_bits"), ("rotate_groups", 1, "rotate_groups"), ("seed", -1, "seed"),
    ("center", "yes", "center"), ("allocation", "greedy", "allocation"), ("head_gain_bits", 9, "head_gain_bits"),
    ("reflector_bits", 1, "reflector_bits"), ("reflector_bits", 9, "reflector_bits"),
    ("transforms_hash", "XYZ", "transforms_hash"), ("head_weights", (1.0, 0.0), "head_weights"),
    ("head_weights", (float("nan"),), "head_weights"), ("head_weights", ("1",), "head_weights"),
])
def test_config_validation_names_the_field(field, value, match):
    with pytest.raises(kt.ConfigError, match=match):
        KakeyaV2Config(**{field: value})
    with pytest.raises(kt.ConfigError, match="no_such_field"):
        KakeyaV2Config.from_dict({"no_such_field": 1})


def test_fit_rejects_bad_input():
    with pytest.raises(kt.ShapeError, match=r"\[S, N, D\]"):
        fit_transforms(torch.zeros(10, 8), KakeyaV2Config(bits=3.0))
    with pytest.raises(kt.ShapeError, match="at least 2"):
        fit_transforms(torch.zeros(1, 1, 8), KakeyaV2Config(bits=3.0))
    with pytest.raises(kt.ConfigError, match="code bits per vector"):
        fit_transforms(torch.randn(1, 50, 8), KakeyaV2Config(bits=0.5))
    with pytest.raises(kt.NumericRangeError, match="mean"):
        fit_transforms(torch.randn(1, 50, 8) + 1e5, KakeyaV2Config(bits=3.0))
    x = torch.randn(1, 50, 8)
    x[0, 3, 2] = float("nan")
    with pytest.raises(kt.NonFiniteInputError):
        fit_transforms(x, KakeyaV2Config(bits=3.0))
    with pytest.raises(kt.ShapeError, match="whiten must be"):
        fit_transforms(torch.randn(1, 50, 8), KakeyaV2Config(bits=3.0), whiten=torch.eye(4)[None])
    with pytest.raises(kt.ConfigError, match="reflector_bits stores an orthogonal basis"):
        fit_transforms(torch.randn(1, 50, 8), KakeyaV2Config(bits=3.0, reflector_bits=4), whiten=torch.eye(8)[None])
    for heads in (0, 3, True):
        with pytest.raises(kt.ShapeError, match="heads must be a positive divisor of D=8"):
            fit_transforms(torch.randn(1, 50, 8), KakeyaV2Config(bits=3.0, head_gain_bits=4), heads=heads)


BATCH_VARIANTS = [
    *[{"layout": layout, "head_gain_bits": hg, "reflector_bits": rb, "coding": coding}
      for layout in ("head", "joint") for hg in (0, 4) for rb in (0, 3, 4) for coding in CODINGS],
    *[{"layout": layout, **extra} for layout in ("head", "joint") for extra in (
        {"allocation": "uniform"}, {"allocation": "uniform", "reflector_bits": 4}, {"center": True},
        {"center": False}, {"scale_bits": 0}, {"scale_bits": 5, "coding": "entropy"}, {"rotate_groups": False},
        {"whiten": True}, {"whiten": True, "head_gain_bits": 4, "coding": "auto"}, {"fitted_tables": False})],
]
"""Fit variants the batched fit is checked on: layout ("head": 3 streams of D=16; "joint": 1 stream of
D=48 holding 3 heads), whitening, and config fields (each fit of a batch with its own bits and seed)."""


@pytest.mark.parametrize("variant", BATCH_VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("stream", ["k", "v"])
def test_a_batch_of_fits_is_bit_identical_to_the_fits_one_by_one(variant, stream):
    fields = dict(variant)
    s, d, heads = (3, 16, 1) if fields.pop("layout") == "head" else (1, 48, 3)
    x = torch.stack([synth(s, 300, d, seed, values=stream == "v") for seed in (3, 4, 5)])  # U = 3 samples
    whiten = None
    if fields.pop("whiten", False):
        a = torch.randn(3, s, d, d, generator=torch.Generator().manual_seed(0)) / d**0.5
        whiten = torch.linalg.cholesky(a @ a.transpose(-1, -2) + torch.eye(d))
    plan = [(0, 1.5, 0), (0, 3.25, 0), (1, 2.0, 1), (2, 2.5, 2), (1, 4.0, 7), (2, 1.25, 2)]  # (sample, bits, seed)
    configs = [KakeyaV2Config.for_calibration({**fields, "bits": bits, "seed": seed}, stream) for _, bits, seed in plan]
    samples = [p for p, _, _ in plan]
    batch = fit_transforms_batch(x, configs, whiten=whiten, samples=samples, heads=heads)
    for t, cfg, p in zip(batch, configs, samples):
        one = fit_transforms(x[p], cfg, whiten=None if whiten is None else whiten[p], heads=heads)
        mine, theirs = t.to_tensors(), one.to_tensors()
        assert mine.keys() == theirs.keys() and t.fingerprint() == one.fingerprint()
        assert all(mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine)
    if fields.get("coding") == "auto" and "fitted_tables" not in fields:  # both kinds in one batch
        assert {t.tables is None for t in batch} == {True, False}


def test_a_batch_rejects_fits_that_differ_beyond_bits_seed_and_tables():
    x = synth(1, 100, 8, 0).unsqueeze(0)
    with pytest.raises(kt.ConfigError, match=r"differ only in .*fitted_tables.\], not in \[.center.\]"):
        fit_transforms_batch(x.expand(2, -1, -1, -1), [KakeyaV2Config(bits=3.0), KakeyaV2Config(bits=2.0, stream="v")])
    with pytest.raises(kt.ShapeError, match="one sample index in 0..0 for each of the 2 configs"):
        fit_transforms_batch(x, [KakeyaV2Config(bits=3.0)] * 2, samples=[0, 1])
    with pytest.raises(kt.ShapeError, match=r"x must be a tensor \[U, S, N, D\]"):
        fit_transforms_batch(x[0], [KakeyaV2Config(bits=3.0)])
    with pytest.raises(kt.ShapeError, match=r"whiten must be \[U=1, S=1, D=8, D=8\]"):
        fit_transforms_batch(x, [KakeyaV2Config(bits=3.0)], whiten=torch.eye(8)[None])


# ---- transforms ------------------------------------------------------------------------------


def test_transforms_roundtrip_and_honest_nbytes(codec, tmp_path):
    from safetensors.torch import load_file, save_file

    t = codec.transforms
    tensors = t.to_tensors()
    heads = {"head_log_gain"} if codec.config.head_gain_bits else set()
    dense = codec.config.reflector_bits == 0
    basis = {"basis_q", "basis_scale"} if dense else {"reflectors", "reflector_scale", "reflector_bits"}
    assert set(tensors) == {"mean", "sigma", "bits", "log_gain"} | basis | heads  # keys: centred
    basis_nbytes = S * D * D + 2 * S * D if dense else reflectors_nbytes(tensors["reflector_bits"]) + 3 * S * D
    assert t.nbytes == basis_nbytes + 2 * 2 * S * D + S * D + 4 * 2 * S + len(heads) * 4 * 2 * S * 2
    assert codec.side_nbytes == t.nbytes
    save_file(tensors, str(tmp_path / "t.safetensors"))
    back = V2Transforms.from_tensors(load_file(str(tmp_path / "t.safetensors")))
    assert back.fingerprint() == t.fingerprint() == codec.config.transforms_hash
    x = _x("cpu")
    assert torch.equal(KakeyaV2Codec(codec.config, transforms=back).roundtrip(x), codec.roundtrip(x))


def test_fitted_tables_are_stored_and_counted(calib):
    c = KakeyaV2Codec.calibrate(calib, bits=3.0, stream="k", fitted_tables=True)
    tensors = c.transforms.to_tensors()
    assert tensors["tables"].shape == (S, TABLE_SLOTS) and tensors["tables"].dtype == torch.float16
    assert c.side_nbytes == S * D * D + 3 * 2 * S * D + S * D + 4 * 2 * S + 2 * S * TABLE_SLOTS
    assert V2Transforms.from_tensors(tensors).fingerprint() == c.config.transforms_hash


def test_stored_basis_is_nearly_orthonormal(codec):
    b = codec.transforms.basis.matrix()
    err = (b.transpose(1, 2) @ b - torch.eye(D, dtype=b.dtype)).abs().max()
    assert float(err) < (0.02 if codec.config.reflector_bits == 0 else 1e-12)


def test_bad_transforms_tensors_raise_corrupt_data(codec):
    tensors = codec.transforms.to_tensors()
    with pytest.raises(kt.CorruptDataError, match="missing"):
        V2Transforms.from_tensors({k: v for k, v in tensors.items() if k != "sigma"})
    with pytest.raises(kt.CorruptDataError, match="unknown"):
        V2Transforms.from_tensors({**tensors, "extra": torch.zeros(1)})
    with pytest.raises(kt.CorruptDataError, match="'mean'"):
        V2Transforms.from_tensors({**tensors, "mean": tensors["mean"].float()})
    with pytest.raises(kt.CorruptDataError, match="bits"):
        V2Transforms.from_tensors({**tensors, "bits": torch.full_like(tensors["bits"], 9)})
    with pytest.raises(kt.CorruptDataError, match="sigma"):
        V2Transforms.from_tensors({**tensors, "sigma": torch.zeros_like(tensors["sigma"])})
    with pytest.raises(kt.CorruptDataError, match="S, D > 0"):
        V2Transforms.from_tensors({**tensors, "sigma": torch.zeros(0, D, dtype=torch.float16)})
    scale = "basis_scale" if "basis_q" in tensors else "reflector_scale"
    with pytest.raises(kt.CorruptDataError, match="either basis_q and basis_scale"):
        V2Transforms.from_tensors({k: v for k, v in tensors.items() if k != scale})
    with pytest.raises(kt.CorruptDataError, match=f"{scale} must be > 0"):
        V2Transforms.from_tensors({**tensors, scale: torch.zeros_like(tensors[scale])})
    if "basis_q" in tensors:
        with pytest.raises(kt.CorruptDataError, match="'basis_q'"):
            V2Transforms.from_tensors({**tensors, "basis_q": torch.zeros(0, 0, 0, dtype=torch.int8)})
    else:
        with pytest.raises(kt.CorruptDataError, match="'reflectors'"):
            V2Transforms.from_tensors({**tensors, "reflectors": tensors["reflectors"][:-1]})
        with pytest.raises(kt.CorruptDataError, match="reflector_bits: .*0 or 2..8"):
            V2Transforms.from_tensors({**tensors, "reflector_bits": torch.ones_like(tensors["reflector_bits"])})
    with pytest.raises(kt.CorruptDataError, match="lo < hi"):
        V2Transforms.from_tensors({**tensors, "log_gain": tensors["log_gain"].flip(1)})
    grid = torch.tensor([[-1.0, 1.0]]).expand(S, 3, 2).contiguous()
    with pytest.raises(kt.CorruptDataError, match="head_log_gain must be .S, G, 2. with G dividing D=32"):
        V2Transforms.from_tensors({**tensors, "head_log_gain": grid})
    with pytest.raises(kt.CorruptDataError, match="head_log_gain needs lo < hi"):
        V2Transforms.from_tensors({**tensors, "head_log_gain": grid[:, :2].flip(-1)})


def test_value_transforms_store_no_mean_unless_asked():
    x = synth(2, 512, 16, 3, values=True)
    t = fit_transforms(x, KakeyaV2Config(bits=3.0, stream="v"))
    assert t.mean is None and "mean" not in t.to_tensors() and not bool(t.centre.any())
    assert t.nbytes == 2 * 16 * 16 + 2 * 2 * 2 * 16 + 2 * 16 + 4 * 2 * 2
    assert fit_transforms(x, KakeyaV2Config(bits=3.0, stream="v", center=True)).mean is not None


def test_whitening_is_folded_into_the_basis(calib, test_x):
    """Fitting raw keys in the metric of ``L`` codes as well, measured in that metric, as fitting
    pre-whitened keys, while the codec takes and returns raw keys and stores no ``L``."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(S, D, D, generator=g) / math.sqrt(D)
    lower = torch.linalg.cholesky(a @ a.transpose(1, 2) + 0.3 * torch.eye(D))
    folded = KakeyaV2Codec.calibrate(calib, whiten=lower, bits=3.0)
    white = KakeyaV2Codec.calibrate(calib @ lower, bits=3.0)
    assert folded.side_nbytes == white.side_nbytes
    err_folded = rel_mse(folded.roundtrip(test_x) @ lower, test_x @ lower)
    err_white = rel_mse(white.roundtrip(test_x @ lower), test_x @ lower)
    assert err_folded == pytest.approx(err_white, rel=0.1)
    plain = KakeyaV2Codec.calibrate(calib, bits=3.0)
    assert rel_mse(plain.roundtrip(test_x) @ lower, test_x @ lower) > err_folded  # the metric matters


def test_without_a_gain_every_bit_goes_to_the_codes(calib, test_x):
    c = KakeyaV2Codec.calibrate(calib, bits=3.0, scale_bits=0)
    assert c.transforms.log_gain is None and int(c.transforms.bits[0].long().sum()) == 3 * D
    enc = c.encode(test_x)
    assert "scale" not in enc.fields and 8 * enc.payload_nbytes == 3 * test_x.numel()
    assert rel_mse(c.decode(enc), test_x) < 0.2


def test_uniform_allocation_splits_the_budget_evenly(calib):
    t = KakeyaV2Codec.calibrate(calib, bits=3.0, allocation="uniform", rotate_groups=False).transforms
    widths = t.bits.long()
    assert bool((widths.sum(1) == 3 * D - 8).all()) and int(widths.max() - widths.min()) <= 1


def test_group_rotations_are_orthogonal_and_stay_inside_groups():
    widths = torch.tensor([[4, 4, 4, 4, 3, 3, 3, 1, 0, 0], [5, 3, 3, 3, 3, 3, 2, 2, 2, 0]])
    rot = group_rotations(widths, seed=3)
    assert torch.allclose(rot.transpose(1, 2) @ rot, torch.eye(10, dtype=torch.float64).expand(2, -1, -1),
                          atol=1e-12)
    same = widths.unsqueeze(2) == widths.unsqueeze(1)
    assert bool((rot[~same] == 0).all())
    assert bool((rot[widths == 0].abs().sum(-1) == 1).all())
    assert not torch.equal(rot[0, :4, :4], torch.eye(4, dtype=torch.float64))


# ---- quality ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_x() -> torch.Tensor:
    return synth(S, 1024, D, 2)


def test_error_falls_with_bits_and_payload_bits_match(calib, test_x):
    errs = []
    for bits in (2.0, 2.25, 3.0, 4.0):
        c = KakeyaV2Codec.calibrate(calib, bits=bits, stream="k")
        enc = c.encode(test_x)
        assert 8 * enc.payload_nbytes / test_x.numel() == pytest.approx(bits, abs=0.02)
        assert 8 * enc.nbytes / test_x.numel() == pytest.approx(bits, abs=0.02 + 8 * 1024 / test_x.numel())
        errs.append(rel_mse(c.decode(enc), test_x))
    assert errs[0] > errs[1] > errs[2] > errs[3], errs


def test_water_filling_beats_uniform_allocation(calib, test_x):
    c = KakeyaV2Codec.calibrate(calib, bits=3.0, stream="k", rotate_groups=False)
    t = c.transforms
    uniform = water_fill(torch.ones(S, D), int(t.bits[0].long().sum())).to(torch.uint8)
    tu = dataclasses.replace(t, bits=uniform)
    cu = KakeyaV2Codec(dataclasses.replace(c.config, transforms_hash=tu.fingerprint()), transforms=tu)
    assert rel_mse(c.roundtrip(test_x), test_x) < 0.7 * rel_mse(cu.roundtrip(test_x), test_x)


def test_group_rotation_helps(calib, test_x):
    plain = KakeyaV2Codec.calibrate(calib, bits=3.0, stream="k", rotate_groups=False)
    rotated = KakeyaV2Codec.calibrate(calib, bits=3.0, stream="k", rotate_groups=True)
    assert rel_mse(rotated.roundtrip(test_x), test_x) < rel_mse(plain.roundtrip(test_x), test_x)


def test_fitted_tables_beat_gaussian_tables_on_heavy_tails(calib, test_x):
    gauss = KakeyaV2Codec.calibrate(calib, bits=3.0, stream="k", rotate_groups=False)
    fitted = KakeyaV2Codec.calibrate(calib, bits=3.0, stream="k", rotate_groups=False, fitted_tables=True)
    assert rel_mse(fitted.roundtrip(test_x), test_x) < 0.95 * rel_mse(gauss.roundtrip(test_x), test_x)


@pytest.mark.parametrize("coding", CODINGS)
def test_values_error_scales_with_vector_norm(coding):
    x = synth(2, 1024, D, 5, values=True)
    c = KakeyaV2Codec.calibrate(x, bits=3.0, stream="v", coding=coding)
    err = (c.roundtrip(x) - x).norm(dim=-1) / x.norm(dim=-1)
    small, large = x.norm(dim=-1) < x.norm(dim=-1).median(), x.norm(dim=-1) >= x.norm(dim=-1).median()
    assert float(err[small].mean()) == pytest.approx(float(err[large].mean()), rel=0.3)


@pytest.mark.parametrize("heavy", [False, True])
@pytest.mark.parametrize("bits", [2.5, 3.0, 4.0])
def test_entropy_coding_beats_fixed_widths_in_the_same_bytes(calib, heavy, bits):
    x = synth(S, 1024, D, 3, heavy=heavy)
    fit = calib if heavy else synth(S, 2048, D, 1, heavy=False)
    fixed = KakeyaV2Codec.calibrate(fit, bits=bits, stream="k")
    entropy = KakeyaV2Codec.calibrate(fit, bits=bits, stream="k", coding="entropy")
    ef, ee = fixed.encode(x), entropy.encode(x)
    assert ee.payload_nbytes == ef.payload_nbytes
    assert rel_mse(entropy.decode(ee), x) < 0.9 * rel_mse(fixed.decode(ef), x)


def test_entropy_coding_config_rules():
    with pytest.raises(kt.ConfigError, match="coding='entropy' needs scale_bits >= 1"):
        KakeyaV2Config(coding="entropy", scale_bits=0)
    with pytest.raises(kt.ConfigError, match="fitted_tables=false"):
        KakeyaV2Config(coding="entropy", fitted_tables=True)
    with pytest.raises(kt.ConfigError, match="coding must be one of"):
        KakeyaV2Config(coding="huffman")


@pytest.mark.parametrize("bits,entropy", [(1.5, False), (2.0, False), (AUTO_ENTROPY_BITS, True), (3.0, True)])
def test_auto_coding_picks_entropy_from_its_threshold(bits, entropy):
    assert KakeyaV2Config(bits=bits, coding="auto").entropy_coded is entropy
    assert not KakeyaV2Config(bits=bits, coding="auto", scale_bits=0).entropy_coded
    assert not KakeyaV2Config(bits=bits, coding="auto", fitted_tables=True).entropy_coded


def test_entropy_coding_from_a_bundle_drops_the_fitted_tables(calib):
    t = fit_transforms(calib, KakeyaV2Config(bits=3.0, stream="k", fitted_tables=True))

    class Bundle:
        def v2_transforms(self, layer, stream, space, layout, config):
            return t if config.fitted_tables else t.without_tables()

    fixed = KakeyaV2Codec.from_calibration({"bits": 3.0}, Bundle(), 0, "k", "none")
    entropy = KakeyaV2Codec.from_calibration({"bits": 3.0, "coding": "entropy"}, Bundle(), 0, "k", "none")
    auto = KakeyaV2Codec.from_calibration({"bits": 3.0, "coding": "auto"}, Bundle(), 0, "k", "none")
    assert fixed.transforms.tables is not None and entropy.transforms.tables is None
    assert auto.config.entropy_coded and auto.transforms.tables is None
    assert entropy.side_nbytes == fixed.side_nbytes - t.tables.numel() * 2


# ---- head gains (rows holding several heads: the joint layout) ---------------------------------


def heads_apart(n: int, sample_seed: int, heads: int = 4) -> torch.Tensor:
    """Value-like rows ``[2, n, D]`` of ``heads`` heads whose norms vary independently (log-normal, σ = 1)."""
    x = synth(2, n, D, sample_seed, values=True)
    g = torch.Generator().manual_seed(sample_seed + 1)
    scale = torch.exp(torch.randn(2, n, heads, generator=g)).repeat_interleave(D // heads, dim=-1)
    return x * scale


def head_errors(y: torch.Tensor, x: torch.Tensor, heads: int = 4) -> torch.Tensor:
    """Each head's error relative to its own norm, ``[2, n, heads]``."""
    split = (2, x.shape[1], heads, D // heads)
    return (y - x).reshape(split).norm(dim=-1) / x.reshape(split).norm(dim=-1)


@pytest.mark.parametrize("coding", ["fixed", "entropy"])
def test_head_gains_bound_each_heads_error_by_its_own_norm(coding):
    fit, x = heads_apart(2048, 11), heads_apart(512, 12)
    plain = KakeyaV2Codec.calibrate(fit, bits=3.0, stream="v", coding=coding)
    gains = KakeyaV2Codec.calibrate(fit, bits=3.0, stream="v", coding=coding, head_gain_bits=4, heads=4)
    assert gains.transforms.heads == 4 and gains.config.fit_fields(0)["head_gain_bits"] == 4
    enc = gains.encode(x)
    assert 8 * enc.payload_nbytes == 3 * x.numel() and enc.fields["head_scale"].numel() == 2 * 512 * 4 * 4 // 8
    worst_plain = torch.quantile(head_errors(plain.roundtrip(x), x), 0.99)
    worst_gains = torch.quantile(head_errors(gains.decode(enc), x), 0.99)
    assert float(worst_gains) < 0.5 * float(worst_plain)


def test_head_gain_codes_are_part_of_the_payload():
    x = heads_apart(64, 12, heads=2)
    c = KakeyaV2Codec.calibrate(heads_apart(1024, 11, heads=2), bits=3.0, stream="v", head_gain_bits=4, heads=2)
    enc = c.encode(x)
    enc.fields["head_scale"] = enc.fields["head_scale"][:-1]
    with pytest.raises(kt.CorruptDataError, match="head_scale"):
        c.decode(enc)


@pytest.mark.parametrize("field,value", [("head_gain_bits", 4), ("reflector_bits", 4), ("head_weights", (2.0, 0.5))])
def test_added_fields_are_left_out_of_headers_that_do_not_use_them(field, value):
    plain, used = KakeyaV2Config(bits=3.0), KakeyaV2Config(bits=3.0, **{field: value})
    written = list(value) if isinstance(value, tuple) else value
    assert field not in plain.to_dict() and used.to_dict()[field] == written
    assert KakeyaV2Config.from_dict(plain.to_dict()) == plain and KakeyaV2Config.from_dict(used.to_dict()) == used


# ---- head weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("reflector_bits", [0, 3])
def test_head_weights_move_error_to_the_lightly_weighted_heads(reflector_bits):
    fit, x = heads_apart(2048, 11), heads_apart(512, 12)
    fields = {"bits": 1.5, "stream": "v", "head_gain_bits": 4, "heads": 4, "reflector_bits": reflector_bits}
    plain = KakeyaV2Codec.calibrate(fit, **fields)
    weighted = KakeyaV2Codec.calibrate(fit, head_weights=(4.0, 1.0, 1.0, 1.0), **fields)
    assert weighted.config.fit_fields(0)["head_weights"] == (4.0, 1.0, 1.0, 1.0)
    assert "head_weights" not in plain.config.fit_fields(0)  # unweighted fits keep their memo keys
    err_plain = head_errors(plain.roundtrip(x), x).pow(2).mean(dim=tuple(range(x.dim() - 1)))
    err_weighted = head_errors(weighted.roundtrip(x), x).pow(2).mean(dim=tuple(range(x.dim() - 1)))
    assert float(err_weighted[0]) < 0.5 * float(err_plain[0])
    assert bool((err_weighted[1:] > err_plain[1:]).all())
    assert 8 * weighted.encode(x).payload_nbytes == 8 * plain.encode(x).payload_nbytes  # same bytes


def test_equal_head_weights_change_nothing_and_weights_must_fit_the_row():
    fit, x = heads_apart(1024, 11), heads_apart(64, 12)
    fields = {"bits": 2.0, "stream": "v", "head_gain_bits": 4, "heads": 4}
    plain = KakeyaV2Codec.calibrate(fit, **fields)
    for w in ((1.0,) * 4, (3.0,) * 4):
        same = KakeyaV2Codec.calibrate(fit, head_weights=w, **fields)
        assert torch.allclose(same.roundtrip(x), plain.roundtrip(x), atol=1e-4)
    with pytest.raises(kt.ConfigError, match="head_weights holds 3 weights"):
        KakeyaV2Codec.calibrate(fit, head_weights=(1.0, 2.0, 3.0), **fields)
    assert KakeyaV2Config(head_weights=[1.0, 2.0]).head_weights == (1.0, 2.0)  # as JSON gives it


# ---- Householder reflectors ------------------------------------------------------------------


@pytest.mark.parametrize("coding", ["fixed", "entropy"])
def test_reflector_basis_costs_little_error_for_far_fewer_bytes(calib, test_x, coding):
    dense = KakeyaV2Codec.calibrate(calib, bits=2.0, stream="k", coding=coding)
    refl = KakeyaV2Codec.calibrate(calib, bits=2.0, stream="k", coding=coding, reflector_bits=4)
    t = refl.transforms
    assert refl.config.fit_fields(0)["reflector_bits"] == 4
    assert bool((t.bits == 0).any()) and torch.equal(t.basis.reflector_bits == 0, t.bits == 0)  # uncoded: not stored
    assert int(t.basis.reflector_bits[t.bits > 0].min()) == 4 and int(t.basis.reflector_bits.max()) > 4
    assert t.nbytes < dense.transforms.nbytes - S * D * D / 2
    assert rel_mse(refl.roundtrip(test_x), test_x) < 1.03 * rel_mse(dense.roundtrip(test_x), test_x)
