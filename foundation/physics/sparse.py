"""Sparse H, S for very large cells and eigenpairs near a chosen energy (shift-invert).

* `assemble` builds H(k) or S(k) as `scipy.sparse.csr_matrix` straight from the flat
  block arrays through the same `BlockLayout` as the dense path (one COO → CSR
  conversion, duplicates = several R of the same pair summed). Memory is linear in the
  number of atoms: nothing of size N_orb² is ever allocated.
* `eigs_near` returns the eigenpairs of H c = ε S c closest to an energy σ with ARPACK in
  shift-invert mode (``scipy.sparse.linalg.eigsh(H, k, M=S, sigma=σ)``). (H − σS)⁻¹ is
  applied either by one sparse LU (`Factorization`: exact) or by MINRES (memory linear in N:
  only H, S and a few vectors), followed by a Rayleigh–Ritz step with the exact matrices.
  `scripts/bench_physics.py` measures both.
* Fill-reducing ordering (`nested_dissection_order`): H − σS of a 3-D solid is a 3-D mesh
  with a long interaction range (9 Å edges: ~160 neighbours per atom), on which minimum
  degree fills in badly. METIS nested dissection of the *atom* graph (vertex weight = the
  atom's orbital count), expanded to orbitals with each atom's orbitals kept together, is
  applied as a symmetric permutation and SuperLU factors the permuted matrix in its natural
  order, in symmetric mode (diagonal pivots preferred), so the factor stays LDLᵀ-shaped.
  Asymptotically that costs O(N²) time and O(N^{4/3}) memory for a 3-D solid (minimum
  degree: worse). Measured on Si supercells (bench_results/bench_physics.json) the 9 Å
  range keeps the separators a large part of the cell up to 10⁴ atoms: 20 eigenpairs take
  time ∝ N^2.2 and the factor's entries grow ∝ N^1.7 between 2000 and 9826 atoms; at 2000
  atoms the LU takes 0.70× the time and 0.82× the entries of minimum degree (MMD_AT_PLUS_A).
* `count_below` counts eigenvalues below σ from the inertia of H − σS (Sylvester's law:
  S positive definite ⇒ #negative pivots of the LDLᵀ of H − σS = #ε < σ; a symmetric
  permutation is a congruence, so the ordering leaves the inertia unchanged), so the Fermi
  level of an insulator can be bracketed by bisection on the electron count without any
  dense diagonalization (`fermi_level_sparse`).
* The small-system path is the dense solver, `BlochHamiltonian.eigh`; tests check the two
  agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pymetis
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from foundation.physics.kspace import BlochHamiltonian, BlockLayout, overlap_error

PIVOT_THRESHOLD = 0.01
"""Symmetric-mode SuperLU takes the diagonal pivot unless it is below this fraction of the
column's largest entry (then a row swap keeps the solve stable at slightly more fill).
`count_below` uses 0: only diagonal pivots give the inertia."""


def assemble(
    ham: BlochHamiltonian, k: Sequence[float] = (0.0, 0.0, 0.0), which: str = "h"
) -> sp.csr_matrix:
    """Sparse X(k) = Σ_R e^{2πi k·R} X(R) for ``which`` = "h" (eV) or "s"; real at Γ and
    wherever every phase is ±1, complex otherwise; hermitian part (½(X + X†)), like the dense
    path."""
    lay = ham.layout
    flat = {"h": ham.h, "s": ham.s}[which]
    if flat is None:
        return sp.identity(lay.n, format="csr")
    c, s = lay.element_phase(k)
    data = flat * c if s is None else flat * (c + 1j * s)
    m = sp.coo_matrix((data, (lay.rows, lay.cols)), shape=(lay.n, lay.n)).tocsr()
    m.sum_duplicates()
    return (0.5 * (m + m.conj().T)).tocsr()  # exact hermiticity (float32 records: ~1e-6 off)


def assemble_hs(
    ham: BlochHamiltonian, k: Sequence[float] = (0.0, 0.0, 0.0)
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(H(k), S(k)) as CSR matrices."""
    return assemble(ham, k, "h"), assemble(ham, k, "s")


def nested_dissection(graph: sp.csr_matrix, weights: np.ndarray | None = None) -> np.ndarray:
    """METIS nested-dissection ordering of an undirected graph given by the pattern of a
    symmetric sparse matrix (diagonal ignored); ``weights`` per vertex. Returns ``perm``
    (new position → old index)."""
    graph = sp.csr_matrix(graph, copy=True)
    graph.setdiag(0)
    graph.eliminate_zeros()
    graph.sort_indices()
    perm, _ = pymetis.nested_dissection(
        adjacency=pymetis.CSRAdjacency(graph.indptr, graph.indices),
        vweights=None if weights is None else np.asarray(weights, dtype=np.int64),
    )
    return np.asarray(perm, dtype=np.int64)


def nested_dissection_order(layout: BlockLayout) -> np.ndarray:
    """Fill-reducing orbital permutation (new position → old orbital) of any X(k) on this block
    layout: nested dissection of the atom graph (an edge per pair of atoms with a block, vertex
    weight = orbital count), each atom's orbitals contiguous and in their own order."""
    n_atoms = len(layout.n_orb)
    i, j = layout.edges[:, 0], layout.edges[:, 1]
    off = i != j
    ones = np.ones(int(off.sum()), dtype=np.int8)
    graph = sp.csr_matrix((ones, (i[off], j[off])), shape=(n_atoms, n_atoms))
    atoms = nested_dissection(graph + graph.T, layout.n_orb)
    counts = layout.n_orb[atoms]
    start_new = np.cumsum(counts) - counts  # first position of each atom in the new order
    within = np.arange(int(counts.sum())) - np.repeat(start_new, counts)
    return np.repeat(layout.orb_offset[atoms], counts) + within


class Factorization:
    """Sparse LU of A = H − σS after a symmetric fill-reducing permutation: P A Pᵀ = L U
    (SuperLU, natural order, symmetric mode), so A x = b is solved as x[order] = U⁻¹L⁻¹ b[order].

    ``order`` (new position → old index) defaults to the nested dissection of A's own graph
    (orbital level); pass `nested_dissection_order` of the block layout when it is known (the
    atom graph is ~n_orb² times smaller). ``pivot_threshold`` as in `PIVOT_THRESHOLD`.
    """

    def __init__(
        self,
        a: sp.spmatrix,
        order: np.ndarray | None = None,
        pivot_threshold: float = PIVOT_THRESHOLD,
    ):
        a = sp.csr_matrix(a)
        self.order = nested_dissection(a) if order is None else np.asarray(order)
        self.lu = spla.splu(
            a[self.order][:, self.order].tocsc(),
            permc_spec="NATURAL",
            diag_pivot_thresh=pivot_threshold,
            options={"SymmetricMode": True},
        )

    @property
    def diagonal_pivots(self) -> bool:
        """Whether every pivot was a diagonal entry (then U's diagonal gives the inertia)."""
        return bool(np.array_equal(self.lu.perm_r, self.lu.perm_c))

    @property
    def fill(self) -> int:
        """Entries SuperLU stores for L (supernodes, dense within) and U: the factor's memory
        is ∝ this. (``lu.L``/``lu.U`` would build copies of the factor to count them.)"""
        return int(self.lu.nnz)

    def negative_pivots(self) -> int:
        """Negative entries of U's diagonal (real parts): with `diagonal_pivots`, the number
        of negative eigenvalues of A (Sylvester). Builds a copy of U to read them."""
        return int(np.count_nonzero(self.lu.U.diagonal().real < 0))

    def solve(self, b: np.ndarray) -> np.ndarray:
        y = self.lu.solve(b[self.order])
        x = np.empty_like(y)
        x[self.order] = y
        return x


class PardisoFactorization:
    """LDLᵀ of a real symmetric indefinite A = H − σS by Intel MKL PARDISO (``pypardiso``,
    the optional ``solvers`` extra): supernodal, multithreaded, METIS ordering, half the
    storage of SuperLU's LU. A complex hermitian A = Ar + i·Ai is factored through its real
    symmetric embedding [[Ar, −Ai], [Ai, Ar]] (pypardiso is real-only), whose solution holds
    the complex one. The inertia comes free with the factor (`negative_eigenvalues`)."""

    def __init__(self, a: sp.spmatrix):
        try:
            import pypardiso
        except ImportError as exc:
            raise ImportError(
                "eig solver 'pardiso' needs pypardiso (Intel MKL, ~0.7 GB): "
                "pip install -e '.[solvers]', or choose --eig-solver superlu"
            ) from exc
        a = sp.csr_matrix(a)
        self.complex = bool(np.iscomplexobj(a.data))
        self.n = a.shape[0]
        real = sp.bmat([[a.real, -a.imag], [a.imag, a.real]]) if self.complex else a
        self.upper = sp.triu(real, format="csr")
        self.upper.sort_indices()
        self.solver = pypardiso.PyPardisoSolver(mtype=-2)  # real symmetric indefinite
        self.solver.factorize(self.upper)

    @property
    def fill(self) -> int:
        """Entries of the factor (PARDISO iparm(18))."""
        return int(self.solver.iparm[17])

    def negative_eigenvalues(self) -> int:
        """Negative eigenvalues of A from the LDLᵀ inertia (PARDISO iparm(23); the complex
        embedding doubles every eigenvalue, hence the halving)."""
        neg = int(self.solver.iparm[22])
        return neg // 2 if self.complex else neg

    def solve(self, b: np.ndarray) -> np.ndarray:
        if not self.complex:
            return self.solver.solve(self.upper, np.asarray(b, dtype=float))
        rhs = np.concatenate([b.real, b.imag])
        x = self.solver.solve(self.upper, rhs)
        return x[: self.n] + 1j * x[self.n :]


DIRECT_MAX_ORBITALS = 60_000
"""`eigs_near` solver="auto": sparse LU up to this many orbitals, MINRES beyond. Measured on
Si with 9 Å edges (bench_results/bench_physics.json, one core): 20 eigenpairs in 18 min and
8.9 GB at 39 304 orbitals, where MINRES takes ~1.5 min per solve (~135 solves: hours). The
LU's memory grows ~N^1.7 there, so it would pass 24 GB near 7·10⁴ orbitals; beyond this
bound the linear-memory MINRES is the one that fits."""


@dataclass
class Eigenpairs:
    """Eigenvalues (eV, ascending) and S-orthonormal eigenvectors (columns) near ``sigma``;
    ``residual`` = max_n ‖H c_n − ε_n S c_n‖ (eV) of the returned pairs; ``n_solves``
    applications of (H − σS)⁻¹, ``inner_iterations`` of MINRES in all, ``factor_entries``
    stored entries of the sparse LU (direct solver; its memory ∝ this)."""

    values: np.ndarray
    vectors: np.ndarray | None
    sigma: float
    k: np.ndarray
    solver: str = ""
    residual: float = float("nan")
    n_solves: int = 0
    inner_iterations: int = 0
    factor_entries: int = 0


def _shift_invert_operator(a: sp.csr_matrix, solver: str, inner_tol: float, layout: BlockLayout):
    """(H − σS)⁻¹ as a LinearOperator: sparse LU (exact; ordered by nested dissection of the
    atom graph of ``layout``) or MINRES (memory linear in N).
    Returns (operator, counts) with counts = [applications, MINRES iterations, stored entries
    of the LU factor (0 for MINRES)]."""
    counts = [0, 0, 0]
    n = a.shape[0]
    if solver in ("superlu", "pardiso"):
        lu = (
            Factorization(a, nested_dissection_order(layout))
            if solver == "superlu"
            else PardisoFactorization(a)
        )
        counts[2] = lu.fill

        def solve(b: np.ndarray) -> np.ndarray:
            counts[0] += 1
            return lu.solve(b)

        return spla.LinearOperator(a.shape, matvec=solve, dtype=a.dtype), counts
    # scipy's MINRES is for real symmetric matrices; a complex hermitian A = Ar + i·Ai is
    # solved through the real symmetric embedding [[Ar, −Ai], [Ai, Ar]].
    real = (
        a if not np.iscomplexobj(a.data) else sp.bmat([[a.real, -a.imag], [a.imag, a.real]]).tocsr()
    )

    def tick(_):
        counts[1] += 1

    def solve(b: np.ndarray) -> np.ndarray:
        counts[0] += 1
        rhs = b if real is a else np.concatenate([b.real, b.imag])
        x, info = spla.minres(real, rhs, rtol=inner_tol, maxiter=20 * n, callback=tick)
        if info != 0:
            raise RuntimeError(f"MINRES did not converge for (H − σS)x = b (info {info}).")
        return x if real is a else x[:n] + 1j * x[n:]

    return spla.LinearOperator(a.shape, matvec=solve, dtype=a.dtype), counts


def eigs_near(
    ham: BlochHamiltonian,
    sigma: float,
    n: int = 20,
    k: Sequence[float] = (0.0, 0.0, 0.0),
    *,
    vectors: bool = True,
    which: str = "LM",
    solver: str = "auto",
    tol: float = 1e-10,
    inner_tol: float = 1e-9,
    matrices: tuple[sp.spmatrix, sp.spmatrix] | None = None,
) -> Eigenpairs:
    """The ``n`` eigenpairs of H(k) c = ε S(k) c closest to ``sigma`` (eV).

    ``solver`` (`EIG_SOLVERS`; bench_results/bench_physics.json compares them):
    "pardiso" — ARPACK shift-invert (``eigsh(H, M=S, sigma=σ, OPinv=(H − σS)⁻¹)``) with the
    inverse from MKL PARDISO's LDLᵀ (`PardisoFactorization`, optional extra); "superlu" — the
    same with SciPy's SuperLU (`Factorization`, nested-dissection order); "iterative" — the
    same with MINRES to ``inner_tol`` (memory linear in N); "primme" — PRIMME's Davidson/JD
    targeting σ with no factorization (optional extra); "chebyshev" — Chebyshev-filtered
    subspace iteration (`foundation.physics.kpm.filtered_eigs_near`, no factorization);
    "auto" — `choose_eig_solver`. For the shift-invert solvers the Ritz vectors are refined by
    one Rayleigh–Ritz step with the exact H, S, so inexact inner solves cost accuracy only at
    second order; the worst residual is returned.
    ``which`` acts on ν = 1/(ε − σ): "LM" the n nearest σ, "BE" n/2 below and n/2 above
    (shift-invert solvers only).
    A non-positive-definite S raises `OverlapError` (smallest eigenvalue of S by Lanczos).
    """
    h, s = assemble_hs(ham, k) if matrices is None else matrices
    n = min(n, h.shape[0] - 1)
    if solver == "auto":
        solver = choose_eig_solver(h.shape[0])
    if solver not in EIG_SOLVERS:
        raise ValueError(f"unknown eig solver {solver!r}; choose one of {', '.join(EIG_SOLVERS)}")
    if solver in ("primme", "chebyshev"):
        return _eigs_near_unfactored(h, s, sigma, n, k, solver, tol, vectors, ham.key)
    op_inv, counts = _shift_invert_operator((h - sigma * s).tocsr(), solver, inner_tol, ham.layout)
    rng = np.random.default_rng(0)  # a fixed start vector: reproducible Lanczos runs
    v0 = rng.normal(size=h.shape[0])
    if np.iscomplexobj(h.data):
        v0 = v0 + 1j * rng.normal(size=h.shape[0])
    try:
        w, v = spla.eigsh(h, k=n, M=s, sigma=sigma, which=which, OPinv=op_inv, tol=tol, v0=v0)
    except (spla.ArpackError, spla.ArpackNoConvergence, ValueError) as exc:
        s_min = smallest_overlap_eigenvalue(s)
        if s_min <= 0:
            raise overlap_error(f"ARPACK: {exc}", k, s_min, ham.key) from None
        raise
    # Rayleigh–Ritz with the exact matrices on the Ritz vectors.
    hv, sv = h @ v, s @ v
    hs = v.conj().T @ hv
    ss = v.conj().T @ sv
    try:
        w, y = scipy.linalg.eigh(0.5 * (hs + hs.conj().T), 0.5 * (ss + ss.conj().T))
    except np.linalg.LinAlgError:  # Ritz vectors with cᵀSc ≤ 0: S is not positive definite
        raise overlap_error(
            "Ritz vectors not S-normalizable", k, smallest_overlap_eigenvalue(s), ham.key
        ) from None
    v, hv, sv = v @ y, hv @ y, sv @ y
    residual = float(np.max(np.linalg.norm(hv - sv * w, axis=0)))
    return Eigenpairs(
        w, v if vectors else None, float(sigma), np.asarray(k, float), solver, residual, *counts
    )


EIG_SOLVERS = ("auto", "pardiso", "superlu", "iterative", "primme", "chebyshev")
"""Names accepted by `eigs_near` and ``foundation-predict --eig-solver``."""


def pardiso_available() -> bool:
    """Whether the optional pypardiso (Intel MKL PARDISO) is installed."""
    import importlib.util

    return importlib.util.find_spec("pypardiso") is not None


PARDISO_MIN_ORBITALS = 6_000
"""`choose_eig_solver`: PARDISO from this many orbitals on (when installed). Measured for 20
pairs on Si (bench_results/bench_physics.json, busy 2-core machine): 2 016 orbitals SuperLU
2.0 s vs PARDISO 29 s (each of PARDISO's ~130 solves costs ~0.06 s of fixed overhead through
pypardiso and MKL threading, more than the whole LU); 8 000 orbitals SuperLU 45 s vs PARDISO
36 s, with half the factor entries (2.3e7 vs 4.8e7)."""


def choose_eig_solver(n_orbitals: int) -> str:
    """The solver "auto" picks: SuperLU for small matrices, PARDISO (when installed) from
    `PARDISO_MIN_ORBITALS` up to `DIRECT_MAX_ORBITALS`, MINRES beyond (memory linear in N)."""
    if n_orbitals > DIRECT_MAX_ORBITALS:
        return "iterative"
    if n_orbitals >= PARDISO_MIN_ORBITALS and pardiso_available():
        return "pardiso"
    return "superlu"


def _eigs_near_unfactored(h, s, sigma, n, k, solver, tol, vectors, source) -> Eigenpairs:
    """`eigs_near` by PRIMME or Chebyshev filtering (neither factorizes H − σS)."""
    if solver == "chebyshev":
        from foundation.physics.kpm import filtered_eigs_near

        r = filtered_eigs_near(h, s, sigma, n, tol=max(tol, 1e-9) * 100, k=k, source=source)
        w, v, counts = r.values, r.vectors, (r.iterations, r.s_iterations, 0)
    else:
        try:
            import primme
        except ImportError as exc:
            raise ImportError(
                "eig solver 'primme' needs the primme package (built from source against "
                "system BLAS/LAPACK: apt-get install liblapack-dev libblas-dev; pip install primme)"
            ) from exc
        w, v, stats = primme.eigsh(h, k=n, M=s, which=sigma, tol=tol, return_stats=True,
                                   maxMatvecs=1_000_000)  # fmt: skip
        order = np.argsort(w)
        w, v = w[order], v[:, order]
        counts = (int(stats["numMatvecs"]), 0, 0)
    residual = float(np.max(np.linalg.norm(h @ v - (s @ v) * w, axis=0)))
    return Eigenpairs(
        w, v if vectors else None, float(sigma), np.asarray(k, float), solver, residual, *counts
    )


def smallest_overlap_eigenvalue(s: sp.spmatrix) -> float:
    """Smallest eigenvalue of a sparse S by Lanczos (no dense matrix)."""
    if s.shape[0] < 200:
        return float(np.linalg.eigvalsh(s.toarray())[0])
    w = spla.eigsh(s, k=1, which="SA", tol=1e-6, return_eigenvectors=False)
    return float(w[0])


def count_below(
    h: sp.spmatrix, s: sp.spmatrix, sigma: float, order: np.ndarray | None = None
) -> int:
    """Number of eigenvalues of H c = ε S c below ``sigma`` (Sylvester inertia of H − σS).

    ``order``: fill-reducing permutation as in `Factorization` (default: nested dissection
    of the matrix graph). Raises RuntimeError if SuperLU had to pivot off the diagonal (then
    the pivots do not give the inertia); move sigma slightly and retry.
    """
    lu = Factorization(h - sigma * s, order, pivot_threshold=0.0)
    if not lu.diagonal_pivots:
        raise RuntimeError(f"off-diagonal pivoting at σ = {sigma:.6f} eV; inertia unavailable.")
    return lu.negative_pivots()


def fermi_level_sparse(
    ham: BlochHamiltonian,
    n_electrons: float | None = None,
    *,
    window: tuple[float, float] | None = None,
    tol_eV: float = 0.02,
    matrices: tuple[sp.spmatrix, sp.spmatrix] | None = None,
    max_steps: int = 40,
) -> dict:
    """Γ-point Fermi level of a large cell by inertia bisection, then the band edges.

    Bisect σ until the count of eigenvalues below σ equals the number of occupied bands
    (n_electrons / 2, spin-degenerate) or the bracket is narrower than ``tol_eV``; then one
    shift-invert solve at σ gives the highest occupied and lowest unoccupied levels. For an
    insulator E_F = midgap (VBM + CBM)/2, as in `foundation.physics.bands.fermi_level`.
    Each bisection step is one sparse LU (nested-dissection order, shared by all steps):
    seconds at 4·10³ orbitals, while at 4·10⁴ one LU and its ~135 solves in `eigs_near` took
    18 min on one core (bench_results/bench_physics.json); for the largest cells pass the
    energy of interest to `eigs_near` directly (one LU).
    """
    n_el = ham.n_electrons if n_electrons is None else float(n_electrons)
    if n_el is None:
        raise ValueError(f"{ham.key}: electron count unknown; pass n_electrons.")
    n_occ = n_el / 2.0
    h, s = assemble_hs(ham) if matrices is None else matrices
    order = nested_dissection_order(ham.layout)
    if window is None:  # Gershgorin bounds of S⁻¹H are loose; use the extreme Lanczos values
        lo = float(spla.eigsh(h, k=1, M=s, which="SA", tol=1e-3, return_eigenvectors=False)[0])
        hi = float(spla.eigsh(h, k=1, M=s, which="LA", tol=1e-3, return_eigenvectors=False)[0])
        lo, hi = lo - 1.0, hi + 1.0
    else:
        lo, hi = window
    steps = 0
    while hi - lo > tol_eV and steps < max_steps:
        mid = 0.5 * (lo + hi)
        steps += 1
        try:
            c = count_below(h, s, mid, order)
        except RuntimeError:
            mid += 1e-3 * (hi - lo)
            c = count_below(h, s, mid, order)
        if c < n_occ:
            lo = mid
        elif c > n_occ:
            hi = mid
        else:
            lo = hi = mid
            break
    sigma = 0.5 * (lo + hi)
    w = eigs_near(ham, sigma, n=8, vectors=False, which="BE", matrices=(h, s)).values
    below = count_below(h, s, sigma, order)
    out = {"sigma_eV": sigma, "bisection_steps": steps, "n_below_sigma": below}
    if below == n_occ and (w < sigma).any() and (w > sigma).any():
        vbm, cbm = float(w[w < sigma].max()), float(w[w > sigma].min())
        out |= {
            "vbm_eV": vbm,
            "cbm_eV": cbm,
            "gap_eV": cbm - vbm,
            "fermi_level_eV": 0.5 * (vbm + cbm),
        }
        out["convention"] = "Γ only; E_F = midgap (VBM + CBM)/2"
    else:
        out |= {"fermi_level_eV": sigma, "convention": f"Γ only; centre of a {tol_eV:g} eV bracket"}
    return out
