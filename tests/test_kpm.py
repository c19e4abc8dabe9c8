"""Kernel polynomial DOS / Fermi level and the interior eigensolvers against dense
diagonalization, on real PySCF Si blocks tiled onto supercells (`si` fixture)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.linalg

from foundation.physics import kpm
from foundation.physics import sparse as SP
from foundation.physics.bands import fermi_level
from foundation.physics.kspace import OverlapError


def dense_spectrum(h, s) -> np.ndarray:
    return scipy.linalg.eigh(h.toarray(), s.toarray(), eigvals_only=True)


def test_exact_trace_moments_equal_dense_moments(si):
    """With the n_orb unit vectors as probes the 'stochastic' trace is exact, so the moments
    test the Chebyshev recurrence and the CG solves with S alone (complex k included)."""
    sc = si.supercell((2, 1, 1))  # 4 atoms, 16 orbitals
    for k in [(0, 0, 0), (0.2, -0.1, 0.35)]:
        h, s = SP.assemble_hs(sc, k)
        w = dense_spectrum(h, s)
        res = kpm.kpm_moments(h, s, 120, n_vectors=0, rtol=1e-12, k=k)
        assert (
            res.center_eV - res.half_width_eV < w.min()
            and w.max() < res.center_eV + res.half_width_eV
        )
        ref = kpm.dense_moments(w, res.center_eV, res.half_width_eV, 120)
        np.testing.assert_allclose(res.moments, ref, atol=1e-7 * len(w))
        # the integrated DOS counts every level; halfway between two levels it is exact
        # to the kernel's tails
        assert res.idos([res.center_eV + res.half_width_eV])[0] == pytest.approx(len(w), abs=1e-6)


def test_kpm_dos_and_fermi_level_match_dense(si):
    """128-atom Si at Γ (512 orbitals; levels of a 4×4×4 k-mesh folded): stochastic DOS vs the
    dense DOS under the same kernel, E_F and the gap vs the dense VBM/CBM."""
    sc = si.supercell((4, 4, 4))
    h, s = SP.assemble_hs(sc)
    w = dense_spectrum(h, s)
    dense = fermi_level(w[None], sc.n_electrons)
    res = kpm.kpm_moments(h, s, 300, n_vectors=16, rtol=1e-6, seed=1)
    ref = kpm.dense_moments(w, res.center_eV, res.half_width_eV, 300)
    l1 = kpm.dos_l1_distance(res, ref)
    assert l1 < 0.15  # 16 vectors on 512 orbitals; falls as 1/√(vectors × orbitals)
    f = kpm.fermi_level_kpm(res, sc.n_electrons)
    assert f.insulator
    # E_F = middle of the detected gap, which lies inside the true gap
    assert dense.vbm_eV < f.gap_lo_eV < f.gap_hi_eV < dense.cbm_eV
    assert abs(f.fermi_level_eV - dense.fermi_level_eV) < 0.1
    # a lower bound: the kernel's tails eat into the gap from both band edges
    assert 0.2 * dense.gap_eV < f.gap_eV < dense.gap_eV


def test_kpm_metal_fermi_level_from_integrated_dos(si):
    """With fewer electrons E_F falls inside the valence band: no gap, and the integrated DOS
    at E_F is the occupied-level count (exact trace, so no stochastic error)."""
    sc = si.supercell((2, 2, 1))
    h, s = SP.assemble_hs(sc)
    w = np.sort(dense_spectrum(h, s))
    n_el = sc.n_electrons - 6  # 3 levels emptied: inside the degenerate valence top
    res = kpm.kpm_moments(h, s, 300, n_vectors=0, rtol=1e-10)
    f = kpm.fermi_level_kpm(res, n_el)
    assert not f.insulator and f.gap_eV == 0.0
    assert f.idos_at_fermi == pytest.approx(n_el / 2, abs=1e-6)
    assert w[0] < f.fermi_level_eV < w[-1]
    assert abs(f.fermi_level_eV - w[int(n_el) // 2]) < 3 * f.resolution_eV


def test_kpm_refuses_non_positive_definite_overlap(si):
    """An S inflated until it is indefinite stops the CG with the k-point and its smallest
    eigenvalue, not with a wrong DOS."""
    sc = si.supercell((2, 2, 2))
    h, s = SP.assemble_hs(sc)
    bad = s + 1.5 * (s - s.multiply(np.eye(s.shape[0])))  # off-diagonal overlaps × 2.5
    assert np.linalg.eigvalsh(bad.toarray())[0] < 0
    with pytest.raises(OverlapError, match="not positive definite: smallest eigenvalue -"):
        kpm.kpm_moments(h, bad, 50, n_vectors=2)


SOLVERS = [
    "superlu",
    "iterative",
    "chebyshev",
    pytest.param(
        "pardiso",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("pypardiso") is None,
            reason="pypardiso not installed (optional extra: pip install -e '.[solvers]')",
        ),
    ),
    pytest.param(
        "primme",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("primme") is None,
            reason="primme not installed (needs system BLAS/LAPACK to build: see README)",
        ),
    ),
]


@pytest.mark.parametrize("solver", SOLVERS)
def test_eigensolvers_match_dense(si, solver):
    """Every interior eigensolver gives the 12 dense eigenvalues nearest midgap of a 2×2×2
    supercell to 1e-8 eV, at Γ (real) and at a general k (complex)."""
    sc = si.supercell((2, 2, 2))
    for k in [(0, 0, 0), (0.25, 0.1, -0.3)]:
        h, s = SP.assemble_hs(sc, k)
        w = np.sort(dense_spectrum(h, s))
        n_occ = int(sc.n_electrons) // 2
        sigma = 0.5 * (w[n_occ - 1] + w[n_occ])
        pairs = SP.eigs_near(sc, sigma, n=12, k=k, solver=solver, matrices=(h, s))
        nearest = np.sort(w[np.argsort(np.abs(w - sigma))[:12]])
        np.testing.assert_allclose(pairs.values, nearest, atol=1e-8)
        assert pairs.solver == solver and pairs.residual < 1e-5


def test_auto_solver_choice():
    assert SP.choose_eig_solver(SP.DIRECT_MAX_ORBITALS + 1) == "iterative"
    assert SP.choose_eig_solver(1000) == "superlu"
    expected = "pardiso" if SP.pardiso_available() else "superlu"
    assert SP.choose_eig_solver(SP.PARDISO_MIN_ORBITALS) == expected
    with pytest.raises(ValueError, match="unknown eig solver 'lapack'"):
        SP.eigs_near(None, 0.0, solver="lapack", matrices=(np.eye(4), np.eye(4)))
