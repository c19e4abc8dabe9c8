"""Generate `HamiltonianRecord`s with periodic PySCF (Kohn–Sham DFT, GTH pseudopotentials).

Pipeline of `compute_record` (units: PySCF works in Bohr/Hartree; structures go in in Å
(``cell.unit = "A"``, converted by PySCF with ``pyscf.data.nist.BOHR``) and energies come out
in eV with ``pyscf.data.nist.HARTREE2EV`` (CODATA), so everything stored is Å/eV):

1. Self-consistent KRKS on a modest Γ-centred k-mesh (time-reversal-reduced), Fermi smearing
   for metals.
2. From the converged density, the Fock matrix F(k) = hcore(k) + veff[ρ](k) at a *dense*
   Γ-centred mesh (non-self-consistent, exactly what ``get_bands`` does at ``kpts_band``).
   The dense mesh is chosen so that the shortest lattice vector of its Born–von Kármán (BvK)
   supercell is at least ``cutoff_A + alias_margin_A``: an image of a stored block then sits
   ≥ ``alias_margin_A`` away, where the short-range MOLOPT-SR orbitals barely overlap
   (what is left is measured in step 4).
3. H(R) = w/N_k Σ_k e^{−2πi k·R} F(k) for every stored edge (i, j, R); R is the image of the
   pair inside the Wigner–Seitz cell of the BvK supercell, degenerate images sharing weight w.
   PySCF's Bloch sums are φ_kμ = Σ_T e^{ik·T} φ_μ(r − T), so F(k) = Σ_R e^{2πi k·R} H(R) with
   H_μν(R) = ⟨φ_μ(r)|H|φ_ν(r − R)⟩ — the package convention (DESIGN.md §3).
4. S(R) exactly in real space (two-centre overlap integrals between the cell and the cell
   shifted by R, no lattice sum). The Fourier-transformed S(R) is compared with it and the
   largest difference is stored as ``meta["s_alias_error"]`` — a direct measure of the
   aliasing of step 3.
5. Blocks go from PySCF's AO order to the package order (``basis.convention("pyscf")``).
6. The truncated S(R) is Bloch-summed at every dense and band k-point; a smallest eigenvalue
   below ``min_overlap_eig`` raises `OverlapNotPositiveDefinite` (the cutoff is too short for
   the basis) instead of returning a record whose bands are garbage.
7. ``meta["dft_bands"]`` = PySCF's own eigenvalues (eV, absolute) at ``band_kpts_frac``
   (default: generic points off every small Γ-centred mesh), so anyone can test band
   reconstruction from the stored blocks against DFT.

`generate_dataset` runs `compute_record` over many structures: process pool, resumable,
progress bar, one failing structure reported by key without stopping the others.

For electron–phonon coupling, `hamiltonian_derivatives` gives dH(R)/du, dS(R)/du by central
differences of `compute_record` runs on the reference edges, and `overlap_blocks` /
`overlap_derivatives` the exact S(R) of any geometry and its derivative at a tiny step.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import ase
import numpy as np

from foundation import keys
from foundation.basis import BasisSet, convention
from foundation.data.graph import neighbor_edges
from foundation.data.record import HamiltonianRecord, RecordError
from foundation.physics.kspace import flatten_blocks

log = logging.getLogger(__name__)

DEFAULT_BASIS = "gth-szv-molopt-sr"
DEFAULT_PSEUDO = "gth-pbe"
DEFAULT_CUTOFF_A = 9.0
"""Å: stored edges |r_ij| < cutoff. Band error vs cutoff (occupied / first empty, meV): Si2
8 Å 3.9/7.1, 9 Å 0.2/0.6; InSb 8 Å 27/15, 9 Å 3.0/5.5; AgBr 8 Å 4.0/78, 9 Å 1.0/18."""
DEFAULT_KSPACING = 0.5
"""Å⁻¹ (2π included): SCF mesh n_i = ceil(|b_i| / kspacing); 4×4×4 for Si's primitive cell."""
DEFAULT_ALIAS_MARGIN_A = 11.0
"""Å: the BvK supercell's shortest vector is ≥ cutoff + margin, so the nearest alias of a
stored block lies ≥ margin (in practice more) away; ``meta["s_alias_error"]`` measures what
is left. Measured at a 9 Å cutoff, max |S_FT − S_exact| for margin 8 / 11 / 14 Å: Ag (fcc,
2 atoms) 8.6e-4 / 2.0e-6 / 1.2e-9, AgI 6.8e-4 / 2.5e-8 / 9e-15; Si 9e-9 at 8 Å. The
diffuse 5s/5p tails of Ag, In, Sn, Pb need more than 8 Å."""
DEFAULT_MIN_VACUUM_A = 10.0
"""Å: smallest vacuum along a non-periodic axis (≥ the 9 Å edge cutoff, so no stored edge and
no appreciable PySCF matrix element crosses it)."""
DEFAULT_BAND_KPTS_FRAC = np.array(
    [[0.13, 0.29, 0.41], [0.37, 0.11, -0.23], [-0.21, 0.44, 0.07]], dtype=np.float64
)
"""Fractional k-points off every Γ-centred mesh up to 99 points per axis."""

KE_CUTOFF_HA = {
    # Plane-wave cutoff (Hartree) of the FFT grid per element; a structure takes the max over
    # its elements. Measured with gth-szv-molopt-sr/PBE, 2-atom cells, 3×3×3 mesh: the lowest
    # occupied + 2 empty bands move by ≲ 3 meV against 100 Ha for Si, AlP (18–25 Ha: ≤ 1.6
    # meV), Ag, AgBr, InP (40 Ha: ≤ 2.7 meV), C, BN (60 Ha: ≤ 2 meV). The others are set
    # like their measured row neighbours (same valence shells, GTH-PBE radii of that row).
    "B": 60, "C": 60, "N": 60,
    "Al": 20, "Si": 20, "P": 22, "S": 25, "Cl": 30,
    "Ge": 20, "As": 22, "Se": 25, "Br": 30,
    "Ag": 40, "In": 40, "Sn": 20, "Sb": 22, "Te": 25, "I": 30,
    "Pb": 20,
    # Measured by scripts/ke_cutoff_scan.py (bench_results/ke_cutoff.json): one-atom fcc
    # cell, bands up to two above the (half-)filled one within 3 meV of 160 Ha (F: 3.4 meV
    # at 120 Ha, the highest candidate). Na (q9) and Mg (q10) are left out: against 260 Ha
    # their bands still move by 20 and 100 meV at 200 Ha (and by 82 and 197 meV at 160 Ha),
    # so they need ≳ 300 Ha, i.e. FFT grids ~3× those of O.
    "H": 40, "Li": 60, "O": 100, "F": 120, "K": 30, "Ca": 50, "Sr": 80, "Ba": 20, "Pd": 50,
    "Cd": 40, "Hf": 50, "Ta": 50, "Ti": 100, "Zn": 100, "W": 60, "Pt": 80,
    "Be": 120, "Cs": 20, "Sc": 100, "V": 100, "Cu": 120, "Ga": 120, "Zr": 60, "Nb": 40,
    "Y": 60, "Mo": 30, "Au": 40, "Tl": 40, "Bi": 20,
}  # fmt: skip


class OverlapNotPositiveDefinite(RecordError):
    """The cutoff-truncated S(k) has a non-positive eigenvalue: the stored blocks cannot
    reproduce the DFT bands. Raise the cutoff (or use a shorter-ranged basis)."""


class SCFNotConverged(RuntimeError):
    """PySCF's SCF did not converge for a structure."""


def hartree_ev() -> float:
    """eV per Hartree (``pyscf.data.nist.HARTREE2EV``, CODATA)."""
    from pyscf.data import nist

    return float(nist.HARTREE2EV)


# ----------------------------------------------------------------------------- k-meshes
def scf_kmesh(
    cell: np.ndarray, kspacing: float = DEFAULT_KSPACING, pbc: Sequence[bool] = (True,) * 3
) -> tuple[int, int, int]:
    """Γ-centred mesh with n_i = ceil(|b_i| / kspacing), |b_i| in Å⁻¹ with the 2π; 1 along
    a non-periodic axis (a slab's normal)."""
    b = 2 * np.pi * np.linalg.inv(np.asarray(cell, dtype=np.float64)).T
    return tuple(
        max(1, math.ceil(np.linalg.norm(bi) / kspacing - 1e-9)) if p else 1
        for bi, p in zip(b, pbc, strict=True)
    )


def _lattice_steps(nmax: int, pbc: Sequence[bool] = (True,) * 3) -> np.ndarray:
    """Integer triples with |n_i| ≤ nmax along periodic axes and 0 along the others."""
    ranges = [range(-nmax, nmax + 1) if p else (0,) for p in pbc]
    return np.array(list(itertools.product(*ranges)), dtype=np.int64).reshape(-1, 3)


def _shortest_vector(cell: np.ndarray, nmax: int = 2, pbc: Sequence[bool] = (True,) * 3) -> float:
    """Length of the shortest nonzero lattice vector along the periodic axes (enumerates
    |n_i| ≤ nmax; exact for the reduced-enough cells we build)."""
    n = _lattice_steps(nmax, pbc)
    n = n[np.any(n != 0, axis=1)]
    return float(np.min(np.linalg.norm(n @ cell, axis=1)))


def dense_kmesh(
    cell: np.ndarray,
    min_image_A: float,
    at_least: Sequence[int] = (1, 1, 1),
    pbc: Sequence[bool] = (True,) * 3,
) -> tuple[int, int, int]:
    """Smallest Γ-centred mesh N (≥ `at_least`) whose BvK supercell (rows N_i a_i) has no
    lattice vector along the periodic axes shorter than `min_image_A` (N = 1 along the
    others: a slab has no Fourier components across its vacuum)."""
    cell = np.asarray(cell, dtype=np.float64)
    periodic = np.asarray(pbc, dtype=bool)
    mesh = np.array(
        [
            max(int(m), math.ceil(min_image_A / np.linalg.norm(a) - 1e-9)) if p else 1
            for m, a, p in zip(at_least, cell, periodic, strict=True)
        ]
    )
    while _shortest_vector(mesh[:, None] * cell, pbc=periodic) < min_image_A - 1e-9:
        lengths = np.where(periodic, mesh * np.linalg.norm(cell, axis=1), np.inf)
        mesh[int(np.argmin(lengths))] += 1
    return tuple(int(m) for m in mesh)


def vacuum_gap_A(atoms: ase.Atoms, axis: int) -> float:
    """Empty space (Å) between the atoms and their periodic image along cell ``axis``,
    measured normal to the other two cell vectors (the largest gap in fractional coordinate)."""
    cell = np.asarray(atoms.cell, dtype=np.float64)
    others = [cell[i] for i in range(3) if i != axis]
    height = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(*others))
    frac = np.sort(atoms.get_scaled_positions(wrap=False)[:, axis] % 1.0)
    gaps = np.diff(np.concatenate([frac, frac[:1] + 1.0]))
    return float(gaps.max() * height)


def gamma_mesh_frac(mesh: Sequence[int]) -> np.ndarray:
    """(N_k, 3) fractional k-points n_i / N_i of a Γ-centred mesh (C order)."""
    grids = [np.arange(n) / n for n in mesh]
    return np.array(list(itertools.product(*grids)), dtype=np.float64)


def _time_reversal_pairs(mesh: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """For the Γ-centred mesh: indices of representative k-points and, for every k, the
    index (into the representatives) of k or −k, plus whether it is −k (conjugate)."""
    mesh = np.asarray(mesh)
    idx = np.array(list(itertools.product(*[range(n) for n in mesh])))
    flat = np.ravel_multi_index(idx.T, mesh)
    neg = np.ravel_multi_index(((-idx) % mesh).T, mesh)
    rep_of = np.minimum(flat, neg)
    reps = np.unique(rep_of)
    pos = np.searchsorted(reps, rep_of)
    return reps, np.stack([pos, (flat != rep_of).astype(np.int64)], axis=1)


# ----------------------------------------------------------------------------- Wigner–Seitz
def wigner_seitz_weights(
    vectors: np.ndarray,
    cell: np.ndarray,
    mesh: Sequence[int],
    tol: float = 1e-6,
    pbc: Sequence[bool] = (True,) * 3,
) -> np.ndarray:
    """Weight of each edge vector r (Å) as an image inside the WS cell of the BvK supercell.

    1 if r is the unique shortest of r + L (L a supercell lattice vector along the periodic
    axes), 1/m if it ties with m−1 others (they share the Fourier component), 0 if a
    shorter image exists.
    """
    sup = np.asarray(mesh, dtype=np.float64)[:, None] * np.asarray(cell, dtype=np.float64)
    shifts = _lattice_steps(2, pbc) @ sup
    d = np.linalg.norm(vectors[:, None, :] + shifts[None], axis=2)
    d0 = np.linalg.norm(vectors, axis=1)
    ties = np.sum(d <= d0[:, None] + tol, axis=1)
    inside = d0 <= d.min(axis=1) + tol
    return np.where(inside, 1.0 / ties, 0.0)


# ----------------------------------------------------------------------------- Bloch sums
def bloch_sum(
    edges: np.ndarray,
    blocks: Sequence[np.ndarray],
    n_orb_per_atom: np.ndarray,
    kpts_frac: np.ndarray,
) -> np.ndarray:
    """(N_k, n, n) complex M(k) = Σ_R e^{2πi k·R} M(R) from per-edge blocks."""
    off = np.concatenate([[0], np.cumsum(n_orb_per_atom)])
    n = int(off[-1])
    kpts_frac = np.atleast_2d(kpts_frac)
    phase = np.exp(2j * np.pi * kpts_frac @ edges[:, 2:5].T)  # (N_k, E)
    out = np.zeros((len(kpts_frac), n, n), dtype=np.complex128)
    for e, (i, j) in enumerate(edges[:, :2]):
        out[:, off[i] : off[i + 1], off[j] : off[j + 1]] += phase[:, e, None, None] * blocks[e]
    return out


def record_bands(
    record: HamiltonianRecord,
    kpts_frac: np.ndarray,
    target: str = keys.H,
    energy_zero: str = keys.ENERGY_ZERO,
) -> np.ndarray:
    """(N_k, n_orb) eigenvalues (eV, absolute: μ ``meta[energy_zero]`` added back) of the
    stored ``target`` (h, or the extra h_hse with ``keys.ENERGY_ZERO_HSE``) and S at k."""
    import scipy.linalg

    n_orb = record.n_orb_per_atom
    hk = bloch_sum(record.edges, record.blocks(target), n_orb, kpts_frac)
    sk = bloch_sum(record.edges, record.blocks(keys.S), n_orb, kpts_frac)
    mu = float(record.meta.get(energy_zero, 0.0))
    return (
        np.array([scipy.linalg.eigh(h, s, eigvals_only=True) for h, s in zip(hk, sk, strict=True)])
        + mu
    )


def band_errors_meV(
    record: HamiltonianRecord,
    bands_key: str = "dft_bands",
    target: str = keys.H,
    energy_zero: str = keys.ENERGY_ZERO,
) -> dict[str, float | None]:
    """Max |ε(stored target, S) − ε(PySCF)| (meV) at the k-points of ``meta[bands_key]``,
    over the occupied bands and over the first empty band (counted from the valence
    electrons; None when the minimal basis has no empty band, e.g. Ba2 with 5s5p6s only).
    ``bands_key="dft_bands_hse", target=keys.H_HSE, energy_zero=keys.ENERGY_ZERO_HSE``
    checks the hybrid target of a paired record."""
    bands = record.meta[bands_key]
    ref = np.asarray(bands["eigenvalues_eV"])
    err = np.abs(record_bands(record, np.asarray(bands["kpts_frac"]), target, energy_zero) - ref)
    err *= 1000
    nocc = int(record.meta[keys.N_ELECTRONS]) // 2
    empty = float(err[:, nocc].max()) if nocc < err.shape[1] else None
    return {"occupied": float(err[:, :nocc].max()), "first_empty": empty}


def check_overlap(key: str, sk: np.ndarray, kpts_frac: np.ndarray, min_eig: float) -> float:
    """Smallest eigenvalue of S(k) over the k-points; raise `OverlapNotPositiveDefinite`."""
    eigs = np.linalg.eigvalsh(sk)[:, 0]
    worst = int(np.argmin(eigs))
    if eigs[worst] < min_eig:
        raise OverlapNotPositiveDefinite(
            f"{key}: the cutoff-truncated overlap S(k) is not positive definite at k = "
            f"{np.round(kpts_frac[worst], 4).tolist()} (fractional): smallest eigenvalue "
            f"{eigs[worst]:.3e} < {min_eig:g}. Increase cutoff_A or use a shorter-ranged basis."
        )
    return float(eigs[worst])


# ----------------------------------------------------------------------------- PySCF
def build_cell(
    atoms: ase.Atoms,
    basis: str = DEFAULT_BASIS,
    pseudo: str = DEFAULT_PSEUDO,
    ke_cutoff_Ha: float | None = None,
    precision: float = 1e-8,
):
    """pyscf.pbc.gto.Cell from ASE atoms (Å); ``ke_cutoff_Ha`` None → `KE_CUTOFF_HA` table
    (max over elements) or PySCF's own estimate for an element not in the table."""
    from pyscf.pbc import gto

    symbols = atoms.get_chemical_symbols()
    if ke_cutoff_Ha is None and all(s in KE_CUTOFF_HA for s in symbols):
        ke_cutoff_Ha = float(max(KE_CUTOFF_HA[s] for s in set(symbols)))
    cell = gto.Cell()
    cell.a = np.asarray(atoms.cell, dtype=np.float64)
    cell.atom = [(s, p.tolist()) for s, p in zip(symbols, atoms.positions, strict=True)]
    cell.unit = "A"
    cell.basis = basis
    cell.pseudo = pseudo
    cell.precision = precision
    if ke_cutoff_Ha is not None:
        cell.ke_cutoff = float(ke_cutoff_Ha)
    cell.verbose = 0
    cell.build()
    return cell


def _ao_to_package(cell, basis: BasisSet, symbols: Sequence[str]) -> list[np.ndarray]:
    """Per atom: U with package_block = U_i @ pyscf_block @ U_jᵀ; checks PySCF's AO layout."""
    conv = convention("pyscf")
    slices = cell.aoslice_by_atom()
    mats = []
    for a, sym in enumerate(symbols):
        shells = basis.shells_of(sym)
        ls = [int(cell.bas_angular(b)) for b in range(slices[a, 0], slices[a, 1])
              for _ in range(int(cell.bas_nctr(b)))]  # fmt: skip
        if tuple(ls) != tuple(shells) or slices[a, 3] - slices[a, 2] != basis.n_orb(sym):
            raise RuntimeError(
                f"PySCF's AO layout of atom {a} ({sym}) has shells {ls}, but the registry "
                f"{basis.name!r} says {list(shells)}."
            )
        mats.append(conv.transform(shells))
    return mats


def _fock_at(mf_full, cell, dm_full, kpts_full_abs, kpts_band_abs) -> np.ndarray:
    """F(k) = hcore(k) + veff[dm](k) at arbitrary k (Hartree): `get_bands` without eigh."""
    fock = np.asarray(mf_full.get_hcore(cell, kpts_band_abs))
    fock = fock + np.asarray(
        mf_full.get_veff(cell, dm_full, kpts=kpts_full_abs, kpts_band=kpts_band_abs)
    )
    return fock.reshape(len(kpts_band_abs), cell.nao, cell.nao)


def _exact_overlap(cell, shifts_frac: np.ndarray) -> np.ndarray:
    """(N_R, nao, nao) S_μν(R) = ⟨φ_μ(r − τ_μ)|φ_ν(r − τ_ν − R·cell)⟩, no lattice sum."""
    from pyscf import gto as mol_gto

    mol = cell.to_mol()
    coords = mol.atom_coords()  # Bohr
    lattice = cell.lattice_vectors()  # Bohr, rows
    out = np.empty((len(shifts_frac), cell.nao, cell.nao))
    for n, r in enumerate(shifts_frac):
        shifted = mol.set_geom_(coords + r @ lattice, unit="Bohr", inplace=False)
        out[n] = mol_gto.intor_cross("int1e_ovlp", mol, shifted)
    return out


def _edge_slices(
    cell, edges: np.ndarray, per_shift: np.ndarray, shift_index: np.ndarray
) -> Iterator[np.ndarray]:
    """Per edge (i, j, R): the AO sub-block [atom i, atom j] of ``per_shift[shift_index[e]]``."""
    sl = cell.aoslice_by_atom()[:, 2:4]
    for (i, j), r in zip(edges[:, :2], shift_index, strict=True):
        yield per_shift[r, slice(*sl[i]), slice(*sl[j])]


def _package_blocks(
    cell,
    basis: BasisSet,
    symbols: Sequence[str],
    edges: np.ndarray,
    per_shift: np.ndarray,
    shift_index: np.ndarray,
    weight: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Per-edge blocks w_e · U_i M_ij(R) U_jᵀ in package order from AO matrices M(R) per
    lattice shift (``per_shift[shift_index[e]]`` belongs to edge e; ``weight`` default 1)."""
    umats = _ao_to_package(cell, basis, symbols)
    weight = np.ones(len(edges)) if weight is None else weight
    return [
        w * umats[i] @ block @ umats[j].T
        for (i, j), w, block in zip(
            edges[:, :2], weight, _edge_slices(cell, edges, per_shift, shift_index), strict=True
        )
    ]


def overlap_blocks(
    atoms: ase.Atoms, edges: np.ndarray, basis: str = DEFAULT_BASIS
) -> list[np.ndarray]:
    """Exact S_ij(R) (package order, dimensionless) of ``atoms`` on the given edges (E, 5).

    Two-centre integrals, no SCF and no lattice sum: cheap for any geometry, so dS/du by
    finite differences can use a step far below a DFT one. Positions are used as given (not
    wrapped), so edges (i, j, R) keep their meaning for displaced copies of a structure.
    """
    symbols = atoms.get_chemical_symbols()
    cell = build_cell(atoms, basis)
    reg = BasisSet.from_pyscf(basis, sorted(set(symbols)))
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 5)
    shifts, inverse = np.unique(edges[:, 2:5], axis=0, return_inverse=True)
    return _package_blocks(
        cell, reg, symbols, edges, _exact_overlap(cell, shifts), inverse.reshape(-1)
    )


def overlap_derivatives(
    atoms: ase.Atoms,
    edges: np.ndarray,
    patterns: np.ndarray,
    delta_A: float = 1e-4,
    basis: str = DEFAULT_BASIS,
) -> np.ndarray:
    """(P, total) flat dS(R)/dλ (1/Å for unit Cartesian patterns) on ``edges`` by central
    differences of `overlap_blocks` at positions τ ± δ·p; ``patterns`` (P, N, 3) as in
    `hamiltonian_derivatives`. S is analytic in the positions, so δ can be tiny (default
    1e-4 Å: truncation error ~δ²) — the reference against which DFT-step derivatives and the
    model's S head are checked."""
    patterns = np.asarray(patterns, dtype=np.float64).reshape(-1, len(atoms), 3)

    def flat_overlap(positions: np.ndarray) -> np.ndarray:
        moved = ase.Atoms(numbers=atoms.numbers, positions=positions, cell=atoms.cell, pbc=True)
        return flatten_blocks(overlap_blocks(moved, edges, basis))

    return np.array(
        [
            (
                flat_overlap(atoms.positions + delta_A * p)
                - flat_overlap(atoms.positions - delta_A * p)
            )
            / (2.0 * delta_A)
            for p in patterns
        ]
    )


@dataclass
class SCFResult:
    """A converged periodic KRKS calculation and the settings it ran with."""

    key: str
    atoms: ase.Atoms  # wrapped copy: the record's positions are these
    cell: object  # pyscf.pbc.gto.Cell
    mf: object  # converged pyscf.pbc.dft KRKS (time-reversal-reduced k-mesh, or the full one)
    kmesh: tuple[int, int, int]
    functional: str
    basis: str
    pseudo: str
    smearing_eV: float | None
    seconds: float
    cpu_seconds: float = 0.0  # CPU time of this process (wall time inflates on a busy machine)
    multigrid: bool = False  # J, XC and local PP on PySCF's multigrid (`run_scf`)


def atomic_guess(mf) -> np.ndarray | None:
    """PySCF's superposition-of-atoms (minao) starting density, or None for an element whose
    minao tables PySCF cannot build with the GTH pseudopotential (Sc and Y: IndexError in
    `minao_basis`); the caller then starts from the core Hamiltonian (``key="1e"``)."""
    try:
        return mf.get_init_guess(key="minao")
    except IndexError:
        return None


def run_scf(
    atoms: ase.Atoms,
    *,
    key: str,
    basis: str = DEFAULT_BASIS,
    functional: str = "PBE",
    kmesh: tuple[int, int, int] | None = None,
    pseudo: str = DEFAULT_PSEUDO,
    smearing_eV: float | None = None,
    ke_cutoff_Ha: float | None = None,
    kspacing: float = DEFAULT_KSPACING,
    conv_tol: float = 1e-9,
    conv_tol_grad: float | None = None,
    max_cycle: int = 100,
    dm0: object | None = None,
    min_vacuum_A: float = DEFAULT_MIN_VACUUM_A,
    multigrid: bool = False,
) -> SCFResult:
    """Self-consistent KRKS on a Γ-centred ``kmesh`` (time-reversal-reduced); raises
    `SCFNotConverged`. A slab or sheet (``atoms.pbc`` false along an axis) runs as a 3-D
    periodic cell with k-mesh 1 along that axis; its vacuum must be ≥ ``min_vacuum_A``
    (ValueError otherwise), so images across it do not interact within the edge cutoff. ``smearing_eV`` is the Fermi–Dirac kT (None: none, for insulators).
    ``conv_tol`` (Ha) and ``conv_tol_grad`` (default √conv_tol) are PySCF's criteria; on a
    coarse FFT grid the orbital gradient has a floor (grid aliasing) that may need a looser
    ``conv_tol_grad``. ``dm0``: initial density matrix (e.g. a converged PBE one to start a
    hybrid SCF; same cell and k-mesh). ``multigrid``: Coulomb, XC and the local
    pseudopotential on PySCF's multigrid (`MultiGridNumInt`: each Gaussian pair density on
    the coarsest grid that resolves it, the fine ``ke_cutoff`` grid only for the tight
    ones) instead of FFTDF on one full grid; semi-local functionals only. Not used for the
    shipped datasets: on five pbe_main structures of 2–12 atoms it saved CPU time only for
    BaO (−39 %), cost more for LiF and an Al slab (+34 %, +32 %), and moved stored H
    elements by up to 210 meV at PySCF's default multigrid precision
    (`bench_results/bench_data_multigrid.json`)."""
    from pyscf.pbc import dft

    hartree = hartree_ev()
    t0, c0 = time.perf_counter(), time.process_time()
    atoms = atoms.copy()
    for axis in np.flatnonzero(~np.asarray(atoms.pbc, dtype=bool)):
        gap = vacuum_gap_A(atoms, int(axis))
        if gap < min_vacuum_A:
            raise ValueError(
                f"{key}: pbc is false along cell axis {axis}, but the vacuum there is only "
                f"{gap:.2f} Å (< {min_vacuum_A} Å): PySCF treats the cell as 3-D periodic, "
                "so images across the vacuum would interact. Enlarge the cell along that axis."
            )
    atoms.wrap()
    cell = build_cell(atoms, basis, pseudo, ke_cutoff_Ha)
    kmesh = tuple(int(n) for n in (kmesh or scf_kmesh(np.asarray(atoms.cell), kspacing, atoms.pbc)))

    def krks(kpts):
        mf = dft.KRKS(cell, kpts)
        mf.xc = functional
        mf.conv_tol = conv_tol
        mf.conv_tol_grad = conv_tol_grad
        mf.max_cycle = max_cycle
        if multigrid:
            mf = mf.multigrid_numint()
        if smearing_eV:
            mf = mf.smearing(sigma=smearing_eV / hartree, method="fermi")
        return mf

    mf = krks(cell.make_kpts(kmesh, time_reversal_symmetry=True, space_group_symmetry=False))
    guess = dm0 if dm0 is not None else atomic_guess(mf)
    if guess is None:
        # No atomic guess (Sc, Y): from the core-Hamiltonian start the time-reversal-reduced
        # SCF stalls at an orbital-gradient floor (ScN: |g| 0.027 after 100 cycles), the full
        # mesh converges (13 cycles), so these structures run on the full mesh.
        log.info("%s: no minao guess, core-Hamiltonian start on the full k-mesh", key)
        mf = krks(cell.make_kpts(kmesh))
        guess = mf.get_init_guess(key="1e")
    mf.kernel(guess)
    if not mf.converged:
        raise SCFNotConverged(
            f"{key}: PySCF SCF did not converge in {max_cycle} cycles (kmesh {kmesh}, "
            f"smearing {smearing_eV} eV); metals need smearing_eV."
        )
    return SCFResult(
        key, atoms, cell, mf, kmesh, functional, basis, pseudo, smearing_eV,
        time.perf_counter() - t0, time.process_time() - c0, multigrid,
    )  # fmt: skip


def record_from_scf(
    scf: SCFResult,
    *,
    cutoff_A: float = DEFAULT_CUTOFF_A,
    band_kpts_frac: np.ndarray | None = None,
    dense_mesh: tuple[int, int, int] | None = None,
    alias_margin_A: float = DEFAULT_ALIAS_MARGIN_A,
    min_overlap_eig: float = 1e-4,
) -> HamiltonianRecord:
    """H(R), S(R) of a converged SCF as a record (steps 2–7 of the module docstring)."""
    import scipy.linalg
    from pyscf.pbc import dft

    hartree = hartree_ev()
    t0, c0 = time.perf_counter(), time.process_time()
    key, atoms, cell, mf = scf.key, scf.atoms, scf.cell, scf.mf
    symbols = atoms.get_chemical_symbols()
    lattice = np.asarray(atoms.cell, dtype=np.float64)
    reg = BasisSet.from_pyscf(scf.basis, sorted(set(symbols)))
    if hasattr(mf.kpts, "transform_dm"):  # time-reversal-reduced mesh → full mesh
        dm_full, kpts_full = mf.kpts.transform_dm(mf.make_rdm1()), mf.kpts.kpts
    else:
        dm_full, kpts_full = mf.make_rdm1(), mf.kpts
    mf_full = dft.KRKS(cell, kpts_full)
    mf_full.xc = scf.functional
    if scf.multigrid:
        mf_full = mf_full.multigrid_numint()
    # 2. Fock at the dense mesh (time-reversal representatives) and the band k-points
    dense_mesh = tuple(
        int(n)
        for n in (
            dense_mesh
            or dense_kmesh(lattice, cutoff_A + alias_margin_A, at_least=scf.kmesh, pbc=atoms.pbc)
        )
    )
    band_frac = np.asarray(
        DEFAULT_BAND_KPTS_FRAC if band_kpts_frac is None else band_kpts_frac, dtype=np.float64
    ).reshape(-1, 3) * np.asarray(atoms.pbc, dtype=np.float64)  # k = 0 across a vacuum
    dense_frac = gamma_mesh_frac(dense_mesh)
    reps, rep_map = _time_reversal_pairs(dense_mesh)
    k_eval = np.concatenate([dense_frac[reps], band_frac])
    fock = _fock_at(mf_full, cell, dm_full, kpts_full, cell.get_abs_kpts(k_eval))
    fock_dense = fock[: len(reps)][rep_map[:, 0]]
    conj = rep_map[:, 1].astype(bool)
    fock_dense[conj] = fock_dense[conj].conj()
    ovlp_band = np.asarray(cell.pbc_intor("int1e_ovlp", hermi=1, kpts=cell.get_abs_kpts(band_frac)))
    ovlp_band = ovlp_band.reshape(len(band_frac), cell.nao, cell.nao)
    dft_eigs = hartree * np.array(
        [
            scipy.linalg.eigh(f, s, eigvals_only=True)
            for f, s in zip(fock[len(reps) :], ovlp_band, strict=True)
        ]
    )

    # 3. edges and their Wigner–Seitz weights in the BvK supercell
    edges = neighbor_edges(atoms.numbers, atoms.positions, lattice, atoms.pbc, cutoff_A)
    vec = atoms.positions[edges[:, 1]] + edges[:, 2:5] @ lattice - atoms.positions[edges[:, 0]]
    weight = wigner_seitz_weights(vec, lattice, dense_mesh, pbc=atoms.pbc)
    edges, weight = edges[weight > 0], weight[weight > 0]
    shifts, inverse = np.unique(edges[:, 2:5], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    phase = np.exp(-2j * np.pi * shifts @ dense_frac.T) / len(dense_frac)  # (N_R, N_k)
    h_r = np.einsum("rk,kab->rab", phase, fock_dense).real * hartree
    s_exact = _exact_overlap(cell, shifts)
    ovlp_dense = np.asarray(
        cell.pbc_intor("int1e_ovlp", hermi=1, kpts=cell.get_abs_kpts(dense_frac))
    )
    s_ft = np.einsum("rk,kab->rab", phase, ovlp_dense.reshape(-1, cell.nao, cell.nao)).real

    # 4./5. per-edge blocks in package order
    h_blocks = _package_blocks(cell, reg, symbols, edges, h_r, inverse, weight)
    s_blocks = _package_blocks(cell, reg, symbols, edges, s_exact, inverse, weight)
    alias = float(
        max(np.max(np.abs(d)) for d in _edge_slices(cell, edges, s_ft - s_exact, inverse))
    )

    # 6. positive definiteness of the truncated overlap
    n_orb = reg.n_orb_array(atoms.numbers)
    k_check = np.concatenate([dense_frac, band_frac])
    s_min = check_overlap(key, bloch_sum(edges, s_blocks, n_orb, k_check), k_check, min_overlap_eig)

    meta = {
        keys.SOURCE: "pyscf",
        keys.FUNCTIONAL: scf.functional,
        keys.BASIS_NAME: scf.basis,
        "pseudo": scf.pseudo,
        keys.N_ELECTRONS: int(cell.nelectron),
        "kmesh": list(scf.kmesh),
        "dense_kmesh": list(dense_mesh),
        "edge_cutoff_A": float(cutoff_A),
        "smearing_eV": scf.smearing_eV,
        "ke_cutoff_Ha": float(cell.ke_cutoff) if cell.ke_cutoff is not None else None,
        "fft_mesh": [int(m) for m in cell.mesh],
        "multigrid": scf.multigrid,
        "e_tot_eV": float(mf.e_tot) * hartree,
        "s_alias_error": alias,
        "s_min_eig": s_min,
        "dft_bands": {"kpts_frac": band_frac.tolist(), "eigenvalues_eV": dft_eigs.tolist()},
        "seconds": {"scf": scf.seconds, "hamiltonian": time.perf_counter() - t0},
        "cpu_seconds": {"scf": scf.cpu_seconds, "hamiltonian": time.process_time() - c0},
    }
    record = HamiltonianRecord.from_blocks(
        key, atoms.numbers, atoms.positions, lattice, atoms.pbc, reg, edges, h_blocks, s_blocks,
        meta=meta,
    )  # fmt: skip
    record.meta["band_error_meV"] = band_errors_meV(record)  # of the stored (float32) blocks
    return record


def compute_record(
    atoms: ase.Atoms,
    *,
    key: str,
    basis: str = DEFAULT_BASIS,
    functional: str = "PBE",
    kmesh: tuple[int, int, int] | None = None,
    cutoff_A: float = DEFAULT_CUTOFF_A,
    pseudo: str = DEFAULT_PSEUDO,
    smearing_eV: float | None = None,
    band_kpts_frac: np.ndarray | None = None,
    ke_cutoff_Ha: float | None = None,
    kspacing: float = DEFAULT_KSPACING,
    dense_mesh: tuple[int, int, int] | None = None,
    alias_margin_A: float = DEFAULT_ALIAS_MARGIN_A,
    min_overlap_eig: float = 1e-4,
    conv_tol: float = 1e-9,
    conv_tol_grad: float | None = None,
    multigrid: bool = False,
    smearing_retry_eV: float | None = None,
) -> HamiltonianRecord:
    """Run periodic PBE (or ``functional``) with PySCF and return H(R), S(R) as a record.

    Units Å, eV. ``kmesh``: SCF Γ-centred mesh (default from ``kspacing``, Å⁻¹ with 2π);
    ``cutoff_A``: every edge with |r_ij| < cutoff is stored (the edge set of
    `foundation.data.graph.neighbor_edges`); ``smearing_eV``: Fermi–Dirac kT, None for
    insulators; ``dense_mesh``: default = smallest mesh whose BvK supercell has no vector
    shorter than ``cutoff_A + alias_margin_A``; ``ke_cutoff_Ha``: FFT-grid cutoff (default
    `KE_CUTOFF_HA`); ``multigrid``: see `run_scf`; ``smearing_retry_eV``: when an SCF
    without smearing does not converge (a structure expected to be insulating that is metallic
    or nearly so in this basis), run it once more with this Fermi–Dirac kT; the record's
    ``smearing_eV`` says which one it is. Method: module docstring (`run_scf` then
    `record_from_scf`).
    """
    settings = dict(
        key=key, basis=basis, functional=functional, kmesh=kmesh, pseudo=pseudo,
        ke_cutoff_Ha=ke_cutoff_Ha, kspacing=kspacing, conv_tol=conv_tol,
        conv_tol_grad=conv_tol_grad, multigrid=multigrid,
    )  # fmt: skip
    try:
        scf = run_scf(atoms, smearing_eV=smearing_eV, **settings)
    except SCFNotConverged as exc:
        if smearing_eV or not smearing_retry_eV:
            raise
        log.warning("%s; retrying with Fermi smearing %.3g eV", exc, smearing_retry_eV)
        scf = run_scf(atoms, smearing_eV=smearing_retry_eV, **settings)
    return record_from_scf(
        scf, cutoff_A=cutoff_A, band_kpts_frac=band_kpts_frac, dense_mesh=dense_mesh,
        alias_margin_A=alias_margin_A, min_overlap_eig=min_overlap_eig,
    )  # fmt: skip


def _kwargs_for(func, kwargs: dict) -> dict:
    """The entries of ``kwargs`` that ``func`` accepts by name."""
    names = inspect.signature(func).parameters
    return {k: v for k, v in kwargs.items() if k in names}


def compute_hybrid_record(
    atoms: ase.Atoms,
    *,
    key: str,
    hybrid: str = "HSE06",
    base: str = "PBE",
    **compute_kwargs,
) -> HamiltonianRecord:
    """One structure with paired targets: ``h`` from the semi-local ``base`` functional and
    the extra target ``h_hse`` (`keys.H_HSE`) from the ``hybrid`` functional, on the same edges.

    Both are `compute_record` pipelines on the same cell, SCF k-mesh, dense mesh, cutoff and
    band k-points; the hybrid SCF starts from the converged base density. Each H has its own
    energy zero subtracted (``meta["energy_zero_eV"]`` for h, ``meta["energy_zero_hse_eV"]``
    for h_hse), so band energies of either come back absolute by adding its μ.

    Hybrid exchange runs on PySCF's FFT density fitting (``FFTDF``): the Fock matrix is
    needed at the dense non-SCF k-points (the F(k) → H(R) step), and FFTDF evaluates exchange
    at any k directly, where Gaussian density fitting would need new 3-centre integrals for
    every (band k, mesh k) pair. The range-separated (HSE) exchange has no G = 0 divergence,
    so no ``exxdiv`` correction enters the bands off the SCF mesh. Cost on 2-atom cells with
    a 3×3×3 SCF mesh: ~10× the PBE record (see scripts/generate_hse_dataset.py).

    Meta added: ``functional_hse``, ``energy_zero_hse_eV``, ``e_tot_hse_eV``,
    ``dft_bands_hse`` (PySCF's hybrid eigenvalues at the band k-points, eV, absolute),
    ``band_error_hse_meV`` (stored h_hse vs those), ``seconds_hse``.
    """
    unknown = set(compute_kwargs) - set(inspect.signature(compute_record).parameters)
    if unknown:
        raise TypeError(f"compute_hybrid_record: unknown keyword(s) {sorted(unknown)}.")
    scf_kwargs = _kwargs_for(run_scf, compute_kwargs)
    record_kwargs = _kwargs_for(record_from_scf, compute_kwargs)
    base_scf = run_scf(atoms, key=key, functional=base, **scf_kwargs)
    record = record_from_scf(base_scf, **record_kwargs)
    hybrid_scf = run_scf(
        atoms, key=key, functional=hybrid, **(scf_kwargs | {"kmesh": base_scf.kmesh}),
        dm0=base_scf.mf.make_rdm1(),
    )  # fmt: skip
    paired = record_from_scf(
        hybrid_scf, **(record_kwargs | {"dense_mesh": tuple(record.meta["dense_kmesh"])})
    )
    if not np.array_equal(paired.edges, record.edges):
        raise RecordError(
            f"{key}: the {hybrid} record has different edges from the {base} one "
            f"({paired.n_edges} vs {record.n_edges}); both must use the same cutoff and meshes."
        )
    record.extras[keys.H_HSE] = paired.h
    record.meta |= {
        "functional_hse": hybrid,
        keys.ENERGY_ZERO_HSE: paired.meta[keys.ENERGY_ZERO],
        "e_tot_hse_eV": paired.meta["e_tot_eV"],
        "dft_bands_hse": paired.meta["dft_bands"],
        "band_error_hse_meV": paired.meta["band_error_meV"],
        "s_alias_error_hse": paired.meta["s_alias_error"],
        "seconds_hse": paired.meta["seconds"],
    }
    record.validate()
    return record


# ----------------------------------------------------------------------------- dH/du
@dataclass
class DisplacementDerivatives:
    """Central finite differences of H(R), S(R) along displacement patterns (eV, Å).

    Structure λ of pattern p has positions τ + λ·p (``patterns`` (P, N, 3), Å per unit λ);
    ``dh[p]`` = [H(+δ) − H(−δ)] / 2δ of the *absolute* H (energy zero μ restored, PySCF's
    convention for the G = 0 potential) and ``ds[p]`` likewise for S, as flat arrays in the
    block layout of ``reference`` (its edges, its order). For unit Cartesian patterns they
    are dH/du_κα (eV/Å) and dS/du_κα (1/Å). ``plus[p]``/``minus[p]`` are the displaced
    records themselves (their own edges, e.g. for their ``dft_bands``).
    """

    reference: HamiltonianRecord
    patterns: np.ndarray
    delta_A: float
    dh: np.ndarray
    ds: np.ndarray
    plus: list[HamiltonianRecord]
    minus: list[HamiltonianRecord]


def _blocks_on_edges(
    record: HamiltonianRecord, edges: np.ndarray, wrap: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flat absolute H and S of ``record`` on ``edges`` (E, 5) of a reference structure whose
    atoms sit at record.positions − wrap·cell (``wrap`` (N, 3) integer: `run_scf` wraps atoms
    into the cell). Edge (i, j, R) of the reference is (i, j, R + n_i − n_j) in the record:
    the same pair of orbitals, since τ_j + R·cell − τ_i is unchanged."""
    lookup = {tuple(e): k for k, e in enumerate(record.edges.tolist())}
    mapped = edges.copy()
    mapped[:, 2:5] += wrap[edges[:, 0]] - wrap[edges[:, 1]]
    missing = [tuple(e) for e in mapped.tolist() if tuple(e) not in lookup]
    if missing:
        raise RecordError(
            f"{record.key}: {len(missing)} reference edges (e.g. {list(missing[0])}) are not "
            "in the displaced record; its cutoff must exceed the reference's by the displacement."
        )
    ids = np.array([lookup[tuple(e)] for e in mapped.tolist()], dtype=np.int64)
    off = record.block_offsets
    flat = np.concatenate([np.arange(off[k], off[k + 1]) for k in ids])
    return record.absolute_h()[flat], record.s.astype(np.float64)[flat]


def hamiltonian_derivatives(
    atoms: ase.Atoms,
    patterns: np.ndarray,
    *,
    key: str = "displaced",
    delta_A: float = 0.01,
    **compute_kwargs,
) -> DisplacementDerivatives:
    """dH(R)/dλ, dS(R)/dλ along displacement patterns by central differences of PySCF runs.

    ``patterns`` (P, N, 3): structure λ has positions τ + λ·p (Å); unit Cartesian patterns
    (`foundation.physics.eph.cartesian_displacements`) give dH/du_κα in eV/Å. Each pattern
    costs two `compute_record` runs at λ = ±δ (``delta_A``, Å), besides the reference run.
    ``compute_kwargs`` go to `compute_record` for all runs.

    The derivative lives on the reference record's edges. A displaced structure may gain or
    lose edges at the cutoff, so the displaced runs use the cutoff plus the largest change of
    an edge length and are then restricted to the reference edges (edges they gain are
    dropped); they reuse the reference's SCF and dense k-meshes, so H(R) is Fourier-resolved
    identically. A reference edge tied with another image on the Wigner–Seitz boundary of the
    BvK supercell (weight < 1) would jump under displacement: that raises a ValueError (raise
    ``alias_margin_A`` or pass a larger ``dense_mesh``).
    """
    patterns = np.asarray(patterns, dtype=np.float64).reshape(-1, len(atoms), 3)
    reference = compute_record(atoms, key=key, **compute_kwargs)
    cell = reference.cell
    weight = wigner_seitz_weights(
        reference.edge_vectors(), cell, reference.meta["dense_kmesh"], pbc=reference.pbc
    )
    if np.any(weight < 1.0):
        bad = reference.edges[int(np.argmin(weight))].tolist()
        raise ValueError(
            f"{key}: edge {bad} lies on the Wigner–Seitz boundary of the BvK supercell "
            "(weight < 1); its block is not a smooth function of the positions."
        )
    stretch = 2.0 * delta_A * float(np.max(np.linalg.norm(patterns, axis=2)))
    displaced_kwargs = compute_kwargs | {
        "cutoff_A": reference.meta["edge_cutoff_A"] + stretch + 1e-6,
        "kmesh": tuple(reference.meta["kmesh"]),
        "dense_mesh": tuple(reference.meta["dense_kmesh"]),
    }
    inv_cell = np.linalg.inv(cell)
    plus, minus, blocks = [], [], []
    for p, pattern in enumerate(patterns):
        for sign, store in ((1.0, plus), (-1.0, minus)):
            positions = reference.positions + sign * delta_A * pattern
            moved = ase.Atoms(
                numbers=reference.numbers, positions=positions, cell=cell, pbc=reference.pbc
            )
            rec = compute_record(
                moved, key=f"{key}-p{p}{'+' if sign > 0 else '-'}", **displaced_kwargs
            )
            wrap = np.rint((rec.positions - positions) @ inv_cell).astype(np.int64)
            store.append(rec)
            blocks.append(_blocks_on_edges(rec, reference.edges.astype(np.int64), wrap))
    h = np.array([b[0] for b in blocks]).reshape(len(patterns), 2, -1)
    s = np.array([b[1] for b in blocks]).reshape(len(patterns), 2, -1)
    return DisplacementDerivatives(
        reference=reference,
        patterns=patterns,
        delta_A=float(delta_A),
        dh=(h[:, 0] - h[:, 1]) / (2.0 * delta_A),
        ds=(s[:, 0] - s[:, 1]) / (2.0 * delta_A),
        plus=plus,
        minus=minus,
    )


# ----------------------------------------------------------------------------- datasets
PER_STRUCTURE_KWARGS = "pyscf"
"""``atoms.info[PER_STRUCTURE_KWARGS]`` (a dict) overrides `generate_dataset`'s compute
keyword arguments for that structure (e.g. ``{"smearing_eV": 0.1}`` for a metal)."""


def _generate_one(
    key: str, atoms: ase.Atoms, out: Path, kwargs: dict, compute: Callable | None = None
) -> tuple[str, str | None, float]:
    """Compute and save one record; returns (key, error message or None, seconds).
    ``compute`` None: this module's `compute_record`, looked up at call time."""
    t0 = time.perf_counter()
    compute = compute_record if compute is None else compute
    try:
        kw = kwargs | dict(atoms.info.get(PER_STRUCTURE_KWARGS, {}))
        compute(atoms, key=key, **kw).save(out / key)
        return key, None, time.perf_counter() - t0
    except Exception as exc:  # one bad structure must not stop the dataset
        log.debug("%s failed:\n%s", key, traceback.format_exc())
        return key, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0


def generate_dataset(
    structures: Sequence[tuple[str, ase.Atoms]],
    records_dir: str | os.PathLike,
    *,
    workers: int = 1,
    resume: bool = True,
    retry_failed: bool = True,
    compute: Callable[..., HamiltonianRecord] | None = None,
    **compute_kwargs,
) -> list[Path]:
    """Compute a record per (key, atoms) into ``records_dir/<key>/`` (atomic saves).

    Resumable: with ``resume`` a key whose record directory is complete is skipped, so an
    interrupted run continues where it stopped. ``workers`` > 1 uses a process pool. A
    structure that fails is reported by key (log, progress bar and ``failures.json`` in
    ``records_dir``) and the others go on. ``compute`` makes one record (default None:
    `compute_record`; `compute_hybrid_record` for paired PBE/HSE06 targets; a module-level
    function, so worker processes can import it); ``compute_kwargs`` go to it;
    ``atoms.info["pyscf"]`` overrides them per structure. Returns the record directories
    that exist at the end, in input order.

    ``failures.json`` accumulates over resumed runs: a failure recorded by an earlier run
    stays listed until its key succeeds; with ``retry_failed=False`` such keys are not run
    again (an SCF that did not converge would fail the same way at every restart).
    """
    import json

    from tqdm.auto import tqdm

    out = Path(records_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys_in = [k for k, _ in structures]
    if len(set(keys_in)) != len(keys_in):
        dup = sorted({k for k in keys_in if keys_in.count(k) > 1})
        raise ValueError(f"generate_dataset: duplicate structure keys {dup[:5]}.")
    done = {k for k in keys_in if resume and (out / k / "structure.json").is_file()}
    failed_before = json.loads((out / "failures.json").read_text()) if resume and (
        out / "failures.json"
    ).is_file() else {}  # fmt: skip
    failures = {k: v for k, v in failed_before.items() if k not in done}
    todo = [(k, a) for k, a in structures if k not in done]
    if not retry_failed:
        todo = [(k, a) for k, a in todo if k not in failures]
        done |= set(failures)
    bar = tqdm(total=len(structures), initial=len(done), desc="PySCF records", unit="structure")

    def save_failures() -> None:
        tmp = out / f".failures.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(failures, indent=1, sort_keys=True))
        os.replace(tmp, out / "failures.json")  # atomic: never a half-written report

    def report(key: str, error: str | None, seconds: float) -> None:
        bar.update(1)
        if error is None:
            if failures.pop(key, None) is not None:
                save_failures()
            bar.set_postfix_str(f"{key} {seconds:.0f}s")
        else:
            failures[key] = error
            save_failures()  # now, not at the end: a killed run keeps its reasons
            bar.write(f"FAILED {key}: {error}")
            log.error("structure %s failed: %s", key, error)

    try:
        if workers <= 1:
            for key, atoms in todo:
                report(*_generate_one(key, atoms, out, compute_kwargs, compute))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [
                    pool.submit(_generate_one, k, a, out, compute_kwargs, compute) for k, a in todo
                ]
                for fut in as_completed(futures):
                    report(*fut.result())
    finally:
        bar.close()
        if failures or (out / "failures.json").exists():
            save_failures()
    return [out / k for k in keys_in if (out / k / "structure.json").is_file()]
