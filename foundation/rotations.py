"""Rotations of orbitals in the package order (DESIGN.md §3), via e3nn's Wigner-D.

The package orders each shell as the standard real spherical harmonics m = -l … l with z as
polar axis (p: y, z, x; d: xy, yz, 3z²-r², xz, x²-y²). e3nn's real harmonics use y as polar
axis; fed Cartesian vectors permuted as (y, z, x) they equal the package order up to positive
constants (checked in tests/test_model.py::test_package_order_matches_e3nn_harmonics). So:

* a Cartesian vector v (x, y, z) enters e3nn as ``v[..., E3NN_FROM_XYZ]`` = (y, z, x);
* a Cartesian rotation Q acts in that frame as Q' = P Q Pᵀ (`e3nn_frame_matrix`);
* an orbital shell of angular momentum l rotates by D_l(Q) = e3nn D_l(Q') with parity
  (-1)^l, so inversion multiplies it by (-1)^l (`shell_D`).

Rotating a structure (positions and cell rows r → Q r) maps every block by
H_ij → D_i(Q) H_ij D_j(Q)ᵀ with D_i the block-diagonal matrix of atom i's shells (`shells_D`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from e3nn import o3

E3NN_FROM_XYZ = (1, 2, 0)
"""Column order that turns Cartesian (x, y, z) into e3nn's frame (y, z, x)."""

_P = np.eye(3)[list(E3NN_FROM_XYZ)]


@contextmanager
def double_precision() -> Iterator[None]:
    """Temporarily make float64 torch's default dtype.

    e3nn computes its Wigner-D generators, Clebsch–Gordan coefficients and harmonics
    constants in the default dtype: build models and D matrices inside this context to get
    them to float64 precision (``.double()`` afterwards only casts float32-accurate numbers).
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def to_e3nn_frame(vectors: torch.Tensor) -> torch.Tensor:
    """(..., 3) Cartesian (x, y, z) → (y, z, x), the frame in which e3nn = package order."""
    return vectors[..., list(E3NN_FROM_XYZ)]


def e3nn_frame_matrix(q: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Q' = P Q Pᵀ: the Cartesian 3×3 (proper or improper) rotation Q in e3nn's frame."""
    q = torch.as_tensor(q, dtype=torch.float64)
    p = torch.as_tensor(_P, dtype=torch.float64)
    return p @ q @ p.T


def shell_D(l: int, q: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(2l+1, 2l+1) float64 matrix rotating one orbital shell (package order) by Q.

    For orbital coefficients c of a shell, the rotated orbital set has c' = D c; an improper
    Q (det −1) includes the orbital parity (−1)^l.
    """
    q = torch.as_tensor(q, dtype=torch.float64)
    with double_precision():
        return o3.Irrep(l, (-1) ** l).D_from_matrix(e3nn_frame_matrix(q))


def shells_D(shells: Sequence[int], q: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Block-diagonal rotation (float64) of a list of shells (an element's or the universal)."""
    return torch.block_diag(*[shell_D(l, q) for l in shells])


def random_rotation(seed: int, improper: bool = False) -> np.ndarray:
    """A reproducible random 3×3 rotation (times −1 when ``improper``) as float64 numpy."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    qm, r = torch.linalg.qr(a)
    qm = qm * torch.sign(torch.diagonal(r))
    if torch.det(qm) < 0:
        qm[:, 0] = -qm[:, 0]
    return (-qm if improper else qm).numpy()


__all__ = [
    "E3NN_FROM_XYZ",
    "double_precision",
    "to_e3nn_frame",
    "e3nn_frame_matrix",
    "shell_D",
    "shells_D",
    "random_rotation",
]
