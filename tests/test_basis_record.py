"""Basis registry, universal padded basis, orbital conventions and HamiltonianRecord checks."""

import numpy as np
import pytest

from foundation import keys
from foundation.basis import BasisSet, convention, parse_shell_spec, shell_spec
from foundation.data.record import HamiltonianRecord, RecordError, energy_zero


def test_shell_spec_round_trip_and_errors():
    assert parse_shell_spec("2s2p1d") == (0, 0, 1, 1, 2)
    assert shell_spec((0, 0, 1, 1, 2)) == "2s2p1d"
    with pytest.raises(ValueError, match="2x"):
        parse_shell_spec("2x")


def test_pyscf_registry_matches_pyscf_ao_count():
    from pyscf.pbc import gto

    basis = BasisSet.from_pyscf("gth-szv-molopt-sr", ["Si", "Na", "Ti"])
    for el in basis.elements:
        cell = gto.Cell(
            atom=f"{el} 0 0 0", a=np.eye(3) * 6, basis="gth-szv-molopt-sr", pseudo="gth-pbe"
        )
        cell.spin = None
        cell.build(verbose=0)
        assert basis.n_orb(el) == cell.nao, el
    with pytest.raises(ValueError, match="no entry for element"):
        BasisSet.from_pyscf("gth-szv", ["Ti"])


def test_universal_basis_masks_place_each_shell_in_its_l_slot():
    basis = BasisSet.from_spec({"Si": "1s1p1d", "Na": "2s1p", "H": "1s"})
    uni = basis.universal
    assert uni.shells == (0, 0, 1, 2)
    assert uni.n_orb == 1 + 1 + 3 + 5
    np.testing.assert_array_equal(uni.orbital_index(1), [0])
    np.testing.assert_array_equal(uni.orbital_index(11), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(uni.orbital_index(14), [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert uni.mask(14).sum() == basis.n_orb("Si")
    with pytest.raises(KeyError, match="Element O is not in basis"):
        uni.orbital_index(8)


def test_conventions_are_orthogonal_permutations_with_signs():
    for name in ("pyscf", "openmx", "abacus"):
        conv = convention(name)
        for l in range(4):
            u = conv.shell_matrix(l)
            np.testing.assert_allclose(u @ u.T, np.eye(2 * l + 1), err_msg=f"{name} l={l}")
    with pytest.raises(KeyError, match="Unknown orbital convention"):
        convention("vasp")


def _two_atom_record(rng, mismatch=0.0):
    """A physically consistent toy record: random symmetric pair blocks on a dimer chain."""
    basis = BasisSet.from_spec({"C": "1s1p", "H": "1s"})
    numbers = [6, 1]
    n = {0: 4, 1: 1}
    edges, hb, sb = [], [], []
    pairs = {}
    for i in range(2):
        for j in range(2):
            for rx in (-1, 0, 1):
                if (i, j, rx) in pairs:
                    continue
                h = rng.normal(size=(n[i], n[j]))
                s = 0.1 * rng.normal(size=(n[i], n[j]))
                if i == j and rx == 0:
                    h = h + h.T
                    s = np.eye(n[i])
                pairs[(i, j, rx)] = (h, s)
                pairs[(j, i, -rx)] = (h.T + mismatch, s.T)
    for (i, j, rx), (h, s) in sorted(pairs.items()):
        edges.append((i, j, rx, 0, 0))
        hb.append(h)
        sb.append(s)
    return dict(
        key="toy-CH",
        numbers=numbers,
        positions=[[0, 0, 0], [1.1, 0, 0]],
        cell=np.diag([3.0, 10.0, 10.0]),
        pbc=[True, False, False],
        basis=basis,
        edges=np.array(edges),
        h_blocks=hb,
        s_blocks=sb,
    )


def test_record_energy_zero_and_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    args = _two_atom_record(rng)
    rec = HamiltonianRecord.from_blocks(**args, meta={keys.N_ELECTRONS: 5})
    h_abs = np.concatenate([b.reshape(-1) for b in args["h_blocks"]])
    mu = rec.meta[keys.ENERGY_ZERO]
    assert mu == pytest.approx(energy_zero(h_abs, rec.s), rel=1e-6)
    # H − μS is orthogonal to S: the shift removes the S component exactly.
    assert abs(np.dot(rec.h.astype(float), rec.s.astype(float))) < 1e-3
    np.testing.assert_allclose(rec.absolute_h(), h_abs, atol=1e-5)
    rec.save(tmp_path / "rec")
    back = HamiltonianRecord.load(tmp_path / "rec")
    np.testing.assert_array_equal(back.h, rec.h)
    np.testing.assert_array_equal(back.edges, rec.edges)
    assert back.basis == rec.basis and back.meta == rec.meta
    back.validate()


def test_record_validation_names_structure_edge_and_block():
    rng = np.random.default_rng(1)
    with pytest.raises(RecordError, match=r"toy-CH: 'h' is not hermitian: block of edge \d+"):
        HamiltonianRecord.from_blocks(**_two_atom_record(rng, mismatch=0.01))
    args = _two_atom_record(rng)
    args["h_blocks"][0] = args["h_blocks"][0][:, :1]
    with pytest.raises(RecordError, match="wrong basis or truncated blocks"):
        HamiltonianRecord.from_blocks(**args)
    args = _two_atom_record(rng)
    args["edges"] = args["edges"][1:]
    args["h_blocks"], args["s_blocks"] = args["h_blocks"][1:], args["s_blocks"][1:]
    with pytest.raises(RecordError, match="has no reverse edge"):
        HamiltonianRecord.from_blocks(**args)
    args = _two_atom_record(rng)
    args["basis"] = BasisSet.from_spec({"C": "1s1p"})
    with pytest.raises(RecordError, match="Element H is not in basis"):
        HamiltonianRecord.from_blocks(**args)
