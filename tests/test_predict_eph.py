"""``foundation-predict --eph``: Γ-phonon e-ph couplings of a structure from a model.

Runs the CLI on the shipped Si cell of eph_mini with its phonopy file and the shipped tiny
model: eph.npz holds g (meV) for the 3 optical modes at the requested k-points, equal to
`predict_eph`; the model obeys the Γ selection rule of the even optical mode (Γ25' ↔ Γ15
forbidden), which its equivariance guarantees; a phonon file of another cell is refused.
"""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
from ase import Atoms
from train_support import REPO

from foundation.data.shards import iter_records
from foundation.physics.phonons import load_gamma_phonons
from foundation.physics.predict import load_model, main, predict_eph, predict_record

EPH = REPO / "data_shards" / "eph_mini"
MODEL = REPO / "pretrained" / "tiny_pbe_mini.pt"
PHONONS = EPH / "phonons" / "Si-diamond-ideal.yaml"
GENERIC_K = [0.13, 0.29, 0.41]


@pytest.fixture(scope="module")
def si(tmp_path_factory):
    record = next(r for r in iter_records(EPH) if r.key == "Si-diamond-ideal")
    atoms = Atoms(numbers=record.numbers, positions=record.positions, cell=record.cell, pbc=True)
    path = tmp_path_factory.mktemp("si") / "POSCAR"
    ase.io.write(path, atoms, format="vasp")
    return atoms, path


def test_predict_eph_writes_couplings(si, tmp_path, capsys):
    atoms, poscar = si
    out = tmp_path / "out"
    argv = [str(MODEL), str(poscar), "-o", str(out), "--eph", str(PHONONS), "--no-progress"]
    assert main([*argv, "--eph-k", "0", "0", "0", "--eph-k", *map(str, GENERIC_K)]) == 0
    printed = capsys.readouterr().out
    assert "e-ph: 3 Γ modes (17.96, 17.96, 17.96 THz) at 2 k-point(s)" in printed
    data = np.load(out / "eph.npz", allow_pickle=False)
    assert data["g_meV"].shape == (2, 3, 8, 8) and data["g_meV"].dtype == np.complex128
    np.testing.assert_allclose(data["frequencies_THz"], 17.96, atol=0.01)
    summary = json.loads((out / "eph.json").read_text())
    assert summary["modes"] == [3, 4, 5] and summary["max_abs_g_meV"] == data["abs_g_meV"].max()

    model = load_model(MODEL)
    record, _ = predict_record(model, atoms, progress=False)
    phonons = load_gamma_phonons(PHONONS, structure=atoms)
    couplings, _ = predict_eph(model, record, phonons, np.array([[0.0, 0.0, 0.0], GENERIC_K]))
    np.testing.assert_allclose(data["g_meV"], 1e3 * couplings.g_eV, rtol=1e-6, atol=1e-6)

    # Γ: bands Γ1 | Γ25' (3) | Γ15 (3) | Γ2'; the optical mode is even, Γ15 odd
    eps = data["eigenvalues_eV"][0]
    assert np.ptp(eps[1:4]) < 1e-3 and np.ptp(eps[4:7]) < 1e-3
    g = data["abs_g_meV"][0]
    assert g[:, 1:4, 4:7].max() < 1e-3 * g.max()


def test_predict_eph_refuses_another_cell(si, tmp_path, capsys):
    atoms, _ = si
    strained = atoms.copy()
    strained.set_cell(atoms.cell * 1.01, scale_atoms=True)
    poscar = tmp_path / "POSCAR"
    ase.io.write(poscar, strained, format="vasp")
    code = main([str(MODEL), str(poscar), "-o", str(tmp_path / "o"), "--eph", str(PHONONS),
                 "--no-progress"])  # fmt: skip
    assert code == 2
    assert "belong to a different cell" in capsys.readouterr().err
