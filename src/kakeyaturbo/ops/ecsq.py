"""Entropy-coded uniform scalar quantisation (ECSQ) of Gaussian-like coefficients.

A coefficient ``x`` quantised with step ``step`` becomes the integer ``v = round(x / step)``. Its
expected spread ``r = sigma / step`` picks a *class* (classes are spaced a quarter of a bit
apart in ``log2 r``). Each class codes ``v`` as

- ``m`` raw low bits (``m > 0`` only for wide classes, so that the coded part keeps a spread of
  at most :data:`HI_SPREAD`): ``v = hi * 2**m + lo``, ``lo`` stored as is;
- ``hi`` in ``-HALF..HALF`` (clamped) by a canonical prefix code built from the N(0, r²) mass of
  each ``hi`` cell.

Narrow classes (``m = 0``) reconstruct each cell at its N(0, r²) centroid (smaller than the cell's
midpoint, which matters at low rates); wide ones at ``v``. All tables follow from these constants,
so nothing per model is stored: :func:`gaussian_classes` builds them once per process.

At high rate ECSQ spends about 0.25 bits per coefficient more than the rate-distortion bound,
fixed-rate Lloyd–Max about 0.7 bits at 4 bits per coefficient; the codes' length limit and the
Gaussian shape assumption cost a little of that gap back.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.ops.prefix_code import PrefixCode, pack_slots, read_slot_columns, write_slots
from kakeyaturbo.ops.varpack import Columns

CLASS_STEP = 0.25
"""log2-spread between neighbouring classes."""
CLASS_MIN = -4.0
"""log2-spread of class 0."""
N_CLASSES = 65
"""Classes 0..64: spreads 1/16 .. 4096."""
HALF = 64
"""Coded ``hi`` symbols are ``-HALF..HALF`` (``2 * HALF + 1`` symbols)."""
HI_SPREAD = 8.0
"""Largest spread left to the prefix code; wider classes move low bits to raw bits."""
MAX_LEN = 14
"""Longest codeword."""
_WEIGHT_FLOOR = 1e-12


def class_spread(k: torch.Tensor | int) -> torch.Tensor:
    """Spread ``sigma / step`` of class ``k`` (float64)."""
    return torch.pow(2.0, CLASS_MIN + CLASS_STEP * torch.as_tensor(k, dtype=torch.float64))


def class_of(spread: torch.Tensor) -> torch.Tensor:
    """int64 class of each spread ``sigma / step`` (nearest in log2, clamped to the table)."""
    k = torch.round((torch.log2(spread.double()) - CLASS_MIN) / CLASS_STEP)
    return k.clamp(0, N_CLASSES - 1).to(torch.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class EcsqTables:
    """The class family (:func:`gaussian_classes`).

    Attributes:
        code: :class:`PrefixCode` over the ``2 * HALF + 1`` ``hi`` symbols, one code per class.
        raw_bits: int64 ``[C]``: raw low bits ``m`` of each class.
        centroid: float32 ``[C, 2 * HALF + 1]``: reconstruction (in steps) of each ``hi`` cell of
            the narrow classes (``m = 0``); unused for wide classes.
        expected_bits: float64 ``[C]``: mean bits per coefficient (codeword + raw) under N(0, r²).
    """

    code: PrefixCode
    raw_bits: torch.Tensor
    centroid: torch.Tensor
    expected_bits: torch.Tensor

    def to(self, device: torch.device | str) -> EcsqTables:
        """A copy with every table on ``device``."""
        return EcsqTables(self.code.to(device), self.raw_bits.to(device), self.centroid.to(device),
                          self.expected_bits.to(device))


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


@functools.lru_cache(maxsize=4)
def gaussian_classes(device: str = "cpu") -> EcsqTables:
    """The ECSQ tables of every class, for N(0, r²) coefficients, on ``device`` (built once per
    process and device)."""
    if device != "cpu":
        return gaussian_classes("cpu").to(device)
    k = torch.arange(N_CLASSES)
    r = class_spread(k)
    m = torch.clamp(torch.ceil(torch.log2(r / HI_SPREAD)), min=0).to(torch.int64)
    hi = torch.arange(-HALF, HALF + 2, dtype=torch.float64)  # cell edges of hi = -HALF..HALF (+1 for the last)
    width = torch.pow(2.0, m.double()).unsqueeze(1)
    edges = (hi.unsqueeze(0) * width - 0.5) / r.unsqueeze(1)  # in units of r
    edges[:, 0], edges[:, -1] = -math.inf, math.inf
    cdf = _normal_cdf(edges)
    mass = (cdf[:, 1:] - cdf[:, :-1]).clamp_min(0.0)
    code = PrefixCode.from_weights(mass + _WEIGHT_FLOOR, MAX_LEN)
    density = torch.exp(-0.5 * edges.nan_to_num(posinf=1e300, neginf=-1e300).clamp(-1e150, 1e150) ** 2)
    density = density / math.sqrt(2 * math.pi)
    mid = hi[:-1].expand(N_CLASSES, -1)
    centroid = r.unsqueeze(1) * (density[:, :-1] - density[:, 1:]) / mass.clamp_min(1e-300)
    centroid = torch.where(mass > 1e-12, centroid, mid)
    expected = (mass * code.lengths.double()).sum(1) / mass.sum(1) + m.double()
    return EcsqTables(code, m, centroid.float(), expected)


def step_for_budget(sigma: torch.Tensor, active: torch.Tensor, budget: int) -> torch.Tensor:
    """Per-stream step ``[S]`` (float64, in units of ``sigma``) at which the expected bits of the
    active components, each coded in the class of ``sigma / step``, equal ``budget``.

    Args:
        sigma: float ``[S, D]``, ``> 0``: rms of each component.
        active: bool ``[S, D]``: components that are coded.
        budget: bits per vector.

    Raises:
        ConfigError: the active components cannot be coded in ``budget`` bits even at the coarsest
            class (about 1 bit each).
    """
    tables = gaussian_classes()
    floor = (active.double() * float(tables.expected_bits[0])).sum(1)
    if bool((floor > budget).any()):
        raise ConfigError(f"ECSQ: {int(active.sum(1).max())} coded components need at least "
                          f"{float(floor.max()):.1f} bits per vector; the budget is {budget}")
    expected = tables.expected_bits.to(sigma.device)
    sigma = sigma.double()
    lo = torch.full(sigma.shape[:1], -40.0, dtype=torch.float64, device=sigma.device)
    hi = torch.full_like(lo, 40.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        k = class_of(sigma / torch.pow(2.0, mid).unsqueeze(1))  # as SlotCoder.build classifies
        over = (expected[k] * active).sum(1) > budget
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    return torch.pow(2.0, hi)


STEP_SPAN = 2.0
"""Margin (in nats) of the per-vector step grid beyond the calibrated gain range times the step."""


@dataclasses.dataclass(frozen=True, eq=False)
class _SlotPlan:
    """What :class:`SlotCoder` precomputes on one device, over the ``K`` components some stream codes.

    Attributes:
        columns: those components.
        classes: int64 ``[S, K]``, ``-1`` = not coded in that stream.
        raw_bits: int64 ``[S, K]``: raw low bits of each (0 where not coded).
        width, inv_width: float ``[S, 1, K]``: ``2**raw_bits`` and its inverse.
        low, bound: float ``[S, 1, K]``: ``∓(HALF + 1) * width`` (0 where not coded): clamping ``c / step``
            to them before rounding changes no symbol, raw value or length.
        length_at: float ``[S, 1, K]``: where the value 0 of each component's class sits in
            :func:`rounded_lengths`.
        code_at: int64 ``[S, 1, K]``: where each component's class starts in the padded codeword table
            (:attr:`~kakeyaturbo.ops.prefix_code.PrefixCode.padded`; the empty class where not coded).
        raw_scale: float ``[K, S]``: 1 for wide classes, -0.0 (adds nothing, not even a sign) else.
    """

    columns: Columns
    classes: torch.Tensor
    raw_bits: torch.Tensor
    width: torch.Tensor
    inv_width: torch.Tensor
    low: torch.Tensor
    bound: torch.Tensor
    length_at: torch.Tensor
    code_at: torch.Tensor
    raw_scale: torch.Tensor

    def rows(self, s: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Classes and raw bits of the ``s * n`` slots (``[1, K]`` when one stream serves them all)."""
        if s == 1:
            return self.classes, self.raw_bits
        k = self.classes.shape[1]
        return (self.classes.unsqueeze(1).expand(s, n, k).reshape(s * n, k),
                self.raw_bits.unsqueeze(1).expand(s, n, k).reshape(s * n, k))


@dataclasses.dataclass(frozen=True, eq=False)
class SlotCoder:
    """ECSQ of vectors of coefficients into fixed-size slots (see the module docstring).

    Every vector of stream ``s`` gets one step from a per-stream log grid (its ``step_bits``-bit
    code is stored next to the slot) and spends at most ``slot_bits`` bits: the encoder picks the
    finest step whose codewords fit. Component ``j`` is coded in the fixed class ``classes[s, j]``.

    Attributes:
        classes: int64 ``[S, D]``: class of each component, ``-1`` = not coded (reconstructed as 0).
        log_step: float64 ``[S, 2]``: ``(lo, hi)`` of the log-step grid.
        step_bits: bits of a step code (the grid has ``2**step_bits`` steps).
        slot_bits: bits per vector.
    """

    classes: torch.Tensor
    log_step: torch.Tensor
    step_bits: int
    slot_bits: int

    @classmethod
    def build(cls, sigma: torch.Tensor, active: torch.Tensor, log_gain: torch.Tensor, step_bits: int,
              slot_bits: int) -> SlotCoder:
        """Classes and step grid for streams whose gain-normalised components have rms ``sigma [S, D]``
        and whose log-gain ranges over ``log_gain [S, 2]``; ``active [S, D]`` marks coded components."""
        if step_bits < 1:
            raise ConfigError(f"ECSQ needs a step code of >= 1 bit, got {step_bits}")
        step = step_for_budget(sigma, active, slot_bits)
        classes = torch.where(active, class_of(sigma.double() / step.unsqueeze(1)), -1)
        zero_bits = slot_lengths_of_zero(classes)
        if bool((zero_bits > slot_bits).any()):
            raise ConfigError(f"ECSQ: an all-zero vector needs {int(zero_bits.max())} bits, the slot holds {slot_bits}")
        centre = torch.log(step).unsqueeze(1)
        log_step = torch.stack([log_gain[:, 0].double() - STEP_SPAN, log_gain[:, 1].double() + STEP_SPAN], 1) + centre
        return cls(classes, log_step, step_bits, slot_bits)

    def steps(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 steps ``[S, N]`` of step codes ``[S, N]``."""
        lo, hi = self.log_step[:, :1].to(codes.device), self.log_step[:, 1:].to(codes.device)
        return torch.exp(lo + codes.double() * ((hi - lo) / (2**self.step_bits - 1))).float()

    @functools.cached_property
    def _plans(self) -> dict[torch.device, _SlotPlan]:
        """The precomputed tables by device."""
        return {}

    def _plan(self, device: torch.device) -> _SlotPlan:
        """The precomputed tables on ``device`` (built on first use)."""
        plans = self._plans
        if device not in plans:
            tables = gaussian_classes(str(device))
            classes = self.classes.to(device)
            columns = Columns.of(classes >= 0)
            cls = columns.take(classes)
            coded = cls >= 0
            raw_bits = torch.where(coded, tables.raw_bits[cls.clamp_min(0)], 0)
            width = torch.pow(2.0, raw_bits.float()).unsqueeze(1)
            _, start = rounded_lengths(str(device))
            at = torch.where(coded, start[cls.clamp_min(0)], start[-1]).float().unsqueeze(1)
            bound = torch.where(coded.unsqueeze(1), (HALF + 1) * width, 0.0)
            code_at = torch.where(coded, cls, tables.raw_bits.numel()).unsqueeze(1) * (2 * HALF + 1)
            plans[device] = _SlotPlan(columns, cls, raw_bits, width, 1.0 / width, -bound, bound, at, code_at,
                                      torch.where(raw_bits > 0, 1.0, -0.0).t())
        return plans[device]

    def _rounded(self, c: torch.Tensor, codes: torch.Tensor, plan: _SlotPlan, exact: bool) -> torch.Tensor:
        """float ``[S, N, K]``: ``round(c / step)`` for step codes ``codes [S, N]``, clamped to ``±bound``,
        as the int64 arithmetic of the format reads it: a value beyond the int64 range (possible when
        ``exact`` is False) reads as ``-2**63``."""
        v = c / self.steps(codes).unsqueeze(-1)
        if not exact:
            v = torch.where(torch.round(v).abs() < 2.0**63, v, -(2.0**63))
        return torch.round(torch.clamp(v, plan.low, plan.bound))

    def encode(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Code coefficients ``c [S, N, D]`` (float32): returns step codes int64 ``[S, N]`` and the
        packed slots (uint8, ``S * N * slot_bits`` bits).

        Only the coded components are touched; each vector's step is found by bisection over the
        step codes, all vectors at once, counting its bits by one table lookup per component."""
        s, n, _ = c.shape
        tables = gaussian_classes(str(c.device))
        lengths, _ = rounded_lengths(str(c.device))
        plan = self._plan(c.device)
        ck = plan.columns.take(c)
        k = ck.shape[-1]
        lo = torch.zeros(s, n, dtype=torch.int64, device=c.device)
        hi = torch.full_like(lo, 2**self.step_bits - 1)
        exact = True  # every |c / step| below 2**62: no rounded value leaves the int64 range
        if k:
            least, most = torch.aminmax(ck.reshape(s, -1), dim=-1)  # per stream; the finest step is code 0's
            exact = bool((torch.maximum(-least, most) / self.steps(lo[:, :1])[:, 0]).amax() < 2.0**62)

        def bits_of(full: torch.Tensor) -> torch.Tensor:
            return lengths.index_select(0, (full + plan.length_at).to(torch.int32).reshape(-1)).view(s, n, k)

        for _ in range(self.step_bits):  # finest step that fits (bits fall as the step grows)
            mid = (lo + hi) // 2
            fits = bits_of(self._rounded(ck, mid, plan, exact)).sum(-1) <= self.slot_bits
            lo, hi = torch.where(fits, lo, mid + 1), torch.where(fits, mid, hi)
        full = self._rounded(ck, hi, plan, exact)
        top = torch.floor(full * plan.inv_width).clamp(-HALF, HALF)
        sym = (top + HALF).to(torch.int64)
        raw = (full - top * plan.width).clamp(torch.zeros_like(plan.width), plan.width - 1).to(torch.int64)
        bits = bits_of(full)
        if bool((bits.sum(-1) > self.slot_bits).any()):  # rare: write_slots counts the fitted lengths again
            sym, raw = self._fit(sym, raw, bits.to(torch.int64), plan.classes)
            rows, raw_bits = plan.rows(s, n)
            return hi, write_slots(tables.code, sym.reshape(s * n, k), rows, raw.reshape(s * n, k), raw_bits,
                                   self.slot_bits)
        codeword = tables.code.padded[1].index_select(0, (sym + plan.code_at).to(torch.int32).reshape(-1))
        words = (codeword.view(s, n, k) << plan.raw_bits.to(torch.int32).unsqueeze(1)) | raw.to(torch.int32)
        return hi, pack_slots(words.view(s * n, k), bits.to(torch.int32).view(s * n, k), self.slot_bits)

    def _fit(self, sym: torch.Tensor, raw: torch.Tensor, bits: torch.Tensor, classes: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero the trailing components of vectors that overflow even at the coarsest step (inputs far
        outside the calibrated range) so that every slot fits: keep the longest prefix that does."""
        zero = slot_lengths_of_zero(classes).to(bits.device)  # [S, D]
        kept = torch.cat([torch.zeros_like(bits[..., :1]), bits.cumsum(-1)], -1)  # bits of the first k components
        rest = torch.cat([zero.flip(-1).cumsum(-1).flip(-1), torch.zeros_like(zero[:, :1])], -1).unsqueeze(1)
        ok = (kept + rest) <= self.slot_bits  # [S, N, D + 1]; k = 0 always fits
        k = (ok * torch.arange(bits.shape[-1] + 1, device=bits.device)).amax(-1, keepdim=True)
        tail = torch.arange(bits.shape[-1], device=bits.device) >= k
        return torch.where(tail, HALF, sym), torch.where(tail, 0, raw)

    def columns(self, device: torch.device) -> Columns:
        """The ``K`` components some stream codes."""
        return self._plan(device).columns

    def decode(self, codes: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`: coefficients float32 ``[S, N, D]`` from step codes ``[S, N]``."""
        return self._plan(packed.device).columns.put(self.decode_columns(codes, packed))

    def decode_columns(self, codes: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` of the :meth:`columns` only: float32 ``[S, N, K]`` (a view)."""
        s, n = codes.shape
        tables = gaussian_classes(str(packed.device))
        plan = self._plan(packed.device)
        rows, raw_bits = plan.rows(s, n)
        found = read_slot_columns(tables.code, packed, rows, raw_bits, s * n, self.slot_bits)  # [K, S*N]
        k = found.entry.shape[0]
        value = decoded_values(str(packed.device)).index_select(0, found.entry.reshape(-1)).view(k, s, n)
        if found.raw.numel():  # wide classes: their raw low bits (-0.0 adds nothing where a stream has none)
            wide = found.raw_columns
            value[wide] += found.raw.view(wide.numel(), s, n) * plan.raw_scale.index_select(0, wide).unsqueeze(-1)
        return (value * self.steps(codes)).permute(1, 2, 0)


@functools.lru_cache(maxsize=4)
def rounded_lengths(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(lengths, start)``: float32 lengths (codeword and raw bits) of the rounded ``c / step`` values
    ``f = -bound..bound`` of every class (``bound = (HALF + 1) * 2**m``; ``hi`` is ``floor(f / 2**m)``
    clamped to ``±HALF``), then one 0 for positions not coded; int64 ``start [C + 1]``: where each
    class's ``f = 0`` sits."""
    tables = gaussian_classes(device)
    parts, start, at = [], [], 0
    for c, m in enumerate(tables.raw_bits.tolist()):
        bound = (HALF + 1) << m
        f = torch.arange(-bound, bound + 1, device=device)
        hi = torch.div(f, 1 << m, rounding_mode="floor").clamp(-HALF, HALF)
        parts.append((tables.code.lengths[c, hi + HALF] + m).float())
        start.append(at + bound)
        at += 2 * bound + 1
    parts.append(torch.zeros(1, device=device))
    start.append(at)
    return torch.cat(parts), torch.tensor(start, device=device)


@functools.lru_cache(maxsize=4)
def decoded_values(device: str = "cpu") -> torch.Tensor:
    """float32 ``[(C + 1) * (2 * HALF + 1)]``: for every (class, symbol) of the class family's prefix code,
    padded as :attr:`~kakeyaturbo.ops.prefix_code.PrefixCode.padded` (the entries
    :func:`~kakeyaturbo.ops.prefix_code.read_slot_columns` finds), the reconstruction in steps without
    raw bits: narrow classes the cell's N(0, r²) centroid, wide ones ``(hi - HALF) * 2**m``; 0 for the
    class of positions not coded."""
    tables = gaussian_classes(device)
    wide = tables.raw_bits.unsqueeze(1) > 0
    hi = torch.arange(-HALF, HALF + 1, device=device).float() * torch.pow(2.0, tables.raw_bits).unsqueeze(1)
    return torch.cat([torch.where(wide, hi, tables.centroid), tables.centroid.new_zeros(1, 2 * HALF + 1)]).reshape(-1)


def slot_lengths_of_zero(classes: torch.Tensor) -> torch.Tensor:
    """int64 ``[S, D]``: bits a zero coefficient takes in each component's class (0 if not coded)."""
    tables = gaussian_classes()
    safe = classes.clamp_min(0).cpu()
    bits = tables.code.lengths[safe, HALF] + tables.raw_bits[safe]
    return torch.where(classes.cpu() >= 0, bits, 0).to(classes.device)
