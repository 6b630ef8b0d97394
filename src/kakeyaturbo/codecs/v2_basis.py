"""The two ways ``kakeya-v2`` stores its per-stream basis ``B_s [D, D]`` (columns are components).

* :class:`DenseBasis`: int8 entries with one float16 scale per column (any basis, whitening folded in);
* :class:`ReflectorBasis`: quantised Householder reflectors (:mod:`kakeyaturbo.ops.householder`) of
  an orthogonal basis, about half the entries, none for a trailing run of unstored reflectors.

Both are built by the fit (:func:`quantise_bases`, batched over fits) or read back from their
stored tensors (:func:`basis_from_tensors`), whose names and dtypes are what calibration bundles
memoise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar, Protocol

import torch

from kakeyaturbo.errors import CorruptDataError, NumericRangeError
from kakeyaturbo.ops import householder
from kakeyaturbo.packing import narrow

_INT8_MAX = 127.0
Spec = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def tensors_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Basis(Protocol):
    """A stored basis of ``S`` streams."""

    description: ClassVar[str]
    """How it is stored, in words."""
    scale_name: ClassVar[str]
    """The stored tensor that must be > 0 everywhere."""

    def matrix(self) -> torch.Tensor:
        """Dequantised basis, float64 ``[S, D, D]`` (columns are components)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name."""

    def specs(self, s: int, d: int) -> Spec:
        """``{name: (dtype, shape)}`` the stored tensors must have for ``S = s`` streams of ``D = d``."""

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""


@dataclasses.dataclass(frozen=True, eq=False)
class DenseBasis:
    """int8 basis with per-column scales: ``basis = basis_q * basis_scale[:, None, :]``.

    Attributes:
        basis_q: int8 ``[S, D, D]``; column ``j`` of stream ``s`` is component ``j`` (in the input's
            space: any whitening is folded in).
        basis_scale: float16 ``[S, D]``, > 0.
    """

    basis_q: torch.Tensor
    basis_scale: torch.Tensor
    description: ClassVar[str] = "an int8 basis"
    scale_name: ClassVar[str] = "basis_scale"

    @classmethod
    def quantise(cls, basis: torch.Tensor) -> DenseBasis:
        """The int8 form of float64 ``basis [S, D, D]`` (each column scaled to its largest entry)."""
        col_scale = narrow(basis.abs().amax(1) / _INT8_MAX, torch.float16, "kakeya-v2 basis scale")
        basis_q = torch.round(basis / col_scale.double().unsqueeze(1)).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
        return cls(basis_q, col_scale)

    def matrix(self) -> torch.Tensor:
        """As :meth:`Basis.matrix`."""
        return self.basis_q.double() * self.basis_scale.double().unsqueeze(-2)

    def tensors(self) -> dict[str, torch.Tensor]:
        """As :meth:`Basis.tensors`."""
        return {"basis_q": self.basis_q, "basis_scale": self.basis_scale}

    def specs(self, s: int, d: int) -> Spec:
        """As :meth:`Basis.specs`."""
        return {"basis_q": (torch.int8, (s, d, d)), "basis_scale": (torch.float16, (s, d))}

    @property
    def nbytes(self) -> int:
        """As :attr:`Basis.nbytes`."""
        return tensors_nbytes(self.tensors())


@dataclasses.dataclass(frozen=True, eq=False)
class ReflectorBasis:
    """An orthogonal basis as quantised Householder reflectors.

    Attributes:
        reflectors: uint8 ``[reflectors_nbytes(reflector_bits)]``: the packed reflector entries
            (:func:`kakeyaturbo.ops.householder.quantize_orthogonal`).
        reflector_scale: float16 ``[S, D]``, > 0: per-reflector scale.
        reflector_bits: uint8 ``[S, D]``: bits of each reflector (0 for a trailing, unstored one).
    """

    reflectors: torch.Tensor
    reflector_scale: torch.Tensor
    reflector_bits: torch.Tensor
    description: ClassVar[str] = "Householder reflectors"
    scale_name: ClassVar[str] = "reflector_scale"

    def matrix(self) -> torch.Tensor:
        """As :meth:`Basis.matrix` (exactly orthogonal)."""
        return householder.dequantize_orthogonal(self.reflectors, self.reflector_scale, self.reflector_bits)

    def tensors(self) -> dict[str, torch.Tensor]:
        """As :meth:`Basis.tensors`."""
        return {"reflectors": self.reflectors, "reflector_scale": self.reflector_scale,
                "reflector_bits": self.reflector_bits}

    def specs(self, s: int, d: int) -> Spec:
        """As :meth:`Basis.specs` (the packed size follows from ``reflector_bits``, checked first)."""
        rb = self.reflector_bits
        if not isinstance(rb, torch.Tensor) or rb.dtype != torch.uint8 or tuple(rb.shape) != (s, d):
            raise CorruptDataError(f"transforms field 'reflector_bits' must be uint8 {(s, d)}")
        try:
            size = householder.reflectors_nbytes(rb)
        except NumericRangeError as e:
            raise CorruptDataError(f"transforms reflector_bits: {e}") from e
        return {"reflector_bits": (torch.uint8, (s, d)), "reflector_scale": (torch.float16, (s, d)),
                "reflectors": (torch.uint8, (size,))}

    @property
    def nbytes(self) -> int:
        """As :attr:`Basis.nbytes`."""
        return tensors_nbytes(self.tensors())


KINDS: tuple[type[DenseBasis] | type[ReflectorBasis], ...] = (DenseBasis, ReflectorBasis)
TENSOR_NAMES: frozenset[str] = frozenset(f.name for kind in KINDS for f in dataclasses.fields(kind))
"""Every stored basis tensor's name."""


def quantise_bases(basis: torch.Tensor, fits: int,
                   widths: torch.Tensor | None = None) -> tuple[list[Basis], torch.Tensor]:
    """Store the bases of ``fits`` fits at once.

    Args:
        basis: float64 ``[F * S, D, D]``: fit ``f``'s ``S`` streams are rows ``f * S .. (f + 1) * S - 1``.
        fits: ``F``.
        widths: None for int8 bases (:class:`DenseBasis`, any basis); else integer ``[F * S, D]``, the
            bits of each Householder reflector of orthogonal bases (:class:`ReflectorBasis`).

    Returns:
        ``(bases, matrix)``: each fit's stored basis, and float64 ``[F * S, D, D]``, what their
        :meth:`Basis.matrix` give (computed once for the batch).
    """
    if widths is None:
        dense = DenseBasis.quantise(basis)
        parts = zip(dense.basis_q.chunk(fits), dense.basis_scale.chunk(fits))
        return [DenseBasis(q.clone(), scale.clone()) for q, scale in parts], dense.matrix()
    codes, scale = householder.reflector_codes(basis, widths)
    reflected = [ReflectorBasis(householder.pack_reflectors(c, w), sc.clone(), w.to(torch.uint8))
                 for c, sc, w in zip(codes.chunk(fits), scale.chunk(fits), widths.chunk(fits))]
    return reflected, householder.reflector_matrix(codes, scale, widths)


def basis_from_tensors(tensors: Mapping[str, torch.Tensor]) -> DenseBasis | ReflectorBasis:
    """The basis stored in ``tensors`` (other names ignored): exactly one kind's tensors must be given."""
    given = {name for name in TENSOR_NAMES if tensors.get(name) is not None}
    for kind in KINDS:
        if given == {f.name for f in dataclasses.fields(kind)}:
            return kind(**{name: tensors[name] for name in given})
    raise CorruptDataError(f"transforms need either basis_q and basis_scale (int8 basis) or reflectors, "
                           f"reflector_scale and reflector_bits (orthogonal basis); got {sorted(given)}")
