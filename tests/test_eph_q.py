"""Electron–phonon couplings at q ≠ 0 (`foundation.physics.eph_q`) and phonons at any q.

Phonons come from a spring model (nearest- and next-nearest-neighbour central springs) of Si
in a 2×2×2 supercell through phonopy: cheap, stable, with acoustic branches. Couplings use an
untrained tiny float64 model (5 Å edges), so every identity holds to float64 precision:
q = 0 equals the Γ path of `foundation.physics.eph`; the phase-summed kernel equals a direct
supercell derivative along the complex phonon pattern, unfolded to the primitive k, k+q
Bloch basis; a larger supercell gives the same q; |g| is gauge invariant, time-reversal
symmetric and periodic in k and q.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.neighborlist import neighbor_list
from train_support import tiny_float64_model

from foundation.physics.eph import (
    eph_matrix_elements,
    flat_blocks,
    model_hamiltonian_derivative,
)
from foundation.physics.eph_q import (
    QCouplings,
    RealSpaceMatrices,
    _model_graph,
    model_kernels,
)
from foundation.physics.kspace import BlochHamiltonian, BlockLayout
from foundation.physics.overlap import edge_displacements, exact_overlap_derivative
from foundation.physics.phonons import (
    PhononError,
    load_gamma_phonons,
    load_phonon_model,
)
from foundation.physics.predict import _tables
from foundation.physics.supercells import build_supercell, cell_triples

CUTOFF_A = 5.0
A_SI = 5.43
REPS = (2, 2, 2)
K_TEST = np.array([[0.0, 0.0, 0.0], [0.13, 0.29, 0.41], [0.5, 0.25, 0.0]])


# ----------------------------------------------------------------------------- phonons
def _spring_forces(atoms: Atoms) -> np.ndarray:
    """Central springs: 8 eV/Å² between nearest neighbours, 2 eV/Å² between next-nearest,
    rest lengths those of ideal diamond Si."""
    i, j, d = neighbor_list("ijD", atoms, 4.2)
    length = np.linalg.norm(d, axis=1)
    nearest = length < 3.0
    rest = np.where(nearest, A_SI * np.sqrt(3) / 4, A_SI / np.sqrt(2))
    k = np.where(nearest, 8.0, 2.0)
    pull = (k * (length - rest) / length)[:, None] * d  # force on i towards j
    forces = np.zeros((len(atoms), 3))
    np.add.at(forces, i, pull)
    return forces


def spring_phonopy(primitive: Atoms, reps=REPS):
    """phonopy object of the spring model in the supercell ``reps`` (force constants made
    and symmetrised)."""
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unit = PhonopyAtoms(
        numbers=primitive.numbers, cell=primitive.cell[:], positions=primitive.positions
    )
    phonon = Phonopy(unit, supercell_matrix=np.diag(reps), primitive_matrix="P")
    phonon.generate_displacements(distance=0.01, is_plusminus=True)
    phonon.forces = [
        _spring_forces(Atoms(c.numbers, c.positions, cell=c.cell, pbc=True))
        for c in phonon.supercells_with_displacements
    ]
    phonon.produce_force_constants()
    phonon.symmetrize_force_constants()
    return phonon


@pytest.fixture(scope="module")
def phonon_files(tmp_path_factory):
    """(phonopy_params.yaml, FORCE_CONSTANTS) of the spring model, 2×2×2 supercell."""
    from phonopy.file_IO import write_FORCE_CONSTANTS

    phonon = spring_phonopy(bulk("Si", "diamond", a=A_SI))
    out = tmp_path_factory.mktemp("phonons")
    phonon.save(out / "phonopy_params.yaml", settings={"force_constants": True})
    write_FORCE_CONSTANTS(phonon.force_constants, filename=str(out / "FORCE_CONSTANTS"))
    return out / "phonopy_params.yaml", out / "FORCE_CONSTANTS"


def test_phonons_at_any_q(phonon_files):
    """Acoustic sum rule (ω → 0 at Γ, linear near it), D(q) hermitian, the Γ modes equal the
    existing Γ path, ω(−q) = ω(q) = ω(q + G), FORCE_CONSTANTS + supercell matrix = YAML."""
    yaml_file, fc_file = phonon_files
    si = bulk("Si", "diamond", a=A_SI)
    model = load_phonon_model(yaml_file, si)
    gamma = model.modes(np.zeros((1, 3)))
    nu = gamma.frequencies_THz[0]
    print("Γ frequencies (THz)", np.round(nu, 4))
    assert np.abs(nu[:3]).max() < 1e-6 * nu.max() and nu[3] > 5.0
    small = model.modes(np.array([[1e-3, 0, 0], [2e-3, 0, 0]])).frequencies_THz[:, :3]
    np.testing.assert_allclose(small[1], 2 * small[0], rtol=1e-3)  # acoustic: ω ∝ |q|

    reference = load_gamma_phonons(yaml_file, si)
    np.testing.assert_allclose(nu, reference.frequencies_THz, atol=1e-10)
    optical = gamma.eigenvectors[0, 3:].reshape(3, -1)
    projector = optical.conj().T @ optical
    ref_optical = reference.eigenvectors[3:].reshape(3, -1)
    np.testing.assert_allclose(projector, ref_optical.T @ ref_optical, atol=1e-10)

    rng = np.random.default_rng(0)
    q = rng.uniform(-0.5, 0.5, (4, 3))
    for point in q:
        d = model.dynamical_matrix(point)
        assert np.abs(d - d.conj().T).max() < 1e-12 * np.abs(d).max()
        assert np.abs(d.imag).max() > 1e-3 * np.abs(d).max()  # genuinely complex off Γ
    shifted = model.modes(np.concatenate([q, -q, q + [1, -2, 0]]))
    nu_q = shifted.frequencies_THz.reshape(3, 4, -1)
    np.testing.assert_allclose(nu_q[1], nu_q[0], atol=1e-9)
    np.testing.assert_allclose(nu_q[2], nu_q[0], atol=1e-9)
    vectors = shifted.eigenvectors.reshape(-1, 6, 6)
    np.testing.assert_allclose(
        vectors.conj() @ np.swapaxes(vectors, 1, 2), np.broadcast_to(np.eye(6), vectors.shape),
        atol=1e-10,
    )  # fmt: skip

    from_fc = load_phonon_model(fc_file, si, supercell_matrix=np.diag(REPS)).modes(q)
    np.testing.assert_allclose(from_fc.frequencies_THz, nu_q[0], atol=1e-8)
    with pytest.raises(PhononError, match="supercell matrix"):
        load_phonon_model(fc_file, si)


# ----------------------------------------------------------------------------- couplings
@pytest.fixture(scope="module")
def model():
    return tiny_float64_model(CUTOFF_A)


@pytest.fixture(scope="module")
def rattled() -> Atoms:
    atoms = bulk("Si", "diamond", a=A_SI)
    atoms.rattle(0.05, seed=3)
    return atoms


@pytest.fixture(scope="module")
def rattled_kernels(model, rattled):
    return model_kernels(model, rattled, REPS)


def _bloch(kernels, flat_q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(…, K, n, n) ⟨i, k+q| ∂X |j, k⟩ from phase-summed flat blocks (…, total)."""
    space = RealSpaceMatrices(kernels.layout)
    return space.at(space.real_space(flat_q), k)


def test_q0_equals_gamma_path(model, rattled, rattled_kernels):
    """At q = 0 the supercell kernel gives exactly the Γ couplings of `eph.eph_matrix_elements`
    (autograd on the primitive cell with all images moved, exact ∂S)."""
    rng = np.random.default_rng(1)
    u = rng.normal(size=(1, 1, 2, 3))  # any real pattern (Å)
    graph, edges = _model_graph(model, rattled, "primitive")
    dh = model_hamiltonian_derivative(model, graph, u[0], ["h"])["h"]
    dh = flat_blocks(dh, rattled.numbers, edges, model.universal)[0]
    cell = np.asarray(rattled.cell)
    tables = _tables(model, edge_displacements(rattled.positions, cell, edges))
    ds = exact_overlap_derivative(tables, rattled.numbers, rattled.positions, cell, edges, u[0])
    k = rattled_kernels
    bloch = BlochHamiltonian(rattled.numbers, k.layout.n_orb, edges, k.h, k.s)
    ours = k.couplings(K_TEST, np.zeros((1, 3)), u.astype(complex), np.ones((1, 1)))
    for ik, point in enumerate(K_TEST):
        eps, g = eph_matrix_elements(bloch, dh, ds[0], point)
        np.testing.assert_allclose(ours.eps_k[ik], eps, atol=1e-10)
        # same eigensolver gauge is not guaranteed: compare |g| (non-degenerate bands)
        np.testing.assert_allclose(np.abs(ours.g_eV[0, ik, 0]), np.abs(g), atol=1e-9)
        assert np.abs(g).max() > 1e-2


@pytest.fixture(scope="module")
def kernels_412(model, rattled):
    return model_kernels(model, rattled, (4, 1, 2))


@pytest.mark.parametrize(
    "reps, q",
    [
        ((2, 2, 2), (0.5, 0.0, 0.0)),
        ((2, 2, 2), (0.0, 0.5, 0.5)),
        ((4, 1, 2), (0.25, 0.0, 0.5)),
        ((4, 1, 2), (0.75, 0.0, 0.0)),
    ],
)
def test_kernel_equals_folded_supercell_derivative(
    model, rattled, rattled_kernels, kernels_412, reps, q
):
    """⟨i, k+q| ∂_q H |j, k⟩ from the phase-summed kernel equals the direct derivative of the
    supercell along the complex pattern u_κ e^{2πi q·L} (real and imaginary parts as two
    real patterns), Bloch-summed at the supercell wave vector and unfolded with the
    primitive Bloch sums; same for S. q = ¼, ¾ have complex phases (sign conventions)."""
    q = np.asarray(q)
    kernels = rattled_kernels if reps == REPS else kernels_412
    rng = np.random.default_rng(2)
    u = rng.normal(size=(2, 3)) + 1j * rng.normal(size=(2, 3))
    sc = build_supercell(rattled, reps)
    cells = cell_triples(reps)
    pattern = (np.exp(2j * np.pi * cells @ q)[:, None, None] * u[None]).reshape(-1, 3)
    real = np.stack([pattern.real, pattern.imag])
    graph, edges_sc = _model_graph(model, sc, "supercell")
    d = model_hamiltonian_derivative(model, graph, real, ["h"])["h"]
    dh = flat_blocks(d, sc.numbers, edges_sc, model.universal)
    cell_sc = np.asarray(sc.cell)
    tables = _tables(model, edge_displacements(sc.positions, cell_sc, edges_sc))
    ds = exact_overlap_derivative(tables, sc.numbers, sc.positions, cell_sc, edges_sc, real)
    space_sc = RealSpaceMatrices(BlockLayout(np.tile(kernels.layout.n_orb, len(cells)), edges_sc))
    n = kernels.layout.n
    for direct_flat, kernel in ((dh, kernels.kernel_h), (ds, kernels.kernel_s)):
        direct_sc = direct_flat[0] + 1j * direct_flat[1]
        ours = _bloch(kernels, kernel.at(q[None], u[None, None])[0, 0], K_TEST)
        for ik, k in enumerate(K_TEST):
            big = space_sc.at(space_sc.real_space(direct_sc), (k * np.array(reps))[None])[0]
            big = big.reshape(len(cells), n, len(cells), n)
            bra = np.exp(-2j * np.pi * cells @ (k + q))
            ket = np.exp(2j * np.pi * cells @ k)
            unfolded = np.einsum("a,aibj,b->ij", bra, big, ket) / len(cells)
            assert np.abs(unfolded).max() > 1e-3
            np.testing.assert_allclose(ours[ik], unfolded, atol=1e-10)


def test_larger_supercell_gives_the_same_q(model, rattled, rattled_kernels):
    """The sum over the supercell's cells is exact for commensurate q: a 4×2×2 supercell
    gives the same ∂_q H, ∂_q S as the 2×2×2 one at q = (½, ½, 0)."""
    q = np.array([[0.5, 0.5, 0.0]])
    u = np.random.default_rng(4).normal(size=(1, 1, 2, 3)).astype(complex)
    big = model_kernels(model, rattled, (4, 2, 2))
    for a, b in (
        (rattled_kernels.kernel_h, big.kernel_h),
        (rattled_kernels.kernel_s, big.kernel_s),
    ):
        xa, xb = a.at(q, u), b.at(q, u)
        assert np.abs(xa).max() > 1e-3
        np.testing.assert_allclose(xa, xb, atol=1e-11)
    with pytest.raises(ValueError, match="not commensurate"):
        rattled_kernels.kernel_h.at(np.array([[0.25, 0, 0]]), u)


@pytest.fixture(scope="module")
def ideal_kernels(model):
    return model_kernels(model, bulk("Si", "diamond", a=A_SI), REPS)


def _mode_couplings(kernels, phonons, k, q) -> QCouplings:
    modes = phonons.modes(q)
    return kernels.couplings(k, q, modes.zero_point_patterns(), modes.frequencies_THz)


def _random_unitary_in_levels(values: np.ndarray, tol: float, rng) -> np.ndarray:
    """Block-diagonal unitary mixing only states of one degenerate level (random phases on
    non-degenerate ones)."""
    out = np.zeros((len(values), len(values)), dtype=complex)
    start = 0
    while start < len(values):
        stop = start + 1
        while stop < len(values) and values[stop] - values[stop - 1] < tol:
            stop += 1
        z = rng.normal(size=(stop - start,) * 2) + 1j * rng.normal(size=(stop - start,) * 2)
        out[start:stop, start:stop] = np.linalg.qr(z)[0]
        start = stop
    return out


def test_gauge_invariance(ideal_kernels, phonon_files):
    """|g| (degenerate bands at k, k+q and degenerate modes averaged) is unchanged by random
    unitaries inside degenerate subspaces; the raw |g_mn| is not (ideal Si at Γ → X)."""
    phonons = load_phonon_model(phonon_files[0])
    c = _mode_couplings(ideal_kernels, phonons, np.zeros((1, 3)), np.array([[0.0, 0.5, 0.5]]))
    rng = np.random.default_rng(5)
    u_k = _random_unitary_in_levels(c.eps_k[0], 1e-4, rng)
    u_kq = _random_unitary_in_levels(c.eps_kq[0, 0], 1e-4, rng)
    u_nu = _random_unitary_in_levels(c.frequencies_THz[0], 1e-3, rng)
    g = np.einsum("Mm,mab->Mab", u_nu.T, c.g_eV[0, 0])  # modes mixed
    g = np.einsum("am,Mab,bn->Mmn", u_kq.conj(), g, u_k)  # bands rotated
    rotated = QCouplings(
        c.kpoints_frac, c.qpoints_frac, c.eps_k, c.eps_kq, c.frequencies_THz, g[None, None]
    )
    assert np.abs(np.abs(rotated.g_eV) - np.abs(c.g_eV)).max() > 1e-3  # the gauge matters raw
    np.testing.assert_allclose(rotated.gauge_abs(), c.gauge_abs(), atol=1e-10)


def test_time_reversal_and_periodicity(ideal_kernels, rattled_kernels, phonon_files):
    """|g(−k, −q)| = |g(k, q)| (real H(R)) and |g(k + G, q + G′)| = |g(k, q)|, on the rattled
    cell (no accidental symmetry) with the spring-model modes."""
    phonons = load_phonon_model(phonon_files[0])
    k = np.array([[0.13, 0.29, 0.41]])
    for q in ([0.5, 0.0, 0.5], [0.5, 0.5, 0.5]):
        q = np.array([q])
        ref = _mode_couplings(rattled_kernels, phonons, k, q).gauge_abs()
        flipped = _mode_couplings(rattled_kernels, phonons, -k, -q).gauge_abs()
        shifted = _mode_couplings(
            rattled_kernels, phonons, k + [1, 0, -1], q + [0, 2, 1]
        ).gauge_abs()
        assert ref.max() > 1e-3
        np.testing.assert_allclose(flipped, ref, atol=1e-9)
        np.testing.assert_allclose(shifted, ref, atol=1e-9)
    acoustic = _mode_couplings(ideal_kernels, phonons, k, np.zeros((1, 3)))
    assert np.abs(acoustic.g_eV[0, 0, :3]).max() == 0.0  # no zero-point amplitude at ω = 0


@pytest.mark.parametrize("q", [(0.0, 0.5, 0.5), (0.5, 0.0, 0.0), (0.5, 0.5, 0.0)])
def test_cell_phase_modes_are_supercell_modes(phonon_files, q):
    """The pattern e_κ(q) e^{2πi q·L} of `PhononModel.modes` (cell-phase convention) is an
    eigenvector of the supercell's mass-weighted force constants with ω², for every mode:
    the phase convention the couplings rely on (the wrong sign of the e^{2πi q·τ} factor
    fails at X, where it is complex)."""
    phonons = load_phonon_model(phonon_files[0])
    sc = phonons.phonon.supercell
    primitive = phonons.phonon.primitive
    fc = phonons.phonon.force_constants
    if fc.shape[0] != fc.shape[1]:  # phonopy.load keeps the compact form
        from phonopy.harmonic.force_constants import compact_fc_to_full_fc

        fc = compact_fc_to_full_fc(primitive, fc)  # (N_sc, N_sc, 3, 3), supercell atom order
    masses = np.asarray(sc.masses)
    prim_of = np.array([primitive.p2p_map[s] for s in primitive.s2p_map])
    lattice = phonons.cell
    offsets = np.linalg.solve(lattice.T, (sc.positions - phonons.positions[prim_of]).T).T
    cells = np.rint(offsets)
    assert np.abs(offsets - cells).max() < 1e-6
    modes = phonons.modes(np.array([q]))
    dyn = fc / np.sqrt(masses[:, None, None, None] * masses[None, :, None, None])
    dyn = dyn.transpose(0, 2, 1, 3).reshape(3 * len(masses), -1)
    eigenvalues = []
    for e in modes.eigenvectors[0]:
        w = (e[prim_of] * np.exp(2j * np.pi * cells @ np.asarray(q))[:, None]).reshape(-1)
        image = dyn @ w
        value = (w.conj() @ image) / (w.conj() @ w)
        np.testing.assert_allclose(image, value * w, atol=1e-8 * np.abs(image).max() + 1e-12)
        eigenvalues.append(value.real)
    nu = modes.frequencies_THz[0]
    scale = np.sqrt(np.array(eigenvalues)) / nu
    np.testing.assert_allclose(scale, scale[0], rtol=1e-6)


def test_supercell_maps_refuse_mismatches():
    """A supercell whose atoms are not lattice translates of the primitive ones, or edges
    built with a longer cutoff than the primitive list, are refused with the fix named."""
    from foundation.data.graph import neighbor_edges
    from foundation.physics.supercells import atom_cells, edge_map

    si = bulk("Si", "diamond", a=A_SI)
    sc = build_supercell(si, (2, 1, 1))
    moved = sc.positions.copy()
    moved[3] += 0.1
    with pytest.raises(ValueError, match="build it with build_supercell"):
        atom_cells(si, moved, len(si))
    cell_sc = np.asarray(sc.cell)
    prim_edges = neighbor_edges(si.numbers, si.positions, si.cell[:], si.pbc, 3.0)
    sc_edges = neighbor_edges(sc.numbers, sc.positions, cell_sc, sc.pbc, 4.0)
    with pytest.raises(ValueError, match="same cutoff"):
        edge_map(si, (2, 1, 1), sc.positions, sc_edges, prim_edges)
    same = neighbor_edges(sc.numbers, sc.positions, cell_sc, sc.pbc, 3.0)
    index, cells = edge_map(si, (2, 1, 1), sc.positions, same, prim_edges)
    assert len(index) == 2 * len(prim_edges) and np.bincount(index).tolist() == [2] * len(
        prim_edges
    )
