"""Bloch sums H(k), S(k) of real-space blocks and the generalized eigenproblem H c = ε S c.

Conventions (DESIGN.md §3, §7):

* k is **fractional**, in the basis of the reciprocal vectors of the cell the blocks belong
  to (k·R is then just the dot product of two triples; no 2π, no Cartesian vectors).
* Edge e = (i, j, R) holds X_ij(R) = ⟨φ_i(r−τ_i)|X|φ_j(r−τ_j−R·cell)⟩ and
  X(k)[i, j] = Σ_R e^{2πi k·R} X_ij(R). The phase carries R only (no τ_j − τ_i): the
  eigenvalues do not depend on that gauge choice, the eigenvectors do.
* Energies in eV. A `HamiltonianRecord` stores H − μS; `BlochHamiltonian.from_record`
  restores μ (``record.absolute_h()``) so eigenvalues are on the DFT code's energy scale.

The flat block layout of records (blocks concatenated in edge order, each row-major) is
mapped once onto (row, column) orbital indices (`BlockLayout`); every H(k) is then one
vectorised scatter (`numpy.bincount`) with no Python loop over edges, and the same layout
feeds the sparse assembly in `foundation.physics.sparse`.

`bloch_matrices` and `generalized_eigvalsh` are the batched, differentiable torch version of
the same conventions on collated graph batches (padded universal blocks), for band-space
losses (`foundation.train.band_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.linalg
import torch

from foundation import keys
from foundation.basis import BasisSet
from foundation.data.record import HamiltonianRecord


class OverlapError(ValueError):
    """S(k) is not positive definite: the message names the k-point, the smallest
    eigenvalue of S(k) and the likely causes."""


def overlap_error(where: str, k: np.ndarray, s_min: float, source: str = "") -> OverlapError:
    """The one wording of a non-positive-definite overlap, used by the dense and sparse paths."""
    k = np.asarray(k, dtype=float).reshape(3)
    return OverlapError(
        f"{source + ': ' if source else ''}S(k) at k = ({k[0]:.4f}, {k[1]:.4f}, {k[2]:.4f}) "
        f"(fractional) is not positive definite: smallest eigenvalue {s_min:.3g} ({where}). "
        "Likely causes: the edge cutoff truncates overlap blocks that are not yet small "
        "(use the cutoff the data were generated with, or a larger one); blocks in a different "
        "basis or orbital order than `numbers`/basis say (inconsistent basis); or a predicted S "
        "that is not accurate enough (use the exact overlap, foundation-predict --overlap exact)."
    )


def orbitals_per_atom(numbers: Sequence[int], basis: BasisSet | Sequence[int]) -> np.ndarray:
    """(N,) orbital count of each atom from a `BasisSet` or from explicit per-atom counts."""
    if isinstance(basis, BasisSet):
        return basis.n_orb_array(numbers)
    n = np.asarray(basis, dtype=np.int64).reshape(-1)
    if n.shape[0] != len(numbers):
        raise ValueError(f"{n.shape[0]} orbital counts for {len(numbers)} atoms.")
    return n


@dataclass
class BlockLayout:
    """Where each element of a flat block array lands in the (n_orb_total)² orbital matrix.

    ``rows[t]``, ``cols[t]`` are the global orbital indices of flat element t, ``edge_of[t]``
    its edge (all int32 or int64, length = total block size). Built vectorised, grouping
    edges by block shape (a handful of element-pair kinds), never looping over edges.
    """

    n_orb: np.ndarray
    edges: np.ndarray
    rows: np.ndarray = field(init=False, repr=False)
    cols: np.ndarray = field(init=False, repr=False)
    edge_of: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.n_orb = np.asarray(self.n_orb, dtype=np.int64).reshape(-1)
        self.edges = np.asarray(self.edges).reshape(-1, 5).astype(np.int64, copy=False)
        ni = self.n_orb[self.edges[:, 0]]
        nj = self.n_orb[self.edges[:, 1]]
        sizes = ni * nj
        self.block_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.orb_offset = np.concatenate([[0], np.cumsum(self.n_orb)]).astype(np.int64)
        total = int(self.block_offsets[-1])
        itype = np.int32 if max(total, self.n) < 2**31 - 1 else np.int64
        self.rows = np.empty(total, dtype=itype)
        self.cols = np.empty(total, dtype=itype)
        self.edge_of = np.empty(total, dtype=itype)
        shape_id = ni * (int(self.n_orb.max(initial=0)) + 1) + nj
        for sid in np.unique(shape_id):
            es = np.flatnonzero(shape_id == sid)
            a, b = int(ni[es[0]]), int(nj[es[0]])
            loc = np.arange(a * b)
            flat = self.block_offsets[es][:, None] + loc  # (Es, a·b) positions in flat arrays
            self.rows[flat] = self.orb_offset[self.edges[es, 0]][:, None] + loc // b
            self.cols[flat] = self.orb_offset[self.edges[es, 1]][:, None] + loc % b
            self.edge_of[flat] = es[:, None]

    @property
    def n(self) -> int:
        """Total number of orbitals (matrix dimension)."""
        return int(self.n_orb.sum())

    @property
    def size(self) -> int:
        """Total number of block elements (length of a flat block array)."""
        return int(self.block_offsets[-1])

    @property
    def shifts(self) -> np.ndarray:
        return self.edges[:, 2:5]

    def edge_phases(self, k: np.ndarray) -> np.ndarray:
        """(E,) 2π k·R for one fractional k."""
        return 2.0 * np.pi * (self.shifts @ np.asarray(k, dtype=np.float64).reshape(3))

    def element_phase(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(cos, sin) of 2π k·R per flat element, or None when every phase is real (±1)."""
        ph = self.edge_phases(k)
        c, s = np.cos(ph), np.sin(ph)
        if np.all(np.abs(s) < 1e-12):  # Γ, zone-boundary points of time-reversal pairs
            return np.rint(c)[self.edge_of], None
        return c[self.edge_of], s[self.edge_of]

    def check_values(self, flat: np.ndarray, name: str) -> np.ndarray:
        flat = np.asarray(flat, dtype=np.float64).reshape(-1)
        if flat.size != self.size:
            raise ValueError(
                f"'{name}' holds {flat.size} values but {len(self.edges)} edges with these "
                f"orbital counts need {self.size}: wrong basis or truncated blocks."
            )
        return flat

    @cached_property
    def _linear_index(self) -> np.ndarray:
        return self.rows.astype(np.int64) * self.n + self.cols

    def dense(self, flat: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Dense X(k) = Σ_R e^{2πi k·R} X(R) (real array when all phases are real), hermitian
        part ½(X + X†): float32-stored records are hermitian only to ~1e-6."""
        n = self.n
        lin = self._linear_index
        c, s = self.element_phase(k)
        x = np.bincount(lin, weights=flat * c, minlength=n * n).reshape(n, n)
        if s is not None:
            x = x + 1j * np.bincount(lin, weights=flat * s, minlength=n * n).reshape(n, n)
        return 0.5 * (x + x.conj().T)


def flatten_blocks(blocks: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Flat float64 array from a flat array or from a list of per-edge 2-D blocks."""
    if isinstance(blocks, np.ndarray) and blocks.ndim == 1:
        return blocks.astype(np.float64, copy=False)
    if len(blocks) == 0:
        return np.zeros(0)
    return np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1) for b in blocks])


def solve_generalized(
    h: np.ndarray,
    s: np.ndarray | None,
    k: np.ndarray = (0.0, 0.0, 0.0),
    *,
    vectors: bool = False,
    source: str = "",
):
    """Eigenvalues (ascending, eV) [and eigenvectors] of H c = ε S c at one k-point.

    A non-positive-definite S raises `OverlapError` (k-point, smallest eigenvalue of S(k),
    likely causes) instead of returning NaNs.
    """
    try:
        out = scipy.linalg.eigh(h, s, eigvals_only=not vectors, check_finite=False)
    except np.linalg.LinAlgError as exc:
        if s is None:
            raise
        s_min = float(scipy.linalg.eigvalsh(s, check_finite=False)[0])
        raise overlap_error(f"LAPACK: {exc}".split(". ")[0], k, s_min, source) from None
    w = out[0] if vectors else out
    if not np.all(np.isfinite(w)):
        s_min = float(scipy.linalg.eigvalsh(s)[0]) if s is not None else float("nan")
        raise overlap_error("non-finite eigenvalues", k, s_min, source)
    return out


class BlochHamiltonian:
    """Real-space H(R), S(R) blocks of one structure, evaluated and diagonalized at any k.

    Build with `from_record` (DFT or predicted records; restores the energy zero μ) or
    `from_arrays` (numbers + basis or per-atom orbital counts, edges (E, 5), flat or per-edge
    blocks of the *absolute* H in eV and of S). ``s=None`` means an orthonormal basis.
    Structure fields (positions, cell, pbc, n_electrons) are optional; band paths and the
    Fermi level use them.
    """

    def __init__(
        self,
        numbers: Sequence[int],
        basis: BasisSet | Sequence[int],
        edges: np.ndarray,
        h: np.ndarray | Sequence[np.ndarray],
        s: np.ndarray | Sequence[np.ndarray] | None,
        *,
        positions: np.ndarray | None = None,
        cell: np.ndarray | None = None,
        pbc: Sequence[bool] = (True, True, True),
        n_electrons: float | None = None,
        key: str = "",
    ):
        self.numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
        self.layout = BlockLayout(orbitals_per_atom(self.numbers, basis), edges)
        self.key = key
        self.h = self.layout.check_values(flatten_blocks(h), f"{key} h".strip())
        self.s = (
            None if s is None else self.layout.check_values(flatten_blocks(s), f"{key} s".strip())
        )
        self.positions = None if positions is None else np.asarray(positions, float).reshape(-1, 3)
        self.cell = None if cell is None else np.asarray(cell, float).reshape(3, 3)
        self.pbc = np.asarray(pbc, dtype=bool).reshape(3)
        self.n_electrons = None if n_electrons is None else float(n_electrons)

    @classmethod
    def from_record(cls, record: HamiltonianRecord) -> BlochHamiltonian:
        """From a record; H gets its energy zero μ back (``record.absolute_h()``)."""
        ne = record.meta.get(keys.N_ELECTRONS)
        return cls(
            record.numbers,
            record.basis,
            record.edges,
            record.absolute_h(),
            None if record.s is None else record.s,
            positions=record.positions,
            cell=record.cell,
            pbc=record.pbc,
            n_electrons=None if ne is None else float(ne),
            key=record.key,
        )

    # ------------------------------------------------------------------ matrices
    @property
    def n_orb(self) -> int:
        return self.layout.n

    @cached_property
    def atoms(self):
        """The structure as `ase.Atoms` (needs positions and cell)."""
        from ase import Atoms

        if self.positions is None or self.cell is None:
            raise ValueError(f"{self.key or 'BlochHamiltonian'}: no positions/cell given.")
        return Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)

    def hk(self, k: Sequence[float]) -> np.ndarray:
        """Dense H(k) (eV); real when all phases e^{2πi k·R} are real (e.g. Γ)."""
        return self.layout.dense(self.h, k)

    def sk(self, k: Sequence[float]) -> np.ndarray:
        """Dense S(k) (identity for an orthonormal basis)."""
        if self.s is None:
            return np.eye(self.n_orb)
        return self.layout.dense(self.s, k)

    def supercell(self, reps: Sequence[int]) -> BlochHamiltonian:
        """The same Hamiltonian on a diagonal supercell reps[0]×reps[1]×reps[2] (vectorised).

        Atom c·N + i of the supercell is atom i of the cell shifted by the integer triple c
        (c in C order over reps). Edge (i, j, R) from cell c ends in cell c + R = wrapped
        + reps·R', so it becomes (c·N + i, wrapped·N + j, R'). The supercell's Γ spectrum is
        the union of this one's spectra at k = m / reps (band folding); tests use that.
        """
        reps = np.asarray(reps, dtype=np.int64).reshape(3)
        if np.any(reps < 1):
            raise ValueError(f"supercell repetitions must be ≥ 1, got {reps.tolist()}.")
        n_atoms, edges = len(self.numbers), self.layout.edges
        cells = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), -1).reshape(
            -1, 3
        )
        target = cells[:, None, :] + edges[None, :, 2:5]  # (C, E, 3)
        wrapped, r_new = np.mod(target, reps), np.floor_divide(target, reps)
        flat_cell = lambda c: (c[..., 0] * reps[1] + c[..., 1]) * reps[2] + c[..., 2]  # noqa: E731
        big_edges = np.concatenate(
            [
                (flat_cell(cells)[:, None] * n_atoms + edges[None, :, 0])[..., None],
                (flat_cell(wrapped) * n_atoms + edges[None, :, 1])[..., None],
                r_new,
            ],
            axis=-1,
        ).reshape(-1, 5)
        nc = len(cells)
        cell = None if self.cell is None else reps[:, None] * self.cell
        positions = None
        if self.positions is not None and self.cell is not None:
            positions = (cells @ self.cell)[:, None, :] + self.positions[None]
        return BlochHamiltonian(
            np.tile(self.numbers, nc),
            np.tile(self.layout.n_orb, nc),
            big_edges,
            np.tile(self.h, nc),
            None if self.s is None else np.tile(self.s, nc),
            positions=None if positions is None else positions.reshape(-1, 3),
            cell=cell,
            pbc=self.pbc,
            n_electrons=None if self.n_electrons is None else self.n_electrons * nc,
            key=f"{self.key}×{'x'.join(map(str, reps.tolist()))}",
        )

    # ------------------------------------------------------------------ eigenproblem
    def eigh(self, k: Sequence[float], vectors: bool = False):
        """Eigenvalues (eV, ascending) [and eigenvectors] at one fractional k."""
        s = None if self.s is None else self.sk(k)
        return solve_generalized(self.hk(k), s, k, vectors=vectors, source=self.key)

    def eigenvalues(self, kpts: np.ndarray, progress: bool = False) -> np.ndarray:
        """(nk, n_orb) eigenvalues in eV at fractional k-points (nk, 3)."""
        kpts = np.asarray(kpts, dtype=np.float64).reshape(-1, 3)
        it = range(len(kpts))
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="diagonalize H(k)", unit="k")
        out = np.empty((len(kpts), self.n_orb))
        for n in it:
            out[n] = self.eigh(kpts[n])
        return out


# --------------------------------------------------------------------------- batched torch path
def bloch_matrices(
    blocks: torch.Tensor,
    edge_index: torch.Tensor,
    edge_shift: torch.Tensor,
    atom_orbitals: torch.Tensor,
    atom_structure: torch.Tensor,
    kpts: torch.Tensor,
    pad_diagonal: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense X(k) = Σ_R e^{2πi k·R} X(R) of every structure of a collated batch (torch,
    differentiable w.r.t. ``blocks``), in complex128.

    Args:
        blocks: (E, n_uni, n_uni) padded blocks in the universal basis (any float dtype;
            entries outside the atoms' orbital masks are ignored).
        edge_index: (2, E) batch-global atom indices (i, j); edge_shift: (E, 3) integer R.
        atom_orbitals: (N, n_uni) bool, the real orbitals of each atom (element mask).
        atom_structure: (N,) structure index of each atom (``keys.BATCH``), sorted.
        kpts: (B, nk, 3) fractional k-points per structure (same convention as
            `BlockLayout.dense`: the phase carries R only).
        pad_diagonal: value on the diagonal of the padding rows/columns of structures with
            fewer orbitals than the largest (e.g. 1 for S; a large energy for H so that the
            padding eigenvalues sort above every real one).

    Returns:
        (X, n_orb): X (B, nk, n_max, n_max) complex128 hermitian part ½(X + X†) (like
        `BlockLayout.dense`), a structure's orbitals in atom order, each atom's real orbitals
        in universal-slot order; n_orb (B,) long, the real orbital count of each structure.
    """
    device = blocks.device
    n_struct, nk = kpts.shape[0], kpts.shape[1]
    atom_orbitals = atom_orbitals.to(device=device, dtype=torch.bool)
    counts = atom_orbitals.sum(1)  # (N,)
    n_orb = torch.zeros(n_struct, dtype=torch.long, device=device).index_add_(
        0, atom_structure, counts
    )
    first_orbital = torch.cumsum(counts, 0) - counts  # batch-global offset of each atom
    structure_start = torch.cumsum(n_orb, 0) - n_orb
    local = first_orbital - structure_start[atom_structure]  # offset inside its structure
    position = local[:, None] + torch.cumsum(atom_orbitals.long(), 1) - 1  # (N, n_uni)
    n_max = int(n_orb.max()) if n_struct else 0

    src, dst = edge_index[0], edge_index[1]
    edge, p, q = torch.nonzero(
        atom_orbitals[src][:, :, None] & atom_orbitals[dst][:, None, :], as_tuple=True
    )
    values = blocks[edge, p, q].to(torch.float64)  # (M,)
    structure = atom_structure[src[edge]]  # (M,)
    k_of_entry = kpts.to(torch.float64)[structure]  # (M, nk, 3)
    shift = edge_shift[edge].to(torch.float64)  # (M, 3)
    phase = 2.0 * torch.pi * torch.einsum("mkx,mx->mk", k_of_entry, shift)  # (M, nk)
    row, col = position[src[edge], p], position[dst[edge], q]
    k_index = torch.arange(nk, device=device)
    flat = ((structure[:, None] * nk + k_index) * n_max + row[:, None]) * n_max + col[:, None]
    size = n_struct * nk * n_max * n_max
    zeros = torch.zeros(size, dtype=torch.float64, device=device)
    real = zeros.index_add(0, flat.reshape(-1), (values[:, None] * torch.cos(phase)).reshape(-1))
    imag = zeros.index_add(0, flat.reshape(-1), (values[:, None] * torch.sin(phase)).reshape(-1))
    x = torch.complex(real, imag).reshape(n_struct, nk, n_max, n_max)
    x = 0.5 * (x + x.transpose(-1, -2).conj())
    padding = torch.arange(n_max, device=device)[None, :] >= n_orb[:, None]  # (B, n_max)
    if pad_diagonal != 0.0 and bool(padding.any()):
        diagonal = padding.to(torch.float64) * pad_diagonal
        x = x + torch.diag_embed(diagonal.to(x.dtype))[:, None]
    return x, n_orb


def generalized_eigvalsh(
    h: torch.Tensor, s: torch.Tensor, kpts: torch.Tensor | None = None
) -> torch.Tensor:
    """Ascending eigenvalues of H c = ε S c for batches of hermitian matrices (torch).

    Reduced to a standard problem through the Cholesky factor S = L L†: ε = eigvalsh(L⁻¹ H
    L⁻†). Differentiable w.r.t. ``h`` (and ``s``); the gradient of eigenvalues alone is
    V diag(∂ε) V†, finite at degenerate eigenvalues (no 1/(ε_m − ε_n) terms).

    Args:
        h: (..., n, n) hermitian; its batch shape may have extra leading axes over that of
            ``s`` (e.g. predicted and reference H stacked against one S: one Cholesky).
        s: (..., n, n) hermitian positive definite.
        kpts: (..., 3) fractional k of each matrix of ``s``, only for the error message.

    Raises:
        OverlapError: S is not positive definite (names the first failing matrix, its k and
            the smallest eigenvalue of that S).
    """
    chol, info = torch.linalg.cholesky_ex(s)
    if bool((info != 0).any()):
        bad = tuple(int(i) for i in torch.nonzero(info)[0])
        s_min = float(torch.linalg.eigvalsh(s[bad])[0])
        k = np.zeros(3) if kpts is None else kpts[bad].detach().cpu().double().numpy()
        raise overlap_error("torch Cholesky", k, s_min, f"batch matrix {list(bad)}")
    half = torch.linalg.solve_triangular(chol, h, upper=False)  # L⁻¹ H
    a = torch.linalg.solve_triangular(chol, half.transpose(-1, -2).conj(), upper=False)
    return torch.linalg.eigvalsh(0.5 * (a + a.transpose(-1, -2).conj()))
