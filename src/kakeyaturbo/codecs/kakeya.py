"""`kakeya`: the KakeyaTurbo block codec (PCA skeleton + axial k-means + WHT-rotated Lloyd–Max residual).

Each stream ``[n, D]`` is cut into blocks of ``block_size`` rows (the last one may be shorter
and is encoded too). Per block: a weighted PCA skeleton (mean, ``d_eff`` basis rows), rounded
to the skeleton dtype *before* projecting; coefficients ``c = U (x - mean)``; axial spherical
k-means on their directions; ``t = <c, centre>`` rounded to the skeleton dtype and the residual
``r = c - t·centre`` computed with that stored ``t``; ``r`` zero-padded to
``W = next_pow2(d_eff)``, rotated by the unnormalised randomized-sign WHT and scaled by
``1/||r||`` (so ``||z||² = W``); ``z`` quantised with a Lloyd–Max table and bit-packed, ``||r||``
stored and always re-applied. Optional outliers ``|z| > T`` are stored exactly (f16) and
patched in before the inverse scale.

Payload fields (blocks in stream-major order, vectors in input order):

========================  ====================================  ================================
field                     shape                                 dtype
========================  ====================================  ================================
``d_eff``                 ``[G_s]`` (skeletons)                 uint8 / int16 / int32 (by ``D``)
``k_eff``                 ``[G]`` (blocks)                      uint8 / int16 (by ``min(k, B)``)
``mean``                  ``[G_s, D]``                          skeleton dtype
``basis``                 ``[Σ d_eff·D]`` (ragged rows)         skeleton dtype
``centres``               ``[Σ_blocks k_eff·d_eff]``            skeleton dtype
``seg``                   ``ceil(N·index_bits(k)/8)``           uint8, packed LSB-first
``t``, ``rnorm``          ``[N]``                               skeleton dtype
``codes``                 ``ceil(Σ_vectors W·bits/8)``          uint8, packed LSB-first
``outlier_count``         ``[N]`` (only with a threshold)       uint8 if max W <= 255 else int16
``outlier_index``         ``[M]``                               as ``outlier_count``
``outlier_value``         ``[M]``                               float16
========================  ====================================  ================================

``G_s`` is the number of blocks, or the number of streams with ``share_basis`` (one skeleton
per stream, k-means still per block). Nothing else is needed to decode.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import torch

from kakeyaturbo.codecs.base import (
    Codec,
    CodecConfig,
    Field,
    check_choice,
    check_codebook,
    check_float,
    check_input,
    check_int,
    expect_field,
    finite_number,
)
from kakeyaturbo.errors import ConfigError, CorruptDataError
from kakeyaturbo.ops.hadamard import random_signs, wht
from kakeyaturbo.ops.kmeans import assign, axial_kmeans
from kakeyaturbo.ops.lloyd_max import gaussian_table, quantize
from kakeyaturbo.ops.pca import PcaFit, exact_pca, mean_energy, randomized_pca
from kakeyaturbo.packing import index_bits, narrow, pack_bits, packed_nbytes, unpack_bits

SKELETON_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# a coefficient vector with ||c||² below this fraction of the block's mean squared row norm is zero
NEGLIGIBLE = 1e-12


@dataclasses.dataclass(frozen=True)
class KakeyaConfig(CodecConfig):
    """KakeyaTurbo block codec settings.

    Attributes:
        bits: residual bits per coordinate, 1..4.
        block_size: rows per block (the last block of a stream may be shorter).
        pca: ``"exact"`` (eigh) or ``"randomized"`` (HMT sketch).
        rank: exact: optional cap on ``d_eff``; randomized: target rank (``None`` ->
            ``max(D//2, 8)``); both clamped to ``D``.
        variance_ratio: kept fraction of (sketched) variance, in ``(0, 1]``.
        oversample, power_iters: randomized PCA sketch settings.
        kmeans_k, kmeans_iters: k-means centres per block and Lloyd step cap.
        seed: seeds the WHT signs, the k-means initialisation and (XOR an offset) the sketch.
        outlier_threshold: ``None`` (off) or ``T > 0``; scaled residual values with ``|z| > T``
            are stored exactly.
        share_basis: one PCA skeleton per stream instead of per block.
        skeleton_dtype: ``"float16"`` or ``"float32"`` storage for mean, basis, centres, ``t``
            and ``||r||``.
        codebook: ``None`` (N(0,1) Lloyd–Max table) or ``2**bits`` strictly increasing floats.
    """

    bits: int = 3
    block_size: int = 512
    pca: str = "exact"
    rank: int | None = None
    variance_ratio: float = 0.95
    oversample: int = 8
    power_iters: int = 2
    kmeans_k: int = 16
    kmeans_iters: int = 32
    seed: int = 0xCAFEBABE
    outlier_threshold: float | None = None
    share_basis: bool = False
    skeleton_dtype: str = "float16"
    codebook: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.codebook is not None:
            vals = self.codebook
            if isinstance(vals, (str, bytes)) or not hasattr(vals, "__iter__"):
                raise ConfigError(f"codebook must be a sequence of floats, got {vals!r}")
            vals = tuple(vals)
            if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in vals):
                raise ConfigError(f"codebook must hold only numbers, got {list(vals)}")
            if not all(finite_number(v) for v in vals):
                raise ConfigError(f"codebook must hold only numbers within the float32 range, got {list(vals)}")
            object.__setattr__(self, "codebook", tuple(float(v) for v in vals))
        super().__post_init__()

    def validate(self) -> None:
        check_int("bits", self.bits, 1, 4)
        check_int("block_size", self.block_size, 1, 1 << 24)
        check_choice("pca", self.pca, ("exact", "randomized"))
        if self.rank is not None:
            check_int("rank", self.rank, 1)
        check_float("variance_ratio", self.variance_ratio, 0.0, 1.0, lo_open=True)
        check_int("oversample", self.oversample, 0, 4096)
        check_int("power_iters", self.power_iters, 0, 64)
        check_int("kmeans_k", self.kmeans_k, 1, 32767)
        check_int("kmeans_iters", self.kmeans_iters, 0, 10000)
        check_int("seed", self.seed, 0, 2**64 - 1)
        if self.outlier_threshold is not None:
            check_float("outlier_threshold", self.outlier_threshold, 0.0, 1e4, lo_open=True)
        if not isinstance(self.share_basis, bool):
            raise ConfigError(f"share_basis must be True or False, got {self.share_basis!r}")
        check_choice("skeleton_dtype", self.skeleton_dtype, tuple(SKELETON_DTYPES))
        check_codebook("codebook", self.codebook, self.bits)


def small_int_dtype(max_value: int) -> torch.dtype:
    """Narrowest of uint8 / int16 / int32 holding ``0..max_value``."""
    if max_value <= 255:
        return torch.uint8
    return torch.int16 if max_value <= 32767 else torch.int32


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How ``[S, n, D]`` is cut into blocks; everything the decoder derives from the shape."""

    streams: int
    n: int
    rows: int  # rows per (full) block
    nb: int  # blocks per stream

    @property
    def blocks(self) -> int:
        return self.streams * self.nb

    def row_mask(self, device: torch.device) -> torch.Tensor:
        """bool ``[G, rows]``: which block rows hold input rows."""
        tok = torch.arange(self.nb * self.rows, device=device).view(self.nb, self.rows)
        return (tok < self.n).repeat(self.streams, 1)


def _layout(s: int, n: int, block_size: int) -> _Layout:
    rows = min(block_size, n)
    return _Layout(s, n, rows, -(-n // rows))


def _pad_rows(basis: torch.Tensor, width: int) -> torch.Tensor:
    """``[G, R, D] -> [G, width, D]``: truncate or zero-pad the row axis."""
    r = basis.shape[1]
    if r >= width:
        return basis[:, :width]
    return torch.nn.functional.pad(basis, (0, 0, 0, width - r))


def _take(centres: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """``centres[g, seg[g, i]]`` for ``centres [G, K, W]``, ``seg [G, n]`` -> ``[G, n, W]``."""
    return centres.gather(1, seg.unsqueeze(-1).expand(-1, -1, centres.shape[-1]))


def _widths(d_eff: torch.Tensor) -> torch.Tensor:
    """``W = next_pow2(d_eff)`` elementwise for an int64 tensor of positive ranks."""
    return torch.exp2(torch.ceil(torch.log2(d_eff.to(torch.float64)))).to(torch.int64)


def rotate_residual(r: torch.Tensor, signs: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Scaled rotated residual ``z = H (s ⊙ r) / norm`` (``norm = ||r||`` gives ``||z||² = W``).

    Args:
        r: float32 ``[..., W]``, ``W`` a power of two (zero-padded residual).
        signs: float32 ``[W]`` of ±1.
        norm: float32 ``[...]`` (the stored ``||r||``); where it is 0 the scale is 1.
    """
    return wht(r * signs) / torch.where(norm > 0, norm, 1.0).unsqueeze(-1)


def unrotate_residual(z: torch.Tensor, signs: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotate_residual`: ``s ⊙ H (z · norm) / W`` (``norm`` 0 gives 0)."""
    return wht(z * norm.unsqueeze(-1)) * signs / z.shape[-1]


def _with_outliers(config: KakeyaConfig) -> bool:
    return config.outlier_threshold is not None


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise CorruptDataError(f"kakeya: {msg}")


@dataclass
class _Analysis:
    """The encoder's decisions for a batch of blocks (``G`` blocks of ``rows`` rows, width ``W_max``).

    Attributes:
        lay, rmask: block layout and real-row mask ``[G, rows]``.
        d_eff, mean, basis, keep: the skeletons (rounded to the skeleton dtype) and kept ranks.
        d_blk, width: each block's rank and padded residual width ``W``.
        kk: k-means centres per block; seg, t, rnorm ``[G, rows]``; k_eff ``[G]``; centres ``[G, kk, W_max]``.
        z: scaled rotated residuals ``[G, rows, W_max]`` float32 (zero beyond each block's ``W``).
    """

    lay: _Layout
    rmask: torch.Tensor
    d_eff: torch.Tensor
    mean: torch.Tensor
    basis: torch.Tensor
    keep: torch.Tensor
    d_blk: torch.Tensor
    width: torch.Tensor
    kk: int
    seg: torch.Tensor
    t: torch.Tensor
    rnorm: torch.Tensor
    k_eff: torch.Tensor
    centres: torch.Tensor
    z: torch.Tensor

    @property
    def code_mask(self) -> torch.Tensor:
        """Stored residual coordinates: real rows, columns below the block's ``W`` (``[G, rows, W_max]``)."""
        cols = torch.arange(self.z.shape[-1], device=self.z.device)
        return self.rmask.unsqueeze(-1) & (cols < self.width.unsqueeze(1)).unsqueeze(1)


class KakeyaCodec(Codec):
    """The KakeyaTurbo block codec (see the module docstring for the algorithm and payload)."""

    name = "kakeya"
    config_class = KakeyaConfig
    config: KakeyaConfig
    payload = {
        **{k: Field((torch.uint8, torch.int16, torch.int32), 1) for k in ("d_eff", "k_eff")},
        "mean": Field(tuple(SKELETON_DTYPES.values()), 2),
        **{k: Field(tuple(SKELETON_DTYPES.values()), 1) for k in ("basis", "centres", "t", "rnorm")},
        **{k: Field(torch.uint8, 1) for k in ("seg", "codes")},
        **{k: Field((torch.uint8, torch.int16), 1, _with_outliers) for k in ("outlier_count", "outlier_index")},
        "outlier_value": Field(torch.float16, 1, _with_outliers),
    }

    @property
    def _sdtype(self) -> torch.dtype:
        return SKELETON_DTYPES[self.config.skeleton_dtype]

    def _table(self, device: torch.device) -> torch.Tensor:
        cfg = self.config
        table = gaussian_table(cfg.bits) if cfg.codebook is None else torch.tensor(cfg.codebook)
        return table.to(device=device, dtype=torch.float32)

    def _fit(self, x: torch.Tensor, w: torch.Tensor) -> PcaFit:
        cfg = self.config
        if cfg.pca == "exact":
            return exact_pca(x, w, cfg.variance_ratio, cfg.rank)
        target = cfg.rank if cfg.rank is not None else max(x.shape[-1] // 2, 8)
        return randomized_pca(x, w, cfg.variance_ratio, target, cfg.oversample, cfg.power_iters, cfg.seed)

    def _analyse(self, x: torch.Tensor) -> _Analysis:
        """Everything the encoder decides before quantisation, for ``x [S, n, D]`` float32."""
        cfg, sd, dev = self.config, self._sdtype, x.device
        s, n, d = x.shape
        lay = _layout(s, n, cfg.block_size)
        rmask = lay.row_mask(dev)
        w = rmask.to(torch.float32)
        xb = torch.nn.functional.pad(x, (0, 0, 0, lay.nb * lay.rows - n)).reshape(lay.blocks, lay.rows, d)
        if cfg.share_basis:
            fit = self._fit(x, torch.ones(s, n, device=dev))
            owner = torch.arange(lay.blocks, device=dev) // lay.nb
        else:
            fit = self._fit(xb, w)
            owner = torch.arange(lay.blocks, device=dev)
        keep = torch.arange(fit.basis.shape[1], device=dev) < fit.d_eff.unsqueeze(1)  # [G_s, R]
        mean = narrow(fit.mean, sd, "kakeya mean")
        basis = narrow(fit.basis * keep.unsqueeze(-1), sd, "kakeya basis")
        d_blk = fit.d_eff[owner]
        width = _widths(d_blk)
        wmax = int(width.max())
        kk = min(cfg.kmeans_k, lay.rows)
        grid = (lay.blocks, lay.rows)
        a = _Analysis(
            lay=lay, rmask=rmask, d_eff=fit.d_eff, mean=mean, basis=basis, keep=keep, d_blk=d_blk, width=width,
            kk=kk, seg=torch.zeros(grid, dtype=torch.int64, device=dev),
            t=torch.zeros(grid, dtype=sd, device=dev), rnorm=torch.zeros(grid, dtype=sd, device=dev),
            k_eff=torch.zeros(lay.blocks, dtype=torch.int64, device=dev),
            centres=torch.zeros(lay.blocks, kk, wmax, dtype=sd, device=dev),
            z=torch.zeros(*grid, wmax, dtype=torch.float32, device=dev),
        )
        for wd in sorted(set(width.tolist())):
            idx = (width == wd).nonzero().squeeze(1)
            o = owner[idx]
            xg, wg = xb[idx], w[idx]
            c = (xg - mean[o].float().unsqueeze(1)) @ _pad_rows(basis[o].float(), wd).transpose(1, 2)
            floor = NEGLIGIBLE * mean_energy(xg, wg)
            valid = (wg > 0) & ((c * c).sum(-1) > floor.unsqueeze(1))
            km = axial_kmeans(c, valid.to(torch.float32), kk, cfg.kmeans_iters, cfg.seed)
            cen = narrow(km.centres, sd, "kakeya centres")
            sg, tt = assign(c, cen.float(), km.k_eff, valid)
            ts = narrow(tt, sd, "kakeya t")
            r = c - ts.float().unsqueeze(-1) * _take(cen.float(), sg)
            rn = narrow(r.norm(dim=-1), sd, "kakeya residual norm")
            a.seg[idx], a.t[idx], a.rnorm[idx], a.k_eff[idx] = sg, ts, rn, km.k_eff
            a.centres[idx, :, :wd] = cen
            a.z[idx, :, :wd] = rotate_residual(r, random_signs(wd, cfg.seed, dev), rn.float())
        return a

    def scaled_residuals(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled, rotated residual coordinates ``z`` this codec would quantise for ``x [..., n, D]``
        (float32 ``[M]``, every stored coordinate of every row): what calibrated tables are fitted on."""
        x32 = check_input(x)[0]
        a = self._analyse(x32)
        return a.z[a.code_mask]

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, dev = self.config, x.device
        a = self._analyse(x)
        cols = torch.arange(a.z.shape[-1], device=dev)
        cen_mask = (torch.arange(a.kk, device=dev) < a.k_eff.unsqueeze(1)).unsqueeze(-1) & (
            cols < a.d_blk.unsqueeze(1)
        ).unsqueeze(1)
        code_mask = a.code_mask
        fields = {
            "d_eff": a.d_eff.to(small_int_dtype(x.shape[-1])),
            "k_eff": a.k_eff.to(small_int_dtype(a.kk)),
            "mean": a.mean,
            "basis": a.basis[a.keep].reshape(-1),
            "centres": a.centres[cen_mask],
            "seg": pack_bits(a.seg[a.rmask], index_bits(cfg.kmeans_k)),
            "t": a.t[a.rmask],
            "rnorm": a.rnorm[a.rmask],
            "codes": pack_bits(quantize(a.z[code_mask], self._table(dev)), cfg.bits),
        }
        if cfg.outlier_threshold is not None:
            out_mask = code_mask & (a.z.abs() > cfg.outlier_threshold)
            small = small_int_dtype(a.z.shape[-1])
            fields["outlier_count"] = out_mask.sum(-1)[a.rmask].to(small)
            fields["outlier_index"] = out_mask.nonzero()[:, 2].to(small)
            fields["outlier_value"] = narrow(a.z[out_mask], torch.float16, "kakeya outlier value")
        return fields

    def _decode(self, fields: dict[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        cfg, sd = self.config, self._sdtype
        lay = _layout(s, n, cfg.block_size)
        dev = fields["mean"].device if "mean" in fields else torch.device("cpu")
        rmask = lay.row_mask(dev)
        n_skel = s if cfg.share_basis else lay.blocks
        owner = torch.arange(lay.blocks, device=dev) // (lay.nb if cfg.share_basis else 1)
        kk = min(cfg.kmeans_k, lay.rows)
        nvec = s * n

        d_eff = expect_field(fields, "d_eff", small_int_dtype(d), (n_skel,)).long()
        _check(bool(((d_eff >= 1) & (d_eff <= d)).all()), f"d_eff outside 1..{d}")
        k_eff = expect_field(fields, "k_eff", small_int_dtype(kk), (lay.blocks,)).long()
        _check(bool(((k_eff >= 1) & (k_eff <= rmask.sum(-1).clamp_max(kk))).all()),
               "k_eff outside 1..min(kmeans_k, block rows)")
        d_blk = d_eff[owner]
        width = _widths(d_blk)
        wmax = int(width.max())
        mean = expect_field(fields, "mean", sd, (n_skel, d)).float()
        basis_flat = expect_field(fields, "basis", sd, (int(d_eff.sum()) * d,)).float()
        cen_flat = expect_field(fields, "centres", sd, (int((k_eff * d_blk).sum()),)).float()
        ib = index_bits(cfg.kmeans_k)
        seg_v = unpack_bits(expect_field(fields, "seg", torch.uint8, (packed_nbytes(nvec, ib),)), ib, nvec)
        t_v = expect_field(fields, "t", sd, (nvec,)).float()
        rn_v = expect_field(fields, "rnorm", sd, (nvec,)).float()
        _check(bool((rn_v >= 0).all()), "negative residual norm")
        vec_rows = rmask.sum(-1)
        vec_width = torch.repeat_interleave(width, vec_rows)
        _check(bool((seg_v < torch.repeat_interleave(k_eff, vec_rows)).all()), "segment id >= k_eff")
        ncodes = int(vec_width.sum())
        codes_v = unpack_bits(
            expect_field(fields, "codes", torch.uint8, (packed_nbytes(ncodes, cfg.bits),)), cfg.bits, ncodes
        )

        grid = (lay.blocks, lay.rows)
        cols = torch.arange(wmax, device=dev)
        code_mask = rmask.unsqueeze(-1) & (cols < width.unsqueeze(1)).unsqueeze(1)
        codes = torch.zeros(*grid, wmax, dtype=torch.int64, device=dev).masked_scatter(code_mask, codes_v)
        v = self._table(dev)[codes] * code_mask
        if cfg.outlier_threshold is not None:
            small = small_int_dtype(wmax)
            count = expect_field(fields, "outlier_count", small, (nvec,)).long()
            _check(bool(((count >= 0) & (count <= vec_width)).all()), "outlier count exceeds W")
            total = int(count.sum())
            oidx = expect_field(fields, "outlier_index", small, (total,)).long()
            oval = expect_field(fields, "outlier_value", torch.float16, (total,)).float()
            owner_vec = torch.repeat_interleave(torch.arange(nvec, device=dev), count)
            _check(bool(((oidx >= 0) & (oidx < vec_width[owner_vec])).all()), "outlier index >= W")
            pos = rmask.nonzero()[owner_vec]
            v[pos[:, 0], pos[:, 1], oidx] = oval
        seg = torch.zeros(grid, dtype=torch.int64, device=dev).masked_scatter(rmask, seg_v)
        t = torch.zeros(grid, device=dev).masked_scatter(rmask, t_v)
        rnorm = torch.zeros(grid, device=dev).masked_scatter(rmask, rn_v)
        rmax = int(d_eff.max())
        keep = torch.arange(rmax, device=dev) < d_eff.unsqueeze(1)
        basis = torch.zeros(n_skel, rmax, d, device=dev).masked_scatter(keep.unsqueeze(-1), basis_flat)
        cen_mask = (torch.arange(kk, device=dev) < k_eff.unsqueeze(1)).unsqueeze(-1) & (
            cols < d_blk.unsqueeze(1)
        ).unsqueeze(1)
        centres = torch.zeros(lay.blocks, kk, wmax, device=dev).masked_scatter(cen_mask, cen_flat)

        out = torch.zeros(*grid, d, device=dev)
        for wd in sorted(set(width.tolist())):
            idx = (width == wd).nonzero().squeeze(1)
            o = owner[idx]
            r_hat = unrotate_residual(v[idx, :, :wd], random_signs(wd, cfg.seed, dev), rnorm[idx])
            c_hat = t[idx].unsqueeze(-1) * _take(centres[idx, :, :wd], seg[idx]) + r_hat
            out[idx] = mean[o].unsqueeze(1) + c_hat @ _pad_rows(basis[o], wd)
        return out.reshape(s, lay.nb * lay.rows, d)[:, :n]

