"""`turboquant` (TurboQuant_mse) and `turboquant-prod` (TurboQuant_prod), arXiv 2504.19874.

TurboQuant_mse stores a norm, rotates the unit vector and quantises every rotated coordinate
with the Lloyd–Max codebook of N(0, 1/d) (``gaussian_table(b) / sqrt(d)``), which is what a
coordinate of a randomly rotated unit vector in d dimensions approximately follows.

* ``variant="paper"``: one f16 norm per vector, dense Haar-random orthogonal rotation.
* ``variant="shipped"``: the turboquant_plus / llama.cpp layout: the vector is zero-padded to
  a power of two ``W``, rotated by the randomized Walsh–Hadamard transform and cut into blocks
  of ``block`` coordinates, each with its own f16 norm (``b + 16/block`` bits per element).

TurboQuant_prod runs TurboQuant_mse (paper variant) at ``bits - 1`` and adds one QJL sign bit
per coordinate of ``S r`` for the residual ``r`` plus an f16 ``||r||``; the estimate
``c·||r||·Sᵀ sign(S r)`` of ``r`` is unbiased, so ``qᵀx̂`` is an unbiased estimate of ``qᵀx``.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from kakeyaturbo.codecs.base import Codec, CodecConfig, Field, check_choice, check_int, expect_field
from kakeyaturbo.codecs.rotated_int import read_codes
from kakeyaturbo.ops.hadamard import next_pow2, random_signs, rotate, unrotate
from kakeyaturbo.ops.lloyd_max import dequantize, gaussian_table, quantize
from kakeyaturbo.packing import narrow, pack_bits

QJL_SEED_OFFSET = 1000


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)


@lru_cache(maxsize=64)
def _haar_cpu(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).to(torch.float32)


@lru_cache(maxsize=64)
def _gaussian_cpu(d: int, seed: int) -> torch.Tensor:
    return torch.randn(d, d, generator=_generator(seed), dtype=torch.float32)


def haar_rotation(d: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Haar-random orthogonal float32 ``[d, d]`` (QR of a seeded Gaussian, sign-fixed) on ``device``."""
    return _haar_cpu(d, seed).to(device)


def gaussian_matrix(d: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded i.i.d. N(0, 1) matrix float32 ``[d, d]`` on ``device``."""
    return _gaussian_cpu(d, seed).to(device)


def sphere_codebook(bits: int, dim: int, device: torch.device | str) -> torch.Tensor:
    """Lloyd–Max levels for one coordinate of a rotated unit vector in ``dim`` dims: float32 ``[2**bits]``."""
    return (gaussian_table(bits) / math.sqrt(dim)).to(device)


def quantize_unit(y: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm + per-coordinate Lloyd–Max codes of vectors along the last dim.

    Args:
        y: float32 ``[..., m]`` (already rotated).
        bits: code width 1..8.

    Returns:
        ``(codes, norm)``: uint8 ``[..., m]`` and float16 ``[...]`` (the norm ``||y||``).
    """
    norm = narrow(y.norm(dim=-1), torch.float16, "turboquant norm")
    nf = norm.float().unsqueeze(-1)
    unit = y / torch.where(nf > 0, nf, torch.inf)  # a zero norm gives (signed) zeros: the code of 0
    return quantize(unit, sphere_codebook(bits, y.shape[-1], y.device), torch.uint8), norm


def dequantize_unit(codes: torch.Tensor, norm: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize_unit`: float32 ``[..., m]``."""
    table = sphere_codebook(bits, codes.shape[-1], codes.device)
    return dequantize(codes, table) * norm.float().unsqueeze(-1)


@dataclasses.dataclass(frozen=True)
class TurboQuantConfig(CodecConfig):
    """Options of :class:`TurboQuantCodec`.

    Attributes:
        bits: bits per coordinate, 1..4.
        variant: ``"paper"`` (Haar rotation, one norm per vector) or ``"shipped"`` (randomized
            WHT, one norm per block).
        block: coordinates per norm in the shipped variant (32 or 128; capped at the padded width).
        seed: seed of the rotation.
    """

    bits: int = 3
    variant: str = "paper"
    block: int = 128
    seed: int = 0

    def validate(self) -> None:
        check_int("bits", self.bits, 1, 4)
        check_choice("variant", self.variant, ("paper", "shipped"))
        check_choice("block", self.block, (32, 128))
        check_int("seed", self.seed, 0, 2**63 - 1)


class TurboQuantCodec(Codec):
    """TurboQuant_mse.

    Payload: ``codes`` (packed, ``S*n*W`` codes of ``bits`` bits) and ``norm`` f16
    ``[S, n, W/B]``, where ``W, B = D, D`` for the paper variant and ``W = next_pow2(D)``,
    ``B = min(block, W)`` for the shipped one.
    """

    name = "turboquant"
    config_class = TurboQuantConfig
    payload = {"codes": Field(torch.uint8, 1), "norm": Field(torch.float16, 3)}

    def _layout(self, d: int) -> tuple[int, int]:
        """Stored width and block length for head dim ``d``."""
        if self.config.variant == "paper":
            return d, d
        w = next_pow2(d)
        return w, min(self.config.block, w)

    def _rotate(self, x: torch.Tensor, w: int) -> torch.Tensor:
        d = x.shape[-1]
        if self.config.variant == "paper":
            return x @ haar_rotation(d, self.config.seed, x.device).T
        return rotate(F.pad(x, (0, w - d)), random_signs(w, self.config.seed, x.device))

    def _unrotate(self, y: torch.Tensor, d: int) -> torch.Tensor:
        if self.config.variant == "paper":
            return y @ haar_rotation(d, self.config.seed, y.device)
        return unrotate(y, random_signs(y.shape[-1], self.config.seed, y.device))[..., :d]

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        s, n, d = x.shape
        w, blk = self._layout(d)
        y = self._rotate(x, w).reshape(s, n, w // blk, blk)
        codes, norm = quantize_unit(y, self.config.bits)
        return {"codes": pack_bits(codes, self.config.bits), "norm": norm}

    def _decode(self, fields: dict[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        w, blk = self._layout(d)
        codes = read_codes(fields, "codes", s * n * w, self.config.bits, torch.int32).reshape(s, n, w // blk, blk)
        norm = expect_field(fields, "norm", torch.float16, (s, n, w // blk))
        return self._unrotate(dequantize_unit(codes, norm, self.config.bits).reshape(s, n, w), d)


@dataclasses.dataclass(frozen=True)
class TurboQuantProdConfig(CodecConfig):
    """Options of :class:`TurboQuantProdCodec`.

    Attributes:
        bits: total bits per coordinate, 2..4 (``bits - 1`` for the MSE stage, 1 for QJL).
        qjl: ``"orthogonal"`` (Haar-random orthogonal S) or ``"reference"`` (i.i.d. Gaussian S,
            as in the turboquant_plus reference code).
        seed: seed of the rotation; S uses ``seed + 1000``.
    """

    bits: int = 3
    qjl: str = "orthogonal"
    seed: int = 0

    def validate(self) -> None:
        check_int("bits", self.bits, 2, 4)
        check_choice("qjl", self.qjl, ("orthogonal", "reference"))
        check_int("seed", self.seed, 0, 2**63 - 1 - QJL_SEED_OFFSET)


def qjl_scale(d: int, kind: str) -> float:
    """Constant ``c`` making ``c·||r||·Sᵀ sign(S r)`` an unbiased estimate of ``r``.

    Gaussian S: ``E[Sᵀ sign(S r)] = d·sqrt(2/π)·r/||r||``, so ``c = sqrt(π/2)/d``. Orthogonal S
    (rows uniform on the sphere): ``E[|u₁|] = Γ(d/2) / (sqrt(π)·Γ((d+1)/2))`` per row, so
    ``c = 1/(d·E|u₁|)``, which tends to ``sqrt(π/2)/sqrt(d)`` for large d (exact here).
    """
    if kind == "reference":
        return math.sqrt(math.pi / 2) / d
    mean_abs = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
    return 1.0 / (d * mean_abs)


class TurboQuantProdCodec(Codec):
    """TurboQuant_prod: TurboQuant_mse at ``bits - 1`` plus a 1-bit QJL residual.

    Payload: ``codes`` (packed, ``S*n*D`` codes of ``bits-1`` bits), ``norm`` f16 ``[S, n]``,
    ``signs`` (packed, ``S*n*D`` bits) and ``residual_norm`` f16 ``[S, n]``.
    """

    name = "turboquant-prod"
    config_class = TurboQuantProdConfig
    payload = {"codes": Field(torch.uint8, 1), "norm": Field(torch.float16, 2), "signs": Field(torch.uint8, 1),
               "residual_norm": Field(torch.float16, 2)}

    def _mse(self) -> TurboQuantCodec:
        return TurboQuantCodec(bits=self.config.bits - 1, variant="paper", seed=self.config.seed)

    def _sketch(self, d: int, device: torch.device) -> torch.Tensor:
        seed = self.config.seed + QJL_SEED_OFFSET
        if self.config.qjl == "orthogonal":
            return haar_rotation(d, seed, device)
        return gaussian_matrix(d, seed, device)

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        s, n, d = x.shape
        mse = self._mse()
        fields = mse._encode(x)
        r = x - mse._decode(fields, s, n, d)
        signs = r @ self._sketch(d, x.device).T >= 0
        rnorm = narrow(r.norm(dim=-1), torch.float16, "turboquant-prod residual norm")
        return {
            "codes": fields["codes"],
            "norm": fields["norm"].reshape(s, n),
            "signs": pack_bits(signs, 1),
            "residual_norm": rnorm,
        }

    def _decode(self, fields: dict[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        norm = expect_field(fields, "norm", torch.float16, (s, n))
        base = self._mse()._decode(dict(fields, norm=norm.reshape(s, n, 1)), s, n, d)
        signs = read_codes(fields, "signs", s * n * d, 1, torch.uint8).reshape(s, n, d).to(torch.float32) * 2 - 1
        rnorm = expect_field(fields, "residual_norm", torch.float16, (s, n)).float().unsqueeze(-1)
        return base + qjl_scale(d, self.config.qjl) * rnorm * (signs @ self._sketch(d, signs.device))
