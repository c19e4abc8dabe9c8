"""Γ-point phonons from phonopy files → frequencies, eigenvectors, zero-point displacements.

Phonon sources (no pickle; phonopy reads YAML or plain text):

* ``phonopy_params.yaml`` (or ``phonopy.yaml``) written by phonopy with force constants
  (``Phonopy.save(settings={"force_constants": True})``, as `scripts/generate_eph_dataset.py`
  does): it carries the unit cell, the supercell matrix and the force constants;
* a ``FORCE_CONSTANTS`` file (phonopy's text format) plus the structure it belongs to
  (the unit cell; the supercell matrix, default 1×1×1, must match the file's atom count).

`load_gamma_phonons` gives q = 0 (`GammaPhonons`, real eigenvectors); `load_phonon_model`
gives any q (`PhononModel`: phonopy's Fourier interpolation of the force constants of a
supercell, complex eigenvectors in the cell-phase convention of `foundation.physics.eph_q`).
For a polar crystal these are the TO-like analytic frequencies: the non-analytic
LO–TO splitting at Γ (Born charges, dielectric tensor) is not included.

Units: frequencies ν in THz (ω = 2πν; negative values mean imaginary modes, phonopy's
convention), eigenvectors of the mass-weighted dynamical matrix (real at Γ, normalised),
masses in amu (phonopy's table unless the file sets them), positions in Å.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ase
import numpy as np
from ase import units

from foundation.physics.eph import zero_point_displacement

ACOUSTIC_THZ = 0.5
"""|ν| below this (THz) at Γ counts as an acoustic (zero-frequency) mode: they have no
zero-point amplitude, and with the acoustic sum rule imposed they sit at ~0."""


class PhononError(ValueError):
    """A phonon file cannot be used for the given structure; the message says why and the fix."""


@dataclass
class GammaPhonons:
    """Γ-point modes of one cell: ``frequencies_THz`` (3N,) ascending, ``eigenvectors``
    (3N, N, 3) real (mode ν, atom κ, axis α), ``masses_amu`` (N,), and the cell they belong
    to (``numbers`` (N,), ``positions`` (N, 3) Å, ``cell`` (3, 3) Å rows)."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    masses_amu: np.ndarray
    frequencies_THz: np.ndarray
    eigenvectors: np.ndarray
    source: str = ""

    @property
    def optical_modes(self) -> np.ndarray:
        """Indices of the modes with ν > `ACOUSTIC_THZ` (the ones with a zero-point amplitude)."""
        return np.flatnonzero(self.frequencies_THz > ACOUSTIC_THZ)

    def zero_point_patterns(self, modes: np.ndarray | list[int] | None = None) -> np.ndarray:
        """(M, N, 3) zero-point displacements u_ν (Å) of ``modes`` (default: `optical_modes`),
        `foundation.physics.eph.zero_point_displacement`: directional derivatives along them
        give ∂_ν H in eV, hence g_mnν in eV."""
        modes = self.optical_modes if modes is None else np.asarray(modes, dtype=np.int64)
        return np.array(
            [
                zero_point_displacement(
                    self.eigenvectors[m], self.frequencies_THz[m], self.masses_amu
                )
                for m in modes
            ]
        ).reshape(len(modes), -1, 3)

    def check_structure(self, atoms: ase.Atoms, where: str, tol_A: float = 1e-3) -> None:
        """Refuse a structure that is not this cell (same atoms in the same order, same
        lattice, same positions up to lattice translations, within ``tol_A``)."""
        if len(atoms) != len(self.numbers) or not np.array_equal(atoms.numbers, self.numbers):
            raise PhononError(
                f"{where}: the phonons ({self.source}) are for atoms {self.numbers.tolist()} but "
                f"the structure has {atoms.numbers.tolist()}; give the phonon file of this cell "
                "(same atoms in the same order)."
            )
        lattice = float(np.max(np.abs(np.asarray(atoms.cell) - self.cell)))
        frac = np.linalg.solve(self.cell.T, (atoms.positions - self.positions).T).T
        offset = float(np.max(np.abs((frac - np.rint(frac)) @ self.cell)))
        if lattice > tol_A or offset > tol_A:
            raise PhononError(
                f"{where}: the phonons ({self.source}) belong to a different cell (lattice off "
                f"by {lattice:.2g} Å, positions by {offset:.2g} Å); compute them for exactly "
                "this structure, in the same Cartesian frame (eigenvectors are Cartesian: a CIF "
                "re-orients the lattice, POSCAR and extxyz keep it)."
            )


def _gamma_modes(phonon, source: str) -> GammaPhonons:
    """Γ frequencies and eigenvectors of a phonopy object with force constants."""
    phonon.run_qpoints([[0.0, 0.0, 0.0]], with_eigenvectors=True)
    q = phonon.get_qpoints_dict()
    freqs = np.asarray(q["frequencies"][0], dtype=np.float64)
    vectors = np.asarray(q["eigenvectors"][0])  # (3N, 3N), columns are modes
    prim = phonon.primitive
    n = len(prim.numbers)
    if np.max(np.abs(vectors.imag)) > 1e-6:  # degenerate modes may mix with complex phases
        vectors = _real_basis(vectors, freqs)
    return GammaPhonons(
        numbers=np.asarray(prim.numbers, dtype=np.int64),
        positions=np.asarray(prim.positions, dtype=np.float64),
        cell=np.asarray(prim.cell, dtype=np.float64),
        masses_amu=np.asarray(prim.masses, dtype=np.float64),
        frequencies_THz=freqs,
        eigenvectors=vectors.real.T.reshape(3 * n, n, 3),
        source=source,
    )


def _real_basis(vectors: np.ndarray, freqs: np.ndarray, tol_THz: float = 1e-4) -> np.ndarray:
    """Real orthonormal eigenvectors spanning each degenerate level (the Γ dynamical matrix
    is real symmetric, so its real and imaginary parts span the same eigenspace)."""
    out = np.empty_like(vectors.real)
    start = 0
    while start < len(freqs):
        stop = start + 1
        while stop < len(freqs) and abs(freqs[stop] - freqs[start]) < tol_THz:
            stop += 1
        span = np.concatenate([vectors[:, start:stop].real, vectors[:, start:stop].imag], axis=1)
        u, sv, _ = np.linalg.svd(span, full_matrices=False)
        out[:, start:stop] = u[:, : stop - start]
        start = stop
    return out


def _load_phonopy(
    path: str | os.PathLike,
    structure: ase.Atoms | None = None,
    supercell_matrix: np.ndarray | None = None,
):
    """phonopy object with force constants from a phonopy YAML or a FORCE_CONSTANTS file
    (`load_gamma_phonons` says which and how)."""
    import phonopy
    from phonopy.file_IO import parse_FORCE_CONSTANTS
    from phonopy.structure.atoms import PhonopyAtoms

    path = Path(path)
    if not path.is_file():
        raise PhononError(f"{path}: no such phonon file.")
    if path.suffix in (".yaml", ".yml"):
        try:
            phonon = phonopy.load(path, primitive_matrix="P", is_nac=False, log_level=0)
        except Exception as exc:  # phonopy raises many kinds for a malformed file
            raise PhononError(
                f"{path}: phonopy could not read it ({type(exc).__name__}: {exc}); give a "
                "phonopy_params.yaml written with force constants."
            ) from None
    else:
        if structure is None:
            raise PhononError(
                f"{path}: a FORCE_CONSTANTS file holds no structure; pass the structure it belongs to."
            )
        unit = PhonopyAtoms(
            numbers=structure.numbers,
            cell=np.asarray(structure.cell),
            positions=structure.positions,
        )
        matrix = np.eye(3, dtype=int) if supercell_matrix is None else supercell_matrix
        phonon = phonopy.Phonopy(unit, supercell_matrix=matrix, primitive_matrix="P")
        try:
            fc = parse_FORCE_CONSTANTS(str(path))
        except Exception as exc:
            raise PhononError(f"{path}: not a phonopy FORCE_CONSTANTS file ({exc}).") from None
        if fc.shape[1] != len(phonon.supercell.numbers):
            raise PhononError(
                f"{path}: force constants for {fc.shape[1]} atoms but the structure repeated by "
                f"{np.asarray(matrix).tolist()} has {len(phonon.supercell.numbers)}; pass the "
                "supercell matrix the file was computed with."
            )
        phonon.force_constants = fc
        phonon.symmetrize_force_constants()
    if phonon.force_constants is None:
        raise PhononError(
            f"{path}: no force constants inside; save them with "
            "Phonopy.save(settings={'force_constants': True}) or give a FORCE_CONSTANTS file."
        )
    return phonon


def load_gamma_phonons(
    path: str | os.PathLike,
    structure: ase.Atoms | None = None,
    supercell_matrix: np.ndarray | None = None,
) -> GammaPhonons:
    """Γ phonons from a phonopy YAML with force constants or a FORCE_CONSTANTS file.

    A ``.yaml``/``.yml`` file is read with ``phonopy.load`` (no primitive-cell search: the
    file's unit cell is the cell of the modes; the acoustic sum rule is imposed by phonopy's
    force-constant symmetrisation). Any other file is a phonopy ``FORCE_CONSTANTS`` text file
    of ``structure`` (required then) repeated by ``supercell_matrix`` (default identity).
    When ``structure`` is given the modes must belong to it (`GammaPhonons.check_structure`).
    """
    modes = _gamma_modes(_load_phonopy(path, structure, supercell_matrix), str(path))
    if structure is not None:
        modes.check_structure(structure, str(path))
    return modes


@dataclass
class QPhonons:
    """Modes at Q wave vectors: ``qpoints_frac`` (Q, 3) (primitive reciprocal basis),
    ``frequencies_THz`` (Q, 3N) ascending, ``eigenvectors`` (Q, 3N, N, 3) complex, normalised,
    in the *cell-phase* convention: atom κ of the cell at lattice vector L moves along
    Re[e_κ e^{2πi q·L}] (phonopy's eigenvectors carry e^{2πi q·τ_κ} in the phase instead;
    `PhononModel.modes` converts), ``masses_amu`` (N,)."""

    qpoints_frac: np.ndarray
    frequencies_THz: np.ndarray
    eigenvectors: np.ndarray
    masses_amu: np.ndarray

    def zero_point_patterns(self, min_THz: float = ACOUSTIC_THZ) -> np.ndarray:
        """(Q, 3N, N, 3) complex u_κ(qν) = e_κ(qν) sqrt(ħ / 2M_κω) in Å: ∂_qν = Σ_κα,L
        u_κα e^{2πi q·L} ∂/∂u_κα,L gives g in eV. Modes with ν ≤ ``min_THz`` (acoustic modes
        at Γ, imaginary modes) get zero amplitude: they do not scatter here."""
        nu = self.frequencies_THz
        safe = np.where(nu > min_THz, nu, 1.0)
        omega = 2.0 * np.pi * safe * 1e12  # rad/s
        length_A = 1e10 * np.sqrt(
            units._hbar / (2.0 * self.masses_amu[None, None, :] * units._amu * omega[..., None])
        )  # (Q, 3N, N)
        length_A = np.where((nu > min_THz)[..., None], length_A, 0.0)
        return self.eigenvectors * length_A[..., None]


class PhononModel:
    """Phonons at any q from the force constants of a supercell (phonopy does the Fourier
    interpolation): `load_phonon_model`. ``primitive`` is the cell of the modes."""

    def __init__(self, phonon, source: str):
        self.phonon = phonon
        self.source = source
        prim = phonon.primitive
        self.numbers = np.asarray(prim.numbers, dtype=np.int64)
        self.positions = np.asarray(prim.positions, dtype=np.float64)
        self.cell = np.asarray(prim.cell, dtype=np.float64)
        self.masses_amu = np.asarray(prim.masses, dtype=np.float64)

    def dynamical_matrix(self, q_frac) -> np.ndarray:
        """(3N, 3N) complex mass-weighted dynamical matrix D(q) of phonopy (eV/Å²/amu)."""
        dm = self.phonon.dynamical_matrix
        dm.run(np.asarray(q_frac, dtype=np.float64).reshape(3))
        return np.array(dm.dynamical_matrix)

    def modes(self, qpoints_frac) -> QPhonons:
        """`QPhonons` at ``qpoints_frac`` (Q, 3) (cell-phase eigenvectors)."""
        q = np.asarray(qpoints_frac, dtype=np.float64).reshape(-1, 3)
        self.phonon.run_qpoints(q, with_eigenvectors=True)
        out = self.phonon.get_qpoints_dict()
        n = len(self.numbers)
        vectors = np.asarray(out["eigenvectors"]).transpose(0, 2, 1).reshape(len(q), 3 * n, n, 3)
        frac = np.linalg.solve(self.cell.T, self.positions.T).T  # (N, 3)
        phase = np.exp(2j * np.pi * q @ frac.T)  # (Q, N): e^{2πi q·τ_κ}
        return QPhonons(
            qpoints_frac=q,
            frequencies_THz=np.asarray(out["frequencies"], dtype=np.float64),
            eigenvectors=vectors * phase[:, None, :, None],
            masses_amu=self.masses_amu,
        )

    @property
    def atoms(self) -> ase.Atoms:
        return ase.Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=True)


def load_phonon_model(
    path: str | os.PathLike,
    structure: ase.Atoms | None = None,
    supercell_matrix: np.ndarray | None = None,
) -> PhononModel:
    """`PhononModel` from the same files as `load_gamma_phonons` (a phonopy YAML with force
    constants, or FORCE_CONSTANTS + ``structure`` + ``supercell_matrix``). Only q whose
    phonons the supercell resolves are exact; others are phonopy's Fourier interpolation of
    the force constants (converges with the supercell size). ``structure``, when given, must
    be the cell of the modes (`GammaPhonons.check_structure`)."""
    phonon = _load_phonopy(path, structure, supercell_matrix)
    model = PhononModel(phonon, str(path))
    if structure is not None:
        _gamma_modes(phonon, str(path)).check_structure(structure, str(path))
    return model


__all__ = [
    "ACOUSTIC_THZ",
    "GammaPhonons",
    "PhononError",
    "PhononModel",
    "QPhonons",
    "load_gamma_phonons",
    "load_phonon_model",
]
