"""foundation-predict: checkpoint loading, structure errors, DeepH output, bands files.

Uses an untrained tiny model (the physics of its output is not the point here: shapes,
files, round trips and messages are).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.build import bulk

from foundation import keys
from foundation.basis import BasisSet
from foundation.data.formats.deeph import read_deeph
from foundation.physics import predict as P
from foundation.physics.kspace import BlochHamiltonian

ROOT = Path(__file__).resolve().parents[1]
SHARDS = ROOT / "data_shards" / "pbe_mini"
TINY = {
    "cutoff_A": 4.0,
    "num_layers": 1,
    "irreps_node": "4x0e+4x0o+2x1o+2x1e+2x2e+2x2o",
    "sh_lmax": 2,
    "radial_hidden": 8,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from foundation.model import build_model
    from foundation.train.checkpoint import export_inference_checkpoint

    torch.manual_seed(0)
    model = build_model(TINY, basis=BasisSet.from_pyscf("gth-szv-molopt-sr", ["Si", "C"]))
    return export_inference_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def si_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "Si.cif"
    bulk("Si").write(path)
    return path


def test_malformed_structure_file_names_file_and_fix(tmp_path, checkpoint, capsys):
    bad = tmp_path / "broken.cif"
    bad.write_text("data_x\n_cell_length_a 5.4\nloop_\n_atom_site_label\n")
    with pytest.raises(P.PredictError) as exc:
        P.read_structure(bad)
    msg = str(exc.value)
    assert str(bad) in msg and "ASE could not read" in msg and "Fix:" in msg
    assert P.main([str(checkpoint), str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "broken.cif" in capsys.readouterr().err
    with pytest.raises(P.PredictError, match="no such structure file"):
        P.read_structure(tmp_path / "missing.vasp")


def test_not_a_checkpoint_is_refused(tmp_path):
    junk = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, junk)
    with pytest.raises(P.PredictError, match="neither an exported inference checkpoint"):
        P.load_model(junk)


def test_lightning_checkpoint_loads_like_export(tmp_path, checkpoint):
    payload = torch.load(checkpoint, weights_only=True)
    meta = {k: payload[k] for k in ("model_config", "basis", "elements", "units")}
    lightning = {
        "state_dict": {f"model.{k}": v for k, v in payload["state_dict"].items()},
        "foundation": meta,
    }
    torch.save(lightning, tmp_path / "last.ckpt")
    a, b = P.load_model(checkpoint), P.load_model(tmp_path / "last.ckpt")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_predicted_record_and_deeph_round_trip(tmp_path, checkpoint):
    model = P.load_model(checkpoint)
    atoms = bulk("Si", cubic=True)
    record, timings = P.predict_record(model, atoms, key="si8", progress=False)
    # default --overlap exact: the basis' tables equal PySCF's cell integrals
    exact_err = np.abs(record.s - P.analytic_overlap(atoms, model.basis, record.edges)).max()
    assert record.meta["overlap"] == "exact" and exact_err < 1e-12
    assert record.meta[keys.N_ELECTRONS] == 32  # GTH-PBE Si: 4 valence electrons
    record.validate()  # shapes + hermiticity of the model output
    # edge chunks give the same blocks as one chunk (float32 model: up to float32 rounding;
    # test_chunked_inference_equals_forward checks the chunking in float64)
    small, _ = P.predict_record(model, atoms, key="si8", edge_chunk=37, progress=False)
    np.testing.assert_allclose(small.h, record.h, rtol=0, atol=1e-6 * np.abs(record.h).max())
    from foundation.data.formats.deeph import write_deeph

    write_deeph(record, tmp_path / "deeph")
    back = read_deeph(tmp_path / "deeph", basis=record.basis)
    np.testing.assert_array_equal(back.edges, record.edges)
    np.testing.assert_allclose(back.absolute_h(), record.absolute_h(), atol=1e-5)
    np.testing.assert_allclose(back.s, record.s, atol=1e-6)
    k = np.array([[0.1, 0.2, 0.3], [0, 0, 0]])
    np.testing.assert_allclose(
        BlochHamiltonian.from_record(back).eigenvalues(k),
        BlochHamiltonian.from_record(record).eigenvalues(k),
        atol=1e-4,
    )


def _real_structure() -> tuple[BasisSet, Atoms]:
    """The first training structure of pbe_mini and the dataset's basis, or a rattled SiC
    crystal with the Si/C basis when the shards are absent."""
    if (SHARDS / "manifest.json").is_file():
        from foundation.data.shards import iter_records, read_manifest

        rec = next(iter_records(SHARDS, "train"))
        atoms = Atoms(numbers=rec.numbers, positions=rec.positions, cell=rec.cell, pbc=rec.pbc)
        return BasisSet.from_dict(read_manifest(SHARDS)["basis"]), atoms
    atoms = bulk("SiC", "zincblende", a=4.36) * (2, 1, 1)
    atoms.rattle(0.05, seed=0)
    return BasisSet.from_pyscf("gth-szv-molopt-sr", ["Si", "C"]), atoms


def test_chunked_inference_equals_forward():
    """`predict_chunks` (backbone and heads run on runs of edges; reverse edges and on-site
    edges fall in other chunks) gives the blocks of the one-shot forward, in float64."""
    from foundation.data.graph import structure_to_graph
    from foundation.model import build_model
    from foundation.model.backbone import edge_slices
    from foundation.rotations import double_precision

    basis, atoms = _real_structure()
    torch.manual_seed(0)
    cfg = yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text())
    with double_precision():
        model = build_model(cfg, basis=basis, cutoff_A=5.0, optimize_einsums=False).double()
    graph = structure_to_graph(
        atoms.numbers, atoms.positions, atoms.cell[:], atoms.pbc, model.universal, 5.0,
        dtype=torch.float64,
    )  # fmt: skip
    n_edges = graph[keys.EDGE_INDEX].shape[1]
    with torch.no_grad():
        full = model(graph)
    for chunk in (37, 101, n_edges):
        parts = list(model.predict_chunks(graph, chunk))
        assert [sl for sl, _ in parts] == edge_slices(n_edges, chunk)
        for name, blocks in full.items():
            chunked = torch.cat([out[name] for _, out in parts])
            err = (chunked - blocks).abs().max().item()
            assert err <= 1e-12 * blocks.abs().max().item(), (chunk, name, err)
    assert len(list(model.predict_chunks(graph, 37, names=[keys.H]))[0][1]) == 1
    with pytest.raises(ValueError, match="edge_chunk must be a positive"):
        edge_slices(10, 0)


def test_model_without_overlap_head_uses_the_exact_overlap(checkpoint):
    """The S head is optional: the default exact overlap needs only the basis; asking for
    the model's S is refused with the fix."""
    model = P.load_model(checkpoint)
    del model.heads[keys.S]
    with pytest.raises(P.PredictError, match="no overlap head.*--overlap exact"):
        P.predict_record(model, bulk("Si"), overlap="model", progress=False)
    record, _ = P.predict_record(model, bulk("Si"), progress=False)
    record.validate()


def test_basis_that_cannot_be_integrated_names_the_fallback(checkpoint):
    model = P.load_model(checkpoint)
    model.basis = BasisSet(name="deeptb:custom", shells=dict(model.basis.shells))
    with pytest.raises(P.PredictError, match="deeptb:custom.*--overlap model"):
        P.predict_record(model, bulk("Si"), progress=False)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("nan", "atom\\(s\\) \\[1\\] have non-finite coordinates"),
        ("close", "atoms 0 \\(Si\\) and 1 \\(Si\\) are 0.300 Å apart"),
        ("fractional", "fractional coordinates read as Cartesian"),
    ],
)
def test_bad_geometry_is_refused_naming_the_file_and_atoms(
    tmp_path, checkpoint, capsys, edit, message
):
    """NaN coordinates, atoms on top of each other, fractional coordinates written as
    Cartesian Å: exit status 2 and a message naming the file, the atoms and the fix."""
    atoms = bulk("Si", cubic=True)
    if edit == "nan":
        atoms.positions[1, 0] = np.nan
    elif edit == "close":
        atoms.positions[1] = atoms.positions[0] + [0.3, 0.0, 0.0]
    else:
        atoms.positions = atoms.get_scaled_positions()  # 0…1 written where Å belong
    path = tmp_path / "bad.xyz"
    atoms.write(path, format="extxyz")
    assert P.main([str(checkpoint), str(path), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and re.search(message, err), err


def test_unknown_element_is_refused(checkpoint):
    with pytest.raises(P.PredictError, match="Fe.*unknown"):
        P.predict_record(P.load_model(checkpoint), bulk("Fe"), progress=False)


def test_cli_writes_bands_dos_deeph_and_compares(tmp_path, checkpoint, si_file, capsys):
    # the reference: the model's own prediction of the same structure, saved as a record
    model = P.load_model(checkpoint)
    atoms = P.read_structure(si_file)
    ref, _ = P.predict_record(model, atoms, key="ref", progress=False)
    ref.save(tmp_path / "ref")
    out = tmp_path / "out"
    rc = P.main(
        [str(checkpoint), str(si_file), "-o", str(out),
         "--compare", str(tmp_path / "ref"), "--no-progress", "--kspacing", "0.5"]
    )  # fmt: skip
    assert rc == 0
    for name in ("bands.png", "dos.png", "bands.json", "summary.json", "deeph/element.dat"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compare"]["band_errors"]["all_max_meV"] < 1e-3  # same H → no error
    assert "E_F =" in capsys.readouterr().out


def test_cli_large_cell_path_kpm_and_eigenpairs(tmp_path, checkpoint, si_file):
    """--supercell 2 2 2 above --dense-max-orbitals: KPM DOS/E_F files, and the eigenpairs
    near E_F equal the dense Γ eigenvalues of the written DeepH folder."""
    import scipy.linalg

    from foundation.data.formats.deeph import read_deeph
    from foundation.physics.kspace import BlochHamiltonian

    out = tmp_path / "big"
    rc = P.main(
        [str(checkpoint), str(si_file), "-o", str(out), "--supercell", "2", "2", "2",
         "--dense-max-orbitals", "4", "--n-eigs", "6", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    fermi, lc = summary["fermi"], summary["large_cell"]
    assert summary["n_atoms"] == 16 and "Γ point only" in fermi["note"]
    assert (out / "dos_kpm.png").stat().st_size > 5_000
    dos = json.loads((out / "dos_kpm.json").read_text())
    assert dos["idos_per_spin"][-1] == pytest.approx(summary["n_orbitals"], rel=0.05)
    ham = BlochHamiltonian.from_record(read_deeph(out / "deeph"))
    w = scipy.linalg.eigh(ham.hk((0, 0, 0)), ham.sk((0, 0, 0)), eigvals_only=True)
    ef = fermi["fermi_level_eV"]
    nearest = np.sort(w[np.argsort(np.abs(w - ef))[:6]])
    np.testing.assert_allclose(lc["eigs"]["values_eV"], nearest, atol=1e-6)
    assert set(lc["timings_s"]) == {"assemble", "dos_fermi_kpm", "eigs_near_fermi"}
