"""Electron–phonon matrix elements at any commensurate q: g_mnν(k, q) from supercell derivatives.

Definition (Bloch sums |i k⟩ = N^{-1/2} Σ_L e^{2πi k·L} |φ_i(r − τ_i − L)⟩, S-orthonormal
eigenvectors c_n(k) of H(k) c = ε S(k) c, the lattice-vector phase convention of
`foundation.physics.kspace`):

    g_mnν(k, q) = c_m(k+q)† [∂_qν H(k+q, k) − ε_n(k) ∂_qν S(k+q, k)] c_n(k),
    ∂_qν = Σ_κα,L u_κα(qν) e^{2πi q·L} ∂/∂u_κα,L,   u_κ(qν) = e_κ(qν) sqrt(ħ / 2M_κ ω_qν),

with e(qν) in the cell-phase convention (`foundation.physics.phonons.QPhonons`). Shifting
both orbitals by −L′ shows ⟨i, k+q| ∂_qν X |j, k⟩ = Σ_R e^{2πi k·R} X^q_ij(R) with

    X^q_ij(R) = Σ_L e^{2πi q·L} u · ∂X_{i0, jR} / ∂u_L
              = Σ_{L_I} e^{−2πi q·L_I} u · ∂X_{(i, L_I), (j, L_I + R)} / ∂u_0,

the derivative of the blocks of every edge with respect to the displacement of one atom in
the home cell, summed with the phase of the cell L_I of the edge's first atom. In a supercell
n₁×n₂×n₃ with n·q integer the phonon pattern is periodic, so the sum over L_I runs over the
supercell's cells and is *exact* (no locality assumption, no interpolation): one set of 3N
Cartesian derivatives (the home-cell atoms, autograd through the model or PySCF finite
differences) serves every q of the supercell's grid and every mode. `DerivativeKernel` holds
them per (primitive block element, cell) and `DerivativeKernel.at` does the phase sums for a
batch of q as one matrix product. q = 0 gives Σ_L ∂/∂u_L, the derivative with all periodic
images moved together: the Γ path of `foundation.physics.eph`.

The −ε_n ∂S term is the non-orthogonal basis term of `foundation.physics.eph` (the orbitals
move with the atoms); ∂S comes from the exact two-center tables where the basis is known
(`foundation.physics.overlap`). Energy zero: a q ≠ 0 pattern leaves the average potential
unchanged at first order, so the model's unknown μ(λ) does not enter; at q = 0 only g_nn
shift by dμ/dλ (as in `foundation.physics.eph`).

Gauge: |g| is made gauge invariant by averaging |g|² over degenerate bands at k (n), at k+q
(m) and degenerate modes at q (ν) (`QCouplings.gauge_abs`, the convention of EPW/Perturbo).
Symmetries the tests check: g(−k, −q) = g(k, q)* (real H(R), time reversal), |g| periodic
in k and q with the reciprocal lattice.

Units: Å, eV (g), THz; fractional k, q in the primitive reciprocal basis (no 2π).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from foundation.physics.eph import level_average
from foundation.physics.kspace import BlockLayout
from foundation.physics.supercells import (
    atom_cells,
    build_supercell,
    cell_triples,
    edge_map,
    supercell_reps,
)


class RealSpaceMatrices:
    """Dense per-shift matrices of flat block arrays on a layout: X(R) (…, n_R, n, n), so
    that X(k) = Σ_R e^{2πi k·R} X(R) is one einsum for a batch of k (no hermitian part taken:
    the q ≠ 0 derivative matrices are not hermitian)."""

    def __init__(self, layout: BlockLayout):
        self.layout = layout
        self.shifts, shift_of_edge = np.unique(layout.shifts, axis=0, return_inverse=True)
        self._shift_of_element = shift_of_edge.reshape(-1)[layout.edge_of]
        self._rows, self._cols = layout.rows.astype(np.int64), layout.cols.astype(np.int64)

    def real_space(self, flat: np.ndarray) -> np.ndarray:
        """(…, total) flat blocks → (…, n_R, n, n) dense X(R) (same dtype)."""
        flat = np.asarray(flat)
        lead = flat.shape[:-1]
        n = self.layout.n
        out = np.zeros((*lead, len(self.shifts), n, n), dtype=flat.dtype)
        out[..., self._shift_of_element, self._rows, self._cols] = flat
        return out

    def at(self, dense: np.ndarray, kpoints_frac: np.ndarray) -> np.ndarray:
        """(…, n_R, n, n) X(R) → (…, K, n, n) complex X(k) at ``kpoints_frac`` (K, 3)."""
        phase = np.exp(2j * np.pi * np.asarray(kpoints_frac).reshape(-1, 3) @ self.shifts.T)
        return np.einsum("kr,...rab->...kab", phase, dense)


def solve_batched(h: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ε (K, n) ascending, c (K, n, n) columns S-orthonormal) of H c = ε S c for stacks of
    small hermitian matrices (Cholesky reduction, batched in numpy)."""
    lower = np.linalg.cholesky(s)
    inv = np.linalg.inv(lower)
    a = inv @ h @ np.swapaxes(inv, -1, -2).conj()
    eps, v = np.linalg.eigh(0.5 * (a + np.swapaxes(a, -1, -2).conj()))
    return eps, np.swapaxes(inv, -1, -2).conj() @ v


@dataclass
class DerivativeKernel:
    """Cartesian derivatives of one quantity's blocks (H or S) with respect to the home-cell
    atoms, arranged for phase sums (module notes).

    ``values`` (3N, total, C): entry [3κ + α, t, c] is ∂X/∂u_κα,0 of the supercell block
    element whose primitive element is t (flat index on ``layout``) and whose first atom lies
    in cell ``cells[c]`` relative to atom κ; ``reps`` the supercell. eV/Å for H, 1/Å for S.
    """

    layout: BlockLayout
    reps: np.ndarray
    cells: np.ndarray
    values: np.ndarray

    @classmethod
    def from_supercell(
        cls,
        primitive: Atoms,
        reps: Sequence[int],
        layout: BlockLayout,
        positions_sc: np.ndarray,
        edges_sc: np.ndarray,
        derivative_sc: np.ndarray,
    ) -> DerivativeKernel:
        """From flat supercell derivatives (3N, total_sc) along the home-cell Cartesian
        patterns (`cartesian_displacements(N_sc, range(N))`) on ``edges_sc`` of the supercell
        whose atoms sit at ``positions_sc`` (atom order of `build_supercell`, possibly
        wrapped). Every (primitive edge, cell) pair must occur exactly once."""
        reps = supercell_reps(reps)
        n = len(primitive)
        edges_sc = np.asarray(edges_sc, dtype=np.int64)
        index, cell_i = edge_map(primitive, reps, positions_sc, edges_sc, layout.edges)
        sc_layout = BlockLayout(np.tile(layout.n_orb, int(np.prod(reps))), edges_sc)
        cells = cell_triples(reps)
        n_cells = len(cells)
        flat_cell = lambda c: (c[..., 0] * reps[1] + c[..., 1]) * reps[2] + c[..., 2]  # noqa: E731
        # element t of the supercell → element of its primitive edge (same block shape)
        local = np.arange(sc_layout.size) - sc_layout.block_offsets[sc_layout.edge_of]
        target = layout.block_offsets[index[sc_layout.edge_of]] + local
        atom_cell = atom_cells(primitive, positions_sc, n)[:n]  # cells of the displaced atoms
        derivative_sc = np.asarray(derivative_sc, dtype=np.float64).reshape(3 * n, -1)
        values = np.zeros((3 * n, layout.size, n_cells))
        seen = np.zeros((layout.size, n_cells), dtype=np.int64)
        for kappa in range(n):
            rel = flat_cell(np.mod(cell_i - atom_cell[kappa], reps))[sc_layout.edge_of]
            values[3 * kappa : 3 * kappa + 3, target, rel] = derivative_sc[
                3 * kappa : 3 * kappa + 3
            ]
            if kappa == 0:
                np.add.at(seen, (target, rel), 1)
        if np.any(seen != 1):
            raise ValueError(
                f"the supercell {reps.tolist()} edges do not cover each primitive edge once per "
                f"cell (counts {seen.min()}–{seen.max()}): build both edge lists with one cutoff."
            )
        return cls(layout, reps, cells, values)

    def at(self, qpoints_frac: np.ndarray, patterns: np.ndarray) -> np.ndarray:
        """(Q, M, total) complex X^q(R) (module notes) along ``patterns`` (Q, M, N, 3)
        complex cell-phase amplitudes (e.g. `QPhonons.zero_point_patterns`) at
        ``qpoints_frac`` (Q, 3), which must be commensurate with the supercell."""
        q = np.asarray(qpoints_frac, dtype=np.float64).reshape(-1, 3)
        scaled = q * self.reps
        if np.any(np.abs(scaled - np.rint(scaled)) > 1e-6):
            bad = q[np.argmax(np.abs(scaled - np.rint(scaled)).max(1))].tolist()
            raise ValueError(
                f"q = {bad} is not commensurate with the {self.reps.tolist()} supercell of the "
                "derivatives (n·q must be integer); use a supercell whose repetitions are "
                "multiples of the q mesh."
            )
        phase = np.exp(-2j * np.pi * self.cells @ q.T)  # (C, Q)
        u = np.asarray(patterns).reshape(len(q), -1, self.values.shape[0])  # (Q, M, 3N)
        n3, total, n_cells = self.values.shape
        per_q = (self.values.reshape(-1, n_cells) @ phase).reshape(n3, total, len(q))
        return u @ per_q.transpose(2, 0, 1)  # (Q, M, 3N) @ (Q, 3N, total)


@dataclass
class QCouplings:
    """g_mnν(k, q): ``g_eV`` (Q, K, M, B, B) complex (m at k+q, n at k), ``eps_k`` (K, B),
    ``eps_kq`` (Q, K, B) eV, ``frequencies_THz`` (Q, M), ``kpoints_frac`` (K, 3),
    ``qpoints_frac`` (Q, 3)."""

    kpoints_frac: np.ndarray
    qpoints_frac: np.ndarray
    eps_k: np.ndarray
    eps_kq: np.ndarray
    frequencies_THz: np.ndarray
    g_eV: np.ndarray

    def gauge_abs(self, tol_eV: float = 1e-4, tol_THz: float = 1e-3) -> np.ndarray:
        """(Q, K, M, B, B) |g| with |g|² averaged over degenerate bands at k+q and at k and
        degenerate modes at q (module notes)."""
        g2 = np.abs(self.g_eV) ** 2
        out = np.empty(g2.shape)
        for iq, (nu, eps_kq) in enumerate(zip(self.frequencies_THz, self.eps_kq, strict=True)):
            modes = level_average(nu, tol_THz)
            for ik, eps in enumerate(self.eps_k):
                m, n = level_average(eps_kq[ik], tol_eV), level_average(eps, tol_eV)
                x = np.einsum("nm,mab->nab", modes, g2[iq, ik])
                out[iq, ik] = np.sqrt(m @ x @ n.T)
        return out


def couplings(
    layout: BlockLayout,
    h: np.ndarray,
    s: np.ndarray,
    kernel_h: DerivativeKernel,
    kernel_s: DerivativeKernel,
    kpoints_frac: np.ndarray,
    qpoints_frac: np.ndarray,
    patterns: np.ndarray,
    frequencies_THz: np.ndarray,
    bands: slice | Sequence[int] | None = None,
    q_chunk: int = 64,
) -> QCouplings:
    """g_mnν(k, q) (module notes) of the primitive H(R), S(R) (flat ``h``, ``s`` on
    ``layout``) with the derivative kernels of H and S, at K k-points and Q commensurate
    q-points for the mode ``patterns`` (Q, M, N, 3) of frequencies (Q, M) THz. ``bands``:
    bands kept for m and n (default all). Batched over k, and over q in chunks of
    ``q_chunk`` (bounds the (q, 3N, total) phase sums in memory)."""
    qpts = np.asarray(qpoints_frac, dtype=np.float64).reshape(-1, 3)
    patterns = np.asarray(patterns).reshape(len(qpts), -1, *np.shape(patterns)[-2:])
    frequencies_THz = np.asarray(frequencies_THz).reshape(len(qpts), -1)
    parts = [
        couplings_from_blocks(
            layout,
            h,
            s,
            kpoints_frac,
            qpts[sl],
            kernel_h.at(qpts[sl], patterns[sl]),
            kernel_s.at(qpts[sl], patterns[sl]),
            frequencies_THz[sl],
            bands,
        )  # fmt: skip
        for sl in (slice(a, a + q_chunk) for a in range(0, len(qpts), q_chunk))
    ]
    first = parts[0]
    return QCouplings(
        first.kpoints_frac, qpts, first.eps_k,
        np.concatenate([p.eps_kq for p in parts]), frequencies_THz,
        np.concatenate([p.g_eV for p in parts]),
    )  # fmt: skip


def couplings_from_blocks(
    layout: BlockLayout,
    h: np.ndarray,
    s: np.ndarray,
    kpoints_frac: np.ndarray,
    qpoints_frac: np.ndarray,
    dh_q: np.ndarray,
    ds_q: np.ndarray,
    frequencies_THz: np.ndarray,
    bands: slice | Sequence[int] | None = None,
) -> QCouplings:
    """`couplings` from phase-summed blocks X^q(R) already taken along the modes: ``dh_q``,
    ``ds_q`` (Q, M, total) complex (`DerivativeKernel.at`)."""
    kpts = np.asarray(kpoints_frac, dtype=np.float64).reshape(-1, 3)
    qpts = np.asarray(qpoints_frac, dtype=np.float64).reshape(-1, 3)
    space = RealSpaceMatrices(layout)
    hr, sr = space.real_space(np.asarray(h, float)), space.real_space(np.asarray(s, float))
    bands = slice(None) if bands is None else bands

    def eigen(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        eps, c = solve_batched(space.at(hr, points), space.at(sr, points))
        return eps[:, bands], c[:, :, bands]

    eps_k, c_k = eigen(kpts)
    g, eps_kq = [], []
    for iq, q in enumerate(qpts):
        e_kq, c_kq = eigen(kpts + q)
        xh = space.at(space.real_space(dh_q[iq]), kpts)  # (M, K, n, n)
        xs = space.at(space.real_space(ds_q[iq]), kpts)
        gh = np.einsum("kam,Mkab,kbn->kMmn", c_kq.conj(), xh, c_k, optimize=True)
        gs = np.einsum("kam,Mkab,kbn->kMmn", c_kq.conj(), xs, c_k, optimize=True)
        g.append(gh - gs * eps_k[:, None, None, :])
        eps_kq.append(e_kq)
    return QCouplings(kpts, qpts, eps_k, np.array(eps_kq), np.asarray(frequencies_THz), np.array(g))


@dataclass
class Kernels:
    """A primitive cell's H(R) and S(R) (flat on ``layout``) with the derivative kernels of
    both (`DerivativeKernel`): all `couplings` needs."""

    primitive: Atoms
    layout: BlockLayout
    h: np.ndarray
    s: np.ndarray
    kernel_h: DerivativeKernel
    kernel_s: DerivativeKernel

    def couplings(self, kpoints_frac, qpoints_frac, patterns, frequencies_THz, bands=None):
        """`couplings` of these matrices and kernels."""
        return couplings(
            self.layout, self.h, self.s, self.kernel_h, self.kernel_s, kpoints_frac,
            qpoints_frac, patterns, frequencies_THz, bands,
        )  # fmt: skip

    def eigenvalues(self, kpoints_frac: np.ndarray) -> np.ndarray:
        """(K, n) band energies (eV, the model's energy zero) at fractional k."""
        space = RealSpaceMatrices(self.layout)
        hr, sr = space.real_space(self.h), space.real_space(self.s)
        points = np.asarray(kpoints_frac, dtype=np.float64).reshape(-1, 3)
        return solve_batched(space.at(hr, points), space.at(sr, points))[0]


def _model_graph(model, atoms: Atoms, key: str):
    """(single-structure graph in the model's dtype, edges (E, 5) int64) at its cutoff."""
    from foundation import keys
    from foundation.data.graph import structure_to_graph

    graph = structure_to_graph(
        atoms.numbers, atoms.positions, np.asarray(atoms.cell), atoms.pbc, model.universal,
        model.cutoff_A, key=key, dtype=next(model.parameters()).dtype,
    )  # fmt: skip
    edges = np.concatenate(
        [graph[keys.EDGE_INDEX].T.numpy(), graph[keys.EDGE_SHIFT].numpy()], axis=1
    ).astype(np.int64)
    return graph, edges


def model_kernels(
    model,
    primitive: Atoms,
    reps: Sequence[int],
    *,
    head: str = "h",
    chunk_size: int | None = None,
    edge_chunk: int | None = 4096,
) -> Kernels:
    """`Kernels` of ``model`` for ``primitive`` from its supercell ``reps``: H(R) of the
    ``head`` (the model's H − μS, unknown μ) and ∂H by forward-mode autograd along the 3N
    home-cell Cartesian patterns (``chunk_size`` patterns per vectorised jvp, None = all;
    the backbone's edge work in chunks of ``edge_chunk`` edges, `model_hamiltonian_derivative`);
    S(R) and ∂S exact from the basis' two-center tables. Edges: the model's cutoff."""
    import torch

    from foundation.physics.eph import cartesian_displacements, model_hamiltonian_derivative
    from foundation.physics.kspace import orbitals_per_atom
    from foundation.physics.overlap import edge_displacements, exact_overlap
    from foundation.physics.predict import _tables, padded_to_flat

    n_orb = orbitals_per_atom(primitive.numbers, model.basis)
    graph, edges = _model_graph(model, primitive, "primitive")
    with torch.no_grad():
        h = padded_to_flat(
            model(graph)[head].double().numpy(), primitive.numbers, edges, model.universal
        )
    sc = build_supercell(primitive, reps)
    cell_sc = np.asarray(sc.cell)
    graph_sc, edges_sc = _model_graph(model, sc, "supercell")
    patterns = cartesian_displacements(len(sc), range(len(primitive)))
    with torch.no_grad():  # forward mode only: no autograd graph over the parameters
        padded = model_hamiltonian_derivative(
            model, graph_sc, patterns, [head], chunk_size, edge_chunk
        )[head]
    padded = padded.detach().double().numpy()
    dh = np.stack([padded_to_flat(x, sc.numbers, edges_sc, model.universal) for x in padded])
    tables = _tables(model, edge_displacements(sc.positions, cell_sc, edges_sc))
    s = exact_overlap(
        tables, primitive.numbers, primitive.positions, np.asarray(primitive.cell), edges
    )
    layout = BlockLayout(n_orb, edges)
    kernel_h = DerivativeKernel.from_supercell(primitive, reps, layout, sc.positions, edges_sc, dh)
    kernel_s = exact_overlap_kernel(tables, primitive, reps, layout, sc.positions, edges_sc)
    return Kernels(primitive, layout, h, s, kernel_h, kernel_s)


def exact_overlap_kernel(
    tables,
    primitive: Atoms,
    reps: Sequence[int],
    layout: BlockLayout,
    positions_sc: np.ndarray,
    edges_sc: np.ndarray,
) -> DerivativeKernel:
    """`DerivativeKernel` of the exact S (two-center ``tables``, `OverlapTables`) on the
    supercell ``reps`` of ``primitive`` with atoms at ``positions_sc`` and ``edges_sc``."""
    from foundation.physics.eph import cartesian_displacements
    from foundation.physics.overlap import exact_overlap_derivative

    reps = supercell_reps(reps)
    numbers = np.tile(primitive.numbers, int(np.prod(reps)))
    cell_sc = reps[:, None] * np.asarray(primitive.cell)
    patterns = cartesian_displacements(len(numbers), range(len(primitive)))
    ds = exact_overlap_derivative(tables, numbers, positions_sc, cell_sc, edges_sc, patterns)
    return DerivativeKernel.from_supercell(primitive, reps, layout, positions_sc, edges_sc, ds)


__all__ = [
    "DerivativeKernel",
    "Kernels",
    "QCouplings",
    "RealSpaceMatrices",
    "couplings",
    "couplings_from_blocks",
    "exact_overlap_kernel",
    "model_kernels",
    "solve_batched",
]
