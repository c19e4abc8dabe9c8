"""Random but self-consistent `HamiltonianRecord`s for tests and I/O benchmarks — not physics.

Each record is a periodic cell with every edge (i, j, R) within a cutoff, both directions
stored, H_ji(−R) = H_ij(R)ᵀ exactly, and S = 1 + off-site blocks scaled so that
‖S(k) − 1‖ ≤ 0.5 for every k: S(k) is positive definite and the generalized eigenproblem
H(k)c = εS(k)c is well posed, so band energies can be compared across conversions.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
from ase.data import atomic_numbers

from foundation.basis import BasisSet
from foundation.data.record import HamiltonianRecord

DEFAULT_BASIS = BasisSet(
    "synthetic",
    {
        "H": (0,),
        "C": (0, 1),
        "O": (0, 1),
        "Si": (0, 0, 1, 1, 2),
        "Ga": (0, 1, 2),
        "As": (0, 1),
        "Ti": (0, 0, 1, 2, 2),
        "Ce": (0, 1, 2, 3),
    },
)


def random_record(
    key: str,
    symbols: Sequence[str],
    *,
    seed: int = 0,
    basis: BasisSet = DEFAULT_BASIS,
    cutoff_A: float = 3.2,
    lattice_A: float = 3.6,
    meta: Mapping | None = None,
) -> HamiltonianRecord:
    """A random record for ``symbols`` (one atom each) in a near-cubic periodic cell."""
    rng = np.random.default_rng(seed)
    numbers = np.array([atomic_numbers[s] for s in symbols])
    n = len(numbers)
    cell = (
        lattice_A * (np.eye(3) + 0.05 * rng.standard_normal((3, 3))) * max(1.0, (n / 2) ** (1 / 3))
    )
    positions = rng.random((n, 3)) @ cell
    norb = basis.n_orb_array(numbers)
    edges = []
    for i, j in itertools.product(range(n), repeat=2):
        for r in itertools.product((-1, 0, 1), repeat=3):
            d = np.linalg.norm(positions[j] + np.asarray(r) @ cell - positions[i])
            if (i == j and r == (0, 0, 0)) or (0 < d < cutoff_A):
                edges.append((i, j, *r))
    index = {e: k for k, e in enumerate(edges)}
    h: list[np.ndarray | None] = [None] * len(edges)
    s: list[np.ndarray | None] = [None] * len(edges)
    for k, (i, j, *r) in enumerate(edges):
        if h[k] is not None:
            continue
        rev = index[(j, i, *(-x for x in r))]
        shape = (norb[i], norb[j])
        if rev == k:  # on-site block: symmetric
            a = rng.standard_normal(shape)
            h[k] = 0.5 * (a + a.T) + np.diag(rng.uniform(-12.0, 2.0, shape[0]))
            s[k] = np.eye(shape[0])
        else:
            d = np.linalg.norm(positions[j] + np.asarray(r) @ cell - positions[i])
            h[k] = 3.0 * np.exp(-d) * rng.standard_normal(shape)
            s[k] = np.exp(-d) * rng.standard_normal(shape)
            h[rev], s[rev] = h[k].T, s[k].T
    off_norm = np.zeros(n)
    for k, (i, j, *r) in enumerate(edges):
        if not (i == j and r == [0, 0, 0]):
            off_norm[i] += np.linalg.norm(s[k], 2)
    scale = 0.5 / max(off_norm.max(), 1e-12)
    for k, (i, j, *r) in enumerate(edges):
        if not (i == j and r == [0, 0, 0]):
            s[k] = s[k] * scale
    full_meta = {
        "source": "synthetic",
        "functional": "none",
        "basis": basis.name,
        "n_electrons": int(2 * n),
        "edge_cutoff_A": cutoff_A,
    } | dict(meta or {})
    return HamiltonianRecord.from_blocks(
        key=key,
        numbers=numbers,
        positions=positions,
        cell=cell,
        pbc=(True, True, True),
        basis=basis.subset(sorted(set(symbols), key=lambda x: atomic_numbers[x])),
        edges=np.array(edges),
        h_blocks=h,
        s_blocks=s,
        meta=full_meta,
    )


def random_dataset(
    n_structures: int,
    *,
    seed: int = 0,
    elements: Sequence[str] = ("C", "O", "Si", "Ga", "As"),
    atoms: tuple[int, int] = (2, 6),
    cutoff_A: float = 3.2,
) -> list[HamiltonianRecord]:
    """``n_structures`` random records of ``atoms[0]``–``atoms[1]`` atoms from ``elements``."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_structures):
        symbols = list(rng.choice(list(elements), size=int(rng.integers(atoms[0], atoms[1] + 1))))
        out.append(
            random_record(f"synthetic-{k:05d}", symbols, seed=seed * 100_003 + k, cutoff_A=cutoff_A)
        )
    return out


__all__ = ["DEFAULT_BASIS", "random_dataset", "random_record"]
