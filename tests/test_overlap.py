"""Exact overlaps from two-center tables (foundation.physics.overlap) against PySCF: s, p, d
shells, rotated cells, image shifts R ≠ 0, hermiticity, positive definiteness, dS/du vs
finite differences, the disk cache and the errors."""

from __future__ import annotations

import ase
import numpy as np
import pytest
import torch
from ase.build import bulk
from train_support import REPO

from foundation.basis import BasisSet
from foundation.data.dft.pyscf import DEFAULT_BASIS, overlap_blocks, overlap_derivatives
from foundation.data.graph import neighbor_edges
from foundation.data.shards import iter_records, read_manifest
from foundation.physics import overlap as ov
from foundation.physics.kspace import flatten_blocks
from foundation.rotations import random_rotation

HSE = REPO / "data_shards" / "hse_mini"
EPH = REPO / "data_shards" / "eph_mini"


@pytest.fixture(scope="module")
def tables(data) -> ov.OverlapTables:
    return ov.OverlapTables(BasisSet.from_dict(read_manifest(data)["basis"]))


def _cell(symbols: str, a: float, seed: int) -> ase.Atoms:
    """A rotated, slightly distorted zincblende cell (random orientation, jittered atoms)."""
    atoms = bulk(symbols, "zincblende", a=a)
    q = random_rotation(seed)
    rng = np.random.default_rng(seed)
    atoms.set_cell(atoms.cell.array @ q.T, scale_atoms=True)
    atoms.positions += 0.1 * rng.standard_normal(atoms.positions.shape)
    return atoms


def _exact(tables, atoms, edges):
    return ov.exact_overlap(tables, atoms.numbers, atoms.positions, atoms.cell.array, edges)


@pytest.mark.parametrize(("symbols", "a"), [("InAs", 6.06), ("AgI", 6.5), ("SiGe", 5.54)])
def test_tables_match_pyscf_on_rotated_cells_with_images(tables, symbols, a):
    """Every block (d shells of Ag and In included) of a rotated, distorted cell with edges to
    9 Å, so most edges point to images R ≠ 0, equals PySCF's two-center integrals."""
    atoms = _cell(symbols, a, seed=len(symbols) + int(a))
    edges = neighbor_edges(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, 9.0)
    assert (np.abs(edges[:, 2:5]).sum(axis=1) > 0).mean() > 0.9
    reference = flatten_blocks(overlap_blocks(atoms, edges, DEFAULT_BASIS))
    err = np.abs(_exact(tables, atoms, edges) - reference).max()
    print(f"{symbols}: {len(edges)} edges, max |S_table − S_PySCF| = {err:.1e}")
    assert err < 1e-9


def test_hermitian_and_positive_definite(tables):
    """S_ji(−R) = S_ij(R)ᵀ to rounding, and S(k) of a real cell is positive definite."""
    from foundation.data.dft.pyscf import bloch_sum

    atoms = _cell("InAs", 6.06, seed=3)
    edges = neighbor_edges(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, 9.0)
    flat = _exact(tables, atoms, edges)
    n = np.array([tables.basis.n_orb(s) for s in atoms.get_chemical_symbols()])
    sizes = n[edges[:, 0]] * n[edges[:, 1]]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    blocks = [flat[starts[e] : starts[e + 1]].reshape(n[i], n[j])
              for e, (i, j) in enumerate(edges[:, :2])]  # fmt: skip
    lookup = {tuple(e): k for k, e in enumerate(edges.tolist())}
    worst = max(
        np.abs(blocks[lookup[(j, i, -rx, -ry, -rz)]] - blocks[k].T).max()
        for k, (i, j, rx, ry, rz) in enumerate(edges.tolist())
    )
    assert worst < 1e-13
    kpts = np.random.default_rng(0).random((8, 3))
    sk = bloch_sum(edges, blocks, n, kpts)
    assert np.abs(sk - sk.conj().transpose(0, 2, 1)).max() < 1e-12
    assert np.linalg.eigvalsh(sk).min() > 1e-3


def test_shipped_records_hold_the_exact_overlap(data):
    """Every stored S of the shipped datasets (float32, Wigner–Seitz weights of the BvK mesh)
    equals the tables to float32 rounding."""
    worst = {}
    for root in (data, HSE, EPH):
        t = ov.OverlapTables(BasisSet.from_dict(read_manifest(root)["basis"]))
        worst[root.name] = max(ov.record_overlap_error(t, rec) for rec in iter_records(root))
    print("max |S_stored − S_exact| per dataset:", worst)
    assert max(worst.values()) < 3e-8


def test_derivative_matches_pyscf_finite_differences(tables):
    """dS/du along random displacement patterns: forward-mode derivative of the tables vs
    central differences of PySCF's integrals (δ = 1e-4 Å)."""
    atoms = _cell("InAs", 6.06, seed=5)
    edges = neighbor_edges(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, 7.0)
    patterns = np.random.default_rng(1).standard_normal((2, len(atoms), 3))
    got = ov.exact_overlap_derivative(
        tables, atoms.numbers, atoms.positions, atoms.cell.array, edges, patterns
    )
    ref = overlap_derivatives(atoms, edges, patterns)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"dS/du: relative error {err:.1e} (max |dS/du| {np.abs(ref).max():.2f} 1/Å)")
    assert err < 1e-6


def test_blocks_are_differentiable_in_the_bond_vector(tables):
    """Autograd through the spline and the rotation agrees with finite differences."""
    v = torch.tensor([[1.3, -0.7, 2.1]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(tables.blocks("Ag", "In", v).pow(2).sum(), v)
    h = 1e-6
    fd = [
        (tables.blocks("Ag", "In", v.detach() + h * e).pow(2).sum()
         - tables.blocks("Ag", "In", v.detach() - h * e).pow(2).sum()).item() / (2 * h)
        for e in torch.eye(3, dtype=torch.float64)
    ]  # fmt: skip
    assert np.allclose(g.numpy()[0], fd, rtol=1e-6, atol=1e-9)


def test_cache_reused_and_invalidated_when_the_basis_changes(tmp_path, monkeypatch):
    basis = BasisSet.from_pyscf(DEFAULT_BASIS, ["Si"])
    first = ov.OverlapTables(basis, cache=tmp_path)
    s0 = first.pair("Si", "Si")
    assert first.builds == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    again = ov.OverlapTables(basis, cache=tmp_path)
    s1 = again.pair("Si", "Si")
    assert again.builds == 0 and np.array_equal(s0.coefficients, s1.coefficients)

    # Other radial functions under the same basis name: a new content hash, a new table.
    original = ov._pyscf_shells

    def tighter(name, symbol):
        shells = original(name, symbol)
        return [[shell[0], *[[p[0] * 1.1, *p[1:]] for p in shell[1:]]] for shell in shells]

    monkeypatch.setattr(ov, "_pyscf_shells", tighter)
    changed = ov.OverlapTables(basis, cache=tmp_path)
    s2 = changed.pair("Si", "Si")
    assert changed.builds == 1 and len(list(tmp_path.glob("*.npz"))) == 2
    assert not np.allclose(s2.coefficients, s0.coefficients)
    monkeypatch.undo()

    # A corrupt cache file is rebuilt, not trusted.
    npz = next(p for p in tmp_path.glob("*.npz") if p.stat().st_mtime == min(
        q.stat().st_mtime for q in tmp_path.glob("*.npz")))  # fmt: skip
    npz.write_bytes(b"not an npz")
    rebuilt = ov.OverlapTables(basis, cache=tmp_path)
    assert np.array_equal(rebuilt.pair("Si", "Si").coefficients, s0.coefficients)
    assert rebuilt.builds == 1


def test_errors_name_the_basis_the_element_and_the_fallback(tables):
    custom = BasisSet.from_spec({"Si": "1s1p"}, name="deeptb:Si-1s1p")
    with pytest.raises(ov.OverlapError, match=r"deeptb:Si-1s1p.*--overlap model"):
        ov.OverlapTables(custom, cache=False).pair("Si", "Si")
    with pytest.raises(ov.OverlapError, match="Element Fe is not in the basis"):
        tables.pair("Fe", "Si")
    far = torch.tensor([[0.0, 0.0, tables.r_max_A + 1.0]], dtype=torch.float64)
    with pytest.raises(ov.OverlapError, match="beyond the overlap table"):
        tables.blocks("Si", "Si", far)
