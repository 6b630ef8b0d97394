"""`kakeya-v2`: calibrated static transform coding, per token, no per-block side data.

Calibration (:func:`fit_transforms`, offline, once per model; :func:`fit_transforms_batch` makes
many independent fits at once, bit-identical to one by one) gives each stream ``s`` (one of the
``S`` leading rows of the codec input ``[S, N, D]``; in the engine, one (layer, KV head) of the K or V
stream, or one layer's joint rows):

- a basis ``B_s [D, D]``: PCA (of the centred covariance for keys, of the second moment for
  values) in the metric the error is measured in, optionally with a seeded random rotation mixed
  into every group of components that got the same bit width. When keys are fitted after a
  whitening ``k -> k·L`` (Σ_q), ``L⁻¹`` is folded into the stored basis (``B_s = L⁻ᵀ·P``), so the
  codec takes raw keys and no whitening matrix is stored or applied at run time;
- a mean ``mu_s [D]`` (keys; values have none), per-component scales ``sigma_s [D]`` and integer
  bit widths ``bits_s [D]`` (0..8) from reverse water-filling (or a uniform split) under the
  per-vector budget;
- the range ``[lo_s, hi_s]`` of the per-vector log-gain (absent when ``scale_bits=0``), and
  optionally Lloyd–Max tables fitted per (stream, bit width) to the normalised coefficients;
- with ``head_gain_bits > 0`` (rows that concatenate ``G`` heads, the engine's joint layout), the
  range of each head's log-gain ``[lo_sh, hi_sh]``: every head of a row is divided by its own
  coded rms before the basis, so one joint gain does not leave small-norm heads with errors far
  above their norm.

Encoding one vector ``x [D]`` of stream ``s``::

    x_h <- (x_h - mu_sh) / h_hat_h               per head h, only with head gains: h_hat_h is the
                                                 coded rms of the head (``head_gain_bits`` each)
    c = B_s^{-1} x                               coefficients (without head gains: B_s^{-1} (x - mu_s))
    g = ||c|| / sqrt(D)                          gain, coded as q in [0, 2**scale_bits) on a log grid
                                                 (g_hat = 1 when scale_bits = 0)
    z_j = c_j / (g_hat * sigma_j)                ~ unit variance
    code_j = nearest level of the bits_j-bit table (N(0,1) Lloyd–Max or fitted)

The payload is the variable-width packed codes (``sum(bits_s)`` bits per vector) plus the
packed gain codes (``scale_bits`` per vector, and ``head_gain_bits`` per head), nothing else, so a
vector costs ``round(bits * D)`` bits.

With ``coding="entropy"`` the same transforms are used differently (no extra side data): the
components with ``bits_j > 0`` are quantised with one uniform step per vector and prefix-coded
(Gaussian ECSQ classes from ``sigma``, :mod:`kakeyaturbo.ops.ecsq`) into a slot of the same
``round(bits * D) - scale_bits`` bits; the ``scale_bits`` code is the step, the finest that lets
the vector fit its slot. Same bytes as fixed widths, about 15-40 % less squared error from 2.5 to
4 bits per element (entropy coding gains most where components get several bits; below about
2 bits per element fixed widths are better, which ``coding="auto"`` follows).

The basis is stored int8 with one float16 scale per column; the
decoder uses the dequantised basis and the encoder its exact inverse. With ``reflector_bits > 0``
an orthogonal basis (no whitening folded in) is stored instead as quantised Householder reflectors
(:mod:`kakeyaturbo.ops.householder`): about half the entries, each reflector at
``reflector_bits + round(log2(sigma_j / sigma_min))`` bits (at most 8; a reflector's error leaks
its component's variance into the others, so high-variance components get finer reflectors),
none for the trailing components that get no code bits. For a joint basis over 3 KV heads
(D = 192) this is about a third of the int8 basis, at a cost of about 1-4 % squared error.

Range: a vector's gain is coded on its stream's calibrated grid. A vector whose coefficient rms
lies more than :data:`GAIN_HEADROOM` times above the grid's top cannot be represented (its gain code
saturates and the error approaches its norm): :meth:`KakeyaV2Codec.encode` raises
:class:`~kakeyaturbo.errors.NumericRangeError` naming the vector and its largest value, like the
other codecs do for values beyond their f16 fields. Below the grid nothing underflows to zero
silently in the sense of a lost scale: a vector is coded at the grid's smallest gain, so its
absolute error stays that of the smallest calibrated vectors (values far below the calibration's
scale, e.g. ``x * 1e-9``, keep that absolute error; their relative error is unbounded).

The fit options (``center``, ``scale_bits``, ``rotate_groups``, ``allocation``) exist so each
design element can be switched off on its own (the ablation); the shipped recipes use the defaults.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from kakeyaturbo import layouts
from kakeyaturbo.codecs.base import (
    Codec,
    CodecConfig,
    Field,
    check_choice,
    check_float,
    check_input,
    check_int,
    expect_field,
    finite_number,
    side_fingerprint,
)
from kakeyaturbo.codecs.v2_basis import (
    TENSOR_NAMES,
    Basis,
    DenseBasis,
    ReflectorBasis,
    basis_from_tensors,
    quantise_bases,
    tensors_nbytes,
)
from kakeyaturbo.codecs.v2_quantiser import (
    MAX_BITS,
    TABLE_FIT_TOKENS,
    TABLE_SLOTS,
    Quantiser,
    SlotQuantiser,
    TableQuantiser,
    fit_tables,
    gain_codes,
    gain_values,
    gaussian_levels,
    log_grid,
    rms,
    table_slice,
)
from kakeyaturbo.container import Encoded
from kakeyaturbo.errors import ConfigError, CorruptDataError, NumericRangeError, ShapeError
from kakeyaturbo.ops import householder
from kakeyaturbo.ops.bitalloc import water_fill
from kakeyaturbo.ops.hadamard import random_signs, wht
from kakeyaturbo.packing import narrow, pack_bits, packed_nbytes, unpack_bits

ALLOCATIONS = ("waterfill", "uniform")
CODINGS = ("fixed", "entropy", "auto")
LAYOUTS = layouts.CALIBRATED
"""Engine layouts calibrated transforms exist for (:data:`kakeyaturbo.layouts.CALIBRATED`)."""
AUTO_ENTROPY_BITS = 2.125
"""``coding="auto"`` codes with entropy from this budget up (measured on SmolLM2 K/V: entropy
coding has 3-10 % less error at 2 bits, 30-45 % more at 1.25-1.5 bits, 15-40 % less from 2.5 up)."""
GAIN_HEADROOM = 4.0
"""How far above the top of its calibrated gain grid a vector's rms may lie before encoding raises."""
SIGMA_FLOOR = 1e-4  # normalised units (sum of sigma**2 is ~D): keeps every component codable
BATCH_FIELDS = ("bits", "seed", "fitted_tables")
"""The fit fields (:meth:`KakeyaV2Config.fit_fields`) the fits of one :func:`fit_transforms_batch` may differ
in; they agree on the others."""


def code_bits_per_vector(bits: float, side_bits: int, d: int) -> int:
    """Code bits per vector for an average of ``bits`` per element including ``side_bits`` of gain codes."""
    budget = math.floor(bits * d + 0.5) - side_bits
    if not 0 <= budget <= MAX_BITS * d:
        raise ConfigError(f"bits={bits} at D={d} leaves {budget} code bits per vector after "
                          f"{side_bits} bits of gain codes; need 0..{MAX_BITS * d}")
    return budget


@dataclasses.dataclass(frozen=True)
class KakeyaV2Config(CodecConfig):
    """Configuration of ``kakeya-v2``.

    Attributes:
        bits: average bits per element, the per-vector gain code included.
        stream: the K/V stream, ``"k"`` or ``"v"``; picks the default of ``center``.
        center: subtract a static mean (None: keys yes, values no).
        scale_bits: bits of the per-vector log-gain code, 0..8 (0: no per-vector gain).
        head_gain_bits: bits of each head's log-gain code, 0..8 (0: none), for rows that hold
            several heads (the joint layout; the head count comes from the transforms).
        reflector_bits: 0 stores the basis int8; 2..8 stores it as quantised Householder
            reflectors of at least this many bits each (orthogonal bases only: no whitening).
        rotate_groups: mix a seeded random rotation into each group of equal-bit components.
        allocation: ``"waterfill"`` (bits where the variance is) or ``"uniform"`` (equal bits).
        fitted_tables: Lloyd–Max tables fitted per (stream, bit width) instead of N(0,1) tables.
        coding: ``"fixed"`` (each component's code has its allocated width), ``"entropy"``
            (uniform steps, prefix-coded, each vector in a fixed slot of the same bits; see
            :mod:`kakeyaturbo.ops.ecsq`: the gain code becomes a step code, only the components
            with a non-zero width are coded, fitted tables are not used) or ``"auto"`` (entropy
            from :data:`AUTO_ENTROPY_BITS` up when there is a gain code and no fitted tables are
            asked for, else fixed).
        head_weights: static weights of the heads a row holds (empty: all 1), one per head, ``> 0``:
            the fit and the codec scale each head by its weight after the head gains, so the PCA and the
            bit allocation minimise the weighted squared error (a cross-layer group's members weighted by
            their measured sensitivity, :func:`kakeyaturbo.engine.member_weights`); folded into the
            transforms' matrices, free at run time.
        seed: seed of the rotations.
        transforms_hash: :meth:`V2Transforms.fingerprint` of the calibrated transforms.
    """

    bits: float = 3.0
    stream: str = "k"
    center: bool | None = None
    scale_bits: int = 8
    head_gain_bits: int = 0
    reflector_bits: int = 0
    rotate_groups: bool = True
    allocation: str = "waterfill"
    fitted_tables: bool = False
    coding: str = "fixed"
    head_weights: tuple[float, ...] = ()
    seed: int = 0
    transforms_hash: str = ""
    added_fields: ClassVar[tuple[str, ...]] = ("head_gain_bits", "reflector_bits", "head_weights")

    def validate(self) -> None:
        check_float("bits", self.bits, 0.0, float(MAX_BITS), lo_open=True)
        check_choice("stream", self.stream, ("k", "v"))
        check_choice("center", self.center, (None, True, False))
        check_int("scale_bits", self.scale_bits, 0, MAX_BITS)
        check_int("head_gain_bits", self.head_gain_bits, 0, MAX_BITS)
        check_int("reflector_bits", self.reflector_bits, 0, MAX_BITS)
        if self.reflector_bits == 1:
            raise ConfigError(f"reflector_bits must be 0 (int8 basis) or {householder.MIN_WIDTH}..{MAX_BITS}, got 1")
        check_choice("allocation", self.allocation, ALLOCATIONS)
        check_choice("coding", self.coding, CODINGS)
        if self.entropy_coded and (self.scale_bits < 1 or self.fitted_tables):
            raise ConfigError(f"coding='entropy' needs scale_bits >= 1 (its step code) and fitted_tables=false, "
                              f"got scale_bits={self.scale_bits}, fitted_tables={self.fitted_tables}")
        for name in ("rotate_groups", "fitted_tables"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        w = self.head_weights
        if isinstance(w, list):  # as JSON and recipe fields give it
            w = tuple(w)
            object.__setattr__(self, "head_weights", w)
        if not isinstance(w, tuple) or not all(finite_number(x) and x > 0 for x in w):
            raise ConfigError(f"head_weights must be a list of finite numbers > 0 (one per head of a row), got {w!r}")
        check_int("seed", self.seed, 0, 2**63 - 1)
        h = self.transforms_hash
        if not isinstance(h, str) or (h and (len(h) != 16 or any(ch not in "0123456789abcdef" for ch in h))):
            raise ConfigError(f"transforms_hash must be '' or 16 lowercase hex digits, got {h!r}")

    @property
    def entropy_coded(self) -> bool:
        """Whether vectors are entropy-coded (``coding``, with ``"auto"`` resolved by ``bits``)."""
        if self.coding == "auto":
            return self.bits >= AUTO_ENTROPY_BITS and self.scale_bits > 0 and not self.fitted_tables
        return self.coding == "entropy"

    def side_bits(self, heads: int) -> int:
        """Gain-code bits per vector of rows holding ``heads`` heads: ``scale_bits + heads * head_gain_bits``."""
        return self.scale_bits + heads * self.head_gain_bits

    @property
    def centred(self) -> bool:
        """Whether a static mean is subtracted (``center``, defaulting by K/V stream: keys yes)."""
        return self.stream == "k" if self.center is None else self.center

    def fit_fields(self, seed: int) -> dict[str, Any]:
        """The fields a calibrated fit of this config reads (the K/V ``stream`` aside), with ``seed`` for its
        rotations and ``center`` resolved: what a calibration memoises the fit under (``head_weights`` only
        when set, so the keys of unweighted fits stay those memoised before the field existed)."""
        return {"bits": float(self.bits), "center": self.centred, "scale_bits": self.scale_bits,
                "head_gain_bits": self.head_gain_bits, "reflector_bits": self.reflector_bits,
                "rotate_groups": self.rotate_groups, "allocation": self.allocation,
                "fitted_tables": self.fitted_tables, "seed": seed,
                **({"head_weights": tuple(float(x) for x in self.head_weights)} if self.head_weights else {})}

    @classmethod
    def for_calibration(cls, config: Mapping[str, Any], stream: str) -> KakeyaV2Config:
        """The config of recipe fields ``config`` for K/V stream ``stream``: ``fitted_tables`` defaults to true
        with fixed coding (tables fitted to the calibration coefficients), ``stream`` filled in."""
        cls.check_keys(config)
        coded = cls(**{**config, "stream": stream})
        return cls(**{"fitted_tables": not coded.entropy_coded, **config, "stream": stream})


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class V2Transforms:
    """Calibrated per-stream transforms, as stored (their bytes are the codec's side data).

    Attributes:
        basis: the basis of every stream, ``[S, D, D]`` once dequantised: a
            :class:`~kakeyaturbo.codecs.v2_basis.DenseBasis` (stored as ``basis_q``, ``basis_scale``)
            or a :class:`~kakeyaturbo.codecs.v2_basis.ReflectorBasis` (``reflectors``,
            ``reflector_scale``, ``reflector_bits``).
        sigma: float16 ``[S, D]``, ``> 0``: rms of each gain-normalised coefficient.
        bits: uint8 ``[S, D]``, 0..8: bit width of each component.
        mean: float16 ``[S, D]``, or None (not centred: values).
        log_gain: float32 ``[S, 2]``: ``(lo, hi)`` of the per-vector log-gain grid, ``lo < hi``;
            None when there is no per-vector gain.
        head_log_gain: float32 ``[S, G, 2]``: the log-gain grid of each of the ``G`` heads a row
            holds (``G`` divides ``D``); None without head gains.
        tables: float16 ``[S, 510]`` or None: fitted levels (in units of sigma) for widths 1..8,
            concatenated; None means N(0,1) Lloyd–Max tables.
    """

    basis: Basis
    sigma: torch.Tensor
    bits: torch.Tensor
    mean: torch.Tensor | None = None
    log_gain: torch.Tensor | None = None
    head_log_gain: torch.Tensor | None = None
    tables: torch.Tensor | None = None
    OPTIONAL: ClassVar[tuple[str, ...]] = ("mean", "log_gain", "head_log_gain", "tables")

    def __post_init__(self) -> None:
        specs = self._specs()
        tensors = self._tensors()
        for name, (dtype, shape) in specs.items():
            t = tensors.get(name)
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise CorruptDataError(f"transforms field {name!r} is {got}, expected {dtype} {shape}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CorruptDataError(f"transforms field {name!r} holds NaN/Inf")
        if int(self.bits.max()) > MAX_BITS:
            raise CorruptDataError(f"transforms bits must be 0..{MAX_BITS}, max is {int(self.bits.max())}")
        if bool((self.sigma <= 0).any()):
            raise CorruptDataError("transforms sigma must be > 0 everywhere")
        if bool((tensors[self.basis.scale_name] <= 0).any()):
            raise CorruptDataError(f"transforms {self.basis.scale_name} must be > 0 everywhere")
        for name in ("log_gain", "head_log_gain"):
            grid = getattr(self, name)
            if grid is not None and bool((grid[..., 1] <= grid[..., 0]).any()):
                raise CorruptDataError(f"transforms {name} needs lo < hi in every stream")

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by name, unchecked."""
        optional = {name: getattr(self, name) for name in self.OPTIONAL if getattr(self, name) is not None}
        return {"sigma": self.sigma, "bits": self.bits, **self.basis.tensors(), **optional}

    def _specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        if not isinstance(self.sigma, torch.Tensor) or self.sigma.dim() != 2 or 0 in self.sigma.shape:
            got = tuple(self.sigma.shape) if isinstance(self.sigma, torch.Tensor) else type(self.sigma).__name__
            raise CorruptDataError(f"transforms sigma must be a float16 tensor [S, D] with S, D > 0, got {got}")
        s, d = self.sigma.shape
        specs = {"sigma": (torch.float16, (s, d)), "bits": (torch.uint8, (s, d)), **self.basis.specs(s, d)}
        optional = {"mean": (torch.float16, (s, d)), "log_gain": (torch.float32, (s, 2)),
                    "tables": (torch.float16, (s, TABLE_SLOTS))}
        if isinstance(self.head_log_gain, torch.Tensor):
            g = self.head_log_gain.shape[1] if self.head_log_gain.dim() == 3 else 0
            if g == 0 or d % g:
                raise CorruptDataError(f"transforms head_log_gain must be [S, G, 2] with G dividing D={d}, "
                                       f"got {tuple(self.head_log_gain.shape)}")
            optional["head_log_gain"] = (torch.float32, (s, g, 2))
        return specs | {name: spec for name, spec in optional.items() if getattr(self, name) is not None}

    @property
    def streams(self) -> int:
        """S, the number of streams."""
        return self.sigma.shape[0]

    @property
    def dim(self) -> int:
        """D, the width of a row (the head dim, or the heads of a joint row together)."""
        return self.sigma.shape[-1]

    @property
    def heads(self) -> int:
        """G, the heads each row holds for the head gains (1 without head gains)."""
        return 1 if self.head_log_gain is None else self.head_log_gain.shape[1]

    @property
    def centre(self) -> torch.Tensor:
        """float32 ``[S, D]``: the mean, zeros when not centred."""
        if self.mean is None:
            return torch.zeros(self.sigma.shape, device=self.sigma.device)
        return self.mean.float()

    @property
    def levels(self) -> torch.Tensor:
        """float32 ``[S, 510]``: every width's levels (fitted, or N(0,1) Lloyd–Max), in units of sigma."""
        if self.tables is not None:
            return self.tables.float()
        return gaussian_levels(self.streams, self.sigma.device)

    def table(self, bits: int) -> torch.Tensor:
        """float32 ``[S, 2**bits]``: the levels of width ``bits`` (1..8), in units of sigma."""
        return self.levels[:, table_slice(bits)]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (for safetensors); optional ones only when present."""
        tensors = self._tensors()
        return {name: tensors[name] for name in self._specs()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> V2Transforms:
        """Inverse of :meth:`to_tensors`; missing, unknown or inconsistent tensors raise CorruptDataError."""
        required = {"sigma", "bits"}
        missing = sorted(required - set(tensors))
        unknown = sorted(set(tensors) - required - set(cls.OPTIONAL) - TENSOR_NAMES)
        if missing or unknown:
            raise CorruptDataError(f"transforms tensors: missing {missing}, unknown {unknown}")
        rest = {name: t for name, t in tensors.items() if name not in TENSOR_NAMES}
        return cls(basis=basis_from_tensors(tensors), **rest)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (int8 basis, float16 scales, ...)."""
        return tensors_nbytes(self.to_tensors())

    def fingerprint(self) -> str:
        """Short SHA-256 of the stored tensors (goes into ``KakeyaV2Config.transforms_hash``)."""
        return side_fingerprint(self.to_tensors())

    def to(self, device: torch.device | str) -> V2Transforms:
        """A copy with every tensor on ``device``."""
        return V2Transforms.from_tensors({k: v.to(device) for k, v in self.to_tensors().items()})

    def without_tables(self) -> V2Transforms:
        """The same transforms with N(0,1) Lloyd–Max tables instead of fitted ones."""
        return dataclasses.replace(self, tables=None)

    def check_serves(self, config: KakeyaV2Config) -> int:
        """Check that these are the transforms ``config`` names and that they hold what it codes with;
        return the code bits per vector. A mismatch raises ConfigError naming the config field."""
        cfg = config
        found = self.fingerprint()
        if found != cfg.transforms_hash:
            raise ConfigError(f"transforms fingerprint {found!r} differs from config.transforms_hash "
                              f"{cfg.transforms_hash!r}: these are not the transforms this config names")
        reflected = isinstance(self.basis, ReflectorBasis)
        # (what the config says, whether it needs the part, whether the transforms have it, the part when
        # present, when absent)
        parts = (
            (f"config.fitted_tables={cfg.fitted_tables}", cfg.fitted_tables, self.tables is not None,
             "hold fitted tables", "lack fitted tables"),
            (f"config says centred={cfg.centred} (stream {cfg.stream!r}, center={cfg.center})", cfg.centred,
             self.mean is not None, "hold a mean", "lack a mean"),
            (f"config.scale_bits={cfg.scale_bits}", cfg.scale_bits > 0, self.log_gain is not None,
             "hold a gain grid", "lack a gain grid"),
            (f"config.head_gain_bits={cfg.head_gain_bits}", cfg.head_gain_bits > 0, self.head_log_gain is not None,
             "hold head gain grids", "lack head gain grids"),
            (f"config.reflector_bits={cfg.reflector_bits}", cfg.reflector_bits > 0, reflected,
             f"store {ReflectorBasis.description}", f"store {DenseBasis.description}"),
        )
        for said, wanted, held, present, absent in parts:
            if wanted != held:
                raise ConfigError(f"{said} but the transforms {present if held else absent}")
        budget = code_bits_per_vector(cfg.bits, cfg.side_bits(self.heads), self.dim)
        spent = self.bits.long().sum(1)
        if bool((spent != budget).any()):
            raise ConfigError(f"transforms spend {sorted(set(spent.tolist()))} code bits per vector; "
                              f"config bits={cfg.bits}, scale_bits={cfg.scale_bits} need {budget}")
        return budget


def element_weights(head_weights: Sequence[float], d: int) -> torch.Tensor | None:
    """float32 ``[D]``: each of ``head_weights`` repeated over its head's ``D / G`` elements (None: no weights).

    Raises:
        ConfigError: ``G`` does not divide ``D``.
    """
    if not head_weights:
        return None
    if d % len(head_weights):
        raise ConfigError(f"head_weights holds {len(head_weights)} weights, which do not divide a row of D={d} "
                          "into heads: give one weight per head of the rows coded")
    return _per_element(torch.tensor(head_weights, dtype=torch.float32), d)


def _per_element(head_gains: torch.Tensor, d: int) -> torch.Tensor:
    """``[..., G] -> [..., D]``: each head's value (gain or weight) repeated over its ``D / G`` elements."""
    return head_gains.repeat_interleave(d // head_gains.shape[-1], dim=-1)


def _rotation(w: int, seed: int) -> torch.Tensor:
    """Seeded orthogonal float64 ``[w, w]``: randomized Hadamard for powers of two, else Haar."""
    if w & (w - 1) == 0:
        return wht(torch.diag(random_signs(w, seed).double())) / math.sqrt(w)
    g = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    q, r = torch.linalg.qr(torch.randn(w, w, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def group_rotations(widths: torch.Tensor, seed: int | Sequence[int]) -> torch.Tensor:
    """Block rotation float64 ``[S, D, D]`` mixing the components of each (stream, bit width) group.

    Args:
        widths: integer ``[S, D]`` bit widths; 0-bit components are left alone.
        seed: base seed, or one per stream (``S`` of them); each (seed, width, group size) gets its
            own rotation.
    """
    s, d = widths.shape
    dev = widths.device
    seeds = torch.as_tensor(seed, dtype=torch.int64, device=dev)
    if seeds.dim() > 1 or seeds.numel() not in (1, s):
        raise ShapeError(f"group_rotations: need one seed or one per stream (S={s}), got {tuple(seeds.shape)}")
    seeds = seeds.reshape(-1).expand(s)
    rot = torch.eye(d, dtype=torch.float64, device=dev).repeat(s, 1, 1)
    for b in range(1, MAX_BITS + 1):
        member = widths == b
        sizes = member.sum(1)
        for w, base in sorted(set(zip(sizes.tolist(), seeds.tolist()))):
            if w < 2:
                continue
            sel = ((sizes == w) & (seeds == base)).nonzero().squeeze(1)
            pos = member[sel].nonzero()[:, 1].reshape(-1, w)
            q = _rotation(w, base * 1_000_003 + b * 1_009 + w).to(dev)
            rot[sel[:, None, None], pos[:, :, None], pos[:, None, :]] = q
    return rot


def reflector_widths(var: torch.Tensor, widths: torch.Tensor, min_bits: int) -> torch.Tensor:
    """int64 ``[S, D]``: the bits of each component's Householder reflector.

    ``min_bits + round(log2(sigma_j / sigma_min))`` (at most 8) for the coded components, where
    ``sigma_min`` is the smallest coded component's: the error of reflector ``j`` leaks a share of
    component ``j``'s variance into the others, so that leak stays below the finest component's
    variance; 0 (not stored) for the uncoded ones, which must come last.

    Args:
        var: float ``[S, D]`` variance of each component (in the units the widths were allocated in).
        widths: integer ``[S, D]`` code bits of each component.
        min_bits: 2..8.
    """
    coded = widths > 0
    floor = torch.where(coded, var, math.inf).amin(1, keepdim=True)
    ratio = (var / floor).clamp_min(1.0) if bool(coded.any()) else torch.ones_like(var)
    rw = (min_bits + 0.5 * torch.log2(ratio)).round().clamp(min_bits, MAX_BITS).long()
    return torch.where(coded, rw, 0)


def uniform_widths(budget: torch.Tensor, d: int) -> torch.Tensor:
    """int64 ``[S, d]``: each stream's ``budget`` (integer ``[S]``) bits split as evenly as possible, the
    remainder to the leading components."""
    base, extra = budget.div(d, rounding_mode="floor"), budget % d
    return base.unsqueeze(1) + (torch.arange(d, device=budget.device) < extra.unsqueeze(1)).long()


def _check_shapes(x: Any, whiten: Any, lead: tuple[str, ...]) -> None:
    """Raise :class:`ShapeError` unless ``x`` is a tensor ``[*lead, N, D]`` and ``whiten`` None or a
    tensor ``[*lead, D, D]`` (``lead``: the names of the leading axes)."""
    if not isinstance(x, torch.Tensor) or x.dim() != len(lead) + 2:
        raise ShapeError(f"fit_transforms: x must be a tensor [{', '.join(lead)}, N, D], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    want = (*x.shape[:-2], x.shape[-1], x.shape[-1])
    if whiten is not None and (not isinstance(whiten, torch.Tensor) or tuple(whiten.shape) != want):
        named = ", ".join(f"{name}={size}" for name, size in zip((*lead, "D", "D"), want))
        raise ShapeError(f"fit_transforms: whiten must be [{named}], got "
                         f"{tuple(whiten.shape) if isinstance(whiten, torch.Tensor) else type(whiten).__name__}")


def fit_transforms(x: torch.Tensor, config: KakeyaV2Config, *, whiten: torch.Tensor | None = None,
                   heads: int = 1) -> V2Transforms:
    """Calibrate the v2 transforms on sample vectors (a batch of one :func:`fit_transforms_batch`).

    Args:
        x: float tensor ``[S, N, D]``: ``N >= 2`` calibration vectors per stream (keys pre-RoPE),
            finite.
        config: the fit options (``bits``, ``center``, ``scale_bits``, ``rotate_groups``,
            ``allocation``, ``fitted_tables``, ``seed``; the hash is ignored).
        whiten: optional float ``[S, D, D]`` lower-triangular ``L`` (e.g. Cholesky of Σ_q): the PCA
            and bit allocation run on ``x·L``, where squared error is the error that matters, and
            ``L⁻¹`` is folded into the stored basis, so the codec still takes (and returns) raw ``x``.
        heads: ``G``, the heads each row holds side by side (``G`` divides ``D``); with
            ``config.head_gain_bits`` each gets its own gain, and the basis is fitted on rows whose
            heads are divided by their coded gains.

    Returns:
        :class:`V2Transforms` on the device of ``x``; every stream spends exactly
        ``round(bits * D) - scale_bits - G * head_gain_bits`` code bits per vector.
    """
    _check_shapes(x, whiten, ("S",))
    return fit_transforms_batch(x.unsqueeze(0), [config], whiten=None if whiten is None else whiten.unsqueeze(0),
                                heads=heads)[0]


def fit_transforms_batch(x: torch.Tensor, configs: Sequence[KakeyaV2Config], *, whiten: torch.Tensor | None = None,
                         heads: int = 1, samples: Sequence[int] | None = None) -> list[V2Transforms]:
    """Calibrate the v2 transforms of ``F`` independent fits at once (:func:`fit_transforms` of each).

    Every result is bit-identical to :func:`fit_transforms` of its sample and config alone: the
    decompositions and matrix products run on the ``F * S`` streams' matrices as one batch (each
    matrix on its own, as the ``S`` streams of one fit are), reductions run per stream, and each
    fit's tables converge on their own. Fits that share a sample (one layer's K at several budgets)
    share its centring, head gains, metric and eigendecomposition, which do not depend on the fields
    the fits of a batch may differ in.

    Args:
        x: float tensor ``[U, S, N, D]``: ``U`` samples of ``S`` streams, as in :func:`fit_transforms`.
        configs: ``F`` fit options; they may differ in :data:`BATCH_FIELDS` (``bits``, ``seed``,
            ``fitted_tables``) and must agree on the other fields a fit reads.
        whiten: optional float ``[U, S, D, D]``: each sample's ``L`` (as in :func:`fit_transforms`).
        heads: ``G``, as in :func:`fit_transforms`, for every fit.
        samples: the sample (index into ``x``) of each fit; None: fit ``f`` uses sample ``f`` (``U = F``).

    Returns:
        ``F`` :class:`V2Transforms` on the device of ``x``, in the order of ``configs``.
    """
    _check_shapes(x, whiten, ("U", "S"))
    u, s, _, d = x.shape
    picks = list(range(u)) if samples is None else list(samples)
    if not configs or len(picks) != len(configs) or any(
            isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < u for p in picks):
        raise ShapeError(f"fit_transforms_batch: need one sample index in 0..{u - 1} for each of the "
                         f"{len(configs)} configs, got {picks}")
    cfg = configs[0]
    shared = {k: v for k, v in cfg.fit_fields(cfg.seed).items() if k not in BATCH_FIELDS}
    for other in configs[1:]:
        theirs = other.fit_fields(other.seed)
        differ = [k for k, v in shared.items() if theirs[k] != v]
        if differ:
            raise ConfigError(f"fit_transforms_batch: the fits of one batch may differ only in {list(BATCH_FIELDS)}, "
                              f"not in {differ}")
    x32, _, n, _ = check_input(x)
    if n < 2:
        raise ShapeError(f"fit_transforms: need at least 2 calibration vectors per stream, got {n}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or d % heads:
        raise ShapeError(f"fit_transforms: heads must be a positive divisor of D={d}, got {heads!r}")
    if whiten is not None and cfg.reflector_bits:
        raise ConfigError("fit_transforms: reflector_bits stores an orthogonal basis, but a whitening folds "
                          "L⁻ᵀ into the basis; fit whitened keys with reflector_bits=0")
    fits, dev = len(configs), x.device
    budget = torch.tensor([code_bits_per_vector(one.bits, one.side_bits(heads), d) for one in configs], device=dev)
    mean16, head_log_gain, xc, lw, pca, var = _principal_components(
        x32, cfg, None if whiten is None else whiten.reshape(u * s, d, d), heads)
    rows = (torch.tensor(picks, device=dev).unsqueeze(1) * s + torch.arange(s, device=dev)).reshape(-1)
    xc, lw, pca, var = xc[rows], lw[rows], pca[rows], var[rows]  # per sample -> per fit: [F * S, ...]
    if cfg.allocation == "waterfill":
        widths = water_fill(var, budget.repeat_interleave(s), MAX_BITS)
    else:
        widths = uniform_widths(budget.repeat_interleave(s), d)
    if cfg.reflector_bits:  # coded components first: the reflectors of the uncoded tail are not stored
        order = torch.argsort(widths, dim=1, descending=True, stable=True)
        widths, var = widths.gather(1, order), var.gather(1, order)
        pca = pca.gather(2, order.unsqueeze(1).expand_as(pca))
    rot = group_rotations(widths, [one.seed for one in configs for _ in range(s)]) if cfg.rotate_groups else None
    rotated = pca @ rot if rot is not None else pca
    if cfg.reflector_bits:
        mixed = (var.unsqueeze(1) @ rot.pow(2)).squeeze(1) if rot is not None else var  # after the rotations
        bases, matrix = quantise_bases(rotated, fits, reflector_widths(mixed, widths, cfg.reflector_bits))
    else:  # L⁻ᵀ·P: components in the input space
        bases, matrix = quantise_bases(torch.linalg.solve(lw.transpose(1, 2), rotated).contiguous(), fits)
    c = xc @ torch.linalg.inv(matrix).transpose(1, 2)
    log_gain = log_grid(rms(c)) if cfg.scale_bits else None
    g_hat = gain_values(gain_codes(rms(c.float()), log_gain, cfg.scale_bits), log_gain, cfg.scale_bits)
    normed = c / g_hat.double().unsqueeze(-1)
    sigma = narrow(normed.pow(2).mean(1).sqrt().clamp_min(SIGMA_FLOOR), torch.float16, "kakeya-v2 sigma")
    tabled = [f for f, one in enumerate(configs) if one.fitted_tables]
    tables = None
    if tabled:
        at = (torch.tensor(tabled, device=dev).unsqueeze(1) * s + torch.arange(s, device=dev)).reshape(-1)
        keep = torch.linspace(0, n - 1, min(n, TABLE_FIT_TOKENS), device=dev).long()
        z = (normed[at][:, keep] / sigma[at].double().unsqueeze(1)).float()
        tables = narrow(fit_tables(z, widths[at], fits=len(tabled)), torch.float16, "kakeya-v2 fitted tables")

    def part(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
        """Rows ``i * S .. (i + 1) * S - 1`` of ``t`` (of fit or sample ``i``), or None."""
        return None if t is None else t[i * s : (i + 1) * s].clone()

    return [V2Transforms(basis=bases[f], sigma=part(sigma, f), bits=part(widths, f).to(torch.uint8),
                         mean=part(mean16, picks[f]), log_gain=part(log_gain, f),
                         head_log_gain=part(head_log_gain, picks[f]),
                         tables=part(tables, tabled.index(f)) if configs[f].fitted_tables else None)
            for f in range(fits)]


def _principal_components(x32: torch.Tensor, cfg: KakeyaV2Config, whiten: torch.Tensor | None, heads: int
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor]:
    """What a fit computes before its bit allocation, for samples ``x32 [R, N, D]`` (``R`` streams).

    Args:
        x32: float32 ``[R, N, D]``.
        cfg: the fit options (``center``, ``head_gain_bits``, ``scale_bits`` are read).
        whiten: optional float ``[R, D, D]``, each stream's ``L``.
        heads: ``G``.

    Returns:
        ``(mean16, head_log_gain, xc, lw, pca, var)``: the float16 mean ``[R, D]`` (None when not
        centred), the head gain grids ``[R, G, 2]`` (None without head gains), the centred rows in float64
        ``[R, N, D]`` (heads divided by their coded gains, then times their ``head_weights``), the metric
        ``L`` float64 ``[R, D, D]``, the principal components in the metric (columns, by descending variance)
        float64 ``[R, D, D]`` and their variances after the per-vector gain ``[R, D]``.
    """
    r, n, d = x32.shape
    hb = cfg.head_gain_bits
    x64 = x32.double()
    mean16 = narrow(x64.mean(1), torch.float16, "kakeya-v2 mean") if cfg.centred else None
    xc = x64 - mean16.double().unsqueeze(1) if mean16 is not None else x64
    head_log_gain = None
    if hb:
        g = rms(xc, heads)
        head_log_gain = log_grid(g)
        xc = xc / _per_element(gain_values(gain_codes(g.float(), head_log_gain, hb), head_log_gain, hb), d).double()
    weights = element_weights(cfg.head_weights, d)
    if weights is not None:
        xc = xc * weights.to(xc.device).double()
    lw = torch.eye(d, dtype=torch.float64, device=x32.device).expand(r, d, d) if whiten is None else whiten.double()
    w = xc @ lw  # the metric space
    _, vecs = torch.linalg.eigh(w.transpose(1, 2) @ w / n)
    pca = vecs.flip(-1)  # descending variance
    c = w @ pca
    gain = (c.norm(dim=-1, keepdim=True) / math.sqrt(d)).clamp_min(1e-30) if cfg.scale_bits else 1.0
    var = ((c / gain) ** 2).mean(1).clamp_min(SIGMA_FLOOR**2)
    return mean16, head_log_gain, xc, lw, pca, var


class KakeyaV2Codec(Codec):
    """Calibrated static transform codec; needs its :class:`V2Transforms` (``transforms=``)."""

    name = "kakeya-v2"
    config_class = KakeyaV2Config
    needs_calibration = True
    folds_whitening = True
    payload = {"codes": Field(torch.uint8, 1), "scale": Field(torch.uint8, 1, lambda c: c.scale_bits > 0),
               "head_scale": Field(torch.uint8, 1, lambda c: c.head_gain_bits > 0)}

    def __init__(self, config: KakeyaV2Config | None = None, *, transforms: V2Transforms | None = None,
                 **overrides: Any) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        if transforms is None:
            raise ConfigError("kakeya-v2 needs its calibrated transforms: pass "
                              "transforms=fit_transforms(...) (or build it with KakeyaV2Codec.calibrate)")
        budget = transforms.check_serves(cfg)
        self.transforms = transforms
        dec = transforms.basis.matrix()
        weights = element_weights(cfg.head_weights, transforms.dim)
        if weights is not None:  # input rows scaled by W before the basis: x = c·Pᵀ·W⁻¹, so dec = W⁻¹·P
            dec = dec / weights.to(dec.device, dec.dtype).unsqueeze(-1)
        self._dec = dec.float()
        self._enc = torch.linalg.inv(dec).transpose(1, 2).float()
        self._unprojections: dict[torch.device, torch.Tensor] = {}
        self._quantiser: Quantiser
        if cfg.entropy_coded:
            self._quantiser = SlotQuantiser(transforms.sigma.float(), transforms.bits > 0, transforms.log_gain,
                                            cfg.scale_bits, budget)
        else:
            used = sorted(set(transforms.bits.unique().tolist()) - {0})
            self._quantiser = TableQuantiser(transforms.sigma.float(), transforms.bits.long(), transforms.log_gain,
                                             cfg.scale_bits, {b: transforms.table(b) for b in used})

    @classmethod
    def calibrate(cls, x: torch.Tensor, *, whiten: torch.Tensor | None = None, heads: int = 1,
                  **config: Any) -> KakeyaV2Codec:
        """Fit transforms on ``x [S, N, D]`` (optionally in the metric ``whiten [S, D, D]``, with
        ``heads`` head gains per row, see :func:`fit_transforms`) with the given config fields and
        return the codec."""
        cfg = KakeyaV2Config(**config)
        t = fit_transforms(x, cfg, whiten=whiten, heads=heads)
        return cls(dataclasses.replace(cfg, transforms_hash=t.fingerprint()), transforms=t)

    @classmethod
    def from_calibration(cls, config: Mapping[str, Any], calibration: Any, layer: int, stream: str,
                         space: str, layout: str = "head") -> KakeyaV2Codec:
        """The codec of one (layer, K/V stream) with transforms a calibration bundle fits for it (on demand).

        Args:
            config: config fields from a recipe (:meth:`KakeyaV2Config.for_calibration` fills in
                ``stream`` and the ``fitted_tables`` default; ``transforms_hash`` comes from the fit).
            calibration: an object with ``v2_transforms(layer, stream, space, layout, config)``.
            layer: the layer index (also the seed of the rotations).
            stream: the K/V stream, ``"k"`` or ``"v"``.
            space: the key space the input is in, one of :data:`kakeyaturbo.calibration.fits.KEY_SPACES`:
                a whitening ("sigma_q", "lag", folded into the basis), "post_rope", or "none" (always
                "none" for V).
            layout: the engine layout of the input, one of :data:`LAYOUTS` (per-head or joint transforms).
        """
        cfg = KakeyaV2Config.for_calibration(config, stream)
        t = calibration.v2_transforms(layer, stream, space, layout, cfg)
        return cls(dataclasses.replace(cfg, transforms_hash=t.fingerprint()), transforms=t)

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        """As :meth:`Codec.check_config`, for recipe fields (``stream`` and the fit's hash filled in later)."""
        KakeyaV2Config.for_calibration(config, "k")

    @property
    def side_nbytes(self) -> int:
        """Bytes of the calibrated transforms."""
        return self.transforms.nbytes

    def check_encoded(self, enc: Any) -> None:
        """As :meth:`Codec.check_encoded`, refusing payloads encoded with other transforms by name."""
        if isinstance(enc, Encoded) and enc.codec == self.name:
            theirs = enc.config.get("transforms_hash") if isinstance(enc.config, Mapping) else None
            if theirs != self.config.transforms_hash:
                raise CorruptDataError(f"payload was encoded with transforms {theirs!r}; this codec holds "
                                       f"transforms {self.config.transforms_hash!r}")
        super().check_encoded(enc)

    def join_fields(self, encs: Sequence[Encoded]) -> dict[str, torch.Tensor] | None:
        """With one transform (the joint layout) every field codes the vectors in order at a fixed number
        of bits each, so payloads of a multiple of 8 vectors (each then ends on a byte), and one more of
        any size last, concatenate field by field."""
        if self.transforms.streams != 1 or any(math.prod(e.shape[:-1]) % 8 for e in encs[:-1]):
            return None
        return {key: torch.cat([e.fields[key] for e in encs]) for key in encs[0].fields}

    def _streams(self, s: int, d: int, error: type[Exception]) -> int:
        """How many times the transforms' ``S`` streams repeat in ``s`` flattened streams."""
        t = self.transforms
        if d != t.dim or s % t.streams:
            raise error(f"input has {s} streams of D={d}; the transforms hold S={t.streams} streams of "
                        f"D={t.dim} (the stream count must be a multiple of S, stream i using transform i % S)")
        return s // t.streams

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        s, n, d = x.shape
        t = self.transforms
        m = self._streams(s, d, ShapeError)
        raw = x
        x = x.reshape(m, t.streams, n, d).transpose(0, 1).reshape(t.streams, m * n, d)  # per-transform rows
        x = x - t.centre.to(x.device).unsqueeze(1)
        fields = {}
        hb = self.config.head_gain_bits
        if hb:
            grid = t.head_log_gain.to(x.device)
            qh = gain_codes(rms(x, t.heads), grid, hb)
            x = (x.view(*qh.shape, d // t.heads) / gain_values(qh, grid, hb).unsqueeze(-1)).view(x.shape)
            fields["head_scale"] = pack_bits(qh, hb)
        c = x @ self._enc.to(x.device)
        self._check_range(c, raw)
        return fields | self._quantiser.encode(c)

    def _unprojection(self, device: torch.device) -> torch.Tensor:
        """float32 ``[S, K, D]``: the basis rows of the coded components (coefficients ``[S, n, K]`` times
        it are the centred vectors), on ``device`` (made once per device)."""
        if device not in self._unprojections:
            index = self._quantiser.columns(device).index
            self._unprojections[device] = self._dec.to(device).index_select(2, index).transpose(1, 2).contiguous()
        return self._unprojections[device]

    def _check_range(self, c: torch.Tensor, x: torch.Tensor) -> None:
        """Raise :class:`NumericRangeError` when a vector of the coefficients ``c [S_t, m*n, D]`` (per
        transform) has an rms beyond :data:`GAIN_HEADROOM` times its grid's top; ``x [S, n, D]`` is the
        input, for the message."""
        grid = self.transforms.log_gain
        if grid is None:
            return
        excess = rms(c) / (grid[:, 1].to(c.device).exp().unsqueeze(1) * GAIN_HEADROOM)
        worst = int(excess.argmax())
        if float(excess.reshape(-1)[worst]) <= 1.0:
            return
        st, row = divmod(worst, c.shape[1])
        n = x.shape[1]
        stream, token = (row // n) * self.transforms.streams + st, row % n
        channel = int(x[stream, token].abs().argmax())
        raise NumericRangeError(
            f"kakeya-v2: vector at index ({stream}, {token}) (largest value {float(x[stream, token, channel]):.6g} "
            f"at channel {channel}) is {float(excess.reshape(-1)[worst]) * GAIN_HEADROOM:.3g} times the largest gain "
            f"its stream's calibrated grid represents (at most {GAIN_HEADROOM:g}); rescale the input or calibrate "
            "on data of its range")

    def _decode(self, fields: dict[str, torch.Tensor], s: int, n: int, d: int) -> torch.Tensor:
        t = self.transforms
        m = self._streams(s, d, CorruptDataError)
        s, n = t.streams, m * n
        c = self._quantiser.decode(fields, s, n, d)  # [S, m*n, K]: the coded components only
        device = c.device
        centre = t.centre.to(device).unsqueeze(1)
        hb = self.config.head_gain_bits
        if hb:
            head = expect_field(fields, "head_scale", torch.uint8, (packed_nbytes(s * n * t.heads, hb),))
            qh = unpack_bits(head, hb, s * n * t.heads).reshape(s, n, t.heads)
            y = torch.bmm(c, self._unprojection(device))
            y.view(s, n, t.heads, d // t.heads).mul_(gain_values(qh, t.head_log_gain.to(device), hb).unsqueeze(-1))
            y.add_(centre)
        else:
            y = torch.baddbmm(centre, c, self._unprojection(device))
        return y.reshape(s, m, n // m, d).transpose(0, 1).reshape(m * s, n // m, d)
