"""Structure recipes of pbe_main (`foundation.data.recipes`) and the slab handling of the PySCF
generator's k-meshes: determinism, geometry, coverage, sizes. No SCF except the slow test."""

from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from foundation.data import recipes
from foundation.data.dft import pyscf as gen

ROOT = Path(__file__).resolve().parents[1]
TRANSITION_METALS = set("Sc Ti V Cr Mn Fe Co Ni Cu Zn Y Zr Nb Mo Tc Ru Rh Pd Ag Cd".split())
PBE_MINI = set("Al Si P S Cl Ge As Se Br Ag In Sn Sb Te I Pb".split())


@pytest.fixture(scope="module")
def structures() -> list[tuple[str, Atoms]]:
    return recipes.main_structures(0)


def _same(a: list[tuple[str, Atoms]], b: list[tuple[str, Atoms]]) -> bool:
    return [k for k, _ in a] == [k for k, _ in b] and all(
        np.array_equal(x.numbers, y.numbers)
        and np.allclose(x.positions, y.positions, atol=0, rtol=0)
        and np.allclose(x.cell.array, y.cell.array, atol=0, rtol=0)
        for (_, x), (_, y) in zip(a, b, strict=True)
    )


def test_recipes_are_deterministic_in_the_seed(structures):
    planar = [s for s in structures if recipes.family_of(s[0]) in ("slab", "sheet", "supercell")]
    assert _same(planar, recipes.supercell_structures(0) + recipes.slab_structures(0)
                 + recipes.sheet_structures(0))  # fmt: skip
    other = recipes.bulk_structures(1)
    mine = [s for s in structures if s[0].startswith("bulk-")]
    assert [k for k, _ in other] == [k for k, _ in mine]
    assert not any(
        np.allclose(x.positions, y.positions) for (_, x), (_, y) in zip(other, mine, strict=True)
    )


def test_a_structure_does_not_depend_on_the_others():
    """Each structure draws from its own (seed, key) generator: more variants or families
    leave the existing ones unchanged."""
    few = dict(recipes.bulk_structures(0, variants=1))
    many = dict(recipes.bulk_structures(0, variants=3))
    for key, atoms in few.items():
        assert np.array_equal(atoms.positions, many[key].positions), key


def test_keys_are_unique_and_name_their_family(structures):
    keys = [k for k, _ in structures]
    assert len(set(keys)) == len(keys)
    assert {recipes.family_of(k) for k in keys} == set(recipes.FAMILIES)
    for key, atoms in structures:
        assert atoms.info["family"] == recipes.family_of(key)


def test_sizes_and_counts_meet_the_issue(structures):
    fam = collections.Counter(recipes.family_of(k) for k, _ in structures)
    sizes = np.array([len(a) for _, a in structures])
    assert len(structures) >= 600
    assert np.sum((sizes >= 8) & (sizes <= 32)) >= 150
    assert sizes.max() <= 32 and sizes.min() >= 2
    assert fam["slab"] + fam["sheet"] >= 40


def test_element_coverage(structures):
    elements = {s for _, a in structures for s in a.get_chemical_symbols()}
    assert len(elements) >= 45
    assert set("H Li B C N O F Na Mg K Ca".split()) <= elements
    assert len(elements & TRANSITION_METALS) >= 6
    assert PBE_MINI <= elements
    assert not elements & set("Cr Mn Fe Co Ni".split())  # magnetic in PBE: out of scope


def test_geometry_is_sane(structures):
    """No two atoms closer than 0.6 × the sum of covalent radii (check_geometry), rattle
    σ ≤ 0.15 Å, and bulk strain within ±4 % of the prototype cell."""
    for key, atoms in structures:
        recipes.check_geometry(key, atoms)
        assert 0 < atoms.info["rattle_sigma_A"] <= 0.15
    for p in recipes.BULK:
        key = f"bulk-{p.formula}-{p.kind}-00"
        atoms = dict(structures)[key]
        eps = np.linalg.solve(recipes.prototype_cell(p).cell.array, atoms.cell.array) - np.eye(3)
        assert np.abs(eps).max() <= 0.04 + 1e-9, key


def test_slabs_and_sheets_have_vacuum_and_open_z(structures):
    planar = [(k, a) for k, a in structures if recipes.family_of(k) in ("slab", "sheet")]
    assert planar
    for key, atoms in planar:
        assert list(atoms.pbc) == [True, True, False], key
        assert recipes.vacuum_gap(atoms) >= recipes.MIN_VACUUM_A, key
        assert gen.vacuum_gap_A(atoms, 2) == pytest.approx(recipes.vacuum_gap(atoms), abs=1e-6)
        # the cell's z vector is normal to the plane (vacuum measured along z is real)
        assert (
            np.abs(atoms.cell.array[2, :2]).max() < 1e-9 and np.abs(atoms.cell[:2, 2]).max() < 1e-9
        )
    for key, atoms in structures:
        if recipes.family_of(key) not in ("slab", "sheet"):
            assert atoms.pbc.all(), key


def test_smearing_where_the_structure_may_be_metallic(structures):
    """Odd electron counts, defects and surfaces always get Fermi smearing; a closed-shell
    insulator prototype does not."""
    for key, atoms in structures:
        smeared = "smearing_eV" in atoms.info.get(gen.PER_STRUCTURE_KWARGS, {})
        if recipes.valence_electrons(atoms) % 2 or recipes.family_of(key) == "slab":
            assert smeared, key
    assert "smearing_eV" not in dict(structures)["bulk-NaCl-rocksalt-00"].info.get(
        gen.PER_STRUCTURE_KWARGS, {}
    )


def test_interstitial_and_vacancy_change_the_atom_count():
    sc = dict(recipes.supercell_structures(0))
    parents = {f"{recipes.bulk_by_name(n).formula}-{recipes.bulk_by_name(n).kind}": (n, r)
               for n, r, _ in recipes.SUPERCELL_PARENTS}  # fmt: skip
    checked = 0
    for key, atoms in sc.items():
        name, defect = key.split("-")[1] + "-" + key.split("-")[2], key.split("-")[3]
        parent_name, reps = parents[name]
        n0 = len(
            recipes.prototype_cell(recipes.bulk_by_name(parent_name), conventional=True) * reps
        )
        expected = {"vacancy": n0 - 1, "interstitial": n0 + 1}.get(defect, n0)
        assert len(atoms) == expected, key
        checked += 1
    assert checked == len(sc)


# ----------------------------------------------------------------------------- slabs in the generator
def test_kmeshes_of_a_slab_are_one_along_the_open_axis():
    cell = np.diag([3.0, 3.0, 25.0])
    assert gen.scf_kmesh(cell, 0.5, (True, True, False))[2] == 1
    assert gen.scf_kmesh(cell, 0.5)[2] == 1  # 25 Å: one point anyway
    assert gen.scf_kmesh(np.diag([3.0, 3.0, 4.0]), 0.5, (True, True, False))[2] == 1
    mesh = gen.dense_kmesh(np.diag([3.0, 3.0, 4.0]), 20.0, pbc=(True, True, False))
    assert mesh[2] == 1 and mesh[0] * 3.0 >= 20.0 and mesh[1] * 3.0 >= 20.0
    assert gen.dense_kmesh(np.diag([3.0, 3.0, 4.0]), 20.0)[2] == 5


def test_wigner_seitz_weights_ignore_the_open_axis():
    """An edge with a large z component keeps weight 1 in a slab (no image along z), while
    the 3-D periodic reading would give its shorter image the weight."""
    cell = np.diag([3.0, 3.0, 10.0])
    vec = np.array([[0.0, 0.0, 6.0]])
    assert gen.wigner_seitz_weights(vec, cell, (4, 4, 1))[0] == 0.0
    assert gen.wigner_seitz_weights(vec, cell, (4, 4, 1), pbc=(True, True, False))[0] == 1.0


def test_run_scf_refuses_a_slab_without_enough_vacuum():
    atoms = Atoms("Si2", positions=[[0, 0, 0], [1.3, 1.3, 1.3]], cell=np.diag([3.8, 3.8, 8.0]),
                  pbc=(True, True, False))  # fmt: skip
    with pytest.raises(ValueError, match="vacuum there is only 6.70 Å"):
        gen.run_scf(atoms, key="thin")


def _generate_script():
    spec = importlib.util.spec_from_file_location(
        "generate_dataset", ROOT / "scripts/generate_dataset.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_preset_skips_structures_with_a_missing_element_and_names_it(monkeypatch):
    script = _generate_script()
    table = dict(script.KE_CUTOFF_HA)
    table.pop("Si", None)
    monkeypatch.setattr(script, "KE_CUTOFF_HA", table)
    kept, skipped = script.main_structures(0)
    assert "element Si" in skipped["bulk-Si-diamond-00"]
    assert all("Si" not in a.get_chemical_symbols() for _, a in kept)
    assert {k for k, _ in kept}.isdisjoint(skipped)


def test_main_order_puts_every_family_first():
    script = _generate_script()
    kept, _ = script.main_structures(0)
    first = {recipes.family_of(k) for k, _ in kept[: 3 * len(recipes.FAMILIES)]}
    assert first == {recipes.family_of(k) for k, _ in kept}
    rest = [(int(k[-2:]), script.main_cost(a)) for k, a in kept[3 * len(recipes.FAMILIES) :]]
    assert rest == sorted(rest)  # variant-major, cheapest first within a variant


@pytest.mark.slow
def test_sheet_record_end_to_end(tmp_path):
    """Graphene (pbc false along z) through PySCF: edges never cross the vacuum, the
    record keeps pbc, band k-points have k_z = 0, and the stored blocks reproduce PySCF's
    bands."""
    from foundation.data.record import HamiltonianRecord

    key, atoms = next(
        s for s in recipes.sheet_structures(0) if s[0] == "sheet-graphene-graphene-00"
    )
    record = gen.compute_record(atoms, key=key, kspacing=1.0, alias_margin_A=6.0,
                                smearing_eV=0.1, conv_tol=1e-7)  # fmt: skip
    assert list(record.pbc) == [True, True, False]
    assert np.all(record.edges[:, 4] == 0)
    assert record.meta["kmesh"][2] == 1 and record.meta["dense_kmesh"][2] == 1
    assert np.all(np.asarray(record.meta["dft_bands"]["kpts_frac"])[:, 2] == 0)
    assert record.meta["band_error_meV"]["occupied"] < 1.0  # 9 Å cutoff: 0.004 meV measured
    assert 0 < record.meta["cpu_seconds"]["scf"] and 0 < record.meta["cpu_seconds"]["hamiltonian"]
    record.save(tmp_path / key)
    assert list(HamiltonianRecord.load(tmp_path / key).pbc) == [True, True, False]


@pytest.mark.slow
def test_main_split_policy_holds_on_the_structure_list(tmp_path):
    """`pack_main` on stand-in records of every structure (its key and atoms, random geometry
    and blocks, no SCF): the held-out compositions and families leave every element with
    training structures (write_shards refuses otherwise), each holds structures out, and the
    manifest reports families, sizes, skipped and failed structures."""
    import json

    from foundation.basis import BasisSet
    from foundation.data.synthetic import random_record

    script = _generate_script()
    structures = recipes.main_structures(script.SEED)
    elements = sorted({s for _, a in structures for s in a.get_chemical_symbols()})
    basis = BasisSet.from_spec({el: "1s" for el in elements})
    meta = {"band_error_meV": {"occupied": 0.5, "first_empty": 1.0},
            "seconds": {"scf": 10.0, "hamiltonian": 2.0}}  # fmt: skip
    for i, (key, atoms) in enumerate(structures[1:]):  # the first one "failed"
        random_record(key, atoms.get_chemical_symbols(), seed=i, basis=basis, cutoff_A=2.5,
                      meta=meta).save(tmp_path / "records" / key)  # fmt: skip
    failed = {structures[0][0]: "SCFNotConverged: test"}
    (tmp_path / "records" / "failures.json").write_text(json.dumps(failed))
    manifest = script.pack_main(structures, tmp_path / "records", tmp_path / "ds", script.SEED,
                                {"bulk-X-fcc-00": "element X is not in basis"})  # fmt: skip
    policy = manifest["split_policy"]
    assert set(policy["held_out_counts"]) == set(script.MAIN_TEST_COMPOSITIONS)
    assert all(n > 0 for n in policy["held_out_counts"].values())
    assert policy["held_out_family_counts"] == {"slab-*-rocksalt-*": 6, "sheet-*-1T-*": 30}
    gen_info = manifest["generation"]
    assert gen_info["failed"] == failed and gen_info["pending"] == []
    assert gen_info["skipped"] == {"bulk-X-fcc-00": "element X is not in basis"}
    assert set(manifest["families"]) == set(recipes.FAMILIES)
    assert sum(f["structures"] for f in manifest["families"].values()) == len(structures) - 1
    assert manifest["atoms_per_structure"]["8-32"] >= 150
    saved_elements = {s for _, a in structures[1:] for s in a.get_chemical_symbols()}
    assert set(manifest["band_error_meV_by_element"]) == saved_elements


def test_band_error_summary_skips_records_without_an_empty_band():
    """A record whose minimal basis is full (first_empty None) counts in the occupied window
    only; a group with no empty band at all reports None instead of failing the manifest."""
    summary = _generate_script().band_error_summary
    metas = {"a": {"band_error_meV": {"occupied": 3.0, "first_empty": None}},
             "b": {"band_error_meV": {"occupied": 1.0, "first_empty": 7.0}}}  # fmt: skip
    out = summary(metas)
    assert out["occupied"] == {"median": 2.0, "max": 3.0, "worst_key": "a"}
    assert out["first_empty"] == {"median": 7.0, "max": 7.0, "worst_key": "b"}
    assert summary({"a": metas["a"]})["first_empty"] == {
        "median": None,
        "max": None,
        "worst_key": None,
    }
