"""Electron–phonon groundwork: dH(R)/du from the model, phonon displacements, g_mn(k, q = 0).

Derivatives of real-space blocks are taken along *displacement patterns*: a pattern p
(N, 3) moves the structure to positions τ + λ·p (Å per unit λ) and d/dλ is the directional
derivative Σ_κα p_κα ∂/∂u_κα. Unit Cartesian patterns (`cartesian_displacements`) give
dH/du_κα in eV/Å; a phonon's zero-point displacement (`zero_point_displacement`) gives
∂_ν H in eV. Moving atom κ moves all its periodic images with it (the lattice is fixed):
the model builds every edge vector τ_j + R·cell − τ_i from the positions, so autograd
through it does exactly that, and PySCF finite differences
(`foundation.data.dft.pyscf.hamiltonian_derivatives`) displace the atom in the cell.

Matrix elements (`eph_matrix_elements`) are for **q = 0 only** (Γ-point phonons; any
electron k): with eigenpairs H(k) c_n = ε_n S(k) c_n, c_m† S c_n = δ_mn,

    g_mn(k) = c_m† [∂_ν H(k) − ε_n ∂_ν S(k)] c_n,   X(k) = Σ_R e^{2πi k·R} X(R),

the nonorthogonal-basis form (the −ε_n ∂S term comes from the basis functions moving
with the atoms). Properties the tests check:

* diagonal: g_nn = ∂ε_n/∂λ (Hellmann–Feynman) for a non-degenerate band;
* in a degenerate level the restricted g is hermitian and its eigenvalues are the
  first-order splittings of the level;
* off the diagonal, g_mn − g_nm* = (ε_m − ε_n) c_m† ∂S c_n: for non-degenerate m ≠ n this
  form contains, besides ⟨ψ_m|∂V|ψ_n⟩, the basis term (ε_m − ε_n)⟨ψ_m|∂_λ ψ_n⟩ of the
  moving orbitals, so it is not hermitian unless ∂S = 0.

Energy zero: shifting H by c(λ)·S (the arbitrary G = 0 potential of periodic DFT, or the
μ = ⟨H,S⟩/⟨S,S⟩ that records and the model's H target subtract) changes g_mn by
(dc/dλ) δ_mn only; off-diagonal elements do not depend on it.

Units: Å, eV, atomic masses in amu, phonon frequencies in THz (ν, as phonopy prints;
ω = 2πν), ħ from `ase.units` (CODATA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import units

from foundation import keys
from foundation.basis import UniversalBasis
from foundation.data.graph import blocks_from_padded
from foundation.physics.kspace import BlochHamiltonian, flatten_blocks


def cartesian_displacements(n_atoms: int, atom_indices: Sequence[int] | None = None) -> np.ndarray:
    """(3·len(atom_indices), N, 3) unit patterns, atom-major: pattern 3a + α moves atom
    ``atom_indices[a]`` along Cartesian axis α by 1 Å per unit λ (default: every atom)."""
    atom_indices = range(n_atoms) if atom_indices is None else atom_indices
    patterns = [
        np.eye(n_atoms * 3)[3 * int(atom) + axis].reshape(n_atoms, 3)
        for atom in atom_indices
        for axis in range(3)
    ]
    return np.array(patterns).reshape(-1, n_atoms, 3)


def model_hamiltonian_derivative(
    model: torch.nn.Module,
    graph: dict[str, torch.Tensor],
    patterns: np.ndarray | torch.Tensor | None = None,
    heads: Sequence[str] | None = None,
    chunk_size: int | None = None,
    edge_chunk: int | None = None,
) -> dict[str, torch.Tensor]:
    """Directional derivatives of the model's predicted blocks along displacement patterns.

    ``graph``: one structure (`structure_to_graph` / `record_to_graph`); ``patterns``
    (P, N, 3) in Å per unit λ, default `cartesian_displacements` of every atom (P = 3N,
    pattern 3κ + α is d/du_κα). Returns {head: (P, E, n_uni, n_uni)} padded blocks on the
    graph's edges: eV/Å for the H head with unit patterns, 1/Å for S.

    Forward-mode autograd (`torch.func.jvp`) vectorised over the patterns with
    `torch.func.vmap` (``chunk_size`` patterns at a time, None = all): each pattern costs
    about one extra forward pass, independent of the number of outputs. The cell is held
    fixed; edge vectors come from positions inside the model, so an atom's periodic images
    move with it. Exact to float precision of the model (use float64 to check against
    finite differences). The result stays differentiable with respect to the model's
    parameters, so a loss on dH/du targets can train them; detach it for analysis.
    ``edge_chunk``: the backbone's per-edge work runs in chunks of that many edges (its
    intermediates dominate the memory of large cells: a 128-atom Si supercell with 9 Å
    edges needs > 20 GB without it); same result up to the order of float additions.
    """
    positions = graph[keys.POSITIONS].detach()
    n_atoms = positions.shape[0]
    if patterns is None:
        patterns = cartesian_displacements(n_atoms)
    tangents = torch.as_tensor(patterns, dtype=positions.dtype).reshape(-1, n_atoms, 3)
    names = list(heads) if heads is not None else list(model.heads)

    def blocks(pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        moved = {**graph, keys.POSITIONS: pos}
        if edge_chunk is None:
            out = model(moved)
        else:
            out = model._run_heads(model.features(moved, edge_chunk), moved, names)
        return tuple(out[name] for name in names)

    def along(tangent: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.func.jvp(blocks, (positions,), (tangent,))[1]

    derivatives = torch.func.vmap(along, chunk_size=chunk_size)(tangents)
    return dict(zip(names, derivatives, strict=True))


def flat_blocks(
    padded: torch.Tensor | np.ndarray,
    numbers: Sequence[int] | np.ndarray,
    edges: np.ndarray | torch.Tensor,
    universal: UniversalBasis,
) -> np.ndarray:
    """(…, E, n_uni, n_uni) padded blocks → (…, total) float64 flat blocks in the record
    layout (each edge's (n_orb(Z_i), n_orb(Z_j)) block row-major, in edge order), the input of
    `BlochHamiltonian` and `eph_matrix_elements`; ``edges`` as in `blocks_from_padded`."""
    if isinstance(padded, torch.Tensor):
        padded = padded.detach().cpu().double().numpy()
    lead = padded.shape[:-3]
    stack = padded.reshape(-1, *padded.shape[-3:])
    flat = [flatten_blocks(blocks_from_padded(p, numbers, edges, universal)) for p in stack]
    return np.array(flat).reshape(*lead, -1)


def zero_point_displacement(
    eigenvector: np.ndarray, frequency_THz: float, masses_amu: Sequence[float]
) -> np.ndarray:
    """(N, 3) real displacement u_κα = e_κα · sqrt(ħ / (2 M_κ ω)) in Å of a Γ-point phonon.

    ``eigenvector`` (N, 3) or (3N,): eigenvector e of the mass-weighted dynamical matrix
    (normalised here, Σ|e_κα|² = 1, as phonopy returns them); ``frequency_THz``: ν with
    ω = 2πν (must be > 0: acoustic Γ modes have no zero-point amplitude); ``masses_amu``
    (N,). With this pattern d/dλ = ∂_ν = Σ_κα e_κα/sqrt(2 M_κ ω_ν) ∂/∂u_κα (ħ = 1 absorbed
    into the length) and g_mnν comes out in eV. At q = 0 the dynamical matrix is real, so e
    is real up to a global phase, which is removed (the largest component is made real and
    positive); a genuinely complex e raises ValueError.
    """
    e = np.asarray(eigenvector, dtype=np.complex128).reshape(-1, 3)
    masses = np.asarray(masses_amu, dtype=np.float64).reshape(-1)
    if masses.shape[0] != e.shape[0]:
        raise ValueError(f"{e.shape[0]} atoms in the eigenvector but {masses.shape[0]} masses.")
    if frequency_THz <= 0:
        raise ValueError(f"frequency_THz must be positive, got {frequency_THz}.")
    e = e / np.linalg.norm(e)
    big = e.reshape(-1)[np.argmax(np.abs(e))]
    e = e * (abs(big) / big)
    if np.max(np.abs(e.imag)) > 1e-8:
        raise ValueError("A Γ-point eigenvector must be real up to a global phase.")
    omega = 2.0 * np.pi * frequency_THz * 1e12  # rad/s
    length_m = np.sqrt(units._hbar / (2.0 * masses * units._amu * omega))
    return e.real * (length_m * 1e10)[:, None]


def directional_derivative(derivatives: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """Σ_κα u_κα ∂X/∂u_κα from Cartesian derivatives (N, 3, total) or (3N, total) of every
    atom (atom-major, as `cartesian_displacements`) and a displacement u (N, 3) in Å."""
    u = np.asarray(displacement, dtype=np.float64).reshape(-1)
    d = np.asarray(derivatives, dtype=np.float64).reshape(len(u), -1)
    return u @ d


def eph_matrix_elements(
    bloch: BlochHamiltonian,
    dh: np.ndarray,
    ds: np.ndarray | None,
    k: Sequence[float] = (0.0, 0.0, 0.0),
    bands: Sequence[int] | slice | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(ε_nk (B,) eV, g_mn(k, q = 0) (B, B)) for one displacement pattern, q = 0 only.

    ``bloch``: H(R), S(R) of the undisplaced structure (absolute or μ-shifted H; see the
    module docstring for what the energy zero changes) — ``dh`` must be the derivative of
    that same H (absolute dH with absolute H; a record's ``dh`` = d(H − μS) with its ``h``:
    mixing them is wrong by μ·c†dS c); ``dh``, ``ds``: flat dH(R)/dλ,
    dS(R)/dλ on the same edges and layout (e.g. `directional_derivative` of Cartesian
    derivatives and a `zero_point_displacement` → g in eV; a unit Cartesian pattern → eV/Å).
    ``ds`` None means a λ-independent S (orthonormal basis or fixed overlap). ``k``
    fractional; ``bands``: indices of the bands m, n kept (default all).

    g_mn = c_m† [dH(k) − ε_n dS(k)] c_n with S-orthonormal eigenvectors c. Phonons at q ≠ 0
    (which couple k to k + q and need supercell or Bloch-phase derivatives) are not supported.
    """
    layout = bloch.layout
    eps, c = bloch.eigh(k, vectors=True)
    if bands is not None:
        eps, c = eps[bands], c[:, bands]
    dhk = c.conj().T @ layout.dense(layout.check_values(dh, "dh"), k) @ c
    if ds is None:
        return eps, dhk
    dsk = c.conj().T @ layout.dense(layout.check_values(ds, "ds"), k) @ c
    return eps, dhk - dsk * eps[None, :]


def level_average(values: np.ndarray, tol: float) -> np.ndarray:
    """(B, B) matrix A with A[a, b] = 1/|D(a)| for b in a's degenerate level D(a) (ascending
    ``values`` closer than ``tol`` to their neighbour belong to one level), else 0: A @ X
    averages X over each level, the gauge-invariant form of |g|² in degenerate subspaces."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    level = np.concatenate([[0], np.cumsum(np.diff(values) > tol)])
    average = (level[:, None] == level[None, :]).astype(np.float64)
    return average / average.sum(axis=1, keepdims=True)


@dataclass
class Couplings:
    """g_mnν(k, q = 0) of M phonon modes at K electron k-points: ``kpoints_frac`` (K, 3),
    ``eigenvalues_eV`` (K, B), ``g_eV`` (K, M, B, B) complex (m, n band indices of the kept
    bands), from `mode_couplings`."""

    kpoints_frac: np.ndarray
    eigenvalues_eV: np.ndarray
    g_eV: np.ndarray

    def degenerate_abs(self, tol_eV: float = 1e-4) -> np.ndarray:
        """(K, M, B, B) gauge-invariant |g|: within degenerate levels (|Δε| < ``tol_eV``) the
        eigenvectors are arbitrary, so |g_mn|² is averaged over the states of m's and of n's
        level, sqrt(Σ_{m'∈D(m), n'∈D(n)} |g_m'n'|² / (|D(m)| |D(n)|)) (the usual convention
        of e-ph codes); equals |g_mn| where nothing is degenerate."""
        out = np.empty(self.g_eV.shape)
        for k, eps in enumerate(self.eigenvalues_eV):
            average = level_average(eps, tol_eV)
            out[k] = np.sqrt(average @ np.abs(self.g_eV[k]) ** 2 @ average.T)
        return out


def mode_couplings(
    bloch: BlochHamiltonian,
    dh: np.ndarray,
    ds: np.ndarray | None,
    kpoints_frac: Sequence[Sequence[float]] = ((0.0, 0.0, 0.0),),
    bands: Sequence[int] | slice | None = None,
) -> Couplings:
    """`eph_matrix_elements` for M displacement patterns at K k-points: ``dh``, ``ds`` (M,
    total) directional derivatives (e.g. along `zero_point_displacement`s → g in eV)."""
    dh = np.asarray(dh, dtype=np.float64).reshape(-1, np.shape(dh)[-1])
    kpoints = np.asarray(kpoints_frac, dtype=np.float64).reshape(-1, 3)
    eigenvalues, g = [], []
    for k in kpoints:
        per_mode = [
            eph_matrix_elements(bloch, dh[m], None if ds is None else ds[m], k, bands)
            for m in range(len(dh))
        ]
        eigenvalues.append(per_mode[0][0])
        g.append([gm for _, gm in per_mode])
    return Couplings(kpoints, np.array(eigenvalues), np.array(g))


def record_couplings(
    record,
    displacements: np.ndarray,
    kpoints_frac: Sequence[Sequence[float]] = ((0.0, 0.0, 0.0),),
    bands: Sequence[int] | slice | None = None,
) -> Couplings:
    """g along ``displacements`` (M, N, 3) Å of the finite-difference derivatives a record
    stores (``dh``, ``ds`` extras, e.g. eph_mini): the record's ``h`` = H − μS with its
    ``dh`` = d(H − μS)/du, a consistent pair (g_nn differ from absolute-H ones by dμ/dλ)."""
    bloch = BlochHamiltonian(record.numbers, record.basis, record.edges, record.h, record.s)
    dh = [directional_derivative(record.target_rows(keys.DH), u) for u in displacements]
    ds = [directional_derivative(record.target_rows(keys.DS), u) for u in displacements]
    return mode_couplings(bloch, np.array(dh), np.array(ds), kpoints_frac, bands)


__all__ = [
    "Couplings",
    "cartesian_displacements",
    "directional_derivative",
    "eph_matrix_elements",
    "flat_blocks",
    "level_average",
    "mode_couplings",
    "model_hamiltonian_derivative",
    "record_couplings",
    "zero_point_displacement",
]
