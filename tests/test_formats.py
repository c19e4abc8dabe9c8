"""DeepH / DeePTB folders: record → folder → record round trips and malformed-input errors."""

import json

import h5py
import numpy as np
import pytest
import scipy.linalg

from foundation.basis import BasisSet, convention
from foundation.data.formats import (
    FormatError,
    is_deeph_folder,
    is_deeptb_folder,
    read_deeph,
    read_deeptb,
    write_deeph,
    write_deeptb,
)
from foundation.data.formats.common import element_transform
from foundation.data.synthetic import random_record

KPTS = np.array([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.1, 0.2, 0.3], [0.25, -0.5, 0.5]])


def band_energies(record, kpts=KPTS):
    """Eigenvalues (eV, DFT zero) of H(k)c = εS(k)c, H(k) = Σ_R e^{2πik·R} H(R): a local Bloch sum."""
    n = record.n_orb_per_atom
    start = np.concatenate([[0], np.cumsum(n)])
    h_flat, s_flat = record.absolute_h(), record.s.astype(np.float64)
    off, shapes = record.block_offsets, record.block_shapes
    out = []
    for k in kpts:
        hk = np.zeros((start[-1], start[-1]), complex)
        sk = np.zeros_like(hk)
        for e, (i, j, *r) in enumerate(record.edges.tolist()):
            phase = np.exp(2j * np.pi * np.dot(k, r))
            sl = (slice(start[i], start[i + 1]), slice(start[j], start[j + 1]))
            hk[sl] += phase * h_flat[off[e] : off[e + 1]].reshape(shapes[e])
            sk[sl] += phase * s_flat[off[e] : off[e + 1]].reshape(shapes[e])
        out.append(scipy.linalg.eigh(hk, sk, eigvals_only=True))
    return np.array(out)


def blocks_by_edge(record, name="h"):
    return {tuple(e): b for e, b in zip(record.edges.tolist(), record.blocks(name), strict=True)}


def absolute_blocks(record):
    flat, off = record.absolute_h(), record.block_offsets
    return {
        tuple(e): flat[off[k] : off[k + 1]].reshape(record.block_shapes[k])
        for k, e in enumerate(record.edges.tolist())
    }


def assert_same_record(a, b, atol=2e-5):
    assert a.key == b.key
    np.testing.assert_array_equal(a.numbers, b.numbers)
    np.testing.assert_allclose(a.positions, b.positions, atol=1e-12)
    np.testing.assert_allclose(a.cell, b.cell, atol=1e-12)
    np.testing.assert_array_equal(a.pbc, b.pbc)
    assert a.basis == b.basis
    assert {k: v for k, v in a.meta.items() if k != "energy_zero_eV"} == {
        k: v for k, v in b.meta.items() if k != "energy_zero_eV"
    }
    assert a.meta["energy_zero_eV"] == pytest.approx(b.meta["energy_zero_eV"], abs=1e-6)
    for name in ("h", "s"):
        ba, bb = blocks_by_edge(a, name), blocks_by_edge(b, name)
        assert ba.keys() == bb.keys()
        for k in ba:
            np.testing.assert_allclose(ba[k], bb[k], atol=atol, err_msg=f"{name} {k}")
    np.testing.assert_allclose(band_energies(a), band_energies(b), atol=1e-4)


@pytest.fixture(scope="module")
def record():
    # Ce carries an f shell and Ti repeated s/d shells, so every convention table is exercised.
    return random_record("GaAsCeTi_0", ["Ga", "As", "Ce", "Ti", "As"], seed=3, cutoff_A=4.0)


FORMATS = {
    "deeph": (read_deeph, write_deeph, is_deeph_folder),
    "deeptb": (read_deeptb, write_deeptb, is_deeptb_folder),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_keeps_blocks_structure_and_bands(tmp_path, record, fmt):
    read, write, is_folder = FORMATS[fmt]
    assert (record.edges[:, 2:5] != 0).any(), "test record needs periodic-image edges"
    folder = write(record, tmp_path / "s0")
    assert is_folder(folder) and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert_same_record(record, read(folder))


def test_deeph_files_follow_deeph_layout(tmp_path, record):
    folder = write_deeph(record, tmp_path / "s0")
    np.testing.assert_allclose(np.loadtxt(folder / "lat.dat").T, record.cell)  # columns = vectors
    np.testing.assert_allclose(np.loadtxt(folder / "site_positions.dat").T, record.positions)
    np.testing.assert_allclose(
        np.loadtxt(folder / "rlat.dat").T @ record.cell.T, 2 * np.pi * np.eye(3), atol=1e-10
    )
    with h5py.File(folder / "hamiltonians.h5") as f:
        assert "[0, 0, 0, 1, 1]" in f  # 1-based on-site key of the first atom
        ga = f["[0, 0, 0, 1, 1]"][()]
    # Ga: s p d → OpenMX p (x, y, z), d (z², x²−y², xy, xz, yz)
    pkg = blocks_by_edge(record)[(0, 0, 0, 0, 0)] + record.meta["energy_zero_eV"] * np.eye(9)
    u = element_transform((0, 1, 2), (0, 1, 2), convention("openmx"))
    np.testing.assert_allclose(ga, u.T @ pkg @ u, atol=1e-4)
    # Named orbitals. Package: s | p (y, z, x) | d (xy, yz, z², xz, x²−y²).
    # OpenMX: s | p (x, y, z) | d (z², x²−y², xy, xz, yz), no signs (DeepH-pack rotate.py).
    pkg_of_openmx = [0, 3, 1, 2, 6, 8, 4, 7, 5]
    np.testing.assert_allclose(ga, pkg[np.ix_(pkg_of_openmx, pkg_of_openmx)], atol=1e-4)


def test_abacus_table_by_named_orbitals(tmp_path, record):
    # ABACUS: m = 0, +1, −1, +2, −2 with the (−1)^m phase: p (z, −x, −y), d (z², −xz, −yz,
    # x²−y², xy) — DeePTB ABACUS2DeePTB / DeepH-pack abacus_get_data.py.
    folder = write_deeptb(record, tmp_path / "a", orbital_convention="abacus")
    with h5py.File(folder / "hamiltonians.h5") as f:
        raw = f["0/0_0_0_0_0"][()]
    pkg = blocks_by_edge(record)[(0, 0, 0, 0, 0)] + record.meta["energy_zero_eV"] * np.eye(9)
    index = [0, 2, 3, 1, 6, 7, 5, 8, 4]
    sign = np.array([1, 1, -1, -1, 1, -1, -1, 1, 1])
    np.testing.assert_allclose(raw, np.outer(sign, sign) * pkg[np.ix_(index, index)], atol=1e-4)


def test_deeptb_keys_are_zero_based_in_group_zero(tmp_path, record):
    folder = write_deeptb(record, tmp_path / "s0")
    with h5py.File(folder / "hamiltonians.h5") as f:
        assert list(f) == ["0"]
        assert "0_0_0_0_0" in f["0"]
    np.testing.assert_allclose(np.loadtxt(folder / "cell.dat"), record.cell)  # rows = vectors
    assert (folder / "basis.dat").read_text().splitlines()[0] == "1s1p1d"


def test_deeptb_legacy_one_based_files_and_abacus_order(tmp_path, record):
    folder = write_deeptb(record, tmp_path / "s0")
    for name in ("hamiltonians.h5", "overlaps.h5"):
        with h5py.File(folder / name, "r+") as f:
            blocks = {k: f["0"][k][()] for k in f["0"]}
            del f["0"]
            g = f.create_group("1")
            for k, b in blocks.items():
                i, j, *r = map(int, k.split("_"))
                g[f"{i + 1}_{j + 1}_{r[0]}_{r[1]}_{r[2]}"] = b
    assert_same_record(record, read_deeptb(folder))
    # Raw ABACUS order (m = 0, +1, −1, … with (−1)^m) reads with the abacus convention.
    abacus = write_deeptb(record, tmp_path / "abacus", orbital_convention="abacus")
    assert_same_record(record, read_deeptb(abacus, orbital_convention="abacus"))
    with h5py.File(abacus / "hamiltonians.h5") as fa, h5py.File(folder / "hamiltonians.h5") as fd:
        assert not np.allclose(fa["0/0_0_0_0_0"][()], fd["1/1_1_0_0_0"][()])


def test_deeptb_reorders_non_l_sorted_shells(tmp_path):
    basis = BasisSet("mixed", {"Si": (0, 1, 0, 2), "O": (1, 0)})
    rec = random_record("SiO", ["Si", "O", "O"], seed=5, basis=basis, cutoff_A=4.0)
    folder = write_deeptb(rec, tmp_path / "s0")
    assert (folder / "basis.dat").read_text().splitlines() == ["2s1p1d", "1s1p", "1s1p"]
    back = read_deeptb(folder, basis=rec.basis)
    assert back.basis == rec.basis
    assert_same_record(rec, back)
    # Without the registry the folder's own l-major order is kept; bands do not change.
    plain = read_deeptb(folder)
    assert plain.basis.shells["Si"] == (0, 0, 1, 2)
    np.testing.assert_allclose(band_energies(plain), band_energies(rec), atol=1e-4)


def test_reader_completes_a_missing_direction(tmp_path, record):
    folder = write_deeph(record, tmp_path / "s0")
    for name in ("hamiltonians.h5", "overlaps.h5"):
        with h5py.File(folder / name, "r+") as f:
            for k in list(f):
                rx, ry, rz, i, j = json.loads(k)
                if (i, rx, ry, rz) > (j, -rx, -ry, -rz):
                    del f[k]
    assert_same_record(record, read_deeph(folder))


@pytest.mark.parametrize("fmt", FORMATS)
def test_max_distance_keeps_short_edges_and_onsite(tmp_path, record, fmt):
    read, write, _ = FORMATS[fmt]
    cut = 3.0
    rec = read(write(record, tmp_path / "s0"), max_distance_A=cut)
    d = np.linalg.norm(record.edge_vectors(), axis=1)
    assert rec.n_edges == int(((d < cut) | (d == 0)).sum()) < record.n_edges
    assert rec.meta["edge_cutoff_A"] == cut
    full = absolute_blocks(record)  # compare absolute H: μ changes with the edge set
    for k, b in absolute_blocks(rec).items():
        np.testing.assert_allclose(b, full[k], atol=1e-4)


# ------------------------------------------------------------------------- malformed input
def _rewrite_block(path, key, new):
    with h5py.File(path, "r+") as f:
        del f[key]
        f[key] = new


@pytest.mark.parametrize(
    ("fmt", "missing", "match"),
    [
        ("deeph", "element.dat", "element.dat: missing"),
        ("deeph", "lat.dat", "lat.dat: missing"),
        ("deeph", "orbital_types.dat", "orbital_types.dat: missing"),
        ("deeph", "hamiltonians.h5", "hamiltonians.h5: missing"),
        ("deeph", "overlaps.h5", "overlaps.h5: missing; records need S"),
        ("deeptb", "positions.dat", "positions.dat: missing"),
        ("deeptb", "basis.dat", "basis.dat: missing.*pass basis="),
        ("deeptb", "overlaps.h5", "overlaps.h5: missing; records need S"),
    ],
)
def test_missing_file_is_named(tmp_path, record, fmt, missing, match):
    read, write, _ = FORMATS[fmt]
    folder = write(record, tmp_path / "s0")
    (folder / missing).unlink()
    with pytest.raises(FormatError, match=match):
        read(folder)


def test_missing_overlap_allowed_on_request(tmp_path, record):
    folder = write_deeph(record, tmp_path / "s0")
    (folder / "overlaps.h5").unlink()
    rec = read_deeph(folder, require_overlap=False)
    assert rec.s is None and rec.meta["energy_zero_eV"] == 0.0
    np.testing.assert_allclose(rec.h, record.absolute_h(), atol=1e-4)


def test_missing_onsite_block_is_named(tmp_path, record):
    folder = write_deeph(record, tmp_path / "s0")
    with h5py.File(folder / "hamiltonians.h5", "r+") as f:
        del f["[0, 0, 0, 2, 2]"]
    with pytest.raises(FormatError, match=r"hamiltonians.h5: no on-site block for atom 1"):
        read_deeph(folder)


@pytest.mark.parametrize("fmt", FORMATS)
def test_malformed_block_key_is_named(tmp_path, record, fmt):
    read, write, _ = FORMATS[fmt]
    folder = write(record, tmp_path / "s0")
    with h5py.File(folder / "hamiltonians.h5", "r+") as f:
        node = f if fmt == "deeph" else f["0"]
        node["[0, 0, 1]" if fmt == "deeph" else "0_0_0"] = np.zeros((1, 1))
    with pytest.raises(FormatError, match=r"hamiltonians.h5: dataset key .* is malformed; De"):
        read(folder)


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_block_shape_is_named(tmp_path, record, fmt):
    read, write, _ = FORMATS[fmt]
    folder = write(record, tmp_path / "s0")
    key = "[0, 0, 0, 1, 2]" if fmt == "deeph" else "0/0_1_0_0_0"
    _rewrite_block(folder / "overlaps.h5", key, np.zeros((3, 3)))
    with pytest.raises(
        FormatError, match=r"overlaps.h5: block \(i=0, j=1.*shape \(3, 3\).*need \(9, 4\)"
    ):
        read(folder)


def test_atom_index_out_of_range_is_named(tmp_path, record):
    folder = write_deeph(record, tmp_path / "s0")
    with h5py.File(folder / "hamiltonians.h5", "r+") as f:
        f["[0, 0, 0, 9, 1]"] = np.zeros((9, 9))
    with pytest.raises(FormatError, match=r"hamiltonians.h5: block \(i=9, j=1.*outside 1..5"):
        read_deeph(folder)


@pytest.mark.parametrize(
    ("fmt", "name"), [("deeph", "element.dat"), ("deeptb", "atomic_numbers.dat")]
)
def test_unknown_element_is_named(tmp_path, record, fmt, name):
    read, write, _ = FORMATS[fmt]
    folder = write(record, tmp_path / "s0")
    z = np.loadtxt(folder / name, dtype=int)
    z[0] = 150
    np.savetxt(folder / name, z, fmt="%d")
    with pytest.raises(FormatError, match=rf"{name}: unknown element \(atomic number 150\)"):
        read(folder)


def test_element_outside_given_basis_is_named(tmp_path, record):
    folder = write_deeph(record, tmp_path / "s0")
    small = BasisSet.from_spec({"Ga": "1s1p1d", "As": "1s1p", "Ti": "2s1p2d"}, name="small")
    with pytest.raises(FormatError, match=r"Z=58.*not in basis 'small'"):
        read_deeph(folder, basis=small)
    wrong = BasisSet.from_spec(
        {"Ga": "1s1p", "As": "1s1p", "Ti": "2s1p2d", "Ce": "1s1p1d1f"}, name="wrong"
    )
    with pytest.raises(FormatError, match=r"Z=31.*1s1p1d cannot map onto 1s1p"):
        read_deeph(folder, basis=wrong)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_h5_is_named(tmp_path, record, fmt, damage):
    read, write, _ = FORMATS[fmt]
    folder = write(record, tmp_path / "s0")
    path = folder / "hamiltonians.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 64)
    with pytest.raises(FormatError, match=r"hamiltonians.h5: .*(truncated or corrupt)"):
        read(folder)


def test_text_file_with_wrong_layout_is_named(tmp_path, record):
    folder = write_deeph(record, tmp_path / "s0")
    np.savetxt(folder / "site_positions.dat", record.positions)  # N×3 instead of 3×N
    with pytest.raises(
        FormatError, match=r"site_positions.dat: .*shape \(5, 3\), expected \(3, None\)"
    ):
        read_deeph(folder)
    folder = write_deeptb(record, tmp_path / "s1")
    (folder / "positions.dat").write_text("1.0 2.0 x\n")
    with pytest.raises(FormatError, match=r"positions.dat: cannot parse positions"):
        read_deeptb(folder)


def test_non_hermitian_blocks_are_named(tmp_path, record):
    folder = write_deeph(record, tmp_path / "s0")
    with h5py.File(folder / "hamiltonians.h5", "r+") as f:
        b = f["[0, 0, 0, 1, 1]"][()]
        b[0, 1] += 0.5
        del f["[0, 0, 0, 1, 1]"]
        f["[0, 0, 0, 1, 1]"] = b
    with pytest.raises(FormatError, match=r"s0: GaAsCeTi_0: 'h' is not hermitian"):
        read_deeph(folder)


def test_spinful_and_multi_frame_folders_are_refused(tmp_path, record):
    folder = write_deeph(record, tmp_path / "s0")
    info = json.loads((folder / "info.json").read_text())
    (folder / "info.json").write_text(json.dumps(info | {"isspinful": True}))
    with pytest.raises(FormatError, match="info.json: isspinful is true"):
        read_deeph(folder)
    folder = write_deeptb(record, tmp_path / "s1")
    info = json.loads((folder / "info.json").read_text())
    (folder / "info.json").write_text(json.dumps(info | {"nframes": 3}))
    with pytest.raises(FormatError, match="nframes = 3; only single-frame"):
        read_deeptb(folder)


def test_foreign_folder_without_saved_meta_gets_folder_key(tmp_path, record):
    folder = write_deeptb(record, tmp_path / "data.7")
    (folder / "foundation.json").unlink()  # what DeePTB's own folders lack
    rec = read_deeptb(folder, basis_name="abacus-dzp")
    assert rec.key == "data_7" and rec.basis.name == "abacus-dzp"
    assert rec.meta["source"] == "deeptb"
    np.testing.assert_allclose(band_energies(rec), band_energies(record), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_pyscf_record_round_trip_keeps_bands(tmp_path, fmt):
    """A real PySCF Si record (s, p shells, PySCF → package order) survives both formats."""
    from ase.build import bulk

    from foundation.data.dft.pyscf import compute_record

    rec = compute_record(bulk("Si"), key="Si_pyscf", cutoff_A=5.0, kmesh=(2, 2, 2))
    read, write, _ = FORMATS[fmt]
    back = read(write(rec, tmp_path / "si"), basis=rec.basis)
    assert_same_record(rec, back)
    kpts = np.array(rec.meta["dft_bands"]["kpts_frac"])
    np.testing.assert_allclose(band_energies(back, kpts), band_energies(rec, kpts), atol=1e-4)


def test_deeptb_info_json_holds_only_the_keys_deeptb_accepts(tmp_path, record):
    """DeePTB 2.2.1 checks info.json strictly; our key and meta live in foundation.json, and
    folders of older writers (a "foundation" entry in info.json) still read back."""
    folder = write_deeptb(record, tmp_path / "s0")
    info = json.loads((folder / "info.json").read_text())
    assert sorted(info) == ["natoms", "nframes", "pbc", "pos_type"]
    assert read_deeptb(folder).key == record.key
    legacy = json.loads((folder / "foundation.json").read_text())
    (folder / "foundation.json").unlink()
    (folder / "info.json").write_text(json.dumps(info | {"foundation": legacy}))
    assert_same_record(record, read_deeptb(folder))


def test_deeptb_dict_form_basis_dat(tmp_path, record):
    """basis.dat as DeePTB's examples and exporter write it: one dict line per element."""
    from ase.data import chemical_symbols

    folder = write_deeptb(record, tmp_path / "s0")
    lines = (folder / "basis.dat").read_text().splitlines()
    table = {chemical_symbols[int(z)]: spec for z, spec in zip(record.numbers, lines, strict=True)}
    (folder / "basis.dat").write_text(repr(table) + "\n")
    assert_same_record(record, read_deeptb(folder))
    missing = dict(list(table.items())[1:])
    (folder / "basis.dat").write_text(repr(missing) + "\n")
    with pytest.raises(FormatError, match="basis.dat: no shells for element"):
        read_deeptb(folder)
    (folder / "basis.dat").write_text("{'Si': __import__('os')}\n")
    with pytest.raises(FormatError, match="cannot read the element"):
        read_deeptb(folder)
