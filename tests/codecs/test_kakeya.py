import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kakeyaturbo as kt
from kakeyaturbo.codecs.kakeya import KakeyaCodec, KakeyaConfig, rotate_residual, unrotate_residual
from kakeyaturbo.ops.hadamard import next_pow2, random_signs
from kakeyaturbo.ops.lloyd_max import gaussian_table
from tests.conftest import lowrank


def _err(codec: KakeyaCodec, x: torch.Tensor) -> float:
    return float(((codec.roundtrip(x) - x) ** 2).sum() / ((x - x.mean(-2, keepdim=True)) ** 2).sum())


@given(st.integers(0, 7), st.integers(0, 2**31))
def test_scaled_residual_has_norm_w_and_inverts(log_w, seed):
    w = 2**log_w
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(6, w, generator=g, dtype=torch.float64)
    r[0] = 0.0
    s = random_signs(w, seed).double()
    norm = r.norm(dim=-1)
    z = rotate_residual(r, s, norm)
    assert torch.allclose((z * z).sum(-1)[1:], torch.full((5,), float(w), dtype=torch.float64))
    assert torch.equal(z[0], torch.zeros(w, dtype=torch.float64))
    assert torch.allclose(unrotate_residual(z, s, norm), r, atol=1e-12)


def _formula_nbytes(enc: kt.Encoded, cfg: KakeyaConfig) -> int:
    """Container size rebuilt from the format: header + skeleton + per-vector fields + codes + outliers."""
    s, n, d = math.prod(enc.shape[:-2]), enc.shape[-2], enc.shape[-1]
    rows = min(cfg.block_size, n)
    nb = -(-n // rows)
    es = {"float16": 2, "float32": 4}[cfg.skeleton_dtype]
    d_eff = enc.fields["d_eff"].long().tolist()
    k_eff = enc.fields["k_eff"].long().tolist()
    blk_rows = [min(rows, n - b * rows) for b in range(nb)] * s
    d_blk = [d_eff[g // nb] if cfg.share_basis else d_eff[g] for g in range(s * nb)]
    widths = [next_pow2(v) for v in d_blk]
    kk = min(cfg.kmeans_k, rows)
    total = len(d_eff) * (1 if d <= 255 else 2) + len(k_eff) * (1 if kk <= 255 else 2)
    total += es * (len(d_eff) * d + sum(d_eff) * d + sum(k * v for k, v in zip(k_eff, d_blk)))  # skeleton
    seg_bits = max(1, math.ceil(math.log2(cfg.kmeans_k))) if cfg.kmeans_k > 1 else 1
    total += math.ceil(s * n * seg_bits / 8) + 2 * es * s * n  # seg ids, t, ||r||
    total += math.ceil(sum(r * w for r, w in zip(blk_rows, widths)) * cfg.bits / 8)  # residual codes
    if cfg.outlier_threshold is not None:
        small = 1 if max(widths) <= 255 else 2
        total += small * s * n + (small + 2) * int(enc.fields["outlier_count"].long().sum())
    header = 12 + len(enc._header()) + 4
    return header + total


CONFIGS = [
    {},
    {"bits": 2, "block_size": 100},
    {"bits": 4, "pca": "randomized", "rank": 8, "variance_ratio": 1.0, "block_size": 64},
    {"bits": 1, "share_basis": True, "skeleton_dtype": "float32", "kmeans_k": 5},
    {"bits": 3, "outlier_threshold": 1.5, "block_size": 48},
    {"bits": 2, "pca": "randomized", "share_basis": True, "outlier_threshold": 2.0, "kmeans_k": 1},
]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_byte_accounting_matches_the_formula(overrides):
    codec = kt.codecs.get("kakeya", **overrides)
    x = lowrank(3, 150, 32, rank=6, noise=0.05)
    enc = codec.encode(x)
    assert enc.nbytes == len(enc.to_bytes()) == _formula_nbytes(enc, codec.config)
    rel = _err(codec, x)
    assert rel < 0.6, rel


def test_ratio_beats_the_seed_reference():
    # the seed charges 10 B/vector (u32 seg id) for 5.785x at D=128, rank 64, k=16, b=2, block 1024
    x = lowrank(1, 1024, 128, rank=128, noise=0.1)
    codec = kt.codecs.get("kakeya", bits=2, pca="randomized", rank=64, variance_ratio=1.0, block_size=1024)
    enc = codec.encode(x)
    assert enc.fields["d_eff"].tolist() == [64]
    assert x.numel() * 2 / enc.nbytes >= 5.785


def test_error_falls_with_bits_on_low_rank_data():
    x = lowrank(2, 256, 32, rank=8, noise=0.01)
    codecs = [kt.codecs.get("kakeya", bits=b, block_size=128, variance_ratio=1.0) for b in (1, 2, 3, 4)]
    errs = [_err(c, x) for c in codecs]
    assert errs[0] > errs[1] > errs[2] > errs[3], errs
    assert errs[3] < 0.01


@pytest.mark.parametrize("overrides", CONFIGS[1:])
def test_deterministic_and_batched_equals_per_stream(overrides):
    codec = kt.codecs.get("kakeya", **overrides)
    x = lowrank(3, 130, 32, rank=6, noise=0.05)
    assert codec.encode(x).to_bytes() == codec.encode(x).to_bytes()
    whole = codec.roundtrip(x)
    parts = torch.stack([codec.roundtrip(x[i]) for i in range(3)])
    assert torch.allclose(whole, parts, atol=1e-5)


def test_tail_block_is_encoded_not_dropped():
    x = lowrank(1, 1000, 32, rank=6, noise=0.01)
    codec = kt.codecs.get("kakeya", bits=4, block_size=512, variance_ratio=1.0)
    enc = codec.encode(x)
    assert enc.fields["k_eff"].numel() == 2 and enc.fields["t"].numel() == 1000
    err = ((codec.decode(enc) - x) ** 2).sum(-1)[0]
    assert float(err[512:].mean()) < 2 * float(err[:512].mean()) + 1e-6


def test_f16_overflow_raises_and_float32_skeleton_works():
    x = lowrank(1, 64, 16, rank=4) * 1e5
    with pytest.raises(kt.NumericRangeError, match=r"kakeya mean.*skeleton_dtype='float32'"):
        kt.codecs.get("kakeya", block_size=32).encode(x)
    codec = kt.codecs.get("kakeya", block_size=32, skeleton_dtype="float32", variance_ratio=1.0)
    y = codec.roundtrip(x)
    assert torch.isfinite(y).all() and _err(codec, x) < 0.05


def test_custom_codebook_is_used():
    x = lowrank(2, 128, 32, rank=8, noise=0.05)
    base = kt.codecs.get("kakeya", bits=2, block_size=64, variance_ratio=1.0)
    same = kt.codecs.get("kakeya", bits=2, block_size=64, variance_ratio=1.0,
                         codebook=tuple(gaussian_table(2).tolist()))
    wide = kt.codecs.get("kakeya", bits=2, block_size=64, variance_ratio=1.0, codebook=(-6.0, -3.0, 3.0, 6.0))
    assert torch.equal(same.roundtrip(x), base.roundtrip(x))
    assert _err(wide, x) > 2 * _err(base, x)
    assert kt.codecs.decode(kt.Encoded.from_bytes(wide.encode(x).to_bytes())).shape == x.shape


def test_outliers_reduce_error_and_use_small_ints():
    x = lowrank(2, 256, 32, rank=16, noise=0.05)
    plain = kt.codecs.get("kakeya", bits=2, block_size=128, variance_ratio=1.0)
    patched = kt.codecs.get("kakeya", bits=2, block_size=128, variance_ratio=1.0, outlier_threshold=1.0)
    enc = patched.encode(x)
    assert enc.fields["outlier_count"].dtype == torch.uint8
    assert enc.fields["outlier_index"].dtype == torch.uint8
    assert enc.fields["outlier_value"].dtype == torch.float16
    assert int(enc.fields["outlier_count"].long().sum()) == enc.fields["outlier_value"].numel() > 0
    assert _err(patched, x) < _err(plain, x)
    assert enc.nbytes > plain.encode(x).nbytes


def test_share_basis_stores_one_skeleton_per_stream():
    x = lowrank(3, 256, 32, rank=6, noise=0.01)
    enc = kt.codecs.get("kakeya", block_size=64, share_basis=True).encode(x)
    assert enc.fields["mean"].shape == (3, 32) and enc.fields["d_eff"].shape == (3,)
    assert enc.fields["k_eff"].shape == (12,)


def test_packed_segment_ids_and_f16_scalars():
    x = lowrank(1, 512, 32, rank=6, noise=0.01)
    enc = kt.codecs.get("kakeya", block_size=512, kmeans_k=16).encode(x)
    assert enc.fields["seg"].dtype == torch.uint8 and enc.fields["seg"].numel() == 512 * 4 // 8
    assert enc.fields["t"].dtype == enc.fields["rnorm"].dtype == torch.float16


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bits", 0), ("bits", 5), ("block_size", 0), ("pca", "svd"), ("rank", 0), ("variance_ratio", 0.0),
        ("variance_ratio", 1.5), ("oversample", -1), ("power_iters", -1), ("kmeans_k", 0),
        ("kmeans_iters", -1), ("seed", -1), ("outlier_threshold", 0.0), ("share_basis", 1),
        ("skeleton_dtype", "bfloat16"), ("codebook", (0.0, 1.0)), ("codebook", (1.0, 0.0, 2.0, 3.0)),
        ("codebook", "abcd"),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(kt.ConfigError, match=field):
        kt.codecs.get("kakeya", **{field: value})


def test_config_roundtrips_through_dict():
    cfg = KakeyaConfig(bits=2, codebook=[-1, -0.5, 0.5, 1], outlier_threshold=2.0, rank=8)
    assert cfg.codebook == (-1.0, -0.5, 0.5, 1.0)
    assert KakeyaConfig.from_dict(cfg.to_dict()) == cfg


def _tamper(enc: kt.Encoded, name: str, fn) -> kt.Encoded:
    fields = dict(enc.fields)
    fields[name] = fn(fields[name].clone())
    return kt.Encoded(enc.codec, enc.config, enc.shape, enc.dtype, fields)


@pytest.mark.parametrize(
    ("name", "fn", "match"),
    [
        ("d_eff", lambda t: t.fill_(0), "d_eff"),
        ("d_eff", lambda t: t.fill_(40), "d_eff"),
        ("k_eff", lambda t: t.fill_(200), "k_eff"),
        ("basis", lambda t: t[:-1], "basis"),
        ("codes", lambda t: torch.cat([t, t[:1]]), "codes"),
        ("seg", lambda t: t.fill_(255), "segment id"),
        ("rnorm", lambda t: t.fill_(-1.0), "residual norm"),
        ("t", lambda t: t.fill_(float("inf")), "'t'"),
        ("outlier_count", lambda t: t.fill_(200), "outlier count"),
        ("outlier_index", lambda t: t.fill_(100), "outlier index"),
        ("outlier_value", lambda t: t[1:], "outlier_value"),
    ],
)
def test_inconsistent_fields_raise_corrupt_data(name, fn, match):
    codec = kt.codecs.get("kakeya", block_size=64, outlier_threshold=1.0, kmeans_k=5)
    enc = codec.encode(lowrank(2, 100, 32, rank=6, noise=0.05))
    with pytest.raises(kt.CorruptDataError, match=match):
        codec.decode(_tamper(enc, name, fn))


def test_scaled_residuals_are_what_the_codec_quantises():
    x = lowrank(2, 300, 64, rank=8, noise=0.05)
    codec = KakeyaCodec(bits=2, block_size=128, pca="randomized", variance_ratio=1.0)
    z = codec.scaled_residuals(x)
    w = 32  # randomized rank D/2 = 32 -> W = 32
    assert z.numel() == 2 * 300 * w
    # scaled by the stored (f16-rounded) norm, so ||z||^2 = W up to f16 rounding of that norm
    assert torch.allclose((z.reshape(-1, w) ** 2).sum(-1), torch.full((600,), float(w)), rtol=2e-3)
    # a table fitted on them is what calibration stores; quantising with it beats the Gaussian table
    from kakeyaturbo.ops import lloyd_max

    fitted = lloyd_max.fit(z, 2)
    err = lambda t: float(((lloyd_max.dequantize(lloyd_max.quantize(z, t), t) - z) ** 2).mean())  # noqa: E731
    assert err(fitted) <= err(lloyd_max.gaussian_table(2)) + 1e-6
