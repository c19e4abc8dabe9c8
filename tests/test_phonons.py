"""Γ phonons: the shipped phonopy files of eph_mini, the loader, and PySCF forces.

Frequencies of the shipped files (PBE, gth-szv-molopt-sr, experimental lattice constants):
Si Γ optical 17.96 THz (experiment 15.6 THz: the minimal basis stiffens the bond), AlP
15.06 THz (TO; experiment 13.2 THz); acoustic modes at 0 after the acoustic sum rule.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from train_support import REPO

from foundation.physics.phonons import PhononError, load_gamma_phonons

EPH = REPO / "data_shards" / "eph_mini"


def _cell(key: str) -> Atoms:
    from foundation.data.shards import iter_records

    record = next(r for r in iter_records(EPH) if r.key == key)
    return Atoms(numbers=record.numbers, positions=record.positions, cell=record.cell, pbc=True)


def _phonon_file(key: str):
    manifest = json.loads((EPH / "manifest.json").read_text())
    return EPH / manifest["eph"]["phonons"][key]["file"]


@pytest.mark.parametrize(
    ("key", "optical_THz"),
    [("Si-diamond-ideal", [17.96] * 3), ("AlP-zincblende-ideal", [15.06] * 3),
     ("Si-diamond-00", [16.70, 18.67, 19.22]), ("AlP-zincblende-00", [13.34, 16.29, 17.05])],
)  # fmt: skip
def test_shipped_gamma_phonons(key, optical_THz):
    """Acoustic modes ~0, optical as generated; eigenvectors orthonormal; zero-point
    displacements u = e·sqrt(ħ/2Mω) are ~0.02 Å and move the centre of mass by nothing."""
    cell = _cell(key)
    modes = load_gamma_phonons(_phonon_file(key), structure=cell)
    print(key, np.round(modes.frequencies_THz, 3))
    assert np.all(np.abs(modes.frequencies_THz[:3]) < 1e-3)
    np.testing.assert_allclose(modes.frequencies_THz[3:], optical_THz, atol=0.01)
    e = modes.eigenvectors.reshape(6, 6)
    np.testing.assert_allclose(e @ e.T, np.eye(6), atol=1e-10)
    u = modes.zero_point_patterns()
    assert u.shape == (3, 2, 3) and 0.015 < np.abs(u).max() < 0.04
    momentum = (modes.masses_amu[None, :, None] * u).sum(axis=1)
    np.testing.assert_allclose(momentum, 0.0, atol=1e-10)


def test_force_constants_file_and_structure_checks(tmp_path):
    """The same modes from a FORCE_CONSTANTS text file plus the structure; a rotated or
    different structure is refused with the reason."""
    import phonopy
    from phonopy.file_IO import write_FORCE_CONSTANTS

    cell = _cell("AlP-zincblende-00")
    path = _phonon_file("AlP-zincblende-00")
    reference = load_gamma_phonons(path, structure=cell)
    write_FORCE_CONSTANTS(phonopy.load(path, primitive_matrix="P").force_constants,
                          tmp_path / "FORCE_CONSTANTS")  # fmt: skip
    again = load_gamma_phonons(tmp_path / "FORCE_CONSTANTS", structure=cell)
    np.testing.assert_allclose(again.frequencies_THz, reference.frequencies_THz, atol=1e-6)
    with pytest.raises(PhononError, match="holds no structure"):
        load_gamma_phonons(tmp_path / "FORCE_CONSTANTS")
    rotated = cell.copy()
    rotated.rotate(30, "z", rotate_cell=True)
    with pytest.raises(PhononError, match="different cell"):
        load_gamma_phonons(path, structure=rotated)
    with pytest.raises(PhononError, match="are for atoms"):
        load_gamma_phonons(path, structure=cell[::-1])


def test_pyscf_forces_match_energy_differences():
    """Analytic PySCF forces (GTH pseudopotentials) = −dE/dx by central differences."""
    pytest.importorskip("pyscf")
    from ase.build import bulk

    from foundation.data.dft.phonons import pyscf_forces
    from foundation.data.dft.pyscf import hartree_ev, run_scf

    atoms = bulk("Si", "diamond", a=5.431)
    atoms.positions[0] += [0.03, -0.02, 0.01]
    settings = {"kmesh": (2, 2, 2), "ke_cutoff_Ha": 18, "conv_tol": 1e-10}
    forces, _ = pyscf_forces(atoms, **settings)
    step = 0.005
    energies = []
    for sign in (1, -1):
        moved = atoms.copy()
        moved.positions[0, 0] += sign * step
        energies.append(run_scf(moved, key="moved", **settings).mf.e_tot * hartree_ev())
    numeric = -(energies[0] - energies[1]) / (2 * step)
    print(f"F_x analytic {forces[0, 0]:.6f} eV/Å, −dE/dx {numeric:.6f} eV/Å")
    assert abs(forces[0, 0] - numeric) < 1e-3 * abs(numeric)
