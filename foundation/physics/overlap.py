"""Exact overlaps S_ij(R) from two-center integral tables of the basis: O(N), no DFT.

S_ij(R) = ⟨φ_i(r − τ_i)|φ_j(r − τ_j − R·cell)⟩ depends only on the two elements and the bond
vector d = τ_j + R·cell − τ_i. With d along +z (the *bond frame*) and real spherical
harmonics, the block is diagonal in m, so each element pair needs only a few radial
functions s(r). They are computed once per pair of a PySCF basis (two-atom integrals of the
contracted Gaussians, `pyscf.gto.intor_cross`, on a uniform grid of ``step_A``), fitted by
quintic splines (interpolation error measured at the interval midpoints against PySCF and
stored with the table), and cached on disk under a content hash of the basis (npz + json).

For an edge the block is D_A(R_d) S_bond(|d|) D_B(R_d)ᵀ, with R_d ẑ = d̂ and the per-shell
Wigner-D matrices of the model (`foundation.model.so2.EdgeFrames`). Evaluation is torch,
vectorised over edges in chunks, so dS/du of a displacement pattern is a forward-mode
derivative (`exact_overlap_derivative`) of the same code: analytic in the spline.

Why: S is known exactly from the basis at no DFT cost; a learned S moves bands through the
generalized eigenproblem, and PySCF's own cell integrals (`--overlap analytic`) are dense
per lattice translation, unusable at 10⁴ atoms.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from foundation.basis import BasisSet, convention
from foundation.model.so2 import EdgeFrames, wigner_size
from foundation.rotations import to_e3nn_frame

log = logging.getLogger(__name__)

TABLE_VERSION = 3
SPLINE_ORDER = 5
DEFAULT_STEP_A = 0.01
MIN_RMAX_A = 10.0  # tables reach at least this far (whole Å above the longest edge)
OFF_DIAGONAL_TOL = 1e-12  # |S| allowed between different m in the bond frame
NEGLIGIBLE = 1e-15  # tables end where every |S| entry stays below this (S = 0 beyond)


class OverlapError(ValueError):
    """The overlap cannot be computed exactly (basis unknown to PySCF, edge beyond the table)."""


def cache_root() -> Path:
    """``$FOUNDATION_CACHE_DIR`` or ``~/.cache/foundation``; tables live in ``overlap/``."""
    root = os.environ.get("FOUNDATION_CACHE_DIR") or Path.home() / ".cache" / "foundation"
    return Path(root) / "overlap"


@functools.cache
def _pyscf_shells(basis_name: str, symbol: str) -> list:
    """PySCF's contracted-Gaussian data of one element (JSON-able nested lists; read once
    per process: every table build and content hash needs it; callers do not mutate it)."""
    from pyscf import gto

    try:
        return gto.basis.load(basis_name, symbol)
    except Exception as exc:  # PySCF raises several types for a missing basis
        raise OverlapError(
            f"Cannot integrate the basis {basis_name!r} for {symbol}: PySCF does not know its "
            f"radial functions ({exc}). Data read from DeePTB/ABACUS folders carry numerical "
            "orbitals we do not have; use the learned S head instead (--overlap model)."
        ) from None


def can_integrate(basis: BasisSet) -> bool:
    """Whether PySCF knows ``basis`` by name with the registry's shells for every element:
    then S is computed exactly here and need not be learned."""
    try:
        return BasisSet.from_pyscf(basis.name, basis.elements).shells == basis.shells
    except (ValueError, RuntimeError):
        return False


def _molecule(basis_name: str, symbol: str, z_A: np.ndarray):
    """A PySCF Mole of ``symbol`` atoms at (0, 0, z) Å (only used for integrals)."""
    from pyscf import gto

    mol = gto.Mole()
    mol.atom = [(symbol, (0.0, 0.0, float(z))) for z in z_A]
    mol.basis = {symbol: _pyscf_shells(basis_name, symbol)}
    mol.unit = "A"
    mol.verbose = 0
    mol.spin = (gto.charge(symbol) * len(z_A)) % 2
    mol.build()
    return mol


def _bond_frame_blocks(basis: BasisSet, a: str, b: str, r_A: np.ndarray) -> np.ndarray:
    """(len(r), n_a, n_b) package-order S blocks with B at (0, 0, r) from A at the origin."""
    from pyscf import gto

    mol_a = _molecule(basis.name, a, np.zeros(1))
    mol_b = _molecule(basis.name, b, r_A)
    for mol, el in ((mol_a, a), (mol_b, b)):
        ls = [int(mol.bas_angular(s)) for s in range(mol.nbas) for _ in range(mol.bas_nctr(s))]
        if tuple(ls[: len(basis.shells_of(el))]) != basis.shells_of(el):
            raise OverlapError(
                f"PySCF's basis {basis.name!r} gives {el} the shells {ls}, the registry says "
                f"{list(basis.shells_of(el))}: the data were made with a different basis."
            )
    n_a, n_b = basis.n_orb(a), basis.n_orb(b)
    raw = gto.intor_cross("int1e_ovlp", mol_a, mol_b).reshape(n_a, len(r_A), n_b)
    conv = convention("pyscf")
    u_a, u_b = conv.transform(basis.shells_of(a)), conv.transform(basis.shells_of(b))
    return np.einsum("ab,bkc,dc->kad", u_a, raw, u_b)


def _m_labels(shells: tuple[int, ...]) -> np.ndarray:
    """m of every orbital (package order: m = −l … l inside a shell)."""
    return np.concatenate([np.arange(-l, l + 1) for l in shells]) if shells else np.zeros(0)


@dataclass(frozen=True)
class PairTable:
    """Bond-frame overlap of element ``a`` (origin) with ``b`` (on +z): quintic splines of the
    P entries (``rows``, ``cols``) with equal m, on r = 0, step, … ≤ r_max (Å).

    ``values`` (grid points, P): the PySCF integrals the spline interpolates (what the cache
    stores); ``coefficients`` (intervals, order + 1, P): polynomial in t = r − r_k, highest power
    first, up to the last grid point where some |S| exceeds `NEGLIGIBLE` (zero beyond, up to
    r_max). ``max_error``: largest |spline − PySCF| at the interval midpoints.
    """

    a: str
    b: str
    n_a: int
    n_b: int
    step_A: float
    r_max_A: float
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    coefficients: np.ndarray
    max_error: float
    build_seconds: float

    def evaluate(self, r: torch.Tensor) -> torch.Tensor:
        """(E,) distances in Å → (E, n_a, n_b) bond-frame blocks (differentiable in r)."""
        coef = torch.as_tensor(self.coefficients, dtype=r.dtype, device=r.device)
        k = torch.clamp((r.detach() / self.step_A).floor().long(), 0, coef.shape[0] - 1)
        t = (r - k.to(r.dtype) * self.step_A).unsqueeze(-1)
        c = coef[k]
        values = c[:, 0]
        for p in range(1, c.shape[1]):
            values = values * t + c[:, p]
        values = values * (r.detach() < coef.shape[0] * self.step_A).unsqueeze(-1).to(r.dtype)
        place = torch.zeros((len(self.rows), self.n_a * self.n_b), dtype=r.dtype, device=r.device)
        place[torch.arange(len(self.rows)), torch.as_tensor(self.rows * self.n_b + self.cols)] = 1.0
        return (values @ place).reshape(len(r), self.n_a, self.n_b)


def _content_hash(basis: BasisSet, a: str, b: str, step_A: float, r_max_A: float) -> str:
    content = {
        "version": TABLE_VERSION,
        "order": SPLINE_ORDER,
        "basis": basis.name,
        "shells": [list(basis.shells_of(a)), list(basis.shells_of(b))],
        "data": [_pyscf_shells(basis.name, a), _pyscf_shells(basis.name, b)],
        "step_A": step_A,
        "r_max_A": r_max_A,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]


def _spline(step_A: float, values: np.ndarray):
    """The quintic interpolating spline through ``values`` on the grid r_k = k·step."""
    from scipy.interpolate import make_interp_spline

    return make_interp_spline(np.arange(len(values)) * step_A, values, k=SPLINE_ORDER, axis=0)


def _spline_coefficients(step_A: float, values: np.ndarray, spline=None) -> np.ndarray:
    """(intervals, order + 1, P) Taylor coefficients at each left grid point of the spline
    through ``values`` (`_spline`, or ``spline`` when already fitted): its derivatives there
    (the highest one, piecewise constant, at the interval midpoint), highest power first;
    intervals end after the last grid point where some |S| exceeds `NEGLIGIBLE`."""
    r = np.arange(len(values)) * step_A
    spline = _spline(step_A, values) if spline is None else spline
    significant = np.nonzero(np.abs(values).max(axis=1) > NEGLIGIBLE)[0]
    n_keep = min(len(r) - 1, int(significant.max(initial=0)) + 2)
    left = r[:n_keep]
    return np.ascontiguousarray(
        np.stack(
            [
                spline(left + 0.5 * step_A if nu == SPLINE_ORDER else left, nu=nu)
                / math.factorial(nu)
                for nu in range(SPLINE_ORDER, -1, -1)
            ],
            axis=1,
        )
    )


def build_pair_table(
    basis: BasisSet, a: str, b: str, r_max_A: float, step_A: float = DEFAULT_STEP_A
) -> PairTable:
    """Tabulate and fit the bond-frame overlap of ``a``–``b`` (PySCF two-atom integrals)."""
    t0 = time.perf_counter()
    n_grid = int(round(r_max_A / step_A)) + 1
    r = np.arange(n_grid) * step_A
    blocks = _bond_frame_blocks(basis, a, b, r)
    m_a, m_b = _m_labels(basis.shells_of(a)), _m_labels(basis.shells_of(b))
    same_m = m_a[:, None] == m_b[None, :]
    leak = float(np.abs(blocks[:, ~same_m]).max(initial=0.0))
    if leak > OFF_DIAGONAL_TOL:
        raise OverlapError(
            f"{basis.name} {a}–{b}: bond-frame overlap couples different m ({leak:.2e}); the "
            "PySCF → package orbital convention is broken."
        )
    rows, cols = np.nonzero(same_m)
    values = np.ascontiguousarray(blocks[:, rows, cols])
    spline = _spline(step_A, values)
    mid = r[:-1] + 0.5 * step_A
    error = float(np.abs(spline(mid) - _bond_frame_blocks(basis, a, b, mid)[:, rows, cols]).max())
    return PairTable(
        a=a,
        b=b,
        n_a=basis.n_orb(a),
        n_b=basis.n_orb(b),
        step_A=step_A,
        r_max_A=float(r[-1]),
        rows=rows,
        cols=cols,
        values=values,
        coefficients=_spline_coefficients(step_A, values, spline),
        max_error=error,
        build_seconds=time.perf_counter() - t0,
    )


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save(table: PairTable, npz: Path, meta: dict) -> None:
    npz.parent.mkdir(parents=True, exist_ok=True)

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, rows=table.rows, cols=table.cols, values=table.values)

    _atomic_write(npz, write_npz)
    _atomic_write(npz.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))


def _load(npz: Path, digest: str) -> PairTable | None:
    """The cached table, or None if absent, from another content hash, or unreadable."""
    meta_path = npz.with_suffix(".json")
    if not (npz.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("hash") != digest:
            return None
        with np.load(npz, allow_pickle=False) as f:
            rows, cols, values = f["rows"], f["cols"], f["values"]
        step = float(meta["step_A"])
        return PairTable(
            a=meta["a"], b=meta["b"], n_a=int(meta["n_a"]), n_b=int(meta["n_b"]),
            step_A=step, r_max_A=float(meta["r_max_A"]), rows=rows, cols=cols, values=values,
            coefficients=_spline_coefficients(step, values), max_error=float(meta["max_error"]),
            build_seconds=float(meta["build_seconds"]),
        )  # fmt: skip
    except (OSError, ValueError, KeyError) as exc:
        log.warning("Overlap table %s unreadable (%s); rebuilding it.", npz, exc)
        return None


class OverlapTables:
    """The pair tables of one basis, built on first use and cached on disk.

    ``r_max_A`` is rounded up to whole Å (at least `MIN_RMAX_A`) so that cache entries are
    shared between runs; ``cache``: a folder, None for `cache_root`, False for memory only.
    """

    def __init__(
        self,
        basis: BasisSet,
        r_max_A: float = MIN_RMAX_A,
        step_A: float = DEFAULT_STEP_A,
        cache: Path | str | None | bool = None,
    ):
        self.basis = basis
        self.r_max_A = float(max(MIN_RMAX_A, math.ceil(r_max_A)))
        self.step_A = float(step_A)
        self.cache = None if cache is False else Path(cache) if cache else cache_root()
        self._tables: dict[tuple[str, str], PairTable] = {}
        self._frames: EdgeFrames | None = None
        self.builds = 0  # tables computed (not loaded) by this object

    def pair(self, a: str, b: str) -> PairTable:
        """Table of the ordered pair (``a`` at the origin, ``b`` on +z)."""
        if (a, b) in self._tables:
            return self._tables[(a, b)]
        for el in (a, b):
            if el not in self.basis.shells:
                raise OverlapError(
                    f"Element {el} is not in the basis {self.basis.name!r} "
                    f"({', '.join(self.basis.elements)})."
                )
        digest = _content_hash(self.basis, a, b, self.step_A, self.r_max_A)
        name = f"{self.basis.name.replace('/', '_')}-{a}-{b}-{digest}.npz"
        npz = None if self.cache is None else self.cache / name
        table = None if npz is None else _load(npz, digest)
        if table is None:
            table = build_pair_table(self.basis, a, b, self.r_max_A, self.step_A)
            self.builds += 1
            if npz is not None:
                meta = {k: getattr(table, k) for k in ("a", "b", "n_a", "n_b", "step_A",
                        "r_max_A", "max_error", "build_seconds")}  # fmt: skip
                _save(table, npz, meta | {"hash": digest, "basis": self.basis.name,
                                          "version": TABLE_VERSION, "order": SPLINE_ORDER})  # fmt: skip
        self._tables[(a, b)] = table
        return table

    def _wigner(self, a: str, b: str, lmax: int, unit: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-edge block-diagonal rotations D_a, D_b (E, n, n) of the two elements' shells."""
        if self._frames is None or self._frames.lmax < lmax:
            self._frames = EdgeFrames(lmax)
        packed = self._frames(to_e3nn_frame(unit))
        pad = packed.shape[1]
        packed = torch.cat([packed, packed.new_zeros((len(packed), 1))], dim=1)
        return tuple(
            packed[:, _wigner_index(self.basis.shells_of(el), pad)].reshape(len(unit), n, n)
            for el, n in ((a, self.basis.n_orb(a)), (b, self.basis.n_orb(b)))
        )

    def blocks(self, a: str, b: str, vectors: torch.Tensor) -> torch.Tensor:
        """(E, n_a, n_b) S blocks of ``a`` at the origin and ``b`` at ``vectors`` (E, 3) Å;
        differentiable in ``vectors``. Pairs are tabulated once (lighter element first):
        the other order is S_ab(d) = S_ba(−d)ᵀ, which keeps S_ji(−R) = S_ij(R)ᵀ exact."""
        if _z(a) > _z(b):
            return self.blocks(b, a, -vectors).transpose(1, 2)
        table = self.pair(a, b)
        r = torch.linalg.norm(vectors, dim=-1)
        if len(r) and float(r.detach().max()) > table.r_max_A:
            raise OverlapError(
                f"Edge of {float(r.detach().max()):.2f} Å between {a} and {b} is beyond the overlap "
                f"table ({table.r_max_A:.1f} Å); build OverlapTables with a larger r_max_A."
            )
        onsite = r.detach() < 1e-9  # S(0) commutes with rotations: any frame will do
        safe = torch.where(onsite.unsqueeze(-1), torch.tensor([0.0, 0.0, 1.0]).to(vectors), vectors)
        lmax = max(self.basis.shells_of(a) + self.basis.shells_of(b))
        d_a, d_b = self._wigner(a, b, lmax, safe)
        bond = table.evaluate(torch.where(onsite, torch.zeros_like(r), r))
        return d_a @ bond @ d_b.transpose(1, 2)


def _z(symbol: str) -> int:
    from ase.data import atomic_numbers

    return atomic_numbers[symbol]


def _wigner_index(shells: tuple[int, ...], pad: int) -> np.ndarray:
    """Flat index into a packed `EdgeFrames` output (zero column appended at ``pad``) for the
    block-diagonal (n, n) rotation of ``shells``; entries between shells point at the pad."""
    n = sum(2 * l + 1 for l in shells)
    index = np.full((n, n), pad, dtype=np.int64)
    offset = 0
    for l in shells:
        d = 2 * l + 1
        start = wigner_size(l - 1) if l > 0 else 0
        index[offset : offset + d, offset : offset + d] = start + np.arange(d * d).reshape(d, d)
        offset += d
    return index.reshape(-1)


# --------------------------------------------------------------------------- records
def edge_displacements(positions: np.ndarray, cell: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(E, 3) bond vectors d = τ_j + R·cell − τ_i (Å) of edges (i, j, Rx, Ry, Rz)."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 5)
    return positions[edges[:, 1]] + edges[:, 2:5] @ np.asarray(cell) - positions[edges[:, 0]]


def _block_sizes(basis: BasisSet, numbers: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(E,) entries n_i·n_j of each edge's block (the record layout)."""
    n_orb = basis.n_orb_array(numbers)
    return n_orb[edges[:, 0]] * n_orb[edges[:, 1]]


def _groups(
    tables: OverlapTables, numbers: np.ndarray, edges: np.ndarray, chunk: int
) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """(a, b, edge ids, flat entry index (E_g, n_a·n_b)) per element pair and chunk."""
    from ase.data import chemical_symbols

    per_edge = _block_sizes(tables.basis, numbers, edges)
    starts = np.concatenate([[0], np.cumsum(per_edge)[:-1]])
    kinds, inverse = np.unique(numbers, return_inverse=True)
    inverse = inverse.reshape(-1)
    pair_id = inverse[edges[:, 0]] * len(kinds) + inverse[edges[:, 1]]
    for pid in np.unique(pair_id):
        a, b = (chemical_symbols[int(kinds[q])] for q in divmod(int(pid), len(kinds)))
        ids = np.nonzero(pair_id == pid)[0]
        width = tables.basis.n_orb(a) * tables.basis.n_orb(b)
        for lo in range(0, len(ids), chunk):
            part = ids[lo : lo + chunk]
            yield a, b, part, starts[part][:, None] + np.arange(width)


def _prepared(
    tables: OverlapTables, numbers, positions: np.ndarray, cell: np.ndarray, edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(numbers, edges (E, 5) int64, bond vectors (E, 3) Å, total flat entries)."""
    numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 5)
    vectors = edge_displacements(np.asarray(positions, dtype=np.float64), cell, edges)
    return numbers, edges, vectors, int(_block_sizes(tables.basis, numbers, edges).sum())


def exact_overlap(
    tables: OverlapTables,
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray,
    edges: np.ndarray,
    chunk: int = 65536,
) -> np.ndarray:
    """Flat S(R) blocks (record layout: each edge's n_i × n_j block row-major, in edge order)
    of atoms with atomic ``numbers`` at ``positions`` (Å) on ``edges`` (i, j, Rx, Ry, Rz)."""
    numbers, edges, vectors, total = _prepared(tables, numbers, positions, cell, edges)
    out = np.empty(total)
    with torch.no_grad():
        for a, b, ids, index in _groups(tables, numbers, edges, chunk):
            block = tables.blocks(a, b, torch.from_numpy(vectors[ids]))
            out[index] = block.reshape(len(ids), -1).numpy()
    return out


def exact_overlap_derivative(
    tables: OverlapTables,
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray,
    edges: np.ndarray,
    patterns: np.ndarray,
    chunk: int = 65536,
) -> np.ndarray:
    """(P, total) flat dS(R)/dλ along displacement patterns (P, N, 3) (1/Å for unit
    Cartesian patterns): forward-mode derivative of the splines and the rotations."""
    numbers, edges, vectors, total = _prepared(tables, numbers, positions, cell, edges)
    patterns = np.asarray(patterns, dtype=np.float64).reshape(-1, len(numbers), 3)
    tangents = patterns[:, edges[:, 1]] - patterns[:, edges[:, 0]]  # (P, E, 3)
    out = np.empty((len(patterns), total))
    for a, b, ids, index in _groups(tables, numbers, edges, chunk):
        v = torch.from_numpy(vectors[ids])
        for p in range(len(patterns)):
            _, d = torch.func.jvp(
                lambda x, a=a, b=b: tables.blocks(a, b, x),
                (v,),
                (torch.from_numpy(tangents[p, ids]),),
            )
            out[p, index] = d.reshape(len(ids), -1).detach().numpy()
    return out


def record_overlap_error(tables: OverlapTables, record) -> float:
    """Largest |stored S − exact S| over a DFT record's blocks: a check of stored data.

    Records from our PySCF generator hold w·S on edges that tie on the Wigner–Seitz boundary
    of the BvK supercell (weight w = 1/m, ``meta["dense_kmesh"]``); the same weights are
    applied here. Other records are compared with weight 1.
    """
    from foundation.data.dft.pyscf import wigner_seitz_weights

    exact = exact_overlap(tables, record.numbers, record.positions, record.cell, record.edges)
    mesh = record.meta.get("dense_kmesh")
    if mesh is not None:
        weight = wigner_seitz_weights(record.edge_vectors(), record.cell, mesh, pbc=record.pbc)
        exact = exact * np.repeat(weight, _block_sizes(tables.basis, record.numbers, record.edges))
    return float(np.abs(record.s.astype(np.float64) - exact).max(initial=0.0))
