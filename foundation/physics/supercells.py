"""Diagonal supercells of a primitive cell and the map of their edges back to it.

A supercell n₁×n₂×n₃ of a primitive cell (N atoms, lattice rows A) has lattice rows
diag(n)·A and N·n₁n₂n₃ atoms; atom c·N + κ is primitive atom κ shifted by the integer cell
triple L_c (c in C order over n, so atoms 0 … N−1 are the *home cell* L = 0). Wave vectors
q (fractional, primitive reciprocal basis) with n·q integer are *commensurate*: a phonon of
such a q is periodic in the supercell.

`edge_map` maps a supercell edge (I, J, R_sc) back to the primitive edge (κ_I, κ_J, R) with
R = L_J − L_I + n∘R_sc and to the cell L_I of its first atom, read from the (possibly
wrapped) positions, so it works on a PySCF record of the supercell (`run_scf` wraps atoms
into the cell) as well as on a freshly built graph. Units: Å.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms


def supercell_reps(reps: Sequence[int]) -> np.ndarray:
    """(3,) int64 repetitions, each ≥ 1 (ValueError otherwise)."""
    reps = np.asarray(reps, dtype=np.int64).reshape(3)
    if np.any(reps < 1):
        raise ValueError(f"supercell repetitions must be ≥ 1, got {reps.tolist()}.")
    return reps


def cell_triples(reps: Sequence[int]) -> np.ndarray:
    """(n₁n₂n₃, 3) integer cell offsets L_c in C order."""
    reps = supercell_reps(reps)
    grids = np.meshgrid(*[np.arange(r) for r in reps], indexing="ij")
    return np.stack(grids, -1).reshape(-1, 3)


def build_supercell(primitive: Atoms, reps: Sequence[int]) -> Atoms:
    """Supercell ``reps`` of ``primitive`` with atom c·N + κ at τ_κ + L_c·A (module notes)."""
    reps = supercell_reps(reps)
    cells = cell_triples(reps)
    lattice = np.asarray(primitive.cell)
    positions = (cells @ lattice)[:, None, :] + primitive.positions[None]
    return Atoms(
        numbers=np.tile(primitive.numbers, len(cells)),
        positions=positions.reshape(-1, 3),
        cell=reps[:, None] * lattice,
        pbc=True,
    )


def commensurate(q_frac: np.ndarray, reps: Sequence[int], tol: float = 1e-6) -> bool:
    """Whether every q (…, 3) is periodic in the supercell ``reps`` (n·q integer)."""
    scaled = np.asarray(q_frac, dtype=np.float64).reshape(-1, 3) * supercell_reps(reps)
    return bool(np.all(np.abs(scaled - np.rint(scaled)) < tol))


def atom_cells(
    primitive: Atoms, positions: np.ndarray, n_primitive: int, tol_A: float = 1e-3
) -> np.ndarray:
    """(N_sc, 3) integer cell L of each supercell atom c·N + κ from its position (which may be
    wrapped by a supercell vector): L = round(frac(τ − τ_κ)). A position that is not a
    lattice translate of τ_κ (within ``tol_A``) raises ValueError."""
    lattice = np.asarray(primitive.cell)
    base = np.tile(primitive.positions, (len(positions) // n_primitive, 1))
    frac = np.linalg.solve(lattice.T, (np.asarray(positions) - base).T).T
    cells = np.rint(frac)
    off = np.abs((frac - cells) @ lattice).max(initial=0.0)
    if off > tol_A:
        raise ValueError(
            f"supercell atoms are not lattice translates of the primitive atoms (off by "
            f"{off:.2g} Å): build it with build_supercell and keep its atom order."
        )
    return cells.astype(np.int64)


def edge_map(
    primitive: Atoms,
    reps: Sequence[int],
    positions: np.ndarray,
    edges_sc: np.ndarray,
    edges_prim: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(index of the primitive edge (E_sc,), cell L_I (E_sc, 3)) of each supercell edge.

    ``positions``: the supercell's atoms (order of `build_supercell`, possibly wrapped);
    ``edges_sc`` (E_sc, 5), ``edges_prim`` (E, 5) as (i, j, Rx, Ry, Rz). A supercell edge
    whose primitive image is not in ``edges_prim`` raises ValueError (different cutoffs)."""
    reps = supercell_reps(reps)
    n = len(primitive)
    cells = atom_cells(primitive, positions, n)
    edges_sc = np.asarray(edges_sc, dtype=np.int64)
    i, j = edges_sc[:, 0], edges_sc[:, 1]
    shift = cells[j] - cells[i] + edges_sc[:, 2:5] * reps
    keys_sc = np.concatenate([(i % n)[:, None], (j % n)[:, None], shift], axis=1)
    lookup = {tuple(e): p for p, e in enumerate(np.asarray(edges_prim, dtype=np.int64).tolist())}
    index = np.array([lookup.get(tuple(e), -1) for e in keys_sc.tolist()], dtype=np.int64)
    if np.any(index < 0):
        bad = keys_sc[int(np.argmin(index))].tolist()
        raise ValueError(
            f"supercell edge maps to primitive edge {bad}, which the primitive edge list lacks: "
            "build both edge lists with the same cutoff."
        )
    return index, cells[i]


__all__ = [
    "atom_cells",
    "build_supercell",
    "cell_triples",
    "commensurate",
    "edge_map",
    "supercell_reps",
]
