"""PySCF record generator: bands, orbital convention (rotations), overlap check, datasets.

The SCF runs use small k-meshes and low plane-wave cutoffs so each test takes seconds; the
properties tested (reconstruction of PySCF's own bands, exact rotation covariance) hold for
any discretisation, since both sides come from the same calculation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
from ase.build import bulk

from foundation import keys
from foundation.data.dft import pyscf as gen
from foundation.data.record import HamiltonianRecord
from foundation.rotations import random_rotation, shells_D

pytest.importorskip("pyscf")


def _strained(atoms, seed: int, strain: float = 0.02, rattle: float = 0.05):
    """Copy with a random strain and displacements, so no symmetry hides an error."""
    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    eps = rng.uniform(-strain, strain, (3, 3))
    atoms.set_cell(atoms.cell @ (np.eye(3) + (eps + eps.T) / 2), scale_atoms=True)
    atoms.positions += rng.normal(0.0, rattle, atoms.positions.shape)
    return atoms


@pytest.fixture(scope="module")
def si_scf():
    atoms = _strained(bulk("Si", "diamond", a=5.43), seed=0)
    return gen.run_scf(atoms, key="si2", kmesh=(3, 3, 3), ke_cutoff_Ha=18)


@pytest.fixture(scope="module")
def si_record(si_scf):
    return gen.record_from_scf(si_scf)  # generator defaults: 9 Å cutoff, dense mesh, margin


def test_band_kpoints_are_off_the_scf_mesh(si_record):
    k = np.asarray(si_record.meta["dft_bands"]["kpts_frac"])
    for mesh in (si_record.meta["kmesh"], si_record.meta["dense_kmesh"]):
        frac = k * np.asarray(mesh)
        assert np.all(np.abs(frac - np.round(frac)).max(axis=1) > 1e-3)


def test_dft_bands_are_pyscf_get_bands(si_scf, si_record):
    """meta["dft_bands"] equals PySCF's own get_bands at the same (off-mesh) k-points."""
    k = np.asarray(si_record.meta["dft_bands"]["kpts_frac"])
    eps, _ = si_scf.mf.get_bands(si_scf.cell.get_abs_kpts(k))
    ref = np.asarray(eps) * gen.hartree_ev()
    np.testing.assert_allclose(si_record.meta["dft_bands"]["eigenvalues_eV"], ref, atol=1e-6)


def test_stored_blocks_reproduce_dft_bands_within_10_meV(si_record):
    """Bands rebuilt from the stored (cutoff-truncated, float32) H(R), S(R) at k-points off
    the SCF mesh agree with PySCF's within 10 meV in the occupied and first empty band."""
    meta = si_record.meta
    k = np.asarray(meta["dft_bands"]["kpts_frac"])
    ref = np.asarray(meta["dft_bands"]["eigenvalues_eV"])
    err = np.abs(gen.record_bands(si_record, k) - ref) * 1000
    nocc = meta[keys.N_ELECTRONS] // 2
    occupied, first_empty = err[:, :nocc].max(), err[:, nocc].max()
    print(f"Si2 band error (meV): occupied {occupied:.2f}, first unoccupied {first_empty:.2f}")
    assert occupied < 10 and first_empty < 10
    assert meta["s_alias_error"] < 1e-6  # FT of the dense-mesh S(k) = exact real-space S(R)


def test_exact_overlap_matches_fourier_transform_of_pyscf_sk(si_scf, si_record):
    """The real-space S(R) (no lattice sum) Bloch-sums to PySCF's S(k): proves the phase
    convention F(k) = Σ_R e^{2πik·R} H(R) and the AO → package reordering."""
    k = np.array([[0.31, -0.17, 0.05]])
    rec = si_record
    sk = gen.bloch_sum(rec.edges, rec.blocks(keys.S), rec.n_orb_per_atom, k)[0]
    ref = np.asarray(si_scf.cell.pbc_intor("int1e_ovlp", hermi=1, kpts=si_scf.cell.get_abs_kpts(k)))
    u = scipy.linalg.block_diag(
        *gen._ao_to_package(si_scf.cell, rec.basis, si_scf.atoms.get_chemical_symbols())
    )
    err = np.abs(sk - u @ ref.reshape(u.shape) @ u.T).max()
    print(f"|S(k) from stored blocks − PySCF S(k)| = {err:.1e}")
    assert err < 1e-4  # what the 9 Å truncation leaves out (2e-5 here; float32: ~1e-7)


def test_rotated_copy_gives_wigner_d_rotated_blocks():
    """Rotating cell and positions by a proper Q maps every block (s, p and d shells) by
    D(Q) H D(Q)ᵀ with `foundation.rotations.shells_D` (e3nn Wigner-D in package order)."""
    atoms = _strained(bulk("Ag", "fcc", a=4.09), seed=1)
    q = random_rotation(seed=7)
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell @ q.T, scale_atoms=False)
    rotated.positions = atoms.positions @ q.T
    # any grid works: PySCF's FFT grid and k-points are fixed to the lattice, so they rotate too
    # (the orbital gradient has a grid-aliasing floor ~1e-5 here: converge on energy and a
    # looser gradient; the density is then converged to ~1e-10)
    kw = dict(
        kmesh=(2, 2, 2), ke_cutoff_Ha=30, cutoff_A=8.0, dense_mesh=(6, 6, 6), conv_tol=1e-10,
        conv_tol_grad=1e-4, smearing_eV=0.2,
    )  # fmt: skip
    rec = gen.compute_record(atoms, key="ag", **kw)
    rot = gen.compute_record(rotated, key="ag_rot", **kw)
    assert 2 in rec.basis.shells["Ag"]  # the d shell is tested
    np.testing.assert_array_equal(rec.edges, rot.edges)
    d = {z: shells_D(rec.basis.shells_of(int(z)), q).numpy() for z in np.unique(rec.numbers)}
    for name in (keys.H, keys.S):  # H − μS: μ = ⟨H,S⟩/⟨S,S⟩ is rotation-invariant
        a, b = rec.blocks(name), rot.blocks(name)
        worst, moved = 0.0, 0.0
        for e, (i, j) in enumerate(rec.edges[:, :2]):
            di, dj = d[rec.numbers[i]], d[rec.numbers[j]]
            expect = di @ a[e] @ dj.T
            worst = max(worst, float(np.abs(b[e] - expect).max()))
            moved = max(moved, float(np.abs(b[e] - a[e]).max()))
        print(f"{name}: max |rotated − D·block·Dᵀ| = {worst:.2e}, max change {moved:.2f}")
        assert worst < 1e-3  # eV for H (1 meV), dimensionless for S
        assert moved > 1e-2  # the rotation does change the blocks: the check is not vacuous
    assert abs(rot.meta[keys.ENERGY_ZERO] - rec.meta[keys.ENERGY_ZERO]) < 1e-3


def test_too_short_cutoff_raises_clear_overlap_error():
    """gth-szv is long-ranged: cutting Si at 4 Å makes S(k) indefinite; the error names the
    structure, the k-point and the smallest eigenvalue."""
    atoms = _strained(bulk("Si", "diamond", a=5.43), seed=2)
    scf = gen.run_scf(atoms, key="si_szv", basis="gth-szv", kmesh=(2, 2, 2), ke_cutoff_Ha=12)
    with pytest.raises(
        gen.OverlapNotPositiveDefinite, match=r"si_szv: .*k = \[.*smallest eigenvalue -"
    ):
        gen.record_from_scf(scf, cutoff_A=4.0)


def test_wigner_seitz_weights_share_degenerate_images():
    cell = np.eye(3) * 2.0
    vec = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [2.0, 2.0, 0.0], [3.0, 0, 0], [1.0, 0, 0]])
    w = gen.wigner_seitz_weights(vec, cell, (2, 2, 2))  # supercell: cube of side 4 Å
    np.testing.assert_allclose(w, [1.0, 0.5, 0.25, 0.0, 1.0])


def test_dense_kmesh_bvk_supercell_is_long_enough():
    cell = np.asarray(bulk("Si", "diamond", a=5.43).cell)  # fcc primitive, |a| = 3.84 Å
    mesh = gen.dense_kmesh(cell, 16.0)
    assert mesh == (5, 5, 5)
    assert gen._shortest_vector(np.asarray(mesh)[:, None] * cell) >= 16.0
    frac = gen.gamma_mesh_frac(mesh)
    reps, rep_map = gen._time_reversal_pairs(mesh)
    back = frac[reps][rep_map[:, 0]] * np.where(rep_map[:, 1:] == 1, -1, 1)
    assert np.allclose((back - frac + 0.5) % 1 - 0.5, 0)


@pytest.fixture
def fake_compute(monkeypatch):
    """Replace the PySCF run by a 1-orbital record; key "bad" raises. Returns the call log."""
    from foundation.basis import BasisSet

    calls = []

    def fake(atoms, *, key, **kw):
        calls.append((key, kw))
        if key == "bad":
            raise RuntimeError("SCF exploded")
        n = len(atoms)
        edges = np.array([[i, i, 0, 0, 0] for i in range(n)])
        return HamiltonianRecord.from_blocks(
            key, atoms.numbers, atoms.positions, atoms.cell, atoms.pbc,
            BasisSet.from_spec({"Si": "1s"}), edges, [np.eye(1) * -5.0] * n, [np.eye(1)] * n,
            meta={"kw": kw},
        )  # fmt: skip

    monkeypatch.setattr(gen, "compute_record", fake)
    si = bulk("Si", "diamond", a=5.43)
    metal = si.copy()
    metal.info[gen.PER_STRUCTURE_KWARGS] = {"smearing_eV": 0.1}
    return calls, [("a", si), ("bad", si), ("metal", metal)]


def test_generate_dataset_resumes_and_reports_failures(tmp_path, fake_compute):
    """A failing structure is reported by key, the others are saved; a rerun skips done keys."""
    calls, structures = fake_compute
    paths = gen.generate_dataset(structures, tmp_path, cutoff_A=6.0)
    assert [p.name for p in paths] == ["a", "metal"]
    assert "SCF exploded" in json.loads((tmp_path / "failures.json").read_text())["bad"]
    assert HamiltonianRecord.load(tmp_path / "metal").meta["kw"] == {
        "cutoff_A": 6.0,
        "smearing_eV": 0.1,
    }
    calls.clear()
    gen.generate_dataset(structures, tmp_path, cutoff_A=6.0)
    assert [k for k, _ in calls] == ["bad"]  # done keys skipped, the failed one retried


def test_generate_dataset_failures_accumulate_over_resumed_runs(tmp_path, fake_compute):
    """An earlier failure stays in failures.json when a resumed run does not reach it, and
    retry_failed=False does not run it again; a key that later succeeds leaves the report."""
    calls, structures = fake_compute
    gen.generate_dataset(structures, tmp_path, cutoff_A=6.0)
    calls.clear()
    gen.generate_dataset(structures, tmp_path, cutoff_A=6.0, retry_failed=False)
    assert calls == []
    assert "SCF exploded" in json.loads((tmp_path / "failures.json").read_text())["bad"]
    gen.generate_dataset([structures[0]], tmp_path, cutoff_A=6.0)  # "bad" not in this run
    assert list(json.loads((tmp_path / "failures.json").read_text())) == ["bad"]

    def fixed(atoms, *, key, **kw):  # the "bad" structure now converges
        return gen.compute_record(atoms, key="a", **kw)

    gen.generate_dataset([structures[1]], tmp_path, cutoff_A=6.0, compute=fixed)
    assert json.loads((tmp_path / "failures.json").read_text()) == {}
    assert (tmp_path / "bad" / "structure.json").is_file()


def test_generate_dataset_reports_a_failure_before_the_run_ends(tmp_path, fake_compute):
    """failures.json is written when a structure fails, not only at the end, so a run killed
    later (SIGTERM/SIGKILL skip the final write) keeps the reason: the next structure
    already sees it on disk."""
    _, structures = fake_compute
    seen = []

    def watch(atoms, *, key, **kw):
        report = tmp_path / "failures.json"
        seen.append(json.loads(report.read_text()) if report.is_file() else None)
        return gen.compute_record(atoms, key=key, **kw)

    gen.generate_dataset(structures, tmp_path, cutoff_A=6.0, compute=watch)
    assert seen[0] is None and "SCF exploded" in seen[2]["bad"]


@pytest.mark.multiprocess
def test_generate_dataset_process_pool(tmp_path, fake_compute):
    """workers > 1: the same records and failure report (forked workers inherit the fake)."""
    _, structures = fake_compute
    paths = gen.generate_dataset(structures, tmp_path, workers=2, cutoff_A=6.0)
    assert [p.name for p in paths] == ["a", "metal"]
    assert list(json.loads((tmp_path / "failures.json").read_text())) == ["bad"]


def test_dataset_structure_list_is_reproducible_from_the_seed():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "generate_dataset.py"
    spec = importlib.util.spec_from_file_location("generate_dataset", path)
    gd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gd)
    first, again = gd.build_structures(gd.SEED), gd.build_structures(gd.SEED)
    assert [k for k, _ in first] == [k for k, _ in again]
    for (_, a), (_, b) in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.cell.array, b.cell.array)
    other = gd.build_structures(gd.SEED + 1)
    assert not np.allclose(first[0][1].positions, other[0][1].positions)
    elements = {s for _, a in first for s in a.get_chemical_symbols()}
    assert len(first) >= 150 and len(elements) >= 10
    assert all(2 <= len(a) <= 8 for _, a in first)
    basis = gen.BasisSet.from_pyscf(gen.DEFAULT_BASIS, sorted(elements))
    assert any(2 in basis.shells_of(el) for el in elements)  # some l = 2 blocks


def test_band_errors_without_an_empty_band():
    """A filled minimal basis (e.g. Ba2: 5s5p6s holds all 20 valence electrons) has no first
    empty band: the error is None there instead of an IndexError that fails the record."""
    from foundation.basis import BasisSet
    from foundation.data.synthetic import random_record

    basis = BasisSet.from_spec({"Ba": "2s1p"})
    record = random_record("Ba2", ["Ba", "Ba"], basis=basis, seed=3)
    kpts = np.array([[0.0, 0.0, 0.0], [0.1, 0.2, 0.3]])
    ref = gen.record_bands(record, kpts)
    record.meta[keys.N_ELECTRONS] = 2 * ref.shape[1]  # every orbital filled
    record.meta["dft_bands"] = {
        "kpts_frac": kpts.tolist(),
        "eigenvalues_eV": (ref + 0.002).tolist(),
    }
    err = gen.band_errors_meV(record)
    assert err["first_empty"] is None
    assert err["occupied"] == pytest.approx(2.0, abs=1e-3)
    record.meta[keys.N_ELECTRONS] = 2 * ref.shape[1] - 2  # one band empty again
    assert gen.band_errors_meV(record)["first_empty"] == pytest.approx(2.0, abs=1e-3)


def test_multigrid_record_matches_fftdf(si_scf, si_record):
    """The multigrid option (Coulomb, XC and local pseudopotential on PySCF's multigrid) gives
    the same physics as the full FFT grid: same SCF energy and stored H within the
    record's own reconstruction error, and its blocks reproduce its own PySCF bands."""
    atoms = si_scf.atoms
    mg = gen.record_from_scf(gen.run_scf(atoms, key="si2-mg", kmesh=(3, 3, 3), ke_cutoff_Ha=18,
                                         multigrid=True))  # fmt: skip
    assert mg.meta["multigrid"] and not si_record.meta["multigrid"]
    de = abs(mg.meta["e_tot_eV"] - si_record.meta["e_tot_eV"]) * 1000
    dh = np.abs(mg.absolute_h() - si_record.absolute_h()).max() * 1000
    d_bands = (
        np.abs(
            np.asarray(mg.meta["dft_bands"]["eigenvalues_eV"])
            - np.asarray(si_record.meta["dft_bands"]["eigenvalues_eV"])
        ).max()
        * 1000
    )
    print(f"multigrid vs FFTDF: ΔE {de:.3f} meV, max |ΔH| {dh:.3f} meV, bands {d_bands:.3f} meV")
    assert de < 3 and d_bands < 2 and dh < 2  # measured 0.7, 0.3, 0.4 meV
    assert mg.meta["band_error_meV"]["occupied"] < 10


def test_scf_starts_where_pyscf_has_no_atomic_guess():
    """PySCF's minao guess raises IndexError for Sc (and Y) with the GTH pseudopotential; the
    generator starts from the core Hamiltonian on the full k-mesh instead and converges
    (the time-reversal-reduced SCF stalls from that start)."""
    scn = bulk("ScN", "rocksalt", a=4.5)
    scf = gen.run_scf(scn, key="ScN", kmesh=(2, 2, 2), ke_cutoff_Ha=30, smearing_eV=0.1,
                      conv_tol=1e-7)  # fmt: skip
    assert scf.mf.converged and len(scf.mf.kpts) == 8  # full mesh, not time-reversal-reduced


def test_full_mesh_start_gives_the_same_record(si_scf, si_record, monkeypatch):
    """The full-mesh path (taken when there is no atomic guess) stores the same H(R) as the
    time-reversal-reduced one: Si2 forced through it agrees with the fixture's record."""
    monkeypatch.setattr(gen, "atomic_guess", lambda mf: None)
    scf = gen.run_scf(si_scf.atoms, key="si2-full", kmesh=(3, 3, 3), ke_cutoff_Ha=18)
    assert len(scf.mf.kpts) == 27
    record = gen.record_from_scf(scf)
    dh = np.abs(record.absolute_h() - si_record.absolute_h()).max() * 1000
    assert dh < 0.05, f"max |ΔH| {dh:.4f} meV"
    assert record.meta["band_error_meV"]["occupied"] < 10


def test_unconverged_insulator_is_retried_with_smearing(monkeypatch, si_scf):
    """compute_record(smearing_retry_eV=…): an SCF without smearing that does not converge
    runs once more with Fermi smearing; a smeared SCF that fails, or no retry set, raises."""
    calls = []

    def run(atoms, *, smearing_eV=None, **kw):
        calls.append(smearing_eV)
        if smearing_eV is None:
            raise gen.SCFNotConverged("test: no convergence without smearing")
        return si_scf

    monkeypatch.setattr(gen, "run_scf", run)
    monkeypatch.setattr(gen, "record_from_scf", lambda scf, **kw: scf)
    assert gen.compute_record(si_scf.atoms, key="x", smearing_retry_eV=0.1) is si_scf
    assert calls == [None, 0.1]
    with pytest.raises(gen.SCFNotConverged):
        gen.compute_record(si_scf.atoms, key="x")
