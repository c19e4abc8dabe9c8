"""Model couplings g_mnν(k, q ≠ 0) against PySCF frozen phonons in supercells.

A *reference* (``scripts/generate_eph_q_reference.py``; ``<key>.npz`` + ``<key>.json`` under
``data_shards/eph_mini/q_reference/``) holds, for a primitive cell, a q and a few modes ν:

* the mode patterns u_κ(qν) (complex, cell-phase convention, zero-point amplitudes in Å)
  and their frequencies;
* the DFT H(R) (absolute, eV) and S(R) of the primitive cell: blocks of the supercell
  record whose first atom is in the home cell, mapped to primitive edges (9 Å cutoff);
* ⟨i 0|∂_qν H|j R⟩ and ⟨i 0|∂_qν S|j R⟩ (complex) from PySCF central differences of the
  supercell displaced along the real and imaginary parts of u_κ e^{2πi q·L} (δ = 0.01 Å).

The DFT couplings use those H, S, ∂H and ∂S (the json records how far the finite-difference
∂S is from the exact one of the basis); the model couplings are
`foundation.physics.eph_q.model_kernels` on the same supercell (model H and ∂H by autograd,
exact S and ∂S) along the same patterns, so the comparison isolates the electronic part.
The error is the relative Frobenius norm of the gauge-invariant |g| (`QCouplings.gauge_abs`)
over k, modes and bands, and over the valence and conduction blocks separately, as in
`foundation.physics.eph_validation`.

No pickle: npz of plain arrays (``allow_pickle=False``) and json. Units: Å, eV, THz.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from foundation.physics.eph_q import (
    QCouplings,
    couplings_from_blocks,
    exact_overlap_kernel,
    model_kernels,
)
from foundation.physics.kspace import BlockLayout

CUTOFF_A = 9.0
"""Edge cutoff of the references (that of eph_mini and of the shipped models)."""
KPOINTS = np.array([[0.0, 0.0, 0.0], [0.13, 0.29, 0.41], [0.5, 0.25, 0.0], [0.37, 0.12, 0.81]])
"""Electron k-points of the comparison (fractional): Γ and three generic points."""


@dataclass
class QReference:
    """One DFT reference (module notes): ``patterns`` (M, N, 3) complex, ``frequencies_THz``
    (M,), ``dh_q``/``ds_q`` (M, total) complex on ``layout``."""

    key: str
    primitive: Atoms
    reps: np.ndarray
    qpoint: np.ndarray
    layout: BlockLayout
    h: np.ndarray
    s: np.ndarray
    patterns: np.ndarray
    frequencies_THz: np.ndarray
    dh_q: np.ndarray
    ds_q: np.ndarray
    meta: dict


def _home_edges(primitive: Atoms, reps, positions: np.ndarray, edges_sc: np.ndarray):
    """(ids of supercell edges whose first atom is in the home cell, their primitive edges)."""
    from foundation.physics.supercells import atom_cells

    n = len(primitive)
    cells = atom_cells(primitive, positions, n)
    ids = np.flatnonzero(edges_sc[:, 0] < n)
    e = edges_sc[ids]
    shift = cells[e[:, 1]] - cells[e[:, 0]] + e[:, 2:5] * np.asarray(reps)
    return ids, np.concatenate([e[:, :1], e[:, 1:2] % n, shift], axis=1)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def save_reference(
    record_dir: Path,
    primitive: Atoms,
    out_base: Path,
    meta: dict,
    patterns: np.ndarray,
    frequencies_THz: np.ndarray,
    index: np.ndarray,
) -> dict:
    """Compact reference ``out_base``.npz/.json from a generator folder (the supercell record
    ``structure.json`` and ``dh_abs.npy``/``ds.npy`` (P, total_sc) along the real patterns):
    home-cell rows as primitive H, S and, per mode, X^q = X_re + i X_im (``index`` (M, 2):
    the pattern of each mode's real and imaginary part, −1 for none). ``patterns`` (M, N, 3)
    and ``frequencies_THz`` (M,) are stored as given; ``meta`` (with ``reps``, ``qpoint``)
    goes to the json with the basis and the ∂S check added."""
    from foundation.data.record import HamiltonianRecord
    from foundation.physics.kspace import orbitals_per_atom
    from foundation.physics.supercells import atom_cells

    record = HamiltonianRecord.load(record_dir)
    reps = np.asarray(meta["reps"])
    n = len(primitive)
    if np.any(atom_cells(primitive, record.positions, n)[:n] != 0):
        raise ValueError(
            f"{record_dir}: PySCF wrapped a home-cell atom into another cell, which would "
            "change its phonon phase; give a primitive cell with atoms inside it (atoms.wrap())."
        )
    ids, edges = _home_edges(primitive, reps, record.positions, record.edges.astype(np.int64))
    off = record.block_offsets
    flat = np.concatenate([np.arange(off[k], off[k + 1]) for k in ids])
    layout = BlockLayout(orbitals_per_atom(primitive.numbers, record.basis), edges)
    home = Atoms(primitive.numbers, record.positions[:n], cell=primitive.cell)
    index = np.asarray(index, dtype=np.int64)

    def per_mode(values: np.ndarray) -> np.ndarray:
        values = np.concatenate([values[:, flat], np.zeros((1, len(flat)))])  # row −1 = 0
        return values[index[:, 0]] + 1j * values[index[:, 1]]

    dh_q = per_mode(np.load(record_dir / "dh_abs.npy"))
    ds_q = per_mode(np.load(record_dir / "ds.npy"))
    q = np.asarray(meta["qpoint"], dtype=np.float64)[None]
    ds_exact = _exact_ds(record.basis, home, reps, layout, q, np.asarray(patterns)[None])[0]
    out_base.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out_base.with_suffix(".npz"),
        numbers=home.numbers,
        positions=home.positions,
        cell=np.asarray(home.cell),
        edges=edges.astype(np.int32),
        n_orb=layout.n_orb,
        h=record.absolute_h()[flat],
        s=record.s.astype(np.float64)[flat],
        patterns=np.asarray(patterns, dtype=np.complex128),
        frequencies_THz=np.asarray(frequencies_THz, dtype=np.float64),
        dh_q=dh_q,
        ds_q=ds_q,
    )
    meta = meta | {
        "basis": record.basis.to_dict(),
        "kmesh": record.meta["kmesh"],
        "ds_exact_vs_fd_relative": _relative(ds_exact, ds_q),
        "arrays": {
            "h, s": "absolute DFT H(R) (eV) and S(R) on the primitive edges (flat layout)",
            "patterns": "(M, N, 3) complex cell-phase zero-point amplitudes u_ka(q nu), A",
            "dh_q, ds_q": "(M, total) complex <i0|d_q H|jR> (eV), <i0|d_q S|jR> (PySCF FD)",
        },
    }
    out_base.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return meta


def _exact_ds(basis, primitive: Atoms, reps, layout: BlockLayout, q, patterns) -> np.ndarray:
    """(Q, M, total) exact ∂_q S of the basis on the ``CUTOFF_A`` edges of the supercell."""
    from foundation.data.graph import neighbor_edges
    from foundation.physics.overlap import OverlapTables
    from foundation.physics.supercells import build_supercell

    sc = build_supercell(primitive, reps)
    edges_sc = neighbor_edges(sc.numbers, sc.positions, np.asarray(sc.cell), sc.pbc, CUTOFF_A)
    tables = OverlapTables(basis, r_max_A=CUTOFF_A)
    kernel = exact_overlap_kernel(tables, primitive, reps, layout, sc.positions, edges_sc)
    return kernel.at(q, patterns)


def load_reference(base: Path) -> QReference:
    """A reference written by `save_reference` (``base`` without suffix)."""
    base = Path(base)
    meta = json.loads(base.with_suffix(".json").read_text())
    with np.load(base.with_suffix(".npz"), allow_pickle=False) as z:
        a = {name: z[name] for name in z.files}
    return QReference(
        key=meta["key"],
        primitive=Atoms(a["numbers"], a["positions"], cell=a["cell"], pbc=True),
        reps=np.asarray(meta["reps"]),
        qpoint=np.asarray(meta["qpoint"], dtype=np.float64),
        layout=BlockLayout(a["n_orb"], a["edges"]),
        h=a["h"],
        s=a["s"],
        patterns=a["patterns"],
        frequencies_THz=a["frequencies_THz"],
        dh_q=a["dh_q"],
        ds_q=a["ds_q"],
        meta=meta,
    )


def dft_couplings(reference: QReference, kpoints: np.ndarray = KPOINTS) -> QCouplings:
    """DFT g_mnν(k, q) of the reference's modes (its H, S, ∂H, finite-difference ∂S)."""
    return couplings_from_blocks(
        reference.layout, reference.h, reference.s, kpoints, reference.qpoint[None],
        reference.dh_q[None], reference.ds_q[None], reference.frequencies_THz[None],
    )  # fmt: skip


def coupling_errors(
    model, reference: QReference, kpoints: np.ndarray = KPOINTS, head: str = "h"
) -> dict:
    """{"all", "valence", "conduction", "max_abs_g_dft_meV"}: relative |g| errors of
    ``model`` (its ``head``) against ``reference`` (module notes); valence / conduction: both
    band indices below / at or above half the valence electron count (insulators)."""
    from foundation.physics.predict import valence_electrons

    dft = dft_couplings(reference, kpoints)
    kernels = model_kernels(model, reference.primitive, reference.reps, head=head)
    ours = kernels.couplings(
        kpoints, reference.qpoint[None], reference.patterns[None],
        reference.frequencies_THz[None],
    )  # fmt: skip
    a, b = ours.gauge_abs(), dft.gauge_abs()
    n_val = int(round(valence_electrons(reference.primitive.numbers))) // 2
    val, con = slice(0, n_val), slice(n_val, None)
    return {
        "all": _relative(a, b),
        "valence": _relative(a[..., val, val], b[..., val, val]),
        "conduction": _relative(a[..., con, con], b[..., con, con]),
        "max_abs_g_dft_meV": float(1e3 * b.max()),
    }


__all__ = [
    "CUTOFF_A",
    "KPOINTS",
    "QReference",
    "coupling_errors",
    "dft_couplings",
    "load_reference",
    "save_reference",
]
